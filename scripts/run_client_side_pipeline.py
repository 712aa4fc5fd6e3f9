"""Text to image (or image to image, --image), orchestrated by this client: each network
is a gRPC call to Triton."""

from pathlib import Path

from pipelines.client_side import ClientSidePipeline
from utils.cli import add_generation_arguments, generate_and_save, main_entry, script_parser
from utils.grpc_client import DEFAULT_URL
from utils.models import DEFAULT_MODELS_DIR, resolve_model


def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address")
    parser.add_argument("--model", default="tiny", help="the model served (its tokenizer and scheduler are used here)")
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, type=Path)
    parser.add_argument("--output", default=Path("outputs/client_side.png"), type=Path)
    parser.add_argument("--gpu", type=int, default=None,
                        help="on a server with a copy of each network per GPU (--gpus 0,1): call GPU N's copies")
    parser.add_argument("--refiner", default=None,
                        help="SDXL's refiner the server serves (its tokenizer and scheduler), for --high-noise-frac")
    add_generation_arguments(parser)
    args = parser.parse_args(argv)

    model_dir = resolve_model(args.model, args.models_dir, weights=False)  # the tokenizer and configs
    refiner = args.refiner and resolve_model(args.refiner, args.models_dir, weights=False)
    pipeline = ClientSidePipeline(model_dir, args.url, gpu=args.gpu, refiner=refiner)
    generate_and_save(pipeline, args)


if __name__ == "__main__":
    main_entry(main)
