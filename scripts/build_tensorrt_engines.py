"""Build one TensorRT engine per network with trtexec (fp16, the specs' batch profiles).

Reads <repository>/<network>/1/model.onnx (written by step P3; the repository defaults to
triton/production), writes <repository>/<network>/2/model.plan and, next to it, engine.json: the
TensorRT version, GPU and compute capability it was built for.
Runs trtexec directly where it is on PATH (inside the export image), or through that image
with --docker. Serve the result with the configs of `move_onnx_models_to_triton.py --backend tensorrt`.
"""

import shlex
import shutil
from pathlib import Path

from tqdm import tqdm

from utils import specs
from utils.cli import main_entry, script_parser
from utils.deployment import served_sizes
from utils.docker import export_command
from utils.repository.engines import (DEFAULT_TIMING_CACHE, ENGINE_PRECISIONS, build_engine, plan_path, served_dims,
                                      tensorrt_networks, trtexec_command)
from utils.errors import UsageError
from utils.layout import PRODUCTION_REPOSITORY


def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--repository", default=PRODUCTION_REPOSITORY, type=Path,
                        help=f"a repository written with --backend tensorrt (default {PRODUCTION_REPOSITORY})")
    parser.add_argument("--precision", default="fp16", choices=ENGINE_PRECISIONS)
    parser.add_argument("--timing-cache", default=DEFAULT_TIMING_CACHE, type=Path,
                        help="reused across builds: later builds of similar layers are much faster")
    parser.add_argument("--network", action="append", metavar="NAME",
                        help="build only this network, by its served name: text_encoder, unet, vae_encoder, "
                             "vae_decoder, a LoRA adapter's unet_NAME, a ControlNet's controlnet_NAME or controlled_unet "
                             "(repeatable); default: every one the "
                             "repository serves with TensorRT")
    parser.add_argument("--docker", action="store_true", help="run trtexec in the export image (docker run --gpus)")
    parser.add_argument("--force", action="store_true", help="rebuild engines that exist")
    parser.add_argument("--print-commands", action="store_true",
                        help="print each trtexec command and build nothing (needs no GPU)")
    args = parser.parse_args(argv)

    if args.docker and args.repository.is_absolute():
        raise UsageError(f"--repository {args.repository}: with --docker it must be inside this folder (mounted at "
                         f"/workspace); pass a relative path.")
    served = {network.name: network for network in tensorrt_networks(args.repository)}
    requested = args.network or list(served) or list(specs.NETWORKS)
    not_tensorrt = [name for name in requested if name not in served]
    networks = [served[name] for name in requested if name in served]
    if not_tensorrt:  # an engine there would never be loaded
        raise UsageError(
            f"{args.repository} does not serve {', '.join(not_tensorrt)} with TensorRT (its config.pbtxt "
            f"has no platform tensorrt_plan). Write a TensorRT repository first: python "
            f"scripts/move_onnx_models_to_triton.py --backend tensorrt --repository {args.repository} (same --model).")
    # The sizes of the checkpoint the repository serves (step 3 copied its config files), and the
    # image sizes it was written for (--image-sizes): the profiles' spatial range.
    dims = served_dims(args.repository)
    sizes = served_sizes(args.repository, specs.TEXT_TO_IMAGE.name, dims)
    dims_of = {network.name: served_dims(args.repository, network) for network in networks}  # SDXL's refiner: its own
    wrap = export_command if args.docker else (lambda command: command)
    if args.print_commands:
        for network in networks:
            print("$ " + shlex.join(wrap(trtexec_command(network, dims_of[network.name], args.repository,
                                                         args.precision, args.timing_cache, sizes=sizes))))
        return
    if not args.docker and shutil.which("trtexec") is None:
        raise UsageError("trtexec is not on PATH. Run this inside the export image "
                         "(`make engines` does), or pass --docker to run it there.")
    for network in tqdm(networks, desc="engines", unit="engine"):
        plan = plan_path(args.repository, network)
        if plan.exists() and not args.force:
            tqdm.write(f"{network.name}: {plan} exists, skipped (pass --force to rebuild)")
            continue
        log_file = Path("engines/logs") / f"{network.name}.log"
        built = build_engine(network, dims_of[network.name], args.repository, log_file, args.precision,
                             args.timing_cache, wrap, sizes=sizes)
        tqdm.write(f"{network.name}: wrote {plan} (TensorRT {built.tensorrt_version}, {built.gpu_name}, "
                   f"compute capability {built.compute_capability})")


if __name__ == "__main__":
    main_entry(main)
