"""ONNX export: names and dynamic batch from the specs, checked against torch, never half-written."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import report
from tritonclient.grpc import model_config_pb2 as mc

from utils import export, specs
from utils.repository import configs
from utils.cli import export_cli
from utils.deployment import Deployment
from utils.export import ExportParityError, export_network
from utils.layout import CONFIG_FILE, ONNX_DATA_FILE, ONNX_FILE
from utils.networks import load_network
from utils.repository.writer import write_repository

ONNX_TYPES = {"FP16": "FLOAT16", "FP32": "FLOAT", "INT32": "INT32"}


@pytest.mark.parametrize("name", specs.NETWORKS)
def test_export_matches_torch(name, exports):
    result = exports[name]
    assert result.path.exists() and not result.skipped
    report(f"export {name:<13} max |onnxruntime - torch| = {result.max_abs_error:.2e} in {result.seconds:.1f} s")
    assert result.max_abs_error <= export.TOLERANCE["FP32"]


@pytest.mark.parametrize("name", specs.NETWORKS)
def test_batch_axis_is_dynamic(name, exports, tiny_model):
    network = specs.NETWORKS[name]
    dims = specs.ModelDims.from_pretrained(tiny_model)
    session = ort.InferenceSession(str(exports[name].path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == network.input_names
    assert [o.name for o in session.get_outputs()] == network.output_names
    wrapper = load_network(name, tiny_model)  # its example inputs are in range (token ids, layers to skip)
    for batch in (network.profile.min, network.profile.max):
        inputs = wrapper.example_inputs(batch, dims, torch.Generator().manual_seed(batch))
        feeds = {tensor.name: value.numpy() for tensor, value in zip(network.inputs, inputs)}
        outputs = session.run(None, feeds)
        for tensor, output in zip(network.outputs, outputs):
            assert output.shape == network.shape(tensor, batch, dims)
            assert np.isfinite(output).all()


def test_finished_export_is_skipped_unless_forced(tiny_model, tmp_path, capsys):
    argv = ["--model", str(tiny_model), "--onnx-dir", str(tmp_path)]
    first = export_cli(specs.TEXT_ENCODER, argv)
    assert "max |onnxruntime - torch| = " in capsys.readouterr().out
    modified = first.path.stat().st_mtime_ns
    second = export_cli(specs.TEXT_ENCODER, argv)
    assert second.skipped and "exists, skipped (pass --force" in capsys.readouterr().out
    assert first.path.stat().st_mtime_ns == modified
    third = export_cli(specs.TEXT_ENCODER, argv + ["--force"])
    assert not third.skipped and third.path.stat().st_mtime_ns != modified


def test_export_above_tolerance_fails_and_writes_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(export.TOLERANCE, "FP32", -1.0)  # no error can be below it
    output = tmp_path / "text_encoder.onnx"
    with pytest.raises(ExportParityError, match=r"text_encoder: ONNX Runtime differs from torch by up to .* "
                                                r"The ONNX file was not written"):
        export_network(specs.TEXT_ENCODER, tiny_model, output)
    assert list(tmp_path.iterdir()) == []  # no partial file, no staging folder left behind


@pytest.fixture(scope="module")
def fp16_exports(tiny_model, tmp_path_factory):
    """The four networks exported in FP16 on the CPU by the export scripts' own command line."""
    onnx_dir = tmp_path_factory.mktemp("onnx-fp16")
    argv = ["--model", str(tiny_model), "--onnx-dir", str(onnx_dir), "--precision", "FP16", "--device", "cpu"]
    return {name: export_cli(network, argv) for name, network in specs.NETWORKS.items()}


@pytest.mark.parametrize("name", specs.NETWORKS)
def test_fp16_export_on_cpu_has_the_specs_dtypes(name, fp16_exports):
    """Float activations FP16, everything else as the spec fixes it: the UNet's timestep stays FP32
    (an FP16 timestep rounds fractional timesteps, and the repository step refuses it)."""
    result, network = fp16_exports[name], specs.NETWORKS[name]
    report(f"export {name:<13} FP16 on the CPU: max |onnxruntime - torch| = {result.max_abs_error:.2e}")
    graph = onnx.load(str(result.path), load_external_data=False).graph
    for tensors, expected in ((graph.input, network.inputs), (graph.output, network.outputs)):
        got = {t.name: onnx.TensorProto.DataType.Name(t.type.tensor_type.elem_type) for t in tensors}
        want = {t.name: ONNX_TYPES[t.resolved_dtype("FP16")] for t in expected}
        assert got == want


def test_fp16_graphs_make_an_fp16_repository(fp16_exports, tiny_model, tmp_path):
    """Step 3 accepts the FP16 graphs and declares FP16 activations and an FP32 timestep."""
    write_repository(tmp_path, tiny_model, {name: r.path for name, r in fp16_exports.items()}, Deployment(backend="tensorrt"))
    unet = configs.parse_pbtxt((tmp_path / "unet" / CONFIG_FILE).read_text())
    declared = {t.name: mc.DataType.Name(t.data_type) for t in unet.input}
    assert declared == {"sample": "TYPE_FP16", "timestep": "TYPE_FP32", "encoder_hidden_states": "TYPE_FP16"}


def test_external_data_survives_the_repository_step(tiny_model, exports, tmp_path):
    """Graphs over 2 GB keep their weights apart; the repository renames the data file and the
    graph must then name the new file, or ONNX Runtime and trtexec find no weights."""
    argv = ["--model", str(tiny_model), "--onnx-dir", str(tmp_path / "onnx"), "--external-data"]
    unet = export_cli(specs.UNET, argv)
    assert unet.path.with_name("unet.onnx.data").is_file()
    repository = tmp_path / "repository"
    write_repository(repository, tiny_model, {name: r.path for name, r in exports.items()} | {"unet": unet.path})
    installed = repository / "unet" / "1" / ONNX_FILE
    assert sorted(p.name for p in installed.parent.glob("model.onnx*")) == [ONNX_FILE, ONNX_DATA_FILE]
    dims = specs.ModelDims.from_pretrained(tiny_model)
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal(specs.UNET.shape(t, 2, dims)).astype(np.float32) for t in specs.UNET.inputs}
    served = ort.InferenceSession(str(installed), providers=["CPUExecutionProvider"]).run(None, feeds)
    exported = ort.InferenceSession(str(unet.path), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(served[0], exported[0])
    assert write_repository(repository, tiny_model, {name: r.path for name, r in exports.items()}
                            | {"unet": unet.path}).written == []  # a second run rewrites nothing


def test_check_batch_is_small_and_not_the_traced_one():
    for network in specs.NETWORKS.values():
        batch = export.check_batch(network.profile)
        assert batch != network.profile.opt and network.profile.min <= batch <= network.profile.max
        assert batch <= 2
