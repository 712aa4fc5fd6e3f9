"""The NGC release both images build on, defined here once, and the docker commands around it
(the serving image's `docker run ... tritonserver` is utils/server/docker.py's).

docker/pytorch/Dockerfile (export + trtexec) and docker/triton/Dockerfile (serving) take the
release as a build argument with no default, so a build that forgets it fails instead of
silently mixing releases; every command below passes this one value.
"""

from __future__ import annotations

import os
from pathlib import Path

NGC_RELEASE = "24.10"
# What that release ships (NGC support matrix): the engines the PyTorch image builds must match
# the TensorRT of the Triton image that serves them.
TENSORRT_VERSION = "10.5.0"
TRITON_VERSION = "2.51.0"

EXPORT_IMAGE = f"sd-triton-export:{NGC_RELEASE}"  # FROM nvcr.io/nvidia/pytorch:<release>-py3
SERVE_IMAGE = f"sd-triton-serve:{NGC_RELEASE}"  # FROM nvcr.io/nvidia/tritonserver:<release>-py3
DOCKERFILES = {EXPORT_IMAGE: Path("docker/pytorch/Dockerfile"), SERVE_IMAGE: Path("docker/triton/Dockerfile")}
LOCALHOST = "127.0.0.1"
WORKDIR = "/workspace"


def build_commands() -> list[list[str]]:
    """`docker build` for both images, from the repository root (the build context)."""
    return [
        ["docker", "build", "--build-arg", f"NGC_RELEASE={NGC_RELEASE}", "-f", str(dockerfile), "-t", image, "."]
        for image, dockerfile in DOCKERFILES.items()
    ]


def export_command(command: list[str], gpus: str = "all") -> list[str]:
    """Run ``command`` in the export image with the repository mounted at /workspace.

    A Hugging Face token is passed from the environment at run time only (never baked in), and
    the command runs as the calling user, so what it writes in the repository stays yours.
    """
    return [
        "docker", "run", "--rm", f"--gpus={gpus}", "--env", "HF_TOKEN", "--user", f"{os.getuid()}:{os.getgid()}",
        "-v", f"{Path.cwd()}:{WORKDIR}", "-w", WORKDIR, EXPORT_IMAGE, *command,
    ]
