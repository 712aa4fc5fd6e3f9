"""Warm-up, measured runs and where their time goes; runs under concurrent load; GPU scaling."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm.auto import tqdm

from utils import specs
from utils.benchmark.fidelity import fidelity
from utils.benchmark.report import compute_budget, environment
from utils.benchmark.settings import CONTROLNET, IMAGE_TASKS, Context, Settings
from utils.benchmark.statistics import TritonStatistics
from utils.mask import box_mask

OUTLIER_FACTOR = 3.0  # a measured run this many times slower than the median is reported as an outlier
SETTLED_FACTOR = 1.5  # warm-up continues while a run takes this much longer than the one before
MAX_EXTRA_RUNS = 5  # more warm-up runs, or measured runs done again after a recompilation


def latency_summary(seconds: list[float], images_per_request: int = 1) -> dict:
    values = np.asarray(seconds)
    median = float(np.percentile(values, 50))
    return {
        "runs": len(values),
        "mean_s": float(values.mean()),
        "std_s": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "p50_s": median,
        "p90_s": float(np.percentile(values, 90)),
        "p99_s": float(np.percentile(values, 99)),
        "images_per_s": float(images_per_request / values.mean()),
        "raw_s": [float(v) for v in values],
        "outliers_s": [float(v) for v in values if v > OUTLIER_FACTOR * median],
    }


def warm_up(name: str, contender, generate, settings: Settings) -> None:
    """The settings' warm-up runs, and more while the runs still get faster (a compilation or a
    lazy initialization in the last one), so that neither reaches the measured runs."""
    seconds = []
    for request in tqdm(range(settings.warmup), desc=f"{name}: warm-up", leave=False):
        seconds.append(_timed(generate, settings.options(request)))
    extra = 0
    while len(seconds) >= 2 and seconds[-1] > SETTLED_FACTOR * seconds[-2] and extra < MAX_EXTRA_RUNS:
        seconds.append(_timed(generate, settings.options(len(seconds))))
        extra += 1
    if contender.served and settings.deployment.placement.pipeline_instances > 1:
        # Every pipeline instance is a process of its own that Triton picks in turn: one request
        # each at once, so the measured runs do not meet an instance serving its first request.
        instances = settings.deployment.placement.pipeline_instances
        with ThreadPoolExecutor(instances) as pool:
            list(pool.map(lambda request: contender.client()(**settings.options(request)), range(instances)))


def measured_runs(name: str, contender, generate, settings: Settings) -> tuple[list[float], list[float], np.ndarray]:
    """(latencies, discarded, last images): a run during which torch.compile built a graph is
    discarded and run again (up to MAX_EXTRA_RUNS times): it measured a compilation. Run i is the
    settings' request i, so every contender's last images come from the same request."""
    latencies, discarded, images = [], [], None
    progress = tqdm(total=settings.runs, desc=f"{name}: runs", leave=False)
    while len(latencies) < settings.runs:
        compiled_before = contender.compilations()
        start = time.perf_counter()
        images = generate(**settings.options(len(latencies)))
        seconds = time.perf_counter() - start
        if contender.compilations() != compiled_before and len(discarded) < MAX_EXTRA_RUNS:
            discarded.append(seconds)
            continue
        latencies.append(seconds)
        progress.update()
    progress.close()
    return latencies, discarded, images


def measure(name: str, contender, context: Context, statistics: TritonStatistics | None) -> dict:
    """Warm-up, measured runs and stage breakdown of one contender."""
    settings = context.settings
    generate = contender.client()
    warm_up(name, contender, generate, settings)
    before = statistics.settled_snapshot() if contender.served else None
    in_process_before = statistics.unet_in_process() if contender.served else None
    steps_before = statistics.loop_unet_calls() if contender.served else None
    latencies, discarded, images = measured_runs(name, contender, generate, settings)
    result = {"configuration": contender.configuration(), "latency": latency_summary(latencies), "images": images,
              "discarded_recompilations_s": discarded}
    if contender.served:
        stages = TritonStatistics.stages(before, statistics.settled_snapshot(), settings.runs, settings.stages)
        stages["end_to_end"] = result["latency"]["mean_s"]
        result["stages_source"] = "Triton statistics API over the measured runs"
        # --pipeline-loop with-unet: the steps ran in the loop's own process, which Triton's
        # statistics do not see; its compute comes from the pipeline's own metrics where the
        # benchmark knows the server's metrics address (SD_TRITON_PROFILE_BLS=1 logs it too).
        stages["unet_in_loop"] = not stages["unet_calls_per_run"]
        grown = _grown(in_process_before, statistics.unet_in_process()) if stages["unet_in_loop"] else None
        if grown and grown["calls"]:  # none: not that metric's server
            stages["unet"] = grown["seconds"] / settings.runs
            stages["unet_per_call"] = grown["seconds"] / grown["calls"]
            stages["unet_rows_per_call"] = grown["rows"] / grown["calls"]
        step = step_split(stages, _grown(steps_before, statistics.loop_unet_calls()), settings.runs)
        if step:
            stages["per_step_ms"] = step
    else:
        stages, result["stages_source"] = timed_stages(contender, generate, settings)
    # The rest of the time of the runs the stages were taken from.
    stages["other"] = stages["end_to_end"] - sum(stages[stage] for stage in settings.stages)
    result["stages"] = stages
    return result


def _grown(before: dict | None, after: dict | None) -> dict | None:
    """What each figure grew by (None where either reading is missing)."""
    if before is None or after is None:
        return None
    return {key: after[key] - before.get(key, 0) for key in after}


def step_split(stages: dict, loop_calls: dict | None, runs: int) -> dict | None:
    """Where one denoising step's time goes when the loop calls the served UNet through Triton
    (the loop on the CPU or the GPU, not in the UNet's process), in ms: the UNet call as the loop
    sees it (its metric sd_unet_step_seconds) split into Triton's phases of the UNet's requests
    (queue, data copies in and out, the UNet model's execute: its stub and its network) and the
    rest (the caller's stub and Triton's core: the request made, sent and answered); and the
    loop's own Python and scheduler arithmetic, what is left of a run's time per step."""
    unet = stages.get("per_request_ms", {}).get("unet")
    if not unet or not loop_calls or not loop_calls["calls"]:
        return None
    steps = loop_calls["calls"] / runs
    call_ms = 1000 * loop_calls["seconds"] / loop_calls["calls"]
    triton_ms = sum(unet.values())
    networks = sum(stages[stage] for stage in stages if stage in ("text_encoder", "vae_encoder", "vae_decoder"))
    loop_ms = 1000 * (stages["end_to_end"] - networks) / steps - call_ms
    return {"unet_call_as_the_loop_sees_it": call_ms, "queue": unet["queue"],
            "copies_in_and_out": unet["compute_input"] + unet["compute_output"],
            "unet_model_execute": unet["compute_infer"],
            "caller_stub_and_triton_core": call_ms - triton_ms,
            "loop_python_and_scheduler": loop_ms, "steps_per_run": steps}


def timed_stages(contender, generate, settings: Settings) -> tuple[dict, str]:
    """diffusers' stages from timers around its networks, in runs of their own (the timers
    synchronize the GPU, which the measured runs must not)."""
    totals, calls, profiled = {}, {}, []
    profiled_runs = max(1, min(3, settings.runs))
    with contender.stage_timers(totals, calls):
        for request in range(profiled_runs):
            profiled.append(_timed(generate, settings.options(request)))
    stages = {stage: totals.get(stage, 0.0) / profiled_runs for stage in settings.stages}
    stages["unet_per_call"] = totals.get("unet", 0.0) / max(1, calls.get("unet", 0))
    stages["unet_calls_per_run"] = calls.get("unet", 0) / profiled_runs
    stages["end_to_end"] = sum(profiled) / profiled_runs
    return stages, f"timers around the networks' forward calls, {profiled_runs} extra runs"


def _timed(generate, options: dict) -> float:
    start = time.perf_counter()
    generate(**options)
    return time.perf_counter() - start


def measure_concurrency(name: str, contender, settings: Settings, clients: int,
                        statistics: TritonStatistics | None = None) -> dict:
    """``settings.requests`` requests from ``clients`` threads, each with its own client; with
    the server's statistics, how full the UNet's batches were (dynamic batching at work)."""
    local = threading.local()
    latencies, errors = [], []
    ready = threading.Barrier(clients)

    def warm_up_client(client: int):
        """One untimed request per client thread (each gets exactly one: they wait for each other),
        so client set-up and per-thread runtime initialization stay out of the measurement."""
        try:
            local.generate = contender.client()
            local.generate(**settings.options(client))
        finally:
            ready.wait()

    def one_request(request: int):
        start = time.perf_counter()
        try:
            local.generate(**settings.options(request))
            latencies.append(time.perf_counter() - start)
        except Exception as error:  # counted here: the server's own metrics count errors as successes
            errors.append(f"{type(error).__name__}: {error}")

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(warm_up_client, range(clients)))
        before = statistics.settled_snapshot() if statistics else None
        in_process_before = statistics.unet_in_process() if statistics else None
        start = time.perf_counter()
        list(tqdm(pool.map(one_request, range(settings.requests)), total=settings.requests,
                  desc=f"{name}: {clients} clients", leave=False))
        wall = time.perf_counter() - start
    result = {
        "clients": clients, "requests": settings.requests, "errors": len(errors),
        "error_messages": errors[:5], "wall_s": wall, "throughput_images_per_s": len(latencies) / wall,
        "latency": latency_summary(latencies) if latencies else {},
    }
    if statistics:
        batching = unet_batching(TritonStatistics.delta(before, statistics.settled_snapshot()), wall)
        result["unet"] = batching or in_process_batching(_grown(in_process_before, statistics.unet_in_process()), wall)
    return result


def unet_batching(delta: dict, wall: float) -> dict | None:
    """How full the UNet's batches were and how busy it was, from per-batch statistics."""
    unet = delta.get("unet", {})
    if not unet.get("executions"):
        return None
    return {
        "executions": unet["executions"],
        "mean_batch": unet["batch_rows"] / unet["executions"],  # rows per call, 2 per image with guidance
        "ms_per_execution": unet["busy_ns"] / 1e6 / unet["executions"],
        "busy_fraction": unet["busy_ns"] / 1e9 / wall,  # of the wall time, the UNet computing
    }


def in_process_batching(grown: dict | None, wall: float) -> dict | None:
    """The same figures for the UNet in the loop models' own processes (--pipeline-loop with-unet),
    from the pipeline's own metrics."""
    if not grown or not grown["calls"]:
        return None
    return {"executions": grown["calls"], "mean_batch": grown["rows"] / grown["calls"],
            "ms_per_execution": 1000 * grown["seconds"] / grown["calls"], "busy_fraction": grown["seconds"] / wall,
            "source": "the pipeline's metrics (the UNet in the loop's process)"}


def run_benchmark(settings: Settings, model_dir: Path, url: str | None, contenders: Mapping[str, type],
                  headers: dict[str, str] | None = None, metrics_url: str | None = None,
                  adapter_files: Mapping[str, Path] | None = None,
                  controlnet_folders: Mapping[str, Path] | None = None) -> dict:
    """Measure each contender (a class by name, pipelines/contenders.py) on the settings' work;
    ``adapter_files``, ``controlnet_folders``: the deployment's LoRA files and ControlNets, which
    diffusers loads."""
    dims = specs.ModelDims.from_pretrained(model_dir)
    if settings.task in (*IMAGE_TASKS, CONTROLNET):
        settings = with_picture(settings, dims)
    context = Context(settings, model_dir, url, dict(adapter_files or {}), dict(controlnet_folders or {}))
    statistics = TritonStatistics(url, headers, metrics_url) if url else None
    scheduler = settings.scheduler or json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())[
        "_class_name"]
    results = {
        "settings": {**settings.describe(), "resolution": [dims.image_height, dims.image_width],
                     "scheduler": scheduler},
        "environment": environment(url),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipelines": {}, "concurrency": {}, "static_batch": {}, "failed": {},
    }
    for name, make_contender in tqdm(contenders.items(), desc="pipelines"):
        try:
            contender = make_contender(context)
            results["pipelines"][name] = measure(name, contender, context, statistics)
            # diffusers is one in-process pipeline: it serves one request at a time, so its throughput
            # under load is its sequential images/s (threads would only fight over the same cores).
            if settings.requests and contender.served and settings.concurrency:
                results["concurrency"][name] = concurrency_runs(name, contender, settings, statistics)
            if contender.bounds_serving and settings.static_batches:
                results["static_batch"][name] = static_batch_runs(name, contender, settings)
        except Exception as error:  # keep the other contenders' figures; say what failed
            results["failed"][name] = f"{type(error).__name__}: {error}"
            tqdm.write(f"{name} failed: {results['failed'][name]}")
        if name in results["pipelines"]:
            tqdm.write(summary_line(name, results))
    results["fidelity"] = fidelity({name: r.pop("images") for name, r in results["pipelines"].items()})
    results["compute_budget"] = compute_budget(results)
    return results


def summary_line(name: str, results: dict) -> str:
    """One contender's figures as soon as they are measured (the table waits for the last one)."""
    latency = results["pipelines"][name]["latency"]
    parts = [f"{name}: mean {latency['mean_s']:.3f} s, p50 {latency['p50_s']:.3f} s"]
    for clients, run in results["concurrency"].get(name, {}).items():
        parts.append(f"{clients} clients {run['throughput_images_per_s']:.2f} images/s, {run['errors']} errors")
    for batch, run in results["static_batch"].get(name, {}).items():
        parts.append(f"{batch} images at once {run['throughput_images_per_s']:.2f} images/s")
    return "; ".join(parts)


STATIC_BATCH_RUNS = 3  # measured calls of each static batch (each makes N images)


def static_batch_runs(name: str, contender, settings: Settings) -> dict:
    """N images in one call of an in-process pipeline, for each N of the settings: the same
    kernels at the ideal batch, the bound for N concurrent clients of a served pipeline (with
    adapters, one call per adapter: Settings.batched_calls). {N: {"throughput_images_per_s",
    "latency"}}."""
    runs = {}
    for batch in settings.static_batches:
        def generate(batch=batch, **_options):  # the settings' requests, as batches
            return np.concatenate([contender(**options) for options in settings.batched_calls(batch)])

        batched = replace(settings, runs=STATIC_BATCH_RUNS)
        warm_up(f"{name} x{batch}", contender, generate, batched)
        latencies, discarded, images = measured_runs(f"{name} x{batch}", contender, generate, batched)
        assert len(images) == batch, f"{name}: {len(images)} images for a batch of {batch}"
        latency = latency_summary(latencies, images_per_request=batch)
        runs[str(batch)] = {"images": batch, "throughput_images_per_s": latency["images_per_s"], "latency": latency,
                            "discarded_recompilations_s": discarded}
    return runs


def init_image(dims: specs.ModelDims) -> np.ndarray:
    """The picture image to image starts from: the same every run, at the model's size (smooth
    gradients with some structure, as a photo has)."""
    y, x = np.mgrid[0:dims.image_height, 0:dims.image_width] / max(dims.image_height, dims.image_width)
    pixels = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, (np.cos(9 * x * y) * 0.5 + 0.5)], axis=-1)
    return (pixels[None] * 255).astype(np.uint8)


def with_picture(settings: Settings, dims: specs.ModelDims) -> Settings:
    """The settings with the picture an image task starts from (inpainting: and its mask, the
    middle of the picture repainted; ControlNet: its Canny edges, the control image)."""
    from utils.controlnet import canny

    image = init_image(dims)
    if settings.task == CONTROLNET:
        return replace(settings, control=canny(image))
    return replace(settings, image=image, mask=box_mask(*image.shape[1:3]) if settings.task == "inpaint" else None)


def concurrency_runs(name: str, contender, settings: Settings, statistics: TritonStatistics) -> dict:
    """One contender at each concurrency of the settings: {clients: run}."""
    return {str(clients): measure_concurrency(name, contender, settings, clients, statistics)
            for clients in settings.concurrency}


def run_concurrency(settings: Settings, model_dir: Path, url: str, contenders: Mapping[str, type],
                    headers: dict[str, str] | None = None) -> dict:
    """The concurrency mode alone, for the served contenders: {name: {clients: run}}."""
    if settings.task in (*IMAGE_TASKS, CONTROLNET):
        settings = with_picture(settings, specs.ModelDims.from_pretrained(model_dir))
    context, statistics = Context(settings, model_dir, url), TritonStatistics(url, headers)
    return {name: concurrency_runs(name, make_contender(context), settings, statistics)
            for name, make_contender in contenders.items() if make_contender.served}


def gpu_scaling(one_gpu: dict, all_gpus: dict, gpus: int) -> dict:
    """Images/s on one GPU and on ``gpus`` GPUs of the same host at each concurrency, and the
    factor between them (``gpus`` is the ideal)."""
    scaling = {}
    for name, runs in all_gpus.items():
        for clients, run in runs.items():
            single = one_gpu.get(name, {}).get(clients)
            if single is None:
                continue
            base, scaled = single["throughput_images_per_s"], run["throughput_images_per_s"]
            scaling.setdefault(name, {})[clients] = {
                "images_per_s_1_gpu": base, f"images_per_s_{gpus}_gpus": scaled, "gpus": gpus,
                "factor": scaled / base if base else float("nan"),
                "errors": single["errors"] + run["errors"],
            }
    return scaling
