"""Export one network to ONNX with the names and dynamic axes of its spec, then prove it.

Shared by the four ``optim/convert_*_to_onnx.py`` scripts. Every network's batch axis is dynamic,
and the UNet's and the VAE's height and width too. After exporting, the graph goes through
``onnx.checker`` and ONNX Runtime is compared with torch on fresh random inputs at a batch size
and an image size other than the ones traced, which also proves those axes really dynamic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils import specs
from utils.errors import UsageError, UserError
from utils.layout import served_name
from utils.lora import LoraAdapter, fused_id
from utils.models import model_slug
from utils.networks import TORCH_DTYPES, load_network

DEFAULT_ONNX_DIR = Path("onnx")
OPSET = 17
# Largest |onnxruntime - torch| allowed, as a fraction of the largest |torch| output (at least 1).
TOLERANCE = {"FP32": 1e-3, "FP16": 2e-2}
PROTOBUF_LIMIT = 2**31 - 1  # bytes: larger graphs keep their weights in an external data file


class ExportParityError(UserError, RuntimeError):
    """ONNX Runtime and torch disagree: the graph was not written."""


class ExportConflict(UserError, FileExistsError):
    """A finished export of another precision is in the way."""


def graph_precision(onnx_file: Path) -> str:
    """FP32 or FP16: the precision of a graph's float inputs and outputs (weights not loaded)."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    floats = {onnx.TensorProto.DataType.Name(t.type.tensor_type.elem_type) for t in [*graph.input, *graph.output]}
    found = {specs.ONNX_FLOAT_PRECISIONS[name] for name in floats if name in specs.ONNX_FLOAT_PRECISIONS}
    return found.pop() if len(found) == 1 else "mixed"


@dataclass
class ExportResult:
    path: Path
    skipped: bool
    max_abs_error: float | None = None
    seconds: float = 0.0


def onnx_path(onnx_dir: str | Path, model: str, network: str) -> Path:
    return Path(onnx_dir) / model_slug(model) / f"{network}.onnx"


def adapter_onnx_path(onnx_dir: str | Path, model: str, model_dir: Path, adapter: LoraAdapter,
                      models_dir: Path) -> Path:
    """A LoRA adapter's UNet graph: ``unet_<name>-<hash>.onnx`` (utils/lora.py's fused_id)."""
    return onnx_path(onnx_dir, model, f"{specs.UNET.name}_{fused_id(adapter, model_dir, models_dir)}")


def served_onnx_files(onnx_dir: str | Path, model: str, model_dir: Path, adapters: tuple[LoraAdapter, ...],
                      models_dir: Path, control_networks: tuple[specs.NetworkSpec, ...] = (),
                      refiner: str | None = None) -> dict[str, Path]:
    """Per served network name, its exported graph: the family's networks (SD1.x's four, SDXL's
    five), each adapter's UNet, the ``control_networks`` (Deployment.control_networks: each
    ControlNet's, the controlled UNet), and SDXL's ``refiner``'s UNet (exported from it, under its name)."""
    from utils.families import REFINER_UNET, family_of

    family = family_of(specs.ModelDims.from_pretrained(model_dir))
    files = {name: onnx_path(onnx_dir, model, name) for name in (*family.networks, *(n.name for n in control_networks))}
    if refiner:
        files[REFINER_UNET.name] = onnx_path(onnx_dir, refiner, REFINER_UNET.name)
    for adapter in adapters:
        files[served_name(specs.UNET.name, adapter=adapter.name)] = adapter_onnx_path(onnx_dir, model, model_dir,
                                                                                      adapter, models_dir)
    return files


def export_network(
    network: specs.NetworkSpec,
    model_dir: str | Path,
    output: str | Path,
    precision: str = "FP32",
    device: str = "cpu",
    force: bool = False,
    external_data: bool = False,
    weights: str | Path | None = None,
) -> ExportResult:
    """Export ``network`` of the diffusers folder ``model_dir`` to ``output`` and check it.

    Finished work is skipped unless ``force``: the file is moved into place only after the checks
    pass, so an existing file is always a checked one. FP16 runs on a CPU too (slowly), so a
    machine without a GPU can produce and check the graphs GPU engines are built from.
    ``external_data``: keep the weights in ``<output>.data`` even below the 2 GB limit.
    ``weights``: the network's own folder, where its weights are not the checkpoint's (a ControlNet).
    """
    output = Path(output)
    if precision not in specs.PRECISIONS:
        raise UsageError(f"precision={precision!r} is not supported; use one of {specs.PRECISIONS} (--precision).")
    if output.exists() and not force:
        existing = graph_precision(output)
        if existing != precision:  # never let a graph of another precision stand in for this one
            raise ExportConflict(f"{output} exists in {existing}, not {precision}: pass --force to export it again "
                                 f"in {precision}, or choose another --onnx-dir.")
        return ExportResult(output, skipped=True)
    start = time.perf_counter()
    dims = specs.ModelDims.from_pretrained(model_dir)
    module = load_network(network.name, weights or model_dir, precision, device, for_export=True)
    generator = torch.Generator().manual_seed(0)
    trace_inputs = _on(network, module.example_inputs(network.profile.opt, dims, generator), precision, device)

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.stem}-") as staging:
        staged = Path(staging) / output.name
        _trace(module, network, trace_inputs, staged)
        staged = _single_file_or_external_data(staged, external_data)
        _set_static_dims(staged, network, dims)
        import onnx

        # By path: works above the 2 GB protobuf limit. full_check runs ONNX's type inference,
        # which catches a graph that mixes FP32 and FP16 inputs of one operator.
        onnx.checker.check_model(str(staged), full_check=True)
        check_inputs = module.example_inputs(check_batch(network.profile), check_size(dims), generator)
        error = _check_parity(network, module, staged, _on(network, check_inputs, precision, device), precision)
        for produced in Path(staging).iterdir():  # the graph, and its weights if stored apart
            os.replace(produced, output.parent / produced.name)
    return ExportResult(output, skipped=False, max_abs_error=error, seconds=time.perf_counter() - start)


def _trace(module: torch.nn.Module, network: specs.NetworkSpec, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    with torch.inference_mode(), warnings.catch_warnings():
        # The tracer warns about every Python-side shape check in diffusers; none matters here
        # because the checks run the graph at another batch size.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=network.input_names,
            output_names=network.output_names,
            dynamic_axes=network.dynamic_axes(),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: ~10x faster here, same numbers
        )


def _check_parity(network: specs.NetworkSpec, module: torch.nn.Module, onnx_file: Path,
                  inputs: tuple[torch.Tensor, ...], precision: str) -> float:
    """The largest |onnxruntime - torch|, or ExportParityError above the precision's tolerance."""
    error, scale = compare_with_torch(module, onnx_file, inputs)
    allowed = TOLERANCE[precision] * max(1.0, scale)
    if not error <= allowed:  # also catches NaN
        raise ExportParityError(
            f"{network.name}: ONNX Runtime differs from torch by up to {error:.3g}, above the "
            f"{precision} tolerance {allowed:.3g} (outputs up to {scale:.3g}). "
            f"The ONNX file was not written."
        )
    return error


def compare_with_torch(module: torch.nn.Module, onnx_file: Path, inputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """Max |onnxruntime - torch| over all outputs, and the largest |torch| output."""
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(onnx_file), providers=providers)
    feeds = {i.name: t.cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feeds)
    with torch.inference_mode():
        expected = module(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    error = scale = 0.0
    for g, e in zip(got, expected):
        e = e.float().cpu().numpy()
        error = max(error, float(np.abs(g.astype(np.float32) - e).max()))
        scale = max(scale, float(np.abs(e).max()))
    return error, scale


def check_size(dims: specs.ModelDims) -> specs.ModelDims:
    """The image size the graph is checked at: not the traced one, and not square (the largest
    width of the default range, and a height one latent pixel above its smallest, which no fixed
    up-sampling factor fits): proves both spatial axes dynamic at any multiple of the step; and a
    prompt of two chunks, which proves its length dynamic."""
    sizes = specs.ImageSizes.default(dims)
    return dims.at_size(sizes.min + sizes.step, sizes.max, prompt_chunks=2)


def check_batch(profile: specs.BatchProfile) -> int:
    """The batch the exported graph is checked at: not the traced one (``opt``), which proves the
    batch axis dynamic, and small, because the check runs ONNX Runtime on the CPU."""
    return profile.min if profile.min != profile.opt else profile.opt + 1


def _on(network: specs.NetworkSpec, inputs: tuple[torch.Tensor, ...], precision: str,
        device: str) -> tuple[torch.Tensor, ...]:
    """Example inputs on the device, each in its spec's dtype: activations at the export
    precision, the rest as the spec fixes them (the UNet's timestep stays FP32 in an FP16 graph)."""
    return tuple(tensor.to(device=device, dtype=TORCH_DTYPES[spec.resolved_dtype(precision)])
                 for spec, tensor in zip(network.inputs, inputs))


def _single_file_or_external_data(path: Path, external_data: bool = False) -> Path:
    """Past the 2 GB protobuf limit, the exporter scatters one file per weight: gather them
    into a single ``<name>.onnx.data`` beside the graph, the layout Triton and trtexec expect.
    ``external_data`` asks for that layout at any size."""
    if not external_data and not any(p != path for p in path.parent.iterdir()):
        return path
    import onnx

    model = onnx.load(str(path))
    gathered = path.parent / "gathered"
    gathered.mkdir()
    target = gathered / path.name
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")
    for scattered in path.parent.iterdir():
        if scattered != gathered:
            scattered.unlink() if scattered.is_file() else shutil.rmtree(scattered)
    for produced in gathered.iterdir():
        os.replace(produced, path.parent / produced.name)
    gathered.rmdir()
    return path


def _set_static_dims(path: Path, network: specs.NetworkSpec, dims: specs.ModelDims) -> None:
    """Write the spec's sizes into the graph's inputs and outputs: the exporter sometimes leaves an
    output dim symbolic (e.g. the text encoder's sequence length), which configs and TensorRT
    profiles would then have to guess. Only the batch, the image's height and width and the
    prompt's length stay dynamic, under the spec's names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensors, specs_ in ((model.graph.input, network.inputs), (model.graph.output, network.outputs)):
        for tensor, spec in zip(tensors, specs_):
            shape = tensor.type.tensor_type.shape.dim
            for dim, name, size in zip(list(shape)[1:], spec.dims, dims.resolve(spec.dims)):
                dim.Clear()
                if name in specs.DYNAMIC:
                    dim.dim_param = name
                else:
                    dim.dim_value = size
            shape[0].Clear()
            shape[0].dim_param = specs.BATCH_AXIS
    onnx.save_model(model, str(path))  # external weights, if any, stay where they are
