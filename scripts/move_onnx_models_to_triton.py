"""Step 3: put the exported ONNX files into the Triton model repository, with their configs.

Copies onnx/<model>/<network>.onnx to triton/models/<network>/1/model.onnx, prepares 2/ for a
TensorRT engine, writes each config.pbtxt from utils/specs.py for the chosen backend, and gives
the pipeline models the tokenizer and scheduler files of the same checkpoint.
"""

import argparse
from pathlib import Path

from utils import configs, specs
from utils.cli import add_placement_arguments, placement_from_args
from utils.export import DEFAULT_ONNX_DIR, onnx_path
from utils.models import DEFAULT_MODELS_DIR, resolve_model
from utils.repository import write_repository

DEFAULT_REPOSITORY = Path("triton/models")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="the model the ONNX files were exported from (default: tiny)")
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, type=Path)
    parser.add_argument("--onnx-dir", default=DEFAULT_ONNX_DIR, type=Path)
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY, type=Path, help="Triton model repository")
    parser.add_argument("--backend", default="python", choices=configs.BACKENDS,
                        help="what serves the networks: python (ONNX Runtime in the Python backend, no Docker), "
                             "onnxruntime or tensorrt (NGC Triton image)")
    parser.add_argument("--runtime", default="onnxruntime", choices=configs.RUNTIMES,
                        help="python backend only: onnxruntime (1/model.onnx, CPU) or torch (the checkpoint's "
                             "weights; the GPU runtime with CUDA graphs and dynamic batching)")
    parser.add_argument("--device", default="cpu", help="torch runtime: cpu or cuda")
    parser.add_argument("--precision", default=None, choices=["FP32", "FP16"],
                        help="torch runtime: default FP16 on cuda, FP32 on cpu (ONNX files carry their own)")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist with other content")
    add_placement_arguments(parser)
    args = parser.parse_args(argv)
    try:
        placement = placement_from_args(args)
    except ValueError as error:
        parser.error(str(error))

    # The exported graphs carry the weights: only the torch runtime serves the checkpoint's own.
    model_dir = resolve_model(args.model, args.models_dir, weights=args.runtime == "torch")
    onnx_files = {name: onnx_path(args.onnx_dir, args.model, name) for name in specs.NETWORKS}
    report = write_repository(args.repository, model_dir, onnx_files, backend=args.backend, force=args.force,
                              runtime=args.runtime, device=args.device, precision=args.precision,
                              placement=placement, pipeline_environment=args.pipeline_environment,
                              torch_compile=tuple(args.torch_compile))
    for path in report.written:
        print(f"wrote     {path}")
    runtime = f", runtime: {args.runtime} on {args.device}" if args.backend == "python" else ""
    print(f"{len(report.unchanged)} files already up to date; repository ready: {args.repository} "
          f"(backend: {args.backend}{runtime})")


if __name__ == "__main__":
    main()
