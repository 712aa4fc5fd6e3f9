"""Time the shared denoising loop alone: its scheduler and guidance arithmetic per step, with a
UNet that costs nothing (zeros), at the checkpoint's own latent size.

What a served step costs besides the UNet call, on this host's CPU (one thread, as the pipeline
models run) and, where there is one, on its GPU, at FP16 and FP32:
  python scripts/gpu_host/measure_loop.py --output outputs/loop.json
"""

import argparse
import json
import time
from pathlib import Path

import torch

from pipelines.components import PipelineComponents
from pipelines.stable_diffusion import StableDiffusion
from utils import specs
from utils.cli import add_generation_arguments, main_entry
from utils.models import resolve_model
from utils.networks import TORCH_DTYPES
from utils.request import GenerationRequest


def ms_per_step(components: PipelineComponents, dtype: torch.dtype, device: str, steps: int, runs: int) -> float:
    dims, calls = components.dims, []

    def free_unet(network: specs.NetworkSpec, *inputs: torch.Tensor, adapters=()) -> tuple[torch.Tensor, ...]:
        calls.append(network.name)
        return (torch.zeros_like(inputs[0]),)

    pipeline = StableDiffusion(components, free_unet, dtype=dtype, device=device)
    text_embeddings = torch.zeros(2, dims.text_length, dims.text_hidden, dtype=dtype, device=device)
    request = GenerationRequest(prompt="timing", num_inference_steps=steps, seed=0)
    pipeline.denoise(text_embeddings, request)  # lazy initialization out of the timing
    calls.clear()
    start = time.perf_counter()
    for _ in range(runs):
        pipeline.denoise(text_embeddings, request)
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / len(calls)  # per UNet call (PNDM: steps + 1 per run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-random", help="a preset, a diffusers folder or a hub id")
    add_generation_arguments(parser, ("num_inference_steps",))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", type=Path, required=True, help="a JSON of every figure")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the pipeline models run their loops
    components = PipelineComponents.from_pretrained(resolve_model(args.model)).load()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    record = {"torch": torch.__version__, "latent_size": [components.dims.latent_height, components.dims.latent_width],
              "ms_per_step": {}}
    for device in devices:
        for precision in ("FP16", "FP32"):
            milliseconds = ms_per_step(components, TORCH_DTYPES[precision], device, args.num_inference_steps, args.runs)
            record["ms_per_step"][f"{device} {precision}"] = milliseconds
            print(f"loop on {device}, {precision}: {milliseconds:.3f} ms per step", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main_entry(main)
