"""The walkthrough's preparation steps in one call: model, ONNX export, model repository.

Used by the quickstart (`make demo`) and the benchmark; each step is also a script of its own.
"""

from __future__ import annotations

from pathlib import Path

from utils import specs
from utils.deployment import Deployment
from utils.export import DEFAULT_ONNX_DIR, export_network, onnx_path
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
            onnx_files = {}
            for name, network in specs.NETWORKS.items():
                path = onnx_path(onnx_dir, model, name)
                result = export_network(network, model_dir, path, precision=precision, force=force)
                onnx_files[name] = result.path
                status = "exists, skipped" if result.skipped else f"max |onnxruntime - torch| = {result.max_abs_error:.1e}"
                print(f"    {result.path}: {status}")
    with step(heading("3", str(repository))):
        report = write_repository(repository, model_dir, onnx_files, deployment, force=force)
        print(f"    {len(report.written)} files written, {len(report.unchanged)} up to date")
    return model_dir
