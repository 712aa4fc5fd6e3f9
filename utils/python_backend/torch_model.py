"""Triton Python-backend model that runs one network as a torch module: the GPU runtime of the
portable backend (it also runs on a CPU, which is how CI exercises it).

On CUDA: FP16 weights, PyTorch's fused attention (diffusers' default processor), one CUDA graph
per batch size of the profile at the checkpoint's image size (cuda_graphs.py), captured and
replayed at load so that the first request is not slow (other image sizes: at their first
request), and tensors in and out on the GPU by DLPack (no host copy).
Requests that arrive together (dynamic batching) run as one batch: each UNet sample carries its
own timestep, so requests at different steps can share a call (Triton batches only requests of
one image size).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from utils import specs
from utils.families import family_of
from utils.layout import CHECKPOINT_DIR
from utils.lora import CONFIG_PARAMETER, REQUEST_PARAMETER, decode_adapters
from utils.lora_in_place import InPlaceLoader
from utils.networks import TORCH_DTYPES, run_in_chunks, torch_dtype
from utils.python_backend.cuda_graphs import runnable_network
from utils.timing import PROFILE_EVERY, PhaseTimes, profiling


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        family = family_of(specs.ModelDims.from_pretrained(version_dir / CHECKPOINT_DIR))  # SD1.x or SDXL
        self.spec = specs.served_network(parameters["network"], family)  # the served name may carry a GPU suffix
        self.device = torch.device("cpu")
        if parameters.get("device", "cuda") == "cuda":  # this instance's GPU (runnable_network makes it current)
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        self.dtype = TORCH_DTYPES[parameters.get("precision", "FP16")]
        # LoRA adapters applied to the UNet's or the text encoder's weights in place, per request
        # (utils/lora_in_place.py).
        lora = InPlaceLoader(version_dir, [name for name in parameters.get(CONFIG_PARAMETER, "").split(",") if name],
                             self.spec.name)
        self.network = runnable_network(self.spec, version_dir / CHECKPOINT_DIR, parameters.get("precision", "FP16"),
                                    self.device, compile_module=parameters.get("torch_compile") == "yes",
                                    log=pb_utils.Logger.log_info, prepare=lora)
        self.adapters = lora.adapters
        # SD_TRITON_PROFILE_BLS=1: log where a call's time goes, as the pipeline models do for a
        # request (each phase then waits for the GPU, so the split is true and the calls slower).
        self.profile = profiling()
        self.times, self.calls, self.profiled_seconds = PhaseTimes(), 0, 0.0

    @contextmanager
    def _phase(self, name: str):
        if not self.profile:
            yield
            return
        with self.times.phase(name):
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def execute(self, requests):
        """All requests of this call as one batch; where the batch fails, each request alone, so
        that one bad request fails by itself (as in Triton's own backends)."""
        start = time.perf_counter()
        responses, inputs = {}, {}
        with self._phase("inputs (DLPack, to the device)"):
            for index, request in enumerate(requests):
                try:
                    inputs[index] = [self._input(_received(request, t), t) for t in self.spec.inputs]
                except Exception as error:
                    responses[index] = _error(f"{self.spec.name}: bad input: {error}", invalid=True)
        for adapters, group in self._by_adapters(requests, inputs, responses).items():
            try:
                self._apply(adapters)
            except Exception as error:  # never run without the weights asked for
                responses.update({index: _error(f"{self.spec.name}: {error}", invalid=True) for index in group})
                continue
            try:
                responses.update(self._respond(group))
            except Exception:
                for index, values in group.items():
                    try:
                        responses.update(self._respond({index: values}))
                    except Exception as error:
                        responses[index] = _error(f"{self.spec.name}: {type(error).__name__}: {error}")
        if self.profile:
            self._log_profile(time.perf_counter() - start)
        return [responses[index] for index in range(len(requests))]

    def _by_adapters(self, requests, inputs: dict[int, list[torch.Tensor]], responses: dict) -> dict[tuple, dict]:
        """The requests' inputs by the LoRA adapters each asks for (its request parameter): requests
        of different adapters never share a batch, and each group runs with its own weights. A
        parameter that does not parse fails its request alone, in ``responses``."""
        groups: dict[tuple, dict[int, list]] = {}
        # The VAE's networks have no adapters: they ignore the parameter (an ensemble hands its
        # request's parameters to every step).
        applies = self.spec in (specs.UNET, specs.TEXT_ENCODER)
        for index, values in inputs.items():
            text = json.loads(requests[index].parameters() or "{}").get(REQUEST_PARAMETER, "") if applies else ""
            try:
                adapters = decode_adapters(text)
            except ValueError:
                responses[index] = _error(f"{self.spec.name}: the request parameter {REQUEST_PARAMETER}={text!r}: "
                                          f"write it name:weight,name:weight", invalid=True)
                continue
            groups.setdefault(adapters, {})[index] = values
        return groups

    def _apply(self, adapters: tuple) -> None:
        if self.adapters is None:
            if adapters:
                raise ValueError(f"this model applies no LoRA adapters, and the request asks for {adapters}: write "
                                 f"the repository with --lora NAME=PATH.")
            return
        with self._phase("LoRA adapters applied"):
            self.adapters.apply(adapters)

    def _log_profile(self, seconds: float) -> None:
        self.calls, self.profiled_seconds = self.calls + 1, self.profiled_seconds + seconds
        if self.calls == PROFILE_EVERY:
            split = self.times.summary(self.profiled_seconds, calls=self.calls)
            pb_utils.Logger.log_info(f"{self.spec.name}: {self.calls} calls, per call {split}")
            self.times, self.calls, self.profiled_seconds = PhaseTimes(), 0, 0.0

    def _respond(self, inputs: dict[int, list[torch.Tensor]]) -> dict[int, object]:
        """Run these requests' inputs as one batch, in chunks the profile allows; one response each."""
        if not inputs:
            return {}
        sizes = {index: values[0].shape[0] for index, values in inputs.items()}
        with torch.inference_mode():
            with self._phase("batch joined"):
                merged = [torch.cat(column) for column in zip(*inputs.values())]
            with self._phase("network"):
                output = run_in_chunks(self.network, merged, self.spec.profile.max)
        outputs = output if isinstance(output, tuple) else (output,)  # (SDXL's second text encoder has two)
        responses, start = {}, 0
        with self._phase("answers (DLPack)"):
            for index, size in sizes.items():
                # Answered in the memory it computed in, as TensorRT and ONNX Runtime answer: Triton
                # copies to the caller where the caller asks for other memory (a gRPC client, a BLS
                # request's preferred_memory).
                responses[index] = pb_utils.InferenceResponse([
                    pb_utils.Tensor.from_dlpack(spec.name, value[start:start + size].contiguous())
                    for spec, value in zip(self.spec.outputs, outputs)])
                start += size
        return responses

    def _input(self, value: torch.Tensor, tensor: specs.TensorSpec) -> torch.Tensor:
        return value.to(device=self.device, dtype=torch_dtype(tensor, self.dtype))


def _received(request, tensor: specs.TensorSpec) -> torch.Tensor:
    return torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, tensor.name).to_dlpack())


def _error(message: str, invalid: bool = False):
    """A failed response: INVALID_ARGUMENT where the request is at fault (``invalid``), else INTERNAL."""
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
