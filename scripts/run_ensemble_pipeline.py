"""Text to image (or image to image, --image) through a Triton ensemble: encode_prompt ->
denoise -> decode, a graph Triton runs itself, in one request."""

from pathlib import Path

from pipelines.ensemble import EnsemblePipeline
from utils.cli import add_generation_arguments, generate_and_save, main_entry, script_parser
from utils.grpc_client import DEFAULT_URL


def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address")
    parser.add_argument("--output", default=Path("outputs/ensemble.png"), type=Path)
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    generate_and_save(EnsemblePipeline(args.url), args)


if __name__ == "__main__":
    main_entry(main)
