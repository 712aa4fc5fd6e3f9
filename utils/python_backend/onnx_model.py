"""Triton Python-backend model that runs its version folder's model.onnx with ONNX Runtime (CPU).

This is the portable serving backend: the tritonserver shipped in the ``nvidia-pytriton`` wheel
has no ONNX Runtime or TensorRT backend, but it has the Python backend. Tensor names come from
the model's config.pbtxt, which is generated from utils/specs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from utils.layout import ONNX_FILE


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        onnx_file = Path(args["model_repository"]) / args["model_version"] / ONNX_FILE
        self.session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
                results = self.session.run(self.output_names, feeds)
                # Tensor(name, array) needs numpy<2 (with numpy 2 it arrives empty); requirements.txt
                # and nvidia-pytriton pin it. from_dlpack(name, array) fails on numpy arrays here.
                outputs = [pb_utils.Tensor(name, array) for name, array in zip(self.output_names, results)]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as error:  # one bad request must not fail the others in its batch
                message = f"{self.model_name}: {type(error).__name__}: {error}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses
