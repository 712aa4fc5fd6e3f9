"""Triton Python-backend model that runs one network as a torch module: the GPU runtime of the
portable backend (it also runs on a CPU, which is how CI exercises it).

On CUDA: FP16 weights, PyTorch's fused attention (diffusers' default processor), one CUDA graph
per batch size of the profile at the checkpoint's image size, captured and replayed at load so
that the first request is not slow (other image sizes: at their first request), and tensors in
and out on the GPU by DLPack (no host copy). Requests that arrive together (dynamic batching) run
as one batch: each UNet sample carries its own timestep, so requests at different steps can share
a call (Triton batches only requests of one image size).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from utils import specs
from utils.networks import TORCH_DTYPES, load_network
from utils.layout import CHECKPOINT_DIR


class GraphedNetwork:
    """The module's forward captured in CUDA graphs, replayed on copies of the inputs into static
    buffers (launch overhead dominates a UNet step on a fast GPU): one per batch size at the
    checkpoint's own image size, captured at load, and one per (batch, size) bucket of the other
    image sizes, captured at its first request, the most recent ``OTHER_SIZES`` kept."""

    OTHER_SIZES = 8  # graphs of other image sizes kept: each holds its static inputs and outputs

    def __init__(self, module, spec: specs.NetworkSpec, dims: specs.ModelDims, device, dtype,
                 compile_module: bool = False):
        self.module, self.device = module, device
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()  # by the first input's shape
        # torch.compile fuses the elementwise and normalization kernels between the matmuls and
        # convolutions. One compilation for every batch size above 1 (the batch is marked dynamic)
        # at the checkpoint's size; batch 1 (no guidance) and other sizes keep the eager kernels
        # rather than compiling again (a minute each).
        compiled = module
        if compile_module:
            # As diffusers' own guide to a faster pipeline does: one projection for q, k and v,
            # NHWC convolutions, and 1x1 convolutions as matmuls.
            for submodule in module.children():
                if hasattr(submodule, "fuse_qkv_projections"):
                    submodule.fuse_qkv_projections()
            module.to(memory_format=torch.channels_last)
            torch._inductor.config.conv_1x1_as_mm = True
            compiled = torch.compile(module, dynamic=False)
        self.stream, self.pool = torch.cuda.Stream(device), None
        # Largest batch first, all graphs in its memory pool: one instance replays one graph at a
        # time and copies its output out at once, so the graphs can share their activations' memory.
        for batch in range(spec.profile.max, spec.profile.min - 1, -1):
            inputs = [torch.zeros(spec.shape(t, batch, dims), device=device, dtype=_torch_dtype(t, dtype))
                      for t in spec.inputs]
            if compile_module and batch == spec.profile.max:
                for tensor in inputs:
                    torch._dynamo.mark_dynamic(tensor, 0, min=2, max=spec.profile.max)
            self._capture(compiled if batch > 1 else module, inputs)
        self.own_size = set(self.graphs)  # never evicted

    def _capture(self, forward, inputs: list[torch.Tensor]) -> tuple:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(2):  # warm-up outside the graph (cuDNN/cuBLAS choose their kernels)
                forward(*inputs)
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = forward(*inputs)
        self.pool = graph.pool()
        self.graphs[tuple(inputs[0].shape)] = entry = (graph, inputs, output)
        return entry

    def __call__(self, *inputs):
        key = tuple(inputs[0].shape)
        entry = self.graphs.get(key)
        if entry is None:  # another image size: capture its bucket, forget the oldest other one
            entry = self._capture(self.module, [torch.zeros_like(value) for value in inputs])
            others = [k for k in self.graphs if k not in self.own_size]
            for old in others[:-self.OTHER_SIZES]:
                del self.graphs[old]
        elif key not in self.own_size:
            self.graphs.move_to_end(key)
        graph, static_inputs, static_output = entry
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return static_output.clone()  # the next replay overwrites the static output


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.spec = specs.NETWORKS[parameters["network"]]  # the served name may carry a GPU suffix
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.device = torch.device("cpu")
        if parameters.get("device", "cuda") == "cuda":  # this instance's GPU, from its instance group
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
            torch.cuda.set_device(self.device)
        self.dtype = TORCH_DTYPES[parameters.get("precision", "FP16")]
        checkpoint = version_dir / CHECKPOINT_DIR
        module = load_network(self.spec.name, checkpoint, parameters.get("precision", "FP16"), str(self.device))
        dims = specs.ModelDims.from_pretrained(checkpoint)
        with torch.inference_mode():
            self.run = GraphedNetwork(module, self.spec, dims, self.device, self.dtype,
                                      compile_module=parameters.get("torch_compile") == "yes") \
                if self.device.type == "cuda" else module

    def execute(self, requests):
        """All requests of this call as one batch; where the batch fails, each request alone, so
        that one bad request fails by itself (as in Triton's own backends)."""
        responses, inputs = {}, {}
        for index, request in enumerate(requests):
            try:
                inputs[index] = [self._input(_received(request, t), t) for t in self.spec.inputs]
            except Exception as error:
                responses[index] = _error(f"{self.spec.name}: bad input: {error}")
        try:
            responses.update(self._respond(inputs))
        except Exception:
            for index, values in inputs.items():
                try:
                    responses.update(self._respond({index: values}))
                except Exception as error:
                    responses[index] = _error(f"{self.spec.name}: {type(error).__name__}: {error}")
        return [responses[index] for index in range(len(requests))]

    def _respond(self, inputs: dict[int, list[torch.Tensor]]) -> dict[int, object]:
        """Run these requests' inputs as one batch, in chunks the profile allows; one response each."""
        if not inputs:
            return {}
        sizes = {index: values[0].shape[0] for index, values in inputs.items()}
        with torch.inference_mode():
            merged = [torch.cat(column) for column in zip(*inputs.values())]
            output = torch.cat([self.run(*[t[start:start + self.spec.profile.max] for t in merged])
                                for start in range(0, sum(sizes.values()), self.spec.profile.max)])
        (output_spec,) = self.spec.outputs
        responses, start = {}, 0
        for index, size in sizes.items():
            # Answered in the memory it computed in, as TensorRT and ONNX Runtime answer: Triton
            # copies to the caller where the caller asks for other memory (a gRPC client, a BLS
            # request's preferred_memory).
            piece = output[start:start + size].contiguous()
            responses[index] = pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(output_spec.name, piece)])
            start += size
        return responses

    def _input(self, value: torch.Tensor, tensor: specs.TensorSpec) -> torch.Tensor:
        return value.to(device=self.device, dtype=_torch_dtype(tensor, self.dtype))


def _torch_dtype(tensor: specs.TensorSpec, precision_dtype: torch.dtype) -> torch.dtype:
    """Float activations at the served precision; the other tensors at their spec's dtype."""
    return precision_dtype if tensor.dtype == specs.ACTIVATION else TORCH_DTYPES[tensor.dtype]


def _received(request, tensor: specs.TensorSpec) -> torch.Tensor:
    return torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, tensor.name).to_dlpack())


def _error(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
