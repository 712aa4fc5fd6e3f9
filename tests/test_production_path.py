"""The production path's commands (docs/production.md, from utils/walkthrough.py), run as written
after the quickstart, on a CPU.

What cannot run here is replaced by what can and says so: the export runs on the CPU instead of
CUDA (same script, same FP16 graphs), and the hub is a local cache (HF_HUB_OFFLINE) holding the
tiny model under SD1.5's id. P3 gets a cache with no weights at all: it must not need them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from utils import specs
from utils.repository import configs
from utils.layout import CONFIG_FILE
from utils.models import SD15_HUB_ID, hub_patterns
from utils.repository.writer import write_repository

ROOT = Path(__file__).resolve().parents[1]


def production_commands() -> list[str]:
    """The python commands of the production page's block, continuation lines joined."""
    from utils.docs.facts import production_commands as rendered

    block = re.search(r"```bash\n(.*?)```", rendered(), re.S).group(1)
    assert block in (ROOT / "docs" / "production.md").read_text()
    lines = block.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.split("  #")[0].strip()
        if "python " in line:
            commands.append("python " + line.split("python ", 1)[1])
    return commands


def hub_cache(root: Path, model_dir: Path, weights: bool) -> Path:
    """A Hugging Face cache holding ``model_dir`` as the snapshot of SD1.5's hub id."""
    repo = root / f"models--{SD15_HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    for pattern in hub_patterns(weights):
        for source in model_dir.glob(pattern):
            target = snapshot / source.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return root


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(command: str, cwd: Path, hub: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[0] == "python"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def after_quickstart(tiny_model, exports, tmp_path_factory):
    """A working folder as `make demo` leaves it: the tiny model's repository in triton/models."""
    cwd = tmp_path_factory.mktemp("project")
    for folder in ("optim", "scripts"):
        (cwd / folder).symlink_to(ROOT / folder)
    write_repository(cwd / "triton" / "models", tiny_model, {name: r.path for name, r in exports.items()})
    return cwd


def test_the_production_page_lists_the_production_commands():
    commands = production_commands()
    assert [c.split()[1] for c in commands] == [
        "optim/convert_${network}_to_onnx.py", "scripts/move_onnx_models_to_triton.py",
        "scripts/build_tensorrt_engines.py", "scripts/launch_triton_server.py", "scripts/query_model.py",
        "scripts/run_bls_pipeline.py", "scripts/run_ensemble_pipeline.py", "scripts/run_client_side_pipeline.py"]


@pytest.mark.slow
def test_production_commands_after_the_quickstart(after_quickstart, tiny_model, tmp_path):
    cwd = after_quickstart
    quickstart_repository = tree_digest(cwd / "triton" / "models")
    export, move, print_engines = production_commands()[:3]
    full_hub = hub_cache(tmp_path / "hub-full", tiny_model, weights=True)
    # P2, on the CPU: the one change to the production page's command.
    assert "--device cuda" in export
    for network in specs.NETWORKS:
        done = run(export.replace("${network}", network).replace("--device cuda", "--device cpu"), cwd, full_hub)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"{network}: wrote onnx/stable-diffusion-v1-5--stable-diffusion-v1-5/{network}.onnx" in done.stdout
    # P3 as written, from a cache with no weights.
    config_hub = hub_cache(tmp_path / "hub-configs", tiny_model, weights=False)
    assert not list(config_hub.rglob("*.safetensors"))
    done = run(move, cwd, config_hub)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "repository ready: triton/production (backend: tensorrt)" in done.stdout
    assert tree_digest(cwd / "triton" / "models") == quickstart_repository  # the quickstart's, untouched
    unet = configs.parse_pbtxt((cwd / "triton" / "production" / "unet" / CONFIG_FILE).read_text())
    assert unet.platform == "tensorrt_plan"
    assert {t.name: mc.DataType.Name(t.data_type) for t in unet.input} == {
        "sample": "TYPE_FP16", "timestep": "TYPE_FP32", "encoder_hidden_states": "TYPE_FP16"}
    # What P4 will run, as written.
    done = run(print_engines, cwd, config_hub)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(specs.NETWORKS)
    for line, network in zip(lines, specs.NETWORKS):
        assert line.startswith(f"$ trtexec --onnx=triton/production/{network}/1/model.onnx ")
        assert line.endswith(" --fp16 --timingCacheFile=engines/timing.cache")


def test_engines_for_a_repository_of_another_backend_are_refused(after_quickstart, tmp_path):
    done = run("python scripts/build_tensorrt_engines.py --repository triton/models --print-commands",
               after_quickstart, tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert ("error: triton/models does not serve text_encoder, unet, vae_encoder, vae_decoder with TensorRT"
            in done.stderr)
    assert "scripts/move_onnx_models_to_triton.py --backend tensorrt --repository triton/models" in done.stderr


def test_build_docker_images_help_builds_nothing(tmp_path):
    done = run("python scripts/build_docker_images.py --help", ROOT, tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: build_docker_images.py")
    assert "docker build" not in done.stdout and done.stderr == ""


def test_hub_patterns_without_weights_name_no_weight_file():
    assert not [p for p in hub_patterns(weights=False) if "safetensors" in p or ".bin" in p]
    assert [p for p in hub_patterns(weights=True) if p.endswith("*.safetensors")] == [
        "text_encoder/*.safetensors", "text_encoder_2/*.safetensors", "unet/*.safetensors", "vae/*.safetensors"]
