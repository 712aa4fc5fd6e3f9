"""Step 6: text to image in one request: the BLS pipeline model runs the loop inside Triton."""

import argparse
from pathlib import Path

from pipelines.bls import BlsPipeline
from utils.cli import add_generation_arguments, generate_and_save


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--output", default=Path("outputs/bls.png"), type=Path)
    add_generation_arguments(parser)
    args = parser.parse_args(argv)

    pipeline = BlsPipeline(args.url)
    generate_and_save(pipeline, args)


if __name__ == "__main__":
    main()
