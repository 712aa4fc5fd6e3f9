"""Start Triton on the model repository, with no Docker (or with it: --docker).

Without Docker this runs the tritonserver of the nvidia-pytriton wheel (release 2.51.0, the
NGC 24.10 one) on 127.0.0.1, waits until every model is ready, and serves until Ctrl+C.
"""

import argparse
import shlex
import subprocess
import time
from pathlib import Path

from utils.cli import main_entry, script_parser
from utils.docker import TENSORRT_VERSION
from utils.repository.engines import Target, check_engines, local_gpu, tensorrt_networks
from utils.errors import TritonServerError
from utils.repository.gpus import check_repository_gpus, parse_gpus
from utils.server.health import CANARY_INTERVAL_SECONDS, FAILURES_BEFORE_RESTART, Supervisor
from utils.layout import DEFAULT_REPOSITORY
from utils.server import TritonServer, stop_on_sigterm
from utils.server.access import ADMIN_HEADER, GRPC_HEADER_PREFIX, MODEL_CONTROL_MODES, AccessPolicy
from utils.server.docker import serve_command


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY, type=Path, help="Triton model repository")
    parser.add_argument("--http", action="store_true",
                        help="serve HTTP/REST too (off by default: Triton 2.51's HTTP frontend allocates a request's "
                             "declared input size before reading it, so one small request can take gigabytes)")
    parser.add_argument("--http-port", type=int, default=8000, help="with --http")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-control", default="none", choices=MODEL_CONTROL_MODES,
                        help="explicit: models can be loaded/unloaded through the API, which then needs the admin "
                             "key printed at start (default: none, the repository is fixed)")
    parser.add_argument("--canary-interval", type=float, default=CANARY_INTERVAL_SECONDS,
                        help=f"seconds between canary inferences; after {FAILURES_BEFORE_RESTART} failures in a row "
                             f"the server is restarted (a dead Python-backend stub is invisible to readiness). "
                             f"0: no supervisor")
    parser.add_argument("--memory-limit-mib", type=float, default=None,
                        help="the supervisor restarts the server when it and its stubs hold more (default: twice "
                             "what they held at start, plus 1 GiB; 0: no limit)")
    parser.add_argument("--docker", action="store_true",
                        help="run the project's serving image instead, on ports 8000-8002 (needs Docker, an NVIDIA "
                             "GPU and the NVIDIA container toolkit; `make images` builds it)")
    parser.add_argument("--gpus", default=None,
                        help="the GPUs the server may use: 0, 0,1 or all (default: all). A repository written "
                             "with --gpus places its instances within these (indices count within the list)")
    return parser.parse_args(argv)


def serve_with_docker(repository: Path, gpus: tuple[int, ...] | None, http: bool, model_control: str) -> int:
    """The serving image on this repository, after checking its engines against this GPU."""
    if gpus is not None:  # TritonServer.start checks this for the local server
        check_repository_gpus(repository, available=len(gpus))
    if tensorrt_networks(repository):  # plans only run on the GPU and TensorRT they were built for
        checked = check_engines(repository, Target(*local_gpu(), TENSORRT_VERSION))
        print(f"TensorRT engines match this GPU and TensorRT {TENSORRT_VERSION}: {', '.join(checked)}")
    access = AccessPolicy(model_control)
    command = serve_command(repository, gpus, access, http)
    print("$", shlex.join(command).replace(access.admin_key, "<admin key>"), flush=True)
    print(f"The admin APIs need the header {ADMIN_HEADER}: {access.admin_key}", flush=True)
    return subprocess.call(command)


def serve_locally(args: argparse.Namespace, gpus: tuple[int, ...] | None) -> None:
    stop_on_sigterm()  # `kill` stops it as cleanly as Ctrl+C, even while it starts
    server = TritonServer(args.repository, http=args.http, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, model_control=args.model_control, gpus=gpus)
    try:
        server.start()
        http = f"HTTP {server.http_url}" if args.http else "HTTP off (--http)"
        print(f"Triton is ready: gRPC {server.grpc_url}, {http}, metrics {server.host}:{server.metrics_port}. "
              f"Log: {server.log_file}. Ctrl+C stops it.", flush=True)
        print(f"The model-repository, shared-memory, logging, trace and statistics APIs need the header "
              f"{ADMIN_HEADER}: {server.admin_key} (gRPC: {GRPC_HEADER_PREFIX}{ADMIN_HEADER}); inference, "
              f"health and metadata are open.", flush=True)
        if args.canary_interval > 0:
            limit = None if args.memory_limit_mib is None else int(args.memory_limit_mib * 2**20)
            Supervisor(server, interval=args.canary_interval, memory_limit=limit).watch()  # until Ctrl+C
        else:
            while server.process.poll() is None:  # short sleeps: a signal always gets through
                time.sleep(0.5)
            raise TritonServerError(f"tritonserver exited with code {server.process.returncode}.\n"
                                    f"{server.log_tail()}")
    except KeyboardInterrupt:  # Ctrl+C (or SIGTERM) is how a server is stopped: not an error
        pass
    finally:
        server.stop()
        print("Triton stopped.", flush=True)


def main(argv=None):
    args = parse_arguments(argv)
    gpus = None if args.gpus in (None, "all") else parse_gpus(args.gpus)
    if args.docker:
        raise SystemExit(serve_with_docker(args.repository, gpus, args.http, args.model_control))
    serve_locally(args, gpus)


if __name__ == "__main__":
    main_entry(main)
