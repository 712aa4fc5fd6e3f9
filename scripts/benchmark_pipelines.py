"""Benchmark plain diffusers against the Triton pipelines (client-side, BLS, ensemble) on the same work.

Starts and stops a local Triton server on a freshly prepared repository unless --url is given.
Prints a table; writes every raw figure and the environment to a JSON file, and a chart to a PNG.
On the tiny default it takes about two minutes on 2 CPU cores; SD1.5's settings on a GPU:
  python scripts/benchmark_pipelines.py --model sd15-random --device cuda --precision FP16 --runtime torch
"""

import argparse
import contextlib
import time
from dataclasses import replace
from pathlib import Path

from pipelines.contenders import CONTENDERS
from utils.benchmark import (TASKS, Settings, fidelity_problems, gpu_scaling, run_benchmark, run_concurrency, table,
                             write_results)
from utils.cli import add_deployment_arguments, add_generation_arguments, deployment_from_args, main_entry
from utils.deployment import Deployment
from utils.errors import UsageError
from utils.layout import DEFAULT_REPOSITORY
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
    parser.add_argument("--pipelines", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--task", default=defaults.task, choices=TASKS,
                        help="image-to-image starts every pipeline from the same picture, at --strength")
    add_generation_arguments(parser, ("prompt", "num_inference_steps", "guidance_scale", "seed", "strength"),
                             prompt=defaults.prompt, num_inference_steps=defaults.steps,
                             guidance_scale=defaults.guidance_scale, seed=defaults.seed, strength=defaults.strength)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--runs", type=int, default=defaults.runs)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[],
                        help="concurrent clients of each concurrency run, e.g. 1 4 8 (default: none)")
    parser.add_argument("--requests", type=int, default=0, help="requests in each concurrency run")
    parser.add_argument("--output-dir", default=Path("outputs/benchmark"), type=Path)
    parser.add_argument("--time-restart", action="store_true",
                        help="after the runs, restart the server this script started and record how long it took "
                             "to be ready again (with the compile cache of the first start)")
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
    settings = Settings(model=args.model, prompt=args.prompt, steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                        seed=args.seed, warmup=args.warmup, runs=args.runs, concurrency=tuple(args.concurrency),
                        requests=args.requests, task=args.task, strength=args.strength,
                        deployment=deployment_from_args(args))
    return args, settings


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
    placement, one_gpu = deployment.placement, None
    if served and args.url is None and placement.per_gpu_models and args.concurrency:
        # GPU scaling: the same deployment on the first GPU alone, under the same load.
        first_gpu = replace(deployment, placement=replace(placement, gpus=placement.gpus[:1]))
        with serve(args.repository.with_name(args.repository.name + "-1gpu"), first_gpu) as server:
            one_gpu = run_concurrency(settings, model_dir, server.grpc_url, contenders, server.admin_headers())
    with contextlib.ExitStack() as stack:
        url, headers = args.url, AccessPolicy(admin_key=args.admin_key).headers() if args.admin_key else None
        metrics_url = args.metrics_url
        server_seconds = {}  # until ready: what a user waits for at a start, compilation included
        if served and url is None:
            server = serve(args.repository, deployment)  # the repository prepared first, not timed
            started = time.monotonic()
            stack.enter_context(server)
            server_seconds["start_s"] = time.monotonic() - started
            url, headers, metrics_url = server.grpc_url, server.admin_headers(), server.metrics_url
        results = run_benchmark(settings, model_dir, url, contenders, headers, metrics_url)
        if server_seconds and args.time_restart:
            started = time.monotonic()
            server.restart()
            server_seconds["restart_s"] = time.monotonic() - started
        if server_seconds:
            results["server"] = server_seconds
    if one_gpu is not None:
        results["gpu_scaling"] = gpu_scaling(one_gpu, results["concurrency"], len(placement.gpus))
    json_path, png_path = write_results(results, args.output_dir)
    print(table(results))
    print(f"\nraw figures and environment: {json_path}" + (f"\nchart: {png_path}" if png_path else ""))
    if args.min_psnr is not None:
        problems = fidelity_problems(results, args.min_psnr)
        if problems or results["failed"]:
            raise SystemExit("fidelity check failed: " + "; ".join(problems + list(results["failed"])))
        print(f"fidelity check passed: every image within {args.min_psnr} dB PSNR of diffusers, none constant")


if __name__ == "__main__":
    main_entry(main)
