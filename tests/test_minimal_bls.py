"""The tutorial's minimal BLS model (triton/examples/minimal_bls): served beside the real tiny UNet,
it computes its toy loop exactly, refuses bad requests clearly, reports a failed sub-request, and
stays a small stand-alone file."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from utils.server import TritonServer
from utils.specs import ModelDims

EXAMPLE = Path(__file__).resolve().parents[1] / "triton" / "examples" / "minimal_bls"


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    """One server for the module: the project's tiny `unet` (as the session repository serves it)
    and the minimal BLS model, in a repository of their own."""
    path = tmp_path_factory.mktemp("minimal-bls-repository")
    shutil.copytree(repository / "unet", path / "unet")
    shutil.copytree(EXAMPLE, path / "minimal_bls")
    server = TritonServer(path).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client


@pytest.fixture(scope="module")
def dims(tiny_model):
    return ModelDims.from_pretrained(tiny_model)


def inputs(dims, batch=2, steps=3, features=None, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, dims.latent_channels, dims.latent_height, dims.latent_width), np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, dims.text_length, features or dims.text_hidden),
                                                     np.float32),
        "num_inference_steps": np.array([steps], np.int32),
    }


def infer(client, arrays):
    """A plain tritonclient call, as a reader would write it."""
    request = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "INT32" if array.dtype == np.int32 else "FP32")
        tensor.set_data_from_numpy(array)
        request.append(tensor)
    result = client.infer("minimal_bls", request, outputs=[grpcclient.InferRequestedOutput("sample")])
    return result.as_numpy("sample")


def toy_loop(onnx_file, arrays):
    """The model's loop, run here with ONNX Runtime on the exported UNet (timestep [B]: the
    served config's reshape drops the wire's trailing 1)."""
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    sample, steps = arrays["sample"], int(arrays["num_inference_steps"][0])
    for i in range(steps):
        timestep = np.full(len(sample), 1000.0 * (1 - i / steps), np.float32)
        (noise,) = session.run(["outputs"], {"sample": sample, "timestep": timestep,
                                             "encoder_hidden_states": arrays["encoder_hidden_states"]})
        sample = sample - noise / np.float32(steps)
    return sample


@pytest.mark.server
def test_result_is_the_toy_loop_on_the_served_unet(client, dims, exports):
    arrays = inputs(dims, batch=2, steps=3)
    result = infer(client, arrays)
    expected = toy_loop(exports["unet"].path, arrays)
    assert result.shape == arrays["sample"].shape and result.dtype == np.float32
    assert not np.allclose(result, arrays["sample"], atol=1e-3)  # the loop did change the latents
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


@pytest.mark.server
@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_bad_step_count_is_invalid_arg_and_server_keeps_serving(client, dims, steps):
    with pytest.raises(InferenceServerException) as caught:
        infer(client, inputs(dims, steps=steps))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    assert f"num_inference_steps={steps} is not allowed: send an integer in [1, 1000]" in caught.value.message()
    assert infer(client, inputs(dims, batch=1, steps=1)).shape[0] == 1


@pytest.mark.server
def test_failed_sub_request_is_reported_with_the_unet_reason(client, dims, server):
    wrong = dims.text_hidden + 1
    with pytest.raises(InferenceServerException) as caught:
        infer(client, inputs(dims, features=wrong))
    message = caught.value.message()
    assert "model 'unet' failed:" in message, message
    assert "encoder_hidden_states" in message and str(wrong) in message, message  # the UNet's own reason
    # UNAVAILABLE, as the real pipeline answers a failed sub-request (Triton 2.51 hands a BLS caller
    # every sub-request error as INTERNAL, whatever its cause: the code is the model's choice).
    assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value
    assert server.process.poll() is None
    assert infer(client, inputs(dims, batch=1, steps=1)).shape[0] == 1


def test_model_file_is_small_and_stand_alone():
    source = (EXAMPLE / "1" / "model.py").read_text()
    assert len(source.splitlines()) <= 45
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported == {"numpy", "triton_python_backend_utils"}
    for call in ("get_input_tensor_by_name", "InferenceRequest", "has_error", "get_output_tensor_by_name",
                 "TritonError.INVALID_ARG"):
        assert f"pb_utils.{call}" in source or f".{call}(" in source, call
