"""Benchmark plain diffusers against the Triton pipelines (client-side, BLS, ensemble) on the same work.

Starts and stops a local Triton server on a freshly prepared repository unless --url is given.
Prints a table; writes every raw figure and the environment to a JSON file, and a chart to a PNG.
On the tiny default it takes about two minutes on 2 CPU cores; SD1.5's settings on a GPU:
  python scripts/benchmark_pipelines.py --model sd15-random --device cuda --precision FP16 --runtime torch
"""

import argparse
import contextlib
import shutil
import time
from dataclasses import replace
from pathlib import Path

from pipelines.contenders import CONTENDERS, DEFAULT_CONTENDERS
from utils.benchmark import (
    CONTROLNET,
    TASKS,
    Settings,
    fidelity_problems,
    gpu_scaling,
    run_benchmark,
    run_concurrency,
    table,
    write_results,
)
from utils.controlnet import served_folders
from utils.cli import add_deployment_arguments, add_generation_arguments, deployment_from_args, main_entry
from utils.deployment import Deployment
from utils.errors import UsageError
from utils.grpc_client import connect
from utils.layout import DEFAULT_REPOSITORY
from utils.lora import adapter_file
from utils.models import DEFAULT_MODELS_DIR, resolve_model
from utils.server import TritonServer, stop_on_sigterm
from utils.server.access import AccessPolicy
from utils.workflow import prepare_repository


def parse_arguments(argv=None) -> tuple[argparse.Namespace, Settings]:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, type=Path)
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY, type=Path,
                        help="prepared (export + move) before the server starts, unless --url is given")
    parser.add_argument("--url", default=None, help="benchmark a running server (gRPC) instead of starting one")
    parser.add_argument("--admin-key", default=None,
                        help="with --url: the key the launcher printed (the statistics API needs it for the stages)")
    parser.add_argument("--metrics-url", default=None,
                        help="with --url: the server's metrics address, host:port (8002), for the compute of a UNet "
                             "that runs in the loop's process (--pipeline-loop with-unet)")
    parser.add_argument("--pipelines", nargs="+", default=list(DEFAULT_CONTENDERS), choices=list(CONTENDERS),
                        help="the contenders (default: all but openai-gateway, the gateway in front of BLS)")
    parser.add_argument("--task", default=defaults.task, choices=TASKS,
                        help="image-to-image: from the same picture, at --strength; inpaint: its middle repainted "
                             "(e.g. tiny-inpaint); controlnet: its Canny edges (--controlnet NAME=PATH)")
    add_generation_arguments(parser, ("prompt", "num_inference_steps", "guidance_scale", "seed", "scheduler", "strength"),
                             prompt=defaults.prompt, num_inference_steps=defaults.steps,
                             guidance_scale=defaults.guidance_scale, seed=defaults.seed, strength=defaults.strength)
    parser.add_argument("--alternate-lora", nargs="+", default=[], metavar="NAME",
                        help="LoRA adapters of the deployment's (--lora NAME=PATH) that the requests ask for in turn, "
                             "one each (default: none); diffusers switches them with set_adapters")
    for flag in ("warmup", "runs"):
        parser.add_argument(f"--{flag}", type=int, default=getattr(defaults, flag))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[],
                        help="concurrent clients of each concurrency run, e.g. 1 4 8 (default: none)")
    parser.add_argument("--requests", type=int, default=0, help="requests in each concurrency run")
    parser.add_argument("--static-batch", type=int, nargs="*", default=None, metavar="N",
                        help="images in one call of diffusers-fast, the bound for N concurrent clients "
                             "(default: the highest --concurrency above 1)")
    parser.add_argument("--output-dir", default=Path("outputs/benchmark"), type=Path)
    parser.add_argument("--time-restart", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="after the runs, restart the server this script started N times in a row (default 1) "
                             "and record how long each stop and start took (with the compile cache of the first start)")
    parser.add_argument("--log-verbose-stops", action="store_true",
                        help="with --time-restart: the server logs verbosely (level 1) during each stop, which names "
                             "what a slow stop waits for (the log is kept next to the results)")
    parser.add_argument("--min-psnr", type=float, default=None,
                        help="fail (exit 1) unless every pipeline's image is within this PSNR (dB) of diffusers' "
                             "for the same seed, and none is constant")
    add_deployment_arguments(parser, backend=False)  # the local server runs the python backend
    args = parser.parse_args(argv)
    if args.runs < 2:
        raise UsageError(f"--runs {args.runs}: at least 2 measured runs are needed for a spread")
    if args.concurrency and args.requests < max(args.concurrency):
        raise UsageError(f"--requests {args.requests} with --concurrency {' '.join(map(str, args.concurrency))}: "
                         f"send at least one request per client")
    highest = max(args.concurrency, default=1)
    static_batches = args.static_batch if args.static_batch is not None else [highest] if highest > 1 else []
    if any(batch < 1 for batch in static_batches):
        raise UsageError(f"--static-batch {' '.join(map(str, static_batches))}: give numbers of images, 1 or more")
    deployment = check_task(args.task, deployment_from_args(args))
    settings = Settings(model=args.model, prompt=args.prompt, steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                        seed=args.seed, warmup=args.warmup, runs=args.runs, concurrency=tuple(args.concurrency),
                        requests=args.requests, static_batches=tuple(static_batches), task=args.task,
                        strength=args.strength, scheduler=args.scheduler,
                        lora=requested_adapters(args.alternate_lora, deployment), deployment=deployment)
    return args, settings


def check_task(task: str, deployment: Deployment) -> Deployment:
    """The deployment, where it can serve the task: the controlnet task's needs one ControlNet."""
    if task == CONTROLNET and len(deployment.controlnets) != 1:
        raise UsageError(f"--task {CONTROLNET} guides every request with the deployment's ControlNet: give one, "
                         f"--controlnet NAME=PATH (NAME=tiny: a random one for the model; got "
                         f"{len(deployment.controlnets)})")
    return deployment


def requested_adapters(names: list[str], deployment: Deployment) -> tuple[str, ...]:
    """--alternate-lora's adapters, each one the deployment serves."""
    served = [adapter.name for adapter in deployment.adapters]
    unknown = [name for name in names if name not in served]
    if unknown:
        raise UsageError(f"--alternate-lora {' '.join(names)}: {', '.join(unknown)} not among the deployment's "
                         f"adapters ({', '.join(served) or 'none'}); add each with --lora NAME=PATH")
    return tuple(names)


def timed_restart(server: TritonServer, verbose_stop: bool = False) -> dict:
    """Stop the server and start it again (with the first start's compile cache): how long each took."""
    if verbose_stop:  # Triton's logging API, behind the admin key
        connect(server.grpc_url).update_log_settings({"log_verbose_level": 1}, headers=server.admin_headers())
    started = time.monotonic()
    server.stop()
    stopped = time.monotonic()
    server.restart()  # stopped already: it waits for the ports, and starts
    ready = time.monotonic()
    return {"stop_s": stopped - started, "start_s": ready - stopped, "total_s": ready - started}


def main(argv=None):
    args, settings = parse_arguments(argv)
    stop_on_sigterm()  # a `kill` stops the server this script started, too
    deployment = settings.deployment
    contenders = {name: CONTENDERS[name] for name in args.pipelines}
    served = any(contender.served for contender in contenders.values())

    def serve(repository: Path, deployment: Deployment) -> TritonServer:
        prepare_repository(args.model, repository, deployment, models_dir=args.models_dir)
        # Compiling at load takes minutes: give the server that long to become ready.
        return TritonServer(repository, startup_timeout=180 + 240 * len(deployment.torch_compile))

    model_dir = resolve_model(args.model, args.models_dir)
    settings = settings.for_model(model_dir)  # the family's guidance scale, where none was given
    placement, one_gpu = deployment.placement, None
    if served and args.url is None and placement.per_gpu_models and args.concurrency:
        # GPU scaling: the same deployment on the first GPU alone, under the same load.
        first_gpu = replace(deployment, placement=replace(placement, gpus=placement.gpus[:1]))
        with serve(args.repository.with_name(args.repository.name + "-1gpu"), first_gpu) as server:
            one_gpu = run_concurrency(settings, model_dir, server.grpc_url, contenders, server.admin_headers())
    with contextlib.ExitStack() as stack:
        url, headers = args.url, AccessPolicy(admin_key=args.admin_key).headers() if args.admin_key else None
        metrics_url = args.metrics_url
        server = None
        if served and url is None:
            server = serve(args.repository, deployment)  # the repository prepared first, not timed
            started = time.monotonic()
            stack.enter_context(server)
            start_s = time.monotonic() - started  # until ready: what a user waits for, compilation included
            url, headers, metrics_url = server.grpc_url, server.admin_headers(), server.metrics_url
        adapter_files = {adapter.name: adapter_file(adapter, model_dir, args.models_dir)
                         for adapter in deployment.adapters}
        controlnet_folders = served_folders(deployment.controlnets, model_dir, args.models_dir)
        results = run_benchmark(settings, model_dir, url, contenders, headers, metrics_url, adapter_files,
                                controlnet_folders)
        if server is not None:
            results["server"] = {"start_s": start_s}
        if one_gpu is not None:
            results["gpu_scaling"] = gpu_scaling(one_gpu, results["concurrency"], len(placement.gpus))
        # Written before the restarts too: the measurements stay should a restart never end.
        json_path, png_path = write_results(results, args.output_dir)
        if server is not None and args.time_restart:
            restarts = results["server"]["restarts"] = []
            for _ in range(args.time_restart):
                restarts.append(timed_restart(server, args.log_verbose_stops))
                results["server"]["restart_s"] = max(restart["total_s"] for restart in restarts)
                write_results(results, args.output_dir, json_path)
            if args.log_verbose_stops:
                shutil.copy(server.log_file, args.output_dir / f"{json_path.stem}-server.log")
    print(table(results))
    print(f"\nraw figures and environment: {json_path}" + (f"\nchart: {png_path}" if png_path else ""))
    if args.min_psnr is not None:
        problems = fidelity_problems(results, args.min_psnr)
        if problems or results["failed"]:
            raise SystemExit("fidelity check failed: " + "; ".join(problems + list(results["failed"])))
        print(f"fidelity check passed: every image within {args.min_psnr} dB PSNR of diffusers, none constant")


if __name__ == "__main__":
    main_entry(main)
