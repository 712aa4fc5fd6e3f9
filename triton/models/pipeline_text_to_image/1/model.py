"""Server-side text-to-image pipeline (BLS): the whole loop runs inside Triton.

A thin adapter around pipelines/stable_diffusion.py: parse and validate the request, run the
shared loop with networks called as BLS sub-requests (tensors passed by DLPack), pack the image.
Errors become per-request responses: INVALID_ARG for a bad request, UNAVAILABLE when a
sub-model fails, INTERNAL otherwise; never a traceback.
"""

import json
import traceback
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from pipelines.request import InvalidRequest, request_from_arrays
from pipelines.stable_diffusion import Cancelled, PipelineComponents, StableDiffusion
from utils import specs
from utils.configs import Placement
from utils.networks import TORCH_DTYPES
from utils.repository import PIPELINE_FILES, SERVING_FILE

SPEC = specs.TEXT_TO_IMAGE


class SubModelError(RuntimeError):
    pass


def run_network(model_name: str, network: specs.NetworkSpec, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One BLS sub-request; the only place that calls another model, so errors are checked once."""
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=network.output_names,
        inputs=[
            pb_utils.Tensor.from_dlpack(spec.name, spec.to_wire(tensor).contiguous())
            for spec, tensor in zip(network.inputs, inputs)
        ],
    )
    response = request.exec()
    if response.has_error():
        raise SubModelError(f"model '{model_name}' failed: {response.error().message()}")
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
        if args["model_instance_kind"] == "GPU":  # this instance's GPU; the networks it calls live there too
            gpu = int(args["model_instance_device_id"])
            device = torch.device("cuda", gpu)
            torch.cuda.set_device(device)
        elif serving["device"] == "cuda":
            device = torch.device("cuda")
        placement = Placement(gpus=tuple(serving.get("gpus", ())))
        model_names = {name: placement.model_name(name, gpu) for name in specs.NETWORKS}
        self.pipeline = StableDiffusion(
            components, lambda network, *inputs: run_network(model_names[network.name], network, *inputs),
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
            images = self.pipeline(request_from_arrays(arrays), is_cancelled=request.is_cancelled)
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
