"""Command-line pieces shared by the scripts: generation options and saving images."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pipelines.request import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", default=DEFAULT_PROMPT)
    group.add_argument("--negative-prompt", default=None)
    group.add_argument("--steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="num_inference_steps")
    group.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    group.add_argument("--seed", type=int, default=0)


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
