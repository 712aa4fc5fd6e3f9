"""Measure LoRA adapters on a GPU: switching them in place on the torch runtime's UNet in its CUDA
graphs, and diffusers' own switching on the same checkpoint and adapters.

Builds two random adapters for the checkpoint with peft (utils/lora.py), loads the UNet as the
served model does (utils/python_backend/cuda_graphs.py: CUDA graphs, compiled with --compile) with
the adapters applied in place (InPlaceAdapters), and measures: a switch (A -> B, to a mix, to
none), the UNet's call with and without adapters, and that a graph captured before a switch
computes with the new weights (its output against the eager module's, which holds the same
weights). Then diffusers (FP16, both adapters loaded with load_lora_weights): set_adapters'
switch, one image with an adapter (50 PNDM steps, unfused, as set_adapters leaves it), and
4-step LCM. Every figure goes to --output as JSON.
  python scripts/gpu_host/measure_lora.py --output outputs/lora.json
"""

import argparse
import json
import time
from pathlib import Path

import torch

from utils import specs
from utils.cli import main_entry
from utils.errors import UsageError
from utils.lora import build_tiny_adapter
from utils.lora_in_place import InPlaceAdapters
from utils.models import resolve_model
from utils.networks import torch_dtype
from utils.python_backend.cuda_graphs import runnable_network

SWITCHES = ((("a", 1.0),), (("b", 1.0),), (("a", 0.7), ("b", 0.5)), ())


def milliseconds(function, repeats: int) -> float:
    """Median wall time of ``function`` in ms, the GPU finished each time."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def served_unet(checkpoint: Path, files: dict[str, Path], compile_module: bool, figures: dict):
    """The served UNet with the adapters in place; its switch times and the graphs' check."""
    held = {}

    def prepare(module):
        held["module"], held["adapters"] = module, InPlaceAdapters(module.unet, files)

    start = time.perf_counter()
    network = runnable_network(specs.UNET, checkpoint, "FP16", torch.device("cuda", 0), compile_module=compile_module,
                               prepare=prepare)
    figures["unet_build_s"] = round(time.perf_counter() - start, 1)
    module, adapters = held["module"], held["adapters"]
    dims = specs.ModelDims.from_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(specs.UNET.shape(t, 2, dims), generator=generator).to("cuda", torch_dtype(t, torch.float16))
              for t in specs.UNET.inputs]
    inputs[1] = torch.full((2,), 500.0, device="cuda")
    with torch.inference_mode():
        base = network(*inputs).clone()
        adapters.apply(SWITCHES[2])
        graphed, eager = network(*inputs).clone(), module(*inputs)
        figures["graph_vs_eager_after_switch_max_abs"] = float((graphed - eager).abs().max())
        figures["switch_changes_output_max_abs"] = float((graphed - base).abs().max())
        adapters.apply(())
        figures["back_to_base_max_abs"] = float((network(*inputs) - base).abs().max())
        figures["switch_ms"] = {" + ".join(f"{n}x{s:g}" for n, s in to) or "none": milliseconds(
            lambda to=to: (adapters.apply(()), adapters.apply(to)), 20) for to in SWITCHES[:3]}
        for label, to in (("unet_call_ms_base", ()), ("unet_call_ms_with_a", SWITCHES[0])):
            adapters.apply(to)
            figures[label] = milliseconds(lambda: network(*inputs), 50)
    figures["adapted_layers"] = len(adapters.weights)
    figures["adapter_memory_mib"] = round(sum(t.numel() * t.element_size() for changes in adapters.changes.values()
                                              for t in changes.values()) / 2**20, 1)
    figures["base_copy_memory_mib"] = round(sum(t.numel() * t.element_size() for t in adapters.base.values()) / 2**20, 1)


def diffusers_figures(checkpoint: Path, files: dict[str, Path], figures: dict) -> None:
    import diffusers

    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float16,
                                                                 safety_checker=None, requires_safety_checker=False)
    pipeline = pipeline.to("cuda")
    pipeline.set_progress_bar_config(disable=True)
    for name, path in files.items():
        pipeline.load_lora_weights(str(path), adapter_name=name)
    figures["diffusers_set_adapters_ms"] = {
        "a": milliseconds(lambda: pipeline.set_adapters(["a"]), 20),
        "a x0.7 + b x0.5": milliseconds(lambda: pipeline.set_adapters(["a", "b"], [0.7, 0.5]), 20)}

    def image(steps: int, **options):
        return lambda: pipeline("a photo of an astronaut riding a horse on mars", num_inference_steps=steps,
                                generator=torch.Generator().manual_seed(0), output_type="pt", **options)

    pipeline.set_adapters(["a"])
    image(50)()  # warm-up
    figures["diffusers_image_50_steps_with_a_s"] = milliseconds(image(50), 3) / 1e3
    pipeline.scheduler = diffusers.LCMScheduler.from_config(pipeline.scheduler.config)
    image(4, guidance_scale=1.0)()
    figures["diffusers_image_lcm_4_steps_with_a_s"] = milliseconds(image(4, guidance_scale=1.0), 5) / 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-random", help="a preset, a diffusers folder or a hub id")
    parser.add_argument("--rank", type=int, default=16, help="the random adapters' LoRA rank")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet, as --torch-compile unet does")
    parser.add_argument("--output", type=Path, required=True, help="a JSON of every figure")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise UsageError("no CUDA device: this measures the GPU runtime (CUDA graphs), run it on a GPU host.")
    checkpoint = resolve_model(args.model)
    start = time.perf_counter()
    files = {name: build_tiny_adapter(checkpoint, args.output.parent / f"lora-{name}.safetensors", seed, args.rank)
             for seed, name in enumerate(("a", "b"))}
    figures = {"model": args.model, "rank": args.rank, "compile": args.compile, "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "adapters_built_s": round(time.perf_counter() - start, 1)}
    for stage in (lambda: served_unet(checkpoint, files, args.compile, figures),
                  lambda: diffusers_figures(checkpoint, files, figures)):
        stage()
        torch.cuda.empty_cache()  # the served UNet's memory, back before diffusers loads its own
        args.output.write_text(json.dumps(figures, indent=2) + "\n")  # what is measured so far
        print(json.dumps(figures, indent=2), flush=True)


if __name__ == "__main__":
    main_entry(main)
