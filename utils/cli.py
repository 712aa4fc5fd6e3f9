"""Command-line pieces shared by the scripts: the deployment flags, generation options, saving
images, and the entry wrapper that applies the project's error policy."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from utils import specs
from utils.deployment import (BACKENDS, GPU_PIPELINE_INSTANCES, PIPELINE_INSTANCES, PIPELINE_LOOPS, RUNTIMES,
                              Deployment, Placement)
from utils.errors import UsageError, UserError
from utils.families import SD, SDXL, family_of
from utils.controlnet import AS_SENT, CONTROL_MODES, ServedControlNet
from utils.lora import LoraAdapter
from utils.request import (DEFAULT_INPAINT_STRENGTH, DEFAULT_NUM_INFERENCE_STEPS,
                           DEFAULT_STRENGTH, SCHEDULERS, default_strength)
from utils.specs import PRECISIONS

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"

# The generation flags, each defined once, named as diffusers names the argument
# (--num-inference-steps for num_inference_steps); a script takes all of them or the few it needs.
GENERATION_FLAGS: dict[str, tuple[tuple[str, ...], dict]] = dict(
    prompt=(("--prompt",), dict(default=DEFAULT_PROMPT)),
    negative_prompt=(("--negative-prompt",), dict(default=None)),
    num_inference_steps=(("--num-inference-steps", "--steps"),
                         dict(type=int, default=DEFAULT_NUM_INFERENCE_STEPS,
                              help="denoising steps (--steps for short)")),
    guidance_scale=(("--guidance-scale",), dict(type=float, default=None, help=(
        f"classifier-free guidance (default: the model family's, as diffusers': {SD.default_guidance_scale:g} for "
        f"SD1.x, {SDXL.default_guidance_scale:g} for SDXL)"))),
    cfg_cutoff_step_ratio=(("--cfg-cutoff-step-ratio",), dict(
        type=float, default=None, help="stop guidance after this fraction of the steps, in [0, 1] (default: never)")),
    seed=(("--seed",), dict(type=int, default=0)),
    clip_skip=(("--clip-skip",), dict(type=int, default=None, help=(
        "condition on the text encoder's layer this many before the last (diffusers' clip_skip; 1 is A1111's "
        "'clip skip 2'; default: the last)"))),
    scheduler=(("--scheduler",), dict(default=None, choices=SCHEDULERS,
                                      help="a diffusers scheduler class (default: the checkpoint's own)")),
    num_images_per_prompt=(("--num-images-per-prompt",), dict(type=int, default=1)),
    height=(("--height",), dict(type=int, default=None,
                                help="text to image: the image's height in pixels (default: the checkpoint's)")),
    width=(("--width",), dict(type=int, default=None, help="text to image: the image's width in pixels")),
    image=(("--image",), dict(type=Path, default=None,
                              help="image to image: start from this picture (PNG, JPEG...; its size is the output's)")),
    mask_image=(("--mask-image",), dict(type=Path, default=None,
                                        help="inpainting, with --image: repaint where this picture is white "
                                             "(grey levels; the image's size)")),
    strength=(("--strength",), dict(type=float, default=None,
                                    help=f"image to image: how much of the image is noised away, in (0, 1] "
                                         f"(default: {DEFAULT_STRENGTH}, with --mask-image "
                                         f"{DEFAULT_INPAINT_STRENGTH})")),
    lora=(("--use-lora",), dict(nargs="+", default=[], metavar="NAME",
                                help="LoRA adapters of the deployment's (its --lora NAME=PATH) that the request "
                                     "asks for, mixed (default: none, the base weights)")),
    lora_scale=(("--lora-scale",), dict(type=float, nargs="+", default=None, metavar="WEIGHT",
                                        help="one weight per --use-lora adapter, as diffusers' set_adapters "
                                             "(default: 1 each)")),
    control_image=(("--control-image",), dict(type=Path, nargs="+", default=None, metavar="FILE", help=(
        "ControlNet, text to image: a control image per --use-controlnet (edges, depth...; or a photo with "
        "--control-mode canny); the image takes its size"))),
    controlnet=(("--use-controlnet",), dict(nargs="+", default=[], metavar="NAME", help=(
        "ControlNets of the deployment's (its --controlnet NAME=PATH) that the control images are for "
        "(default: its only one)"))),
    control_mode=(("--control-mode",), dict(nargs="+", default=[], choices=(AS_SENT, *CONTROL_MODES), help=(
        f"per control image: {AS_SENT} (as sent, the default) or canny (a photo: the server makes its edges)"))),
    controlnet_conditioning_scale=(("--controlnet-conditioning-scale",), dict(
        type=float, nargs="+", default=None, metavar="WEIGHT", help="per ControlNet, or one for all (default: 1)")),
    control_guidance_start=(("--control-guidance-start",), dict(
        type=float, nargs="+", default=None, metavar="FRACTION", help="the fraction of the steps each starts at (0)")),
    control_guidance_end=(("--control-guidance-end",), dict(
        type=float, nargs="+", default=None, metavar="FRACTION", help="and ends at (default: 1)")),
    # SDXL's (docs/sdxl.md); an SD1.5 deployment refuses them
    prompt_2=(("--prompt-2",), dict(default=None, help="SDXL: the second text encoder's prompt (default: --prompt)")),
    negative_prompt_2=(("--negative-prompt-2",), dict(default=None, help="SDXL: and its negative prompt")),
    original_size=(("--original-size",), dict(type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                                              help="SDXL's size condition (default: the image's)")),
    crops_coords_top_left=(("--crops-coords-top-left",), dict(type=int, nargs=2, default=None, metavar=("TOP", "LEFT"),
                                                              help="SDXL's crop condition (default: 0 0)")),
    target_size=(("--target-size",), dict(type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                                          help="SDXL's target size condition (default: the image's)")),
    aesthetic_score=(("--aesthetic-score",), dict(type=float, default=None, help="SDXL's refiner's (default: 6)")),
    negative_aesthetic_score=(("--negative-aesthetic-score",), dict(type=float, default=None,
                                                                    help="and its unconditional rows' (default: 2.5)")),
    high_noise_frac=(("--high-noise-frac",), dict(type=float, default=None, help=(
        "SDXL with a refiner served: the base denoises this fraction of the steps, the refiner the rest (e.g. 0.8)"))),
)
SDXL_FLAGS = tuple(t.name for t in specs.SDXL_INPUTS)
CONTROL_FLAGS = tuple(t.name for t in specs.CONTROL_INPUTS if t is not specs.CONTROL_IMAGE)  # besides the files


def script_parser(script: str, doc: str) -> argparse.ArgumentParser:
    """A script's parser, its description naming the walkthrough step it is (utils/walkthrough.py)."""
    from utils.walkthrough import describe

    return argparse.ArgumentParser(description=describe(script, doc))


def add_generation_arguments(parser: argparse.ArgumentParser, names: Iterable[str] = GENERATION_FLAGS,
                             **defaults) -> None:
    """The generation flags ``names`` (default: all), with these ``defaults`` instead of the
    pipelines' (e.g. ``num_inference_steps=10``)."""
    group = parser.add_argument_group("generation")
    for name in names:
        flags, options = GENERATION_FLAGS[name]
        group.add_argument(*flags, dest=name, **{**options, **({"default": defaults[name]} if name in defaults else {})})


def add_deployment_arguments(parser: argparse.ArgumentParser, backend: bool = True) -> None:
    """The flags of a Deployment (utils/deployment.py); ``backend=False`` where only the python
    backend can run (the benchmark serves with the local server)."""
    group = parser.add_argument_group("deployment")
    if backend:
        group.add_argument("--backend", default="python", choices=BACKENDS,
                           help="what serves the networks: python (the portable backend, no Docker), "
                                "onnxruntime or tensorrt (NGC Triton image)")
    group.add_argument("--runtime", default="onnx", choices=RUNTIMES,
                       help="inside the python backend: onnx (runs 1/model.onnx with ONNX Runtime, CPU) or torch (the checkpoint's "
                            "weights; the GPU runtime with CUDA graphs and dynamic batching)")
    group.add_argument("--device", default="cpu", help="cpu or cuda (the torch runtime's device)")
    group.add_argument("--precision", default=None, choices=PRECISIONS,
                       help="FP32 or FP16: the torch runtime's (default FP16 on cuda, FP32 on cpu); on the ONNX route "
                            "the graphs carry theirs")
    group.add_argument("--no-ensembles", dest="ensembles", action="store_false",
                       help="serve the networks and the BLS pipelines only: no ensembles and none of their "
                            "Python steps (fewer stub processes, a faster start)")
    group.add_argument("--image-sizes", type=image_sizes, default=None, metavar="MIN-MAX",
                       help="the heights and widths served, in pixels (each a multiple of 8; default: three "
                            "quarters to one and a half of the checkpoint's size, 384-768 for SD1.5). The TensorRT "
                            "engines are built for this range; requests outside it are refused")
    group = parser.add_argument_group("serving on GPUs (torch runtime on cuda)")
    group.add_argument("--gpus", default=None,
                       help="GPUs to serve on: 0, 0,1 or all (default: GPU 0). On several GPUs each network "
                            "is served once per GPU and each pipeline instance calls its own GPU's copies")
    group.add_argument("--pipeline-instances", type=int, default=None,
                       help=f"BLS pipeline instances, per GPU (default {GPU_PIPELINE_INSTANCES}) "
                            f"or on the CPU ({PIPELINE_INSTANCES})")
    group.add_argument("--pipeline-loop", default=None, choices=PIPELINE_LOOPS,
                       help="where each BLS pipeline instance keeps its loop's tensors (default cpu: the pipeline "
                            "processes stay off the GPU, which the networks then have to themselves; gpu: DLPack); "
                            "with-unet: each model that runs the loop holds a UNet of its own and batches the steps "
                            "of its requests in flight (--pipeline-instances of them), with no Triton call per step, "
                            "its tensors on the UNet's device (the fastest on one GPU with --runtime torch)")
    group.add_argument("--torch-compile", nargs="+", default=[], metavar="NETWORK",
                       help="networks the torch runtime compiles with torch.compile at load, e.g. unet vae_decoder "
                            "(controlnet: each ControlNet; controlled_unet) "
                            "(a minute or more per network, cached for restarts; pays where a network runs at every "
                            "step, and for the VAE decoder: 8.7 against 22.6 ms an image on an H100)")
    group.add_argument("--lora", dest="adapters", action="append", type=lora_argument, default=[], metavar="NAME=PATH",
                       help="serve a LoRA adapter (a diffusers LoRA .safetensors file; tiny: a random one for the tiny "
                            "model, tiny+text-encoder: with a text encoder part) that requests choose with lora=NAME: "
                            "a UNet of its own, unet_NAME, on the ONNX routes (which export it with "
                            "optim/convert_unet_to_onnx.py --lora NAME=PATH), applied in place by the torch runtime; "
                            "repeat for several")
    group.add_argument("--controlnet", dest="controlnets", action="append", type=controlnet_argument, default=[],
                       metavar="NAME=PATH", help="serve a ControlNet (a diffusers ControlNetModel folder or hub id; tiny: "
                       "a random one for the checkpoint) as controlnet_NAME, with controlled_unet, the UNet that adds "
                       "its residuals; requests name it in controlnet=NAME with a control_image (the ONNX routes export "
                       "them with optim/convert_controlnet_to_onnx.py and convert_controlled_unet_to_onnx.py); repeat "
                       "for several")
    group.add_argument("--refiner", default=None, metavar="MODEL",
                       help="SDXL's refiner (a preset such as tiny-sdxl-refiner, a folder or a hub id), served as "
                            "refiner_unet beside an SDXL --model: requests with high_noise_frac hand it their last steps "
                            "(the ONNX routes export it with optim/convert_refiner_unet_to_onnx.py --model MODEL)")
    group.add_argument("--pipeline-environment", type=Path, default=None,
                       help="a Python environment (utils/repository/environments.py) the pipeline model runs in: one with "
                            "numpy<2 where this one has numpy 2, which the 24.10 stub mangles string inputs with")


def deployment_from_args(args: argparse.Namespace) -> Deployment:
    """The Deployment the arguments ask for; a combination that cannot work is a UsageError."""
    from utils.repository.gpus import parse_gpus

    backend = getattr(args, "backend", "python")
    placement = None  # the deployment's default for its runtime and device
    if args.gpus is not None or args.pipeline_instances is not None or args.pipeline_loop is not None:
        on_gpu = Deployment(backend=backend, runtime=args.runtime, device=args.device).torch_on_gpu
        if args.gpus is not None and not on_gpu:
            raise UsageError(f"--gpus {args.gpus} needs --runtime torch --device cuda "
                             f"(got --runtime {args.runtime} --device {args.device}).")
        gpus = parse_gpus(args.gpus) if args.gpus is not None else ((0,) if on_gpu else ())
        default = GPU_PIPELINE_INSTANCES if gpus else PIPELINE_INSTANCES
        instances = default if args.pipeline_instances is None else args.pipeline_instances
        placement = Placement(gpus=gpus, pipeline_instances=instances,
                              pipeline_loop=args.pipeline_loop or Placement.pipeline_loop)
    return Deployment(backend=backend, runtime=args.runtime, device=args.device, precision=args.precision,
                      placement=placement, torch_compile=tuple(args.torch_compile),
                      pipeline_environment=args.pipeline_environment, ensembles=args.ensembles,
                      image_sizes=args.image_sizes, adapters=tuple(args.adapters),
                      controlnets=tuple(getattr(args, "controlnets", ())), refiner=getattr(args, "refiner", None))


def lora_argument(text: str) -> LoraAdapter:
    """``NAME=PATH``, as --lora takes it."""
    try:
        return LoraAdapter.parse(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def controlnet_argument(text: str) -> ServedControlNet:
    """``NAME=PATH``, as --controlnet takes it."""
    try:
        return ServedControlNet.parse(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def image_sizes(text: str) -> tuple[int, int]:
    """``MIN-MAX`` in pixels, as --image-sizes takes it (the step is checked with the checkpoint)."""
    low, separator, high = text.partition("-")
    if not (separator and low.strip().isdigit() and high.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN-MAX in pixels, e.g. 384-768")
    return int(low), int(high)


def main_entry(main: Callable[[], object]) -> None:
    """Run a script's ``main`` under the project's error policy (utils/errors.py): a user error is
    one line, ``error: ...``, exit code 2; Ctrl+C (or SIGTERM, see stop_on_sigterm) ends quietly
    with 130 once the ``finally`` blocks have stopped what the script started."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def generation_options(args: argparse.Namespace) -> dict:
    """The GenerationRequest fields from the parsed arguments."""
    options = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance_scale, cfg_cutoff_step_ratio=args.cfg_cutoff_step_ratio,
                   seed=args.seed, scheduler=args.scheduler, num_images_per_prompt=args.num_images_per_prompt,
                   lora=args.lora, lora_scale=args.lora_scale, clip_skip=getattr(args, "clip_skip", None))
    if args.image is not None:
        options.update(image=load_image(args.image), strength=args.strength)
        if getattr(args, "mask_image", None) is not None:
            options.update(mask_image=load_image(args.mask_image, grey=True, flag="--mask-image"))
    else:
        options.update(height=args.height, width=args.width)
    options.update({name: getattr(args, name) for name in SDXL_FLAGS if getattr(args, name, None) is not None})
    if hasattr(args, "control_image"):  # (its other flags go too, so that one without an image is refused by name)
        options.update({name: getattr(args, name) for name in CONTROL_FLAGS})
    if getattr(args, "control_image", None):  # one file per ControlNet, each of the image's size
        images = [load_image(path, flag="--control-image") for path in args.control_image]
        if len({image.shape for image in images}) != 1:
            raise UsageError(f"--control-image {' '.join(map(str, args.control_image))}: the images differ in size "
                             f"({', '.join('x'.join(map(str, image.shape[1:3])) for image in images)}); give each at "
                             f"the size of the image to make.")
        options.update(control_image=np.concatenate(images))
    return options


def load_image(path: Path, grey: bool = False, flag: str = "--image") -> np.ndarray:
    """An image file as uint8 RGB [1, H, W, 3], or with ``grey`` as grey levels [1, H, W] (a mask,
    converted as diffusers converts it: PIL's "L")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L" if grey else "RGB"))[None]
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(f"{flag} {path}: not an image file ({error}).") from None


def generate_and_save(pipeline, args: argparse.Namespace) -> list[Path]:
    """Run a pipeline with the command line's options; save and report its images."""
    start = time.perf_counter()
    images = pipeline(**generation_options(args))
    seconds = time.perf_counter() - start
    paths = save_images(images, args.output)
    steps = args.num_inference_steps
    if args.image is not None:  # image to image runs the last int(steps x strength) of them
        strength = args.strength if args.strength is not None else default_strength(
            getattr(args, "mask_image", None) is not None)
        steps = f"{min(int(steps * strength), steps)} of {steps} steps (strength {strength:g})"
    else:
        steps = f"{steps} steps"
    for path in paths:
        print(f"saved {path} ({images.shape[2]}x{images.shape[1]}, {steps}, {seconds:.2f} s)")
    return paths


def save_images(images: np.ndarray, path: str | Path) -> list[Path]:
    """Save uint8 images [N, H, W, 3] as PNG: path itself for one image, path-<i> for several."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = [path] if len(images) == 1 else [path.with_stem(f"{path.stem}-{i}") for i in range(len(images))]
    for image, target in zip(images, paths):
        Image.fromarray(image).save(target)
    return paths


def export_cli(network: specs.NetworkSpec, argv: list[str] | None = None):
    """The command line shared by the optim/convert_*_to_onnx.py scripts."""
    from utils.controlnet import controlnet_folder
    from utils.export import DEFAULT_ONNX_DIR, adapter_onnx_path, export_network, onnx_path
    from utils.lora import fused_model
    from utils.models import DEFAULT_MODELS_DIR, resolve_model

    axes = sorted({axis for tensor in network.dynamic_axes().values() for axis in tensor.values()})
    parser = script_parser(f"optim/convert_{network.name}_to_onnx.py",
                           f"Export the {network.name} to ONNX (dynamic axes: {', '.join(axes)}) and check it.")
    parser.add_argument("--model", default="tiny",
                        help="preset (tiny, sd15-random), local diffusers folder or hub id (default: tiny)")
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, type=Path, help="where presets are written")
    parser.add_argument("--onnx-dir", default=DEFAULT_ONNX_DIR, type=Path,
                        help="output folder; the file is <onnx-dir>/<model>/<network>.onnx")
    parser.add_argument("--precision", default="FP32", choices=specs.PRECISIONS,
                        help="FP32 for the CPU default, FP16 for GPU engines (fast with --device cuda; "
                             "a CPU works too, slowly)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--external-data", action="store_true",
                        help="keep the weights in <network>.onnx.data beside the graph at any size "
                             "(graphs over 2 GB always do)")
    parser.add_argument("--force", action="store_true", help="export again even if the file exists")
    if network is specs.UNET:
        parser.add_argument("--lora", dest="adapters", action="append", type=lora_argument, default=[],
                            metavar="NAME=PATH", help="also export the UNet with this LoRA adapter fused in, as "
                                                      "unet_NAME-<hash>.onnx (repeat for several; tiny: a random one)")
    if network is specs.CONTROLNET:
        parser.add_argument("--controlnet", dest="controlnets", action="append", type=controlnet_argument,
                            required=True, metavar="NAME=PATH", help="the ControlNet to export, as controlnet_NAME.onnx "
                            "(a ControlNetModel folder or hub id; tiny: a random one; repeat for several)")
    args = parser.parse_args(argv)
    model_dir = resolve_model(args.model, args.models_dir)
    # The network as the checkpoint's family has it (SDXL's UNet takes the added conditions)
    network = specs.served_network(network.name, family_of(specs.ModelDims.from_pretrained(model_dir)))
    # (label, the network as served, its source checkpoint, its own weights' folder, the output)
    jobs = [] if network is specs.CONTROLNET else [
        (network.name, network, model_dir, None, onnx_path(args.onnx_dir, args.model, network.name))]
    for adapter in getattr(args, "adapters", []):  # exported from the checkpoint with the adapter fused in
        jobs.append((f"{network.name} with LoRA {adapter.name}", network, fused_model(model_dir, adapter, args.models_dir),
                     None, adapter_onnx_path(args.onnx_dir, args.model, model_dir, adapter, args.models_dir)))
    for controlnet in getattr(args, "controlnets", []):  # each from its own folder
        served = specs.controlnet_model(controlnet.name)
        jobs.append((served.name, served, model_dir, controlnet_folder(controlnet, model_dir, args.models_dir),
                     onnx_path(args.onnx_dir, args.model, served.name)))
    for label, served, source, weights, output in jobs:
        result = export_network(served, source, output, args.precision, args.device, args.force,
                                args.external_data, weights)
        if result.skipped:
            print(f"{label}: {output} exists, skipped (pass --force to export again)")
        else:
            print(f"{label}: wrote {output} in {result.seconds:.1f} s; "
                  f"max |onnxruntime - torch| = {result.max_abs_error:.2e}")
    return result
