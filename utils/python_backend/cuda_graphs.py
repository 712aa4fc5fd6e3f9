"""A network's forward captured in CUDA graphs: what the torch runtime replays on a GPU.

Launch overhead dominates a UNet step on a fast GPU, so every call replays a graph: the inputs are
copied into the graph's static buffers, the graph runs, its output is copied out. Eager kernels
are captured once per batch size of the profile. A compiled network (``torch.compile``) is
compiled for a few static batch sizes, the buckets: a static shape gives Inductor's fastest
kernels (measured on an H100: a UNet compiled for batch 2 alone ran 6.5 ms a call, compiled once
for every batch 7.4 ms), and a batch between two buckets runs in the next one up, its spare rows
left over from earlier calls (a network's rows do not mix: each is computed alone).

Kept free of Triton's ``triton_python_backend_utils`` so that it can be timed on its own
(scripts/gpu_host/measure_compile.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from utils import specs


def compiled_batches(profile: specs.BatchProfile) -> tuple[int, ...]:
    """The batch sizes a compiled network is built for: powers of two from the profile's optimal
    batch (the usual one, which must not be padded) up to its largest, which is always one. A
    smaller batch runs in the first bucket (for the UNet, batch 1 is a request without guidance)."""
    batches, batch = [], profile.opt
    while batch < profile.max:
        batches.append(batch)
        batch *= 2
    return (*batches, profile.max)


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``rows``; None above the largest."""
    return next((bucket for bucket in buckets if bucket >= rows), None)


class GraphedNetwork:
    """The module's forward in CUDA graphs, replayed on copies of the inputs into static buffers:
    at the checkpoint's own image size, one per bucket when compiled (``compiled_batches``), else
    one per batch size of the profile, captured at load; at another image size, one per (batch,
    size), eager, captured at its first request, the most recent ``OTHER_SIZES`` kept."""

    OTHER_SIZES = 8  # graphs of other image sizes kept: each holds its static inputs and outputs

    def __init__(self, module, spec: specs.NetworkSpec, dims: specs.ModelDims, device, dtypes: list[torch.dtype],
                 compile_module: bool = False, log=print):
        self.module, self.device = module, device
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()  # by the first input's shape
        self.build_seconds: dict[int, float] = {}  # per batch size: compilation (if any) and capture
        forward = module
        if compile_module:
            # As diffusers' own guide to a faster pipeline does: one projection for q, k and v,
            # NHWC convolutions, and 1x1 convolutions as matmuls.
            for submodule in module.children():
                if hasattr(submodule, "fuse_qkv_projections"):
                    submodule.fuse_qkv_projections()
            module.to(memory_format=torch.channels_last)
            torch._inductor.config.conv_1x1_as_mm = True
            forward = torch.compile(module, dynamic=False)  # a graph per bucket, each of one static shape
            self.buckets = compiled_batches(spec.profile)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(self.buckets))
        else:
            self.buckets = tuple(range(spec.profile.min, spec.profile.max + 1))
        self.stream, self.pool = torch.cuda.Stream(device), None
        # Largest batch first, all graphs in its memory pool: one instance replays one graph at a
        # time and copies its output out at once, so the graphs can share their activations' memory.
        for batch in reversed(self.buckets):
            start = time.perf_counter()
            self._capture(forward, [torch.zeros(spec.shape(t, batch, dims), device=device, dtype=dtype)
                                    for t, dtype in zip(spec.inputs, dtypes)])
            self.build_seconds[batch] = time.perf_counter() - start
            log(f"{spec.name}: batch {batch} {'compiled and ' if compile_module else ''}captured in "
                f"{self.build_seconds[batch]:.1f} s")
        self.own_size = {key[1:] for key in self.graphs}  # the checkpoint's size: never evicted

    def _capture(self, forward, inputs: list[torch.Tensor]) -> tuple:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(2):  # warm-up outside the graph (compilation, cuDNN/cuBLAS kernel choices)
                forward(*inputs)
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = forward(*inputs)
        self.pool = graph.pool()
        self.graphs[tuple(inputs[0].shape)] = entry = (graph, inputs, output)
        return entry

    def __call__(self, *inputs):
        rows, size = inputs[0].shape[0], tuple(inputs[0].shape[1:])
        if size in self.own_size:
            bucket = bucket_for(rows, self.buckets)
            entry = self.graphs[(bucket, *size)]
        else:  # another image size: capture its own graph, forget the oldest other one
            entry = self.graphs.get(tuple(inputs[0].shape))
            if entry is None:
                entry = self._capture(self.module, [torch.zeros_like(value) for value in inputs])
                others = [key for key in self.graphs if key[1:] not in self.own_size]
                for old in others[:-self.OTHER_SIZES]:
                    del self.graphs[old]
            else:
                self.graphs.move_to_end(tuple(inputs[0].shape))
        graph, static_inputs, static_output = entry
        for static, value in zip(static_inputs, inputs):
            static[:rows].copy_(value)
        graph.replay()
        return static_output[:rows].clone()  # the next replay overwrites the static output
