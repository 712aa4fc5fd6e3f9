"""Server-side text-to-image pipeline (BLS): the whole loop runs inside Triton.

A thin adapter around pipelines/stable_diffusion.py: parse and validate the request, run the
shared loop with networks called as BLS sub-requests (tensors passed by DLPack), pack the image.
Errors become per-request responses: INVALID_ARG for a bad request, UNAVAILABLE when a
sub-model fails, INTERNAL otherwise; never a traceback.

Where it runs comes from 1/serving.json (utils/repository.py): the loop's tensors on the CPU or
on the GPU, and, on several GPUs, the networks of this instance's GPU (``unet_gpu1``...).
"""

import json
import os
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from pipelines.request import InvalidRequest, request_from_arrays
from pipelines.stable_diffusion import Cancelled, PipelineComponents, StableDiffusion
from utils import specs
from utils.deployment import Placement
from utils.networks import TORCH_DTYPES
from utils.layout import PIPELINE_FILES, SERVING_FILE

SPEC = specs.TEXT_TO_IMAGE


class SubModelError(RuntimeError):
    pass


class PhaseTimes:
    """Wall time per phase of a request, logged when SD_TRITON_PROFILE_BLS=1: where the time
    between the networks' own compute goes (docs/gpu-notes.md)."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def summary(self, total: float) -> str:
        parts = [f"{name} {1000 * seconds:.1f} ms" for name, seconds in self.seconds.items()]
        rest = total - sum(self.seconds.values())
        return f"{1000 * total:.1f} ms: " + ", ".join(parts + [f"loop and scheduler {1000 * rest:.1f} ms"])


def preferred_memory(device: torch.device) -> "pb_utils.PreferredMemory":
    """Ask for sub-request outputs where the loop keeps its tensors. Without it they stay where the
    called model produced them: GPU memory for TensorRT and ONNX Runtime on a GPU."""
    if device.type == "cuda":
        return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device.index or 0)
    return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)


def run_network(times: PhaseTimes, model_name: str, memory: "pb_utils.PreferredMemory", network: specs.NetworkSpec,
                *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One BLS sub-request; the only place that calls another model, so errors are checked once."""
    with times.phase("inputs to Triton tensors"):
        request = pb_utils.InferenceRequest(
            model_name=model_name,
            requested_output_names=network.output_names,
            inputs=[
                pb_utils.Tensor.from_dlpack(spec.name, spec.to_wire(tensor).contiguous())
                for spec, tensor in zip(network.inputs, inputs)
            ],
            preferred_memory=memory,
        )
    with times.phase(f"{network.name} sub-requests"):
        response = request.exec()
    if response.has_error():
        raise SubModelError(f"model '{model_name}' failed: {response.error().message()}")
    with times.phase("outputs to torch"):
        return tuple(
            torch.from_dlpack(pb_utils.get_output_tensor_by_name(response, name).to_dlpack())
            for name in network.output_names
        )


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        serving = json.loads((version_dir / SERVING_FILE).read_text())
        components = PipelineComponents.from_pretrained(version_dir / PIPELINE_FILES)
        device, gpu = torch.device("cpu"), None
        if args["model_instance_kind"] == "GPU":  # this instance's GPU; the networks it calls live there
            gpu = int(args["model_instance_device_id"])
        if serving["device"] == "cuda" and serving.get("loop_device", "cuda") == "cuda":
            device = torch.device("cuda", gpu or 0)
            torch.cuda.set_device(device)
        else:  # the loop's small tensors on the CPU: this process never touches the GPU
            torch.set_num_threads(1)  # one request per instance; latents of 16k values need no threads
        placement = Placement(gpus=tuple(serving.get("gpus", ())))
        model_names = {name: placement.model_name(name, gpu) for name in specs.NETWORKS}
        self.profile = os.environ.get("SD_TRITON_PROFILE_BLS") == "1"
        self.times = PhaseTimes()  # the current request's (an instance runs one request at a time)
        memory = preferred_memory(device)
        self.pipeline = StableDiffusion(
            components,
            lambda network, *inputs: run_network(self.times, model_names[network.name], memory, network, *inputs),
            dtype=TORCH_DTYPES[serving["precision"]], device=device,
        )
        self.pipeline.warm_up()  # each instance is its own process: warm each one before it serves
        self.logger = pb_utils.Logger

    def execute(self, requests):
        return [self._generate(request) for request in requests]

    def _generate(self, request):
        try:
            arrays = {}
            for tensor in SPEC.inputs:
                value = pb_utils.get_input_tensor_by_name(request, tensor.name)
                arrays[tensor.name] = None if value is None else value.as_numpy()
            self.times, start = PhaseTimes(), time.perf_counter()

            def is_cancelled() -> bool:
                with self.times.phase("cancellation checks"):
                    return request.is_cancelled()

            images = self.pipeline(request_from_arrays(arrays), is_cancelled=is_cancelled)
            if self.profile:
                self.logger.log_info(f"{SPEC.name}: {self.times.summary(time.perf_counter() - start)}")
            (output,) = SPEC.outputs
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack(output.name, images)])
        except InvalidRequest as error:
            return _error(str(error), pb_utils.TritonError.INVALID_ARG)
        except Cancelled as error:
            return _error(str(error), pb_utils.TritonError.CANCELLED)
        except SubModelError as error:
            return _error(str(error), pb_utils.TritonError.UNAVAILABLE)
        except Exception as error:  # a bug: log it in full, answer without internals
            self.logger.log_error(f"{SPEC.name}: unexpected error\n{traceback.format_exc()}")
            return _error(f"{SPEC.name}: internal error ({type(error).__name__})", pb_utils.TritonError.INTERNAL)


def _error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
