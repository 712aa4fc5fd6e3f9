"""Text to image (or image to image, --image) in one request: a BLS pipeline model runs
the whole loop inside Triton."""

from pathlib import Path

from pipelines.bls import BlsPipeline
from utils.cli import add_generation_arguments, generate_and_save, main_entry, script_parser
from utils.grpc_client import DEFAULT_URL


def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address")
    parser.add_argument("--output", default=Path("outputs/bls.png"), type=Path)
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    generate_and_save(BlsPipeline(args.url), args)


if __name__ == "__main__":
    main_entry(main)
