"""Put the exported ONNX files into the Triton model repository, with their configs.

Copies onnx/<model>/<network>.onnx to triton/models/<network>/1/model.onnx, prepares 2/ for a
TensorRT engine, writes each config.pbtxt from utils/specs.py for the chosen backend, and gives
the pipeline models the tokenizer and scheduler files of the same checkpoint. Each LoRA adapter
(--lora NAME=PATH, exported by optim/convert_unet_to_onnx.py --lora) becomes a UNet of its own,
triton/models/unet_<name>/.
"""

from pathlib import Path

from utils.cli import add_deployment_arguments, deployment_from_args, main_entry, script_parser
from utils.export import DEFAULT_ONNX_DIR, served_onnx_files
from utils.families import family_of
from utils.layout import DEFAULT_REPOSITORY
from utils.model_dims import ModelDims
from utils.models import DEFAULT_MODELS_DIR, resolve_model
from utils.repository.writer import write_repository


def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--model", default="tiny", help="the model the ONNX files were exported from (default: tiny)")
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, type=Path)
    parser.add_argument("--onnx-dir", default=DEFAULT_ONNX_DIR, type=Path)
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY, type=Path, help="Triton model repository")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist with other content")
    add_deployment_arguments(parser)
    args = parser.parse_args(argv)
    deployment = deployment_from_args(args)

    # The exported graphs carry the weights: only the torch runtime serves the checkpoint's own.
    model_dir = resolve_model(args.model, args.models_dir, weights=deployment.torch_runtime)
    onnx_files = served_onnx_files(args.onnx_dir, args.model, model_dir, deployment.adapters, args.models_dir,
                                   deployment.control_networks(), deployment.refiner)
    report = write_repository(args.repository, model_dir, onnx_files, deployment, force=args.force,
                              models_dir=args.models_dir)
    for path in report.written:
        print(f"wrote     {path}")
    runtime = f", runtime: {deployment.runtime} on {deployment.device}" if deployment.backend == "python" else ""
    family = family_of(ModelDims.from_pretrained(model_dir)).title + (" and its refiner" if deployment.refiner else "")
    print(f"{len(report.unchanged)} files already up to date; repository ready: {args.repository} "
          f"(backend: {deployment.backend}{runtime}); it serves {family}")


if __name__ == "__main__":
    main_entry(main)
