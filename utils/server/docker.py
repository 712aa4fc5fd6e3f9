"""The server in the project's serving image: the classic `docker run ... tritonserver`, with the
local server's safe defaults (ports on localhost, the admin APIs behind a key, HTTP off)."""

from __future__ import annotations

from pathlib import Path

from utils.docker import LOCALHOST, SERVE_IMAGE
from utils.server.access import AccessPolicy
from utils.server.install import MEMORY_ENVIRONMENT
from utils.server.process import LOAD_ARGUMENTS, MEMORY_ARGUMENTS, METRICS_ARGUMENTS


def docker_gpus(gpus: tuple[int, ...] | None) -> str:
    """docker run's --gpus value: all, or the listed devices (quoted: the value is read as CSV)."""
    return "all" if gpus is None else '"device=' + ",".join(map(str, gpus)) + '"'


def serve_command(model_repository: Path, gpus: tuple[int, ...] | None = None, access=None,
                  http: bool = False) -> list[str]:
    """The classic `docker run ... tritonserver` launch, on the serving image, with the ports bound to
    localhost, on these GPUs (None: all), with the local server's safe defaults: the admin APIs
    behind ``access``'s key (utils/server/access.py), HTTP only when asked for."""
    access = access or AccessPolicy()
    ports = (8000, 8001, 8002) if http else (8001, 8002)
    return [
        "docker", "run", "--rm", f"--gpus={docker_gpus(gpus)}", "--shm-size=1g",
        *[argument for port in ports for argument in ("-p", f"{LOCALHOST}:{port}:{port}")],
        *[argument for name, value in MEMORY_ENVIRONMENT.items() for argument in ("-e", f"{name}={value}")],
        "-v", f"{Path(model_repository).resolve()}:/models",
        SERVE_IMAGE, "tritonserver", "--model-repository=/models", *access.arguments(),
        *METRICS_ARGUMENTS, *LOAD_ARGUMENTS, *MEMORY_ARGUMENTS,
        *([] if http else ["--allow-http=false"]),
    ]


def gateway_command(model_repository: Path, url: str, host: str, port: int, served_model: str) -> list[str]:
    """The OpenAI-compatible gateway in the serving image, beside a server started with --docker
    (its gRPC port bound to this machine): the host's network, the API key from the environment."""
    from utils.gateway import API_KEY_ENV, IMAGE_LAUNCHER

    return ["docker", "run", "--rm", "--network=host", "-e", API_KEY_ENV,
            "-v", f"{Path(model_repository).resolve()}:/models:ro",
            SERVE_IMAGE, "python3", IMAGE_LAUNCHER, "--repository", "/models", "--url", url, "--host", host,
            "--port", str(port), "--served-model-name", served_model]
