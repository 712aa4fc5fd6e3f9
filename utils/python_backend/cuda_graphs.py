"""A network's forward captured in CUDA graphs: what the torch runtime replays on a GPU.

Launch overhead dominates a UNet step on a fast GPU, so every call replays a graph: the inputs are
copied into the graph's static buffers, the graph runs, its output is copied out. One graph per
batch size of the profile at the checkpoint's own image size, captured at load; at another image
size, one per (batch, size), captured at its first request.

A compiled network (``torch.compile``) is compiled once, covering every batch size above 1 (its
batch dimension marked dynamic): what the served networks do. Measured on an H100
(docs/gpu-notes.md): a served UNet compiled for static batch sizes instead (2, 4, 8, 16, a batch
padded to the next) ran faster alone (6.5 ms a call at batch 2 timed on its own) but no faster
served, and slower under load, where batches of 5-15 rows paid for the padding. The UNet in a
loop's own process (step_batching.py) is compiled for static batches (``static_batches``): one
loop's step alone, the profile's largest, and every loop's step at once: there the batches are
one loop's step alone, or full.

Kept free of Triton's ``triton_python_backend_utils`` so that it can be timed on its own
(scripts/gpu_host/measure_compile.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from utils import specs
from utils.networks import TORCH_DTYPES, load_network, torch_dtype
from utils.python_backend.compile_turns import compile_turn


# PyTorch's fused attention, in this order of preference where a kernel takes the shapes: cuDNN's
# first, then flash attention, memory-efficient attention and the plain one. The choice is made
# when a graph is traced or captured, and kept in it.
ATTENTION_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]


def runnable_network(spec: specs.NetworkSpec, checkpoint: Path, precision: str, device: torch.device,
                     compile_module: bool = False, static_batches: tuple[int, ...] = (), log=print,
                     prepare=lambda module: None):
    """A network of the checkpoint as the torch runtime runs it: in CUDA graphs on a GPU (compiled
    first if asked, see GraphedNetwork), the module itself on the CPU. Called with tensors of the
    spec's inputs. ``prepare(module)`` runs first (LoRA adapters to apply in place later: the
    graphs are captured on the weights they will change; after the compile recipe's fused
    projections, which the adapters then change too)."""
    module = load_network(spec.name, checkpoint, precision, str(device))
    if device.type != "cuda":
        prepare(module)
        return module
    if compile_module:
        compile_recipe(module)
    prepare(module)
    torch.cuda.set_device(device)  # this process's GPU, for what it allocates without naming one
    dtypes = [torch_dtype(t, TORCH_DTYPES[precision]) for t in spec.inputs]
    with torch.inference_mode():
        return GraphedNetwork(module, spec, specs.ModelDims.from_pretrained(checkpoint), device, dtypes,
                              compile_module=compile_module, static_batches=static_batches, log=log)


def compile_recipe(module) -> None:
    """What a network gets before torch.compile, as diffusers' own guide to a faster pipeline does:
    one projection for q, k and v (a new weight, the three concatenated), NHWC convolutions, and
    1x1 convolutions as matmuls."""
    for submodule in module.children():
        if hasattr(submodule, "fuse_qkv_projections"):
            submodule.fuse_qkv_projections()
    module.to(memory_format=torch.channels_last)
    torch._inductor.config.conv_1x1_as_mm = True


class GraphedNetwork:
    """The module's forward in CUDA graphs, replayed on copies of the inputs into static buffers:
    one per batch size at the checkpoint's own image size, captured at load, and one per (batch,
    size) of the other image sizes and prompt lengths, captured at its first request, the most
    recent ``OTHER_SIZES`` kept.

    Compiled with ``static_batches``, the checkpoint's size gets one static compilation per batch
    size listed instead, and a batch between two runs in the next one up, in the first rows of its
    buffers (a network's rows are computed apart, so the spare rows change nothing). Static shapes
    give Inductor's fastest kernels (timed alone on an H100, the UNet ran batch 2 in 6.5 ms against
    7.4 ms compiled for every batch; served, the difference has not shown yet) at a minute or more
    of compilation each.
    """

    OTHER_SIZES = 8  # graphs of other image sizes kept: each holds its static inputs and outputs

    def __init__(self, module, spec: specs.NetworkSpec, dims: specs.ModelDims, device, dtypes: list[torch.dtype],
                 compile_module: bool = False, static_batches: tuple[int, ...] = (), log=print):
        self.module, self.device = module, device
        self.static_batches = tuple(sorted(static_batches)) if compile_module else ()
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()  # by (rows, every input's shape per row)
        start = time.perf_counter()
        # torch.compile fuses the elementwise and normalization kernels between the matmuls and
        # convolutions. One compilation for every batch size above 1 (the batch is marked dynamic)
        # at the checkpoint's size, and one for batch 1 where that is the network's usual call
        # (the VAE's one image); the UNet's batch 1 (no guidance) and other sizes keep the eager
        # kernels rather than compiling again (a minute each). With static_batches, one
        # compilation per batch listed, and every batch at the checkpoint's size runs in one of them.
        compiled = module
        if compile_module:  # after compile_recipe
            compiled = torch.compile(module, dynamic=False)
            limit = torch._dynamo.config.cache_size_limit  # compilations kept per function
            torch._dynamo.config.cache_size_limit = max(limit, len(self.static_batches))
        self.stream, self.pool = torch.cuda.Stream(device), None
        # Largest batch first, all graphs in its memory pool: one instance replays one graph at a
        # time and copies its output out at once, so the graphs can share their activations' memory.
        batches = self.static_batches or range(spec.profile.min, spec.profile.max + 1)
        # The same graph compiled by several processes at once (the loop models' UNets): one
        # compiles, the others follow from the compile cache (compile_turns.py).
        batching = "-".join(map(str, self.static_batches)) or "dynamic"
        key = f"{spec.name}-{batching}-{dims.latent_height}x{dims.latent_width}"
        with compile_turn(key, log=log) if compile_module else nullcontext():
            for batch in sorted(batches, reverse=True):
                inputs = [torch.zeros(spec.shape(t, batch, dims), device=device, dtype=dtype)
                          for t, dtype in zip(spec.inputs, dtypes, strict=True)]
                if compile_module and not self.static_batches and batch == spec.profile.max:
                    for tensor in inputs:
                        torch._dynamo.mark_dynamic(tensor, 0, min=2, max=spec.profile.max)
                compiles = batch > 1 or self.static_batches or spec.profile.opt == 1
                self._capture(compiled if compiles else module, inputs)
        self.own_size = set(self.graphs)  # never evicted
        if compile_module:
            # Inductor compiles in a pool of worker processes, one per core, that would stay for
            # this process's life, idle: the graphs of other sizes are captured eagerly. (Its
            # reader thread was alive in the stubs that did not exit after finalize.)
            from torch._inductor.async_compile import shutdown_compile_workers

            shutdown_compile_workers()
        self.build_seconds = time.perf_counter() - start
        log(f"{spec.name}: {'compiled and ' if compile_module else ''}captured {len(self.graphs)} CUDA graphs in "
            f"{self.build_seconds:.1f} s" + (f" ({compile_cache_report()})" if compile_module else ""))

    def _capture(self, forward, inputs: list[torch.Tensor]) -> tuple:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):
            for _ in range(2):  # warm-up outside the graph (compilation, cuDNN/cuBLAS kernel choices)
                forward(*inputs)
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a loop model's request threads) may go on with their own
        # CUDA calls while a graph of a new image size is captured.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"), \
                sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):
            output = forward(*inputs)
        self.pool = graph.pool()
        self.graphs[_key(inputs)] = entry = (graph, inputs, output)
        return entry

    def __call__(self, *inputs):
        # Every input's shape counts, not only the latents': a long prompt's text embeddings are
        # longer for the same latents, and need a graph of their own.
        key = _key(inputs)
        rows, per_row = key
        entry = self.graphs.get(key)
        if entry is None and self.static_batches and (self.static_batches[-1], per_row) in self.own_size:
            bucket = next(batch for batch in self.static_batches if batch >= rows)  # the next one up
            entry = self.graphs[(bucket, per_row)]  # its first rows
        elif entry is None:  # another image size: capture its graph, forget the oldest other one
            entry = self._capture(self.module, [torch.zeros_like(value) for value in inputs])
            others = [k for k in self.graphs if k not in self.own_size]
            for old in others[:-self.OTHER_SIZES]:
                del self.graphs[old]
        elif key not in self.own_size:
            self.graphs.move_to_end(key)
        graph, static_inputs, static_output = entry
        for static, value in zip(static_inputs, inputs):
            static[:rows].copy_(value)
        graph.replay()
        if isinstance(static_output, tuple):  # several outputs (SDXL's second text encoder)
            return tuple(output[:rows].clone() for output in static_output)
        return static_output[:rows].clone()  # the next replay overwrites the static output


def _key(inputs) -> tuple:
    """A call's rows, and each input's shape per row."""
    return inputs[0].shape[0], tuple(tuple(tensor.shape[1:]) for tensor in inputs)


def compile_cache_report() -> str:
    """This process's compilations so far, as the compile cache (TORCHINDUCTOR_CACHE_DIR) served
    them: a restart is only fast where Inductor's graphs and AOTAutograd's come from it."""
    from torch._dynamo.utils import counters

    def counts(group: str, prefix: str) -> str:
        return ", ".join(f"{counters[group][f'{prefix}_{kind}']} {kind}" for kind in ("hit", "miss", "bypass"))

    return f"Inductor graph cache: {counts('inductor', 'fxgraph_cache')}; AOTAutograd cache: " \
           f"{counts('aot_autograd', 'autograd_cache')}"
