"""A fair benchmark of diffusers against the Triton pipelines: same work, figures that explain.

Every contender generates the same images (same model, device, precision, scheduler, steps,
guidance, resolution, seed; diffusers with its safety checker off and PIL output, like the
Triton pipelines' uint8 images). Per contender: warm-up runs, then measured runs (latency mean,
std, p50/p90/p99, images/s) and a stage breakdown (text encoder, UNet in total and per call, VAE
decoder, and the rest: orchestration, transport, queueing), from Triton's statistics API for the
served models and from timers around the networks for diffusers. A concurrency mode sends M
requests from N client threads and reports throughput, latency percentiles and client-counted
errors (Triton's metrics count error responses as successes).

Adding a contender is one line in CONTENDERS.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipelines.client import connect
from utils import specs
from utils.models import model_slug

STAGES = ("text_encoder", "unet", "vae_decoder")


@dataclass
class Settings:
    model: str = "tiny"
    prompt: str = "a photo of an astronaut riding a horse on mars"
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    warmup: int = 5
    runs: int = 20
    concurrency: tuple[int, ...] = ()  # client threads of each concurrency run (none by default)
    requests: int = 0  # requests in each concurrency run
    device: str = "cpu"
    precision: str = "FP32"
    # How the served pipelines were deployed (recorded with the figures).
    runtime: str = "onnxruntime"
    torch_compile: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()
    pipeline_instances: int = 0
    pipeline_loop: str = "cpu"

    def options(self) -> dict:
        return dict(prompt=self.prompt, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                    seed=self.seed)


@dataclass
class Context:
    """What a contender needs: the model folder and, for the Triton ones, the server address."""

    settings: Settings
    model_dir: Path
    url: str | None


# ---------------------------------------------------------------- contenders


class DiffusersContender:
    """Plain diffusers.StableDiffusionPipeline in this process: the baseline."""

    served = False

    def __init__(self, context: Context):
        import diffusers
        import torch
        from diffusers import StableDiffusionPipeline

        self.torch = torch
        settings = context.settings
        dtype = {"FP32": torch.float32, "FP16": torch.float16}[settings.precision]
        self.pipeline = StableDiffusionPipeline.from_pretrained(
            context.model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(settings.device)
        self.pipeline.set_progress_bar_config(disable=True)
        diffusers.utils.logging.set_verbosity_error()  # no per-call prompt truncation warnings

    def client(self):
        return self

    def __call__(self, prompt, seed, **options) -> np.ndarray:
        generator = self.torch.Generator().manual_seed(seed)
        images = self.pipeline(prompt, generator=generator, output_type="pil", **options).images
        return np.stack([np.asarray(image) for image in images])

    @contextmanager
    def stage_timers(self, totals: dict[str, float], calls: dict[str, int]):
        """Time the three networks' forward calls (synchronizing the GPU, so only while profiling)."""
        # vae.decoder: all of the VAE decoder network but its first 1x1 convolution (post_quant_conv).
        modules = {"text_encoder": self.pipeline.text_encoder, "unet": self.pipeline.unet,
                   "vae_decoder": self.pipeline.vae.decoder}
        starts, handles = {}, []

        def sync():
            if self.torch.cuda.is_available():
                self.torch.cuda.synchronize()

        for stage, module in modules.items():
            def before(_module, _inputs, stage=stage):
                sync()
                starts[stage] = time.perf_counter()

            def after(_module, _inputs, _outputs, stage=stage):
                sync()
                totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - starts[stage]
                calls[stage] = calls.get(stage, 0) + 1

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class CompiledDiffusersContender(DiffusersContender):
    """diffusers with its UNet under torch.compile(mode="reduce-overhead"): the strongest plain
    PyTorch baseline on a GPU (compiling takes a minute or more, spent in the warm-up runs)."""

    def __init__(self, context: Context):
        super().__init__(context)
        self.pipeline.unet = self.torch.compile(self.pipeline.unet, mode="reduce-overhead", fullgraph=True)


class ClientSideContender:
    """pipelines/ensemble.py: the loop here, each network a gRPC call."""

    served = True

    def __init__(self, context: Context):
        self.context = context

    def client(self):
        from pipelines.ensemble import ClientSidePipeline

        pipeline = ClientSidePipeline(self.context.model_dir, self.context.url, timeout=None)
        return lambda **options: pipeline(progress=False, **options)


class BlsContender:
    """triton/models/pipeline_text_to_image: one request, the loop inside Triton."""

    served = True

    def __init__(self, context: Context):
        self.context = context

    def client(self):
        from pipelines.bls import BlsPipeline

        return BlsPipeline(self.context.url, timeout=None)


CONTENDERS = {
    "diffusers": DiffusersContender,
    "diffusers-compiled": CompiledDiffusersContender,
    "triton-client-side": ClientSideContender,
    "triton-bls": BlsContender,
}


# ---------------------------------------------------------------- measurements


def latency_summary(seconds: list[float], images_per_request: int = 1) -> dict:
    values = np.asarray(seconds)
    return {
        "runs": len(values),
        "mean_s": float(values.mean()),
        "std_s": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "p50_s": float(np.percentile(values, 50)),
        "p90_s": float(np.percentile(values, 90)),
        "p99_s": float(np.percentile(values, 99)),
        "images_per_s": float(images_per_request / values.mean()),
        "raw_s": [float(v) for v in values],
    }


class TritonStatistics:
    """Cumulative per-model figures from Triton's statistics API, to diff around measured runs."""

    def __init__(self, url: str):
        self.client = connect(url)

    def settled_snapshot(self, timeout: float = 5.0) -> dict[str, dict[str, int]]:
        """A snapshot once the figures stop moving: Triton records a request's statistics just
        after it sends the response, so the last request's figures can still be on their way."""
        previous, deadline, unchanged = self.snapshot(), time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            current = self.snapshot()
            unchanged = unchanged + 1 if current == previous else 0
            if unchanged == 4:  # still for 200 ms: one quiet poll was not enough on a busy 2-core machine
                return current
            previous = current
        return previous

    def snapshot(self) -> dict[str, dict[str, int]]:
        figures = {}
        for model in self.client.get_inference_statistics(as_json=True).get("model_stats", []):
            stats = model.get("inference_stats", {})
            ns = lambda key: int(stats.get(key, {}).get("ns", 0))  # noqa: E731
            figures[model["name"]] = {
                "executions": int(model.get("execution_count", 0)),
                "requests": int(stats.get("success", {}).get("count", 0)),
                "compute_ns": ns("compute_input") + ns("compute_infer") + ns("compute_output"),
                **{f"{key}_ns": ns(key) for key in ("queue", "compute_input", "compute_infer", "compute_output")},
                # Per execution, not per request: a batch's requests each record the batch's time.
                "batch_rows": sum(int(b.get("batch_size", 0)) * int(b.get("compute_infer", {}).get("count", 0))
                                  for b in model.get("batch_stats", [])),
                "busy_ns": sum(int(b.get(key, {}).get("ns", 0)) for b in model.get("batch_stats", [])
                               for key in ("compute_input", "compute_infer", "compute_output")),
            }
        return figures

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
        """What each model's figures grew by between two snapshots."""
        return {name: {key: after[name][key] - before.get(name, {}).get(key, 0) for key in after[name]}
                for name in after}

    @staticmethod
    def stages(before: dict, after: dict, runs: int) -> dict:
        """Seconds per run spent computing in each network, and per UNet call."""
        delta = TritonStatistics.delta(before, after)
        stages = {stage: delta.get(stage, {}).get("compute_ns", 0) / 1e9 / runs for stage in STAGES}
        calls = delta.get("unet", {}).get("executions", 0)
        stages["unet_per_call"] = delta["unet"]["compute_ns"] / 1e9 / calls if calls else 0.0
        stages["unet_calls_per_run"] = calls / runs
        # Milliseconds per request in each phase of each model, to see where "other" goes.
        stages["per_request_ms"] = {
            name: {key.removesuffix("_ns"): figures[key] / 1e6 / figures["requests"]
                   for key in ("queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns")}
            for name, figures in delta.items() if figures.get("requests")
        }
        return stages


def measure(name: str, contender, context: Context, statistics: TritonStatistics | None) -> dict:
    """Warm-up, measured runs and stage breakdown of one contender."""
    settings = context.settings
    generate = contender.client()
    options = settings.options()
    for _ in tqdm(range(settings.warmup), desc=f"{name}: warm-up", leave=False):
        generate(**options)
    if contender.served and settings.pipeline_instances > 1:
        # Every pipeline instance is a process of its own that Triton picks in turn: one request
        # each at once, so the measured runs do not meet an instance serving its first request.
        with ThreadPoolExecutor(settings.pipeline_instances) as pool:
            list(pool.map(lambda _: contender.client()(**options), range(settings.pipeline_instances)))
    before = statistics.settled_snapshot() if contender.served else None
    latencies = []
    for _ in tqdm(range(settings.runs), desc=f"{name}: runs", leave=False):
        start = time.perf_counter()
        images = generate(**options)
        latencies.append(time.perf_counter() - start)
    result = {"latency": latency_summary(latencies), "images": images}
    if contender.served:
        stages = TritonStatistics.stages(before, statistics.settled_snapshot(), settings.runs)
        stages["end_to_end"] = result["latency"]["mean_s"]
        stages_source = "Triton statistics API over the measured runs"
    else:
        totals, calls, profiled = {}, {}, []
        profiled_runs = max(1, min(3, settings.runs))
        with contender.stage_timers(totals, calls):  # separate runs: the timers synchronize the GPU
            for _ in range(profiled_runs):
                start = time.perf_counter()
                generate(**options)
                profiled.append(time.perf_counter() - start)
        stages = {stage: totals.get(stage, 0.0) / profiled_runs for stage in STAGES}
        stages["unet_per_call"] = totals.get("unet", 0.0) / max(1, calls.get("unet", 0))
        stages["unet_calls_per_run"] = calls.get("unet", 0) / profiled_runs
        stages["end_to_end"] = sum(profiled) / profiled_runs
        stages_source = f"timers around the networks' forward calls, {profiled_runs} extra runs"
    # The rest of the time of the runs the stages were taken from.
    stages["other"] = stages["end_to_end"] - sum(stages[stage] for stage in STAGES)
    result["stages"] = stages
    result["stages_source"] = stages_source
    return result


def measure_concurrency(name: str, contender, settings: Settings, clients: int,
                        statistics: TritonStatistics | None = None) -> dict:
    """``settings.requests`` requests from ``clients`` threads, each with its own client; with
    the server's statistics, how full the UNet's batches were (dynamic batching at work)."""
    local = threading.local()
    options = settings.options()
    latencies, errors = [], []
    ready = threading.Barrier(clients)

    def warm_up(_):
        """One untimed request per client thread (each gets exactly one: they wait for each other),
        so client set-up and per-thread runtime initialization stay out of the measurement."""
        try:
            local.generate = contender.client()
            local.generate(**options)
        finally:
            ready.wait()

    def one_request(_):
        start = time.perf_counter()
        try:
            local.generate(**options)
            latencies.append(time.perf_counter() - start)
        except Exception as error:  # counted here: the server's own metrics count errors as successes
            errors.append(f"{type(error).__name__}: {error}")

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(warm_up, range(clients)))
        before = statistics.settled_snapshot() if statistics else None
        start = time.perf_counter()
        list(tqdm(pool.map(one_request, range(settings.requests)), total=settings.requests,
                  desc=f"{name}: {clients} clients", leave=False))
        wall = time.perf_counter() - start
    summary = latency_summary(latencies) if latencies else {}
    result = {
        "clients": clients, "requests": settings.requests, "errors": len(errors),
        "error_messages": errors[:5], "wall_s": wall, "throughput_images_per_s": len(latencies) / wall,
        "latency": summary,
    }
    if statistics:
        unet = TritonStatistics.delta(before, statistics.settled_snapshot())["unet"]
        if unet["executions"]:
            result["unet"] = {
                "executions": unet["executions"],
                "mean_batch": unet["batch_rows"] / unet["executions"],  # rows per call, 2 per image with guidance
                "ms_per_execution": unet["busy_ns"] / 1e6 / unet["executions"],
                "busy_fraction": unet["busy_ns"] / 1e9 / wall,  # of the wall time, the UNet computing
            }
    return result


# ---------------------------------------------------------------- environment and output


def environment(url: str | None) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    for package in ("torch", "diffusers", "transformers", "onnxruntime", "tritonclient", "nvidia-pytriton", "numpy"):
        try:
            env["versions"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env["versions"][package] = None
    if url:
        env["versions"]["tritonserver"] = connect(url).get_server_metadata().version
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def table(results: dict) -> str:
    header = (f"{'pipeline':<20} {'mean ± std (s)':>16} {'p50':>7} {'p90':>7} {'p99':>7} {'img/s':>7} │ "
              f"{'text enc':>8} {'unet':>8} {'per call':>9} {'vae dec':>8} {'other':>8}")
    lines = [header, "─" * len(header)]
    for name, result in results["pipelines"].items():
        latency, stages = result["latency"], result["stages"]
        lines.append(
            f"{name:<20} {latency['mean_s']:>8.3f} ± {latency['std_s']:<5.3f} {latency['p50_s']:>7.3f} "
            f"{latency['p90_s']:>7.3f} {latency['p99_s']:>7.3f} {latency['images_per_s']:>7.2f} │ "
            f"{stages['text_encoder']:>8.4f} {stages['unet']:>8.3f} {1000 * stages['unet_per_call']:>6.2f} ms "
            f"{stages['vae_decoder']:>8.4f} {stages['other']:>8.4f}"
        )
    if results.get("concurrency"):
        lines += ["", f"{'pipeline':<20} {'clients':>7} {'requests':>8} {'errors':>6} {'img/s':>7} "
                      f"{'p50 (s)':>8} {'p90 (s)':>8} {'p99 (s)':>8} │ {'unet batch':>10} {'ms/call':>8} {'busy':>5}"]
        for name, runs in results["concurrency"].items():
            for run in runs.values():
                latency = run["latency"] or {"p50_s": float("nan"), "p90_s": float("nan"), "p99_s": float("nan")}
                unet = run.get("unet") or {"mean_batch": float("nan"), "ms_per_execution": float("nan"),
                                           "busy_fraction": float("nan")}
                lines.append(f"{name:<20} {run['clients']:>7} {run['requests']:>8} {run['errors']:>6} "
                             f"{run['throughput_images_per_s']:>7.2f} {latency['p50_s']:>8.3f} "
                             f"{latency['p90_s']:>8.3f} {latency['p99_s']:>8.3f} │ {unet['mean_batch']:>10.1f} "
                             f"{unet['ms_per_execution']:>8.1f} {unet['busy_fraction']:>5.0%}")
    if results.get("gpu_scaling"):
        lines += ["", f"{'pipeline':<20} {'clients':>7} {'img/s 1 GPU':>12} {'img/s N GPUs':>13} {'GPUs':>5} "
                      f"{'factor':>7} {'errors':>6}"]
        for name, runs in results["gpu_scaling"].items():
            for clients, run in runs.items():
                scaled = run[f"images_per_s_{run['gpus']}_gpus"]
                lines.append(f"{name:<20} {clients:>7} {run['images_per_s_1_gpu']:>12.2f} {scaled:>13.2f} "
                             f"{run['gpus']:>5} {run['factor']:>6.2f}x {run['errors']:>6}")
    for name, error in results.get("failed", {}).items():
        lines.append(f"{name}: FAILED: {error}")
    if results.get("fidelity"):
        lines += ["", "fidelity, same seed as diffusers: " + "; ".join(
            _fidelity_text(name, entry) for name, entry in results["fidelity"].items())]
    return "\n".join(lines)


def _fidelity_text(name: str, entry: dict) -> str:
    if "psnr_db_vs_diffusers" not in entry:
        return f"{name} (reference)"
    psnr = entry["psnr_db_vs_diffusers"]
    return (f"{name} {'identical' if psnr is None else f'PSNR {psnr:.1f} dB'}, "
            f"max pixel difference {entry['max_pixel_difference']}")


def chart(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["pipelines"])
    concurrency = results.get("concurrency") or {}
    columns = 3 if concurrency else 2
    figure, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4.2))
    latencies = [results["pipelines"][n]["latency"] for n in names]
    axes[0].bar(names, [l["mean_s"] for l in latencies], yerr=[l["std_s"] for l in latencies], capsize=6,
                color="#4c78a8")
    for index, l in enumerate(latencies):
        axes[0].annotate(f"p50 {l['p50_s']:.3f}\np99 {l['p99_s']:.3f}", (index, l["mean_s"]),
                         ha="center", va="bottom", fontsize=8, xytext=(0, 8), textcoords="offset points")
    axes[0].set_ylabel("seconds per image (mean ± std)")
    axes[0].set_title("End-to-end latency")
    left = np.zeros(len(names))
    for stage, color in zip((*STAGES, "other"), ("#72b7b2", "#4c78a8", "#f58518", "#bab0ac")):
        widths = np.array([results["pipelines"][n]["stages"][stage] for n in names])
        axes[1].barh(names, widths, left=left, color=color, label=stage)
        left += np.maximum(widths, 0)
    axes[1].set_xlabel("seconds per image")
    axes[1].set_title("Where the time goes")
    axes[1].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    if concurrency:
        for name, runs in concurrency.items():
            clients = [int(c) for c in runs]
            axes[2].plot(clients, [r["throughput_images_per_s"] for r in runs.values()], marker="o", label=name)
        axes[2].set_xlabel("concurrent clients")
        axes[2].set_ylabel("images per second")
        axes[2].set_title("Throughput under load")
        axes[2].legend(fontsize=8)
    for axis in axes:
        axis.tick_params(axis="x", labelsize=8)
    s = results["settings"]
    figure.suptitle(f"{s['model']} on {results['environment']['gpu'] or results['environment']['cpu']} "
                    f"({s['device']}, {s['precision']}), {s['steps']} steps, guidance {s['guidance_scale']}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run_benchmark(settings: Settings, model_dir: Path, url: str | None, names: list[str]) -> dict:
    context = Context(settings, model_dir, url)
    statistics = TritonStatistics(url) if url else None
    dims = specs.ModelDims.from_pretrained(model_dir)
    results = {
        "settings": {**asdict(settings), "resolution": [dims.image_height, dims.image_width],
                     "scheduler": json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"]},
        "environment": environment(url),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipelines": {},
        "concurrency": {},
        "failed": {},
    }
    for name in tqdm(names, desc="pipelines"):
        try:
            contender = CONTENDERS[name](context)
            results["pipelines"][name] = measure(name, contender, context, statistics)
        except Exception as error:  # keep the other contenders' figures; say what failed
            results["failed"][name] = f"{type(error).__name__}: {error}"
            tqdm.write(f"{name} failed: {results['failed'][name]}")
            continue
        # diffusers is one in-process pipeline: it serves one request at a time, so its throughput
        # under load is its sequential images/s (threads would only fight over the same cores).
        if settings.requests and contender.served and settings.concurrency:
            results["concurrency"][name] = concurrency_runs(name, contender, settings, statistics)
    results["fidelity"] = fidelity({name: r.pop("images") for name, r in results["pipelines"].items()})
    return results


def concurrency_runs(name: str, contender, settings: Settings, statistics: TritonStatistics) -> dict:
    """One contender at each concurrency of the settings: {clients: run}."""
    return {str(clients): measure_concurrency(name, contender, settings, clients, statistics)
            for clients in settings.concurrency}


def run_concurrency(settings: Settings, model_dir: Path, url: str, names: list[str]) -> dict:
    """The concurrency mode alone, for the served contenders: {name: {clients: run}}."""
    context, statistics = Context(settings, model_dir, url), TritonStatistics(url)
    return {name: concurrency_runs(name, CONTENDERS[name](context), settings, statistics)
            for name in names if CONTENDERS[name].served}


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


def fidelity(images: dict[str, np.ndarray], reference: str = "diffusers") -> dict:
    """Each pipeline's image (same seed) against diffusers': PSNR, and whether it is a real image."""
    report = {}
    for name, image in images.items():
        entry = {"finite_and_not_constant": bool(image.std() > 0)}
        if reference in images and name != reference:
            mse = float(np.mean((image.astype(np.float64) - images[reference].astype(np.float64)) ** 2))
            entry["psnr_db_vs_" + reference] = None if mse == 0 else 10 * np.log10(255**2 / mse)  # None: identical
            entry["max_pixel_difference"] = int(np.abs(image.astype(int) - images[reference]).max())
        report[name] = entry
    return report


def fidelity_problems(results: dict, min_psnr_db: float) -> list[str]:
    """What fails the fidelity check: a blank or constant image, or PSNR below ``min_psnr_db``
    against diffusers (identical images have no PSNR: they pass)."""
    problems = []
    for name, entry in results.get("fidelity", {}).items():
        if not entry["finite_and_not_constant"]:
            problems.append(f"{name}: the image is constant (or not finite)")
        psnr = entry.get("psnr_db_vs_diffusers")
        if psnr is not None and not psnr >= min_psnr_db:
            problems.append(f"{name}: PSNR {psnr:.1f} dB vs diffusers, below {min_psnr_db} dB")
    if results.get("fidelity") and "diffusers" not in results["fidelity"]:
        problems.append("no diffusers image to compare with: include the diffusers contender")
    return problems


def write_results(results: dict, output_dir: Path) -> tuple[Path, Path]:
    """Timestamped files, so earlier results are never overwritten."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{model_slug(results['settings']['model'])}-{results['settings']['device']}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = output_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    try:
        return json_path, chart(results, output_dir / f"{stem}.png")
    except ImportError as error:  # a machine without matplotlib: the JSON has everything
        print(f"no chart ({error}): draw it elsewhere with `python scripts/plot_benchmark.py {json_path}`")
        return json_path, None

