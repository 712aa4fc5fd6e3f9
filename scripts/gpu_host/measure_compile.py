"""Time the torch runtime's build of one network on a GPU, and its calls at each batch size.

Builds the network as the served model does (utils/python_backend/cuda_graphs.py: a CUDA graph
per batch size, compiled with --compile), prints how long that took, then times calls (copy in,
replay, copy out) with CUDA events at every batch size of the profile. Run it twice with the same TORCHINDUCTOR_CACHE_DIR:
the second run shows what a server restart pays with the first run's compile cache.
  python scripts/gpu_host/measure_compile.py --network unet --compile --output outputs/compile.json
A ControlNet (--network controlnet) is the one --controlnet names (default: a random one built for
the model); the GPU memory the network holds is recorded too.
"""

import argparse
import ast
import json
import os
import time
from pathlib import Path

import torch

from utils import specs
from utils.cli import controlnet_argument, main_entry
from utils.controlnet import TINY, ServedControlNet, controlnet_folder
from utils.errors import UsageError
from utils.models import DEFAULT_MODELS_DIR, resolve_model
from utils.networks import TORCH_DTYPES, load_network, torch_dtype
from utils.python_backend.cuda_graphs import GraphedNetwork, compile_cache_report, compile_recipe


def timed_calls(network: GraphedNetwork, spec: specs.NetworkSpec, dims: specs.ModelDims, dtypes, batch: int,
                calls: int) -> float:
    """Milliseconds per call at ``batch`` rows, as the served model calls it (inputs and output
    copied), averaged over ``calls`` after a few unmeasured ones."""
    inputs = [torch.randint(0, 100, spec.shape(t, batch, dims), device="cuda").to(dtype) if not dtype.is_floating_point
              else torch.randn(spec.shape(t, batch, dims), device="cuda").to(dtype)  # token ids stay in the vocabulary
              for t, dtype in zip(spec.inputs, dtypes)]
    for _ in range(3):
        network(*inputs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        network(*inputs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-random", help="a preset, a diffusers folder or a hub id")
    parser.add_argument("--network", default=specs.UNET.name, choices=[*specs.NETWORKS, *specs.CONTROL_NETWORKS])
    parser.add_argument("--controlnet", default=ServedControlNet("controlnet", TINY), type=controlnet_argument,
                        metavar="NAME=PATH", help="with --network controlnet: which (default: controlnet=tiny)")
    parser.add_argument("--compile", action="store_true", help="torch.compile it, as --torch-compile does")
    parser.add_argument("--static-batches", type=int, nargs="*", default=[],
                        help="compile for these batch sizes alone, as a loop's own UNet is (e.g. 2 16 32)")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per batch size")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="NAME=VALUE",
                        help="Inductor settings to try on top of the served recipe, e.g. "
                             "coordinate_descent_tuning=True epilogue_fusion=False (diffusers' guide)")
    parser.add_argument("--output", type=Path, required=True, help="a JSON of every figure")
    args = parser.parse_args(argv)
    if args.inductor and not args.compile:
        raise UsageError(f"--inductor {' '.join(args.inductor)}: Inductor settings apply to a compiled network; "
                         f"add --compile.")
    if not torch.cuda.is_available():
        raise UsageError("no CUDA device: this measures the GPU runtime (CUDA graphs), run it on a GPU host.")

    spec = specs.served_network(args.network)
    checkpoint = resolve_model(args.model)
    dims = specs.ModelDims.from_pretrained(checkpoint)
    weights = controlnet_folder(args.controlnet, checkpoint, DEFAULT_MODELS_DIR) if spec is specs.CONTROLNET else None
    dtypes = [torch_dtype(t, TORCH_DTYPES["FP16"]) for t in spec.inputs]
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "network": spec.name,
              "compiled": args.compile, "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    start = time.perf_counter()
    module = load_network(spec.name, weights or checkpoint, "FP16", "cuda")
    record["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    if args.compile:
        compile_recipe(module)
        for setting in args.inductor:
            name, _, value = setting.partition("=")
            if not hasattr(torch._inductor.config, name):
                raise UsageError(f"--inductor {setting}: torch._inductor.config has no {name!r}")
            setattr(torch._inductor.config, name, ast.literal_eval(value))
        record["inductor"] = args.inductor
    record["load_s"] = time.perf_counter() - start
    with torch.inference_mode():
        start = time.perf_counter()
        network = GraphedNetwork(module, spec, dims, torch.device("cuda", 0), dtypes, compile_module=args.compile,
                                 static_batches=tuple(args.static_batches), log=lambda line: print(line, flush=True))
        record["build_s"] = time.perf_counter() - start
        record["held_gib"] = torch.cuda.memory_allocated() / 2**30  # the weights, and the graphs' own buffers
        if args.compile:
            record["compile_cache"] = compile_cache_report()
        record["ms_per_call"] = {}
        for batch in args.static_batches or range(spec.profile.min, spec.profile.max + 1):
            milliseconds = timed_calls(network, spec, dims, dtypes, batch, args.calls)
            record["ms_per_call"][batch] = milliseconds
            print(f"batch {batch:>2}: {milliseconds:6.2f} ms per call, {milliseconds / batch:5.2f} ms per row",
                  flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"built in {record['build_s']:.1f} s; {record['weights_gib']:.2f} GiB of weights, "
          f"{record['held_gib']:.2f} GiB held with the graphs; wrote {args.output}")


if __name__ == "__main__":
    main_entry(main)
