"""The walkthrough's preparation steps in one call: model, ONNX export, model repository.

Used by the quickstart (`make demo`) and the benchmark; each step is also a script of its own.
"""

from __future__ import annotations

from pathlib import Path

from utils import specs
from utils.families import REFINER_UNET, family_of
from utils.deployment import Deployment
from utils.export import DEFAULT_ONNX_DIR, export_network, served_onnx_files
from utils.controlnet import served_folders
from utils.layout import served_name
from utils.lora import fused_model
from utils.models import DEFAULT_MODELS_DIR, resolve_model
from utils.repository.writer import write_repository
from utils.timing import StepTimer
from utils.walkthrough import heading


def prepare_repository(model: str, repository: Path, deployment: Deployment = Deployment(),
                       models_dir: Path = DEFAULT_MODELS_DIR, onnx_dir: Path = DEFAULT_ONNX_DIR,
                       force: bool = False, timer: StepTimer | None = None) -> Path:
    """Resolve ``model``, export its networks at the deployment's precision (finished exports are
    reused; the torch runtime needs none) and write the repository; return the model's diffusers
    folder. Each step is printed and timed by ``timer``."""
    step = (timer or StepTimer()).step

    with step(heading("1", model)):
        model_dir = resolve_model(model, models_dir)
        print(f"    {model_dir}")
    onnx_files = None  # the torch runtime serves the checkpoint's weights: no export
    if not deployment.torch_runtime:
        precision = deployment.served_precision
        with step(heading("2")):
            onnx_files = served_onnx_files(onnx_dir, model, model_dir, deployment.adapters, models_dir,
                                           deployment.control_networks(), deployment.refiner)
            sources = {name: model_dir for name in onnx_files}
            if deployment.refiner:  # SDXL's refiner's UNet: from its own checkpoint
                sources[REFINER_UNET.name] = resolve_model(deployment.refiner, models_dir)
            family = family_of(specs.ModelDims.from_pretrained(model_dir))
            sources |= {served_name(specs.UNET.name, adapter=adapter.name): fused_model(model_dir, adapter, models_dir)
                        for adapter in deployment.adapters}  # an adapter's UNet: exported from the fused checkpoint
            weights = served_folders(deployment.controlnets, model_dir, models_dir)  # a ControlNet: its own folder
            for name, path in onnx_files.items():
                network = specs.served_network(name, family)
                result = export_network(network, sources[name], path, precision=precision, force=force,
                                        weights=weights.get(name))
                status = "exists, skipped" if result.skipped else f"max |onnxruntime - torch| = {result.max_abs_error:.1e}"
                print(f"    {result.path}: {status}")
    with step(heading("3", str(repository))):
        report = write_repository(repository, model_dir, onnx_files, deployment, force=force, models_dir=models_dir)
        print(f"    {len(report.written)} files written, {len(report.unchanged)} up to date")
    return model_dir
