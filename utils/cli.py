"""Command-line pieces shared by the scripts: generation options and saving images."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pipelines.request import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS
from utils import configs

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", default=DEFAULT_PROMPT)
    group.add_argument("--negative-prompt", default=None)
    group.add_argument("--steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="num_inference_steps")
    group.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    group.add_argument("--seed", type=int, default=0)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("serving on GPUs (torch runtime on cuda)")
    group.add_argument("--gpus", default=None,
                       help="GPUs to serve on: 0, 0,1 or all (default: GPU 0). On several GPUs each network "
                            "is served once per GPU and each pipeline instance calls its own GPU's copies")
    group.add_argument("--pipeline-instances", type=int, default=None,
                       help=f"BLS pipeline instances, per GPU (default {configs.GPU_PIPELINE_INSTANCES}) "
                            f"or on the CPU ({configs.PIPELINE_INSTANCES})")
    group.add_argument("--pipeline-loop", default=None, choices=["gpu", "cpu"],
                       help="where each BLS pipeline instance keeps its loop's tensors (default cpu: the pipeline "
                            "processes stay off the GPU, which the networks then have to themselves; gpu: DLPack)")
    group.add_argument("--torch-compile", nargs="+", default=[], metavar="NETWORK",
                       help="networks the torch runtime compiles with torch.compile at load, e.g. unet "
                            "(a minute or more per network; pays where a network runs at every step)")
    group.add_argument("--pipeline-environment", type=Path, default=None,
                       help="a Python environment (utils/environments.py) the pipeline model runs in: one with "
                            "numpy<2 where this one has numpy 2, which the 24.10 stub mangles string inputs with")


def placement_from_args(args: argparse.Namespace) -> configs.Placement:
    """The placement the arguments ask for (configs.Placement.default where they say nothing)."""
    from utils.gpus import parse_gpus

    if args.gpus is None and args.pipeline_instances is None and args.pipeline_loop is None:
        return configs.Placement.default(args.runtime, args.device)
    on_gpu = args.device.startswith("cuda") and args.runtime == "torch"
    if args.gpus is not None and not on_gpu:
        raise SystemExit(f"error: --gpus {args.gpus} needs --runtime torch --device cuda "
                         f"(got --runtime {args.runtime} --device {args.device}).")
    gpus = parse_gpus(args.gpus) if args.gpus is not None else ((0,) if on_gpu else ())
    if args.pipeline_instances is not None and args.pipeline_instances < 1:
        raise SystemExit(f"error: --pipeline-instances {args.pipeline_instances}: at least 1 is needed.")
    default = configs.GPU_PIPELINE_INSTANCES if gpus else configs.PIPELINE_INSTANCES
    return configs.Placement(gpus=gpus, pipeline_instances=args.pipeline_instances or default,
                             pipeline_loop=args.pipeline_loop or configs.Placement.pipeline_loop)


def generation_options(args: argparse.Namespace) -> dict:
    """The GenerationRequest fields from the parsed arguments."""
    return dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, seed=args.seed)


def generate_and_save(pipeline, args: argparse.Namespace) -> list[Path]:
    """Run a pipeline with the command line's options; save and report its images."""
    start = time.perf_counter()
    images = pipeline(**generation_options(args))
    seconds = time.perf_counter() - start
    paths = save_images(images, args.output)
    for path in paths:
        print(f"saved {path} ({images.shape[2]}x{images.shape[1]}, {args.steps} steps, {seconds:.2f} s)")
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
