"""ONNX export: names and dynamic batch from the specs, checked against torch, never half-written."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import report

from utils import export, specs
from utils.export import ExportParityError, export_cli, export_network


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
    rng = np.random.default_rng(0)
    for batch in (network.profile.min, network.profile.max):
        feeds = {}
        for tensor in network.inputs:
            shape = network.shape(tensor, batch, dims)
            feeds[tensor.name] = (rng.integers(0, 100, shape).astype(np.int32) if tensor.dtype == "INT32"
                                  else rng.standard_normal(shape).astype(np.float32))
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


def test_fp16_on_cpu_is_refused_with_the_fix(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"precision='FP16' needs device='cuda'"):
        export_network(specs.UNET, tiny_model, tmp_path / "unet.onnx", precision="FP16", device="cpu")
