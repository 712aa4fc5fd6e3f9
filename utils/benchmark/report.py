"""What a benchmark run leaves: a table, a chart, a JSON with every figure, the machine, the
versions and the project's own version."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from utils.benchmark.fidelity import fidelity_text
from utils.benchmark.settings import task_stages
from utils.grpc_client import connect
from utils.models import model_slug
from utils.version import machine_and_versions


def environment(url: str | None) -> dict:
    """The machine and versions (utils/version.py), and the server's release where one answers."""
    env = machine_and_versions()
    if url:
        env["versions"]["tritonserver"] = connect(url).get_server_metadata().version
    return env


def compute_budget(results: dict) -> dict[str, dict[str, float]]:
    """Per pipeline, the ideal time of one image (the networks' own compute, summed: what no way
    of composing them can go below), the measured end-to-end time of the same runs, and the
    overhead between them: orchestration, transport, queueing, the scheduler's arithmetic."""
    budget = {}
    for name, result in results["pipelines"].items():
        stages = result["stages"]
        if unet_unmeasured(stages):  # its UNet's compute is not in the figures: no ideal to compare with
            continue
        ideal = sum(stages.get(stage, 0.0) for stage in stages_of(results))
        measured = stages["end_to_end"]
        budget[name] = {"ideal_s": ideal, "measured_s": measured, "overhead_s": measured - ideal,
                        "overhead_fraction": (measured - ideal) / measured if measured else float("nan")}
    return budget


def budget_lines(results: dict) -> list[str]:
    lines = [f"{'compute budget':<20} {'ideal (s)':>10} {'measured (s)':>13} {'overhead (s)':>13} {'overhead':>9}"]
    for name, entry in compute_budget(results).items():
        lines.append(f"{name:<20} {entry['ideal_s']:>10.3f} {entry['measured_s']:>13.3f} "
                     f"{entry['overhead_s']:>13.3f} {entry['overhead_fraction']:>9.0%}")
    for name, result in results["pipelines"].items():
        if unet_unmeasured(result["stages"]):
            lines.append(f"{name:<20} none: {IN_LOOP}")
    return lines


IN_LOOP = ("its UNet ran in the loop's own process (--pipeline-loop with-unet), out of Triton's statistics, and "
           "its compute metric could not be read (with --url, give --metrics-url)")


def unet_unmeasured(stages: dict) -> bool:
    """Its UNet ran in the loop's process and its compute could not be read (no metrics address)."""
    return bool(stages.get("unet_in_loop")) and not stages.get("unet")


def table(results: dict) -> str:
    """The results as text: latency and stages, compute budget, concurrency, GPU scaling, notes,
    fidelity."""
    lines = [work_text(results["settings"]), ""] if "settings" in results else []
    lines += _latency_lines(results) + [""] + budget_lines(results)
    lines += _step_lines(results)
    if results.get("concurrency"):
        lines += [""] + _concurrency_lines(results["concurrency"])
    if results.get("static_batch"):
        lines += [""] + _bound_lines(results)
    if results.get("gpu_scaling"):
        lines += [""] + _scaling_lines(results["gpu_scaling"])
    for name, error in results.get("failed", {}).items():
        lines.append(f"{name}: FAILED: {error}")
    if results.get("server"):
        lines += ["", server_text(results["server"])]
    lines += _notes(results)
    configurations = [f"  {name}: {result['configuration']}"
                      for name, result in results["pipelines"].items() if "configuration" in result]
    if configurations:  # (results of earlier versions have none)
        lines += ["", "configurations:"] + configurations
    if results.get("fidelity"):
        lines += ["", "fidelity, same seed as diffusers: " + "; ".join(
            fidelity_text(name, entry) for name, entry in results["fidelity"].items())]
    return "\n".join(lines)


def work_text(settings: dict) -> str:
    """What every contender made: the model, the task, the sampling, the adapters."""
    scheduler = f" of {settings['scheduler']}" if settings.get("scheduler") else ""
    text = (f"work: {settings.get('model')}, {settings.get('task', 'text-to-image')}, {settings.get('steps')} steps"
            f"{scheduler}, guidance {settings.get('guidance_scale')}")
    if settings.get("lora"):
        text += f", the requests asking for LoRA {' and '.join(settings['lora'])} in turn"
    return text


def server_text(server: dict) -> str:
    """How long the server this run started took to be ready (compilation at load included), and
    the restarts with the first start's compile cache, where measured."""
    text = f"server: ready {server['start_s']:.0f} s after its start"
    restarts = server.get("restarts") or ([{"total_s": server["restart_s"]}] if "restart_s" in server else [])
    if restarts:
        text += "; restarted (stop, start with the compile cache) in " + ", ".join(
            f"{r['total_s']:.0f} s" + (f" (stop {r['stop_s']:.0f} s)" if "stop_s" in r else "") for r in restarts)
    return text


def stages_of(results: dict) -> tuple[str, ...]:
    """The networks the run's task goes through (results of earlier versions: text to image)."""
    return task_stages(results.get("settings", {}).get("task", "text-to-image"))


def _latency_lines(results: dict) -> list[str]:
    # The stages besides the text encoder, the UNet and the VAE decoder that the task has, with their headings.
    extra = {stage: heading for stage, heading in (("vae_encoder", "vae enc"), ("controlnet", "ctrlnet"))
             if stage in stages_of(results)}
    header = (f"{'pipeline':<20} {'mean ± std (s)':>16} {'p50':>7} {'p90':>7} {'p99':>7} {'img/s':>7} │ "
              f"{'text enc':>8} " + "".join(f"{heading:>8} " for heading in extra.values())
              + f"{'unet':>8} {'per call':>9} {'vae dec':>8} {'other':>8}")
    lines = [header, "─" * len(header)]
    for name, result in results["pipelines"].items():
        latency, stages = result["latency"], result["stages"]
        lines.append(
            f"{name:<20} {latency['mean_s']:>8.3f} ± {latency['std_s']:<5.3f} {latency['p50_s']:>7.3f} "
            f"{latency['p90_s']:>7.3f} {latency['p99_s']:>7.3f} {latency['images_per_s']:>7.2f} │ "
            f"{stages['text_encoder']:>8.4f} " + "".join(f"{stages[stage]:>8.4f} " for stage in extra)
            + (f"{'in loop':>8} {'-':>9} " if unet_unmeasured(stages)
               else f"{stages['unet']:>8.3f} {'in loop':>9} " if not stages.get("unet_per_call")
               else f"{stages['unet']:>8.3f} {1000 * stages['unet_per_call']:>6.2f} ms ")
            + f"{stages['vae_decoder']:>8.4f} {stages['other']:>8.4f}"
        )
    return lines


def _concurrency_lines(concurrency: dict) -> list[str]:
    lines = [f"{'pipeline':<20} {'clients':>7} {'requests':>8} {'errors':>6} {'img/s':>7} "
             f"{'p50 (s)':>8} {'p90 (s)':>8} {'p99 (s)':>8} │ {'unet batch':>10} {'ms/call':>8} {'busy':>5}"]
    for name, runs in concurrency.items():
        for run in runs.values():
            latency = run["latency"]  # empty when every request failed
            percentiles = (" ".join(f"{latency[key]:>8.3f}" for key in ("p50_s", "p90_s", "p99_s")) if latency
                           else f"{'-':>8} {'-':>8} {'-':>8}")
            unet = run.get("unet")
            # Triton's per-batch statistics, or the pipeline's metrics for a UNet in the loop's
            # process; neither without the server's metrics address (with --url, --metrics-url).
            batching = (f"{unet['mean_batch']:>10.1f} {unet['ms_per_execution']:>8.1f} {unet['busy_fraction']:>5.0%}"
                        if unet else f"{'-':>10} {'-':>8} {'-':>5}")
            lines.append(f"{name:<20} {run['clients']:>7} {run['requests']:>8} {run['errors']:>6} "
                         f"{run['throughput_images_per_s']:>7.2f} {percentiles} │ {batching}")
    return lines


STEP_PARTS = {  # per_step_ms's keys, as the table names them
    "loop_python_and_scheduler": "the loop's Python and scheduler",
    "caller_stub_and_triton_core": "the caller's stub and Triton's core (request out, answer back)",
    "queue": "the UNet's queue",
    "copies_in_and_out": "copies in and out of the UNet's backend",
    "unet_model_execute": "the UNet model's execute (its stub and the network)",
}


def _step_lines(results: dict) -> list[str]:
    """Where one step goes, for the pipelines whose loop calls the served UNet through Triton."""
    lines = []
    for name, result in results["pipelines"].items():
        split = result["stages"].get("per_step_ms")
        if split:
            lines += ["", f"{name}: one denoising step, {split['steps_per_run']:.0f} per image, in ms"]
            lines += [f"  {text:<66} {split[key]:>7.2f}" for key, text in STEP_PARTS.items()]
    return lines


def _bound_lines(results: dict) -> list[str]:
    """Each static batch against the served pipelines at as many concurrent clients."""
    lines = []
    for bound_name, batches in results["static_batch"].items():
        for batch, run in batches.items():
            bound = run["throughput_images_per_s"]
            served = {name: runs[batch]["throughput_images_per_s"]
                      for name, runs in results.get("concurrency", {}).items() if batch in runs}
            lines.append(f"bound: {bound_name}, {batch} images in one call: {bound:.2f} img/s"
                         + (f"; at {batch} clients: " + ", ".join(f"{name} {value / bound:.2f}x"
                                                                 for name, value in served.items()) if served else ""))
    return lines


def _scaling_lines(scaling: dict) -> list[str]:
    lines = [f"{'pipeline':<20} {'clients':>7} {'img/s 1 GPU':>12} {'img/s N GPUs':>13} {'GPUs':>5} "
             f"{'factor':>7} {'errors':>6}"]
    for name, runs in scaling.items():
        for clients, run in runs.items():
            scaled = run[f"images_per_s_{run['gpus']}_gpus"]
            lines.append(f"{name:<20} {clients:>7} {run['images_per_s_1_gpu']:>12.2f} {scaled:>13.2f} "
                         f"{run['gpus']:>5} {run['factor']:>6.2f}x {run['errors']:>6}")
    return lines


def _notes(results: dict) -> list[str]:
    """Runs worth a second look: outliers kept in the figures, recompilations kept out."""
    notes = []
    for name, result in results["pipelines"].items():
        outliers = result["latency"].get("outliers_s", [])
        if outliers:
            notes.append(f"note: {name}: {len(outliers)} measured run(s) over 3x the median "
                         f"({', '.join(f'{s:.3f} s' for s in outliers)}), included in mean and std")
        discarded = result.get("discarded_recompilations_s", [])
        if discarded:
            notes.append(f"note: {name}: {len(discarded)} run(s) recompiled the model "
                         f"({', '.join(f'{s:.3f} s' for s in discarded)}): left out and run again")
    return notes


def chart(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = results.get("concurrency") or {}
    columns = 3 if concurrency else 2
    figure, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4.2))
    _latency_bars(axes[0], results)
    _stage_bars(axes[1], results)
    if concurrency:
        _throughput_lines(axes[2], concurrency, results.get("static_batch") or {})
    for axis in axes:
        axis.tick_params(axis="x", labelsize=8)
    s = results["settings"]
    task = f"{s.get('task', 'text-to-image')}, "
    figure.suptitle(f"{task}{s['model']} on {results['environment']['gpu'] or results['environment']['cpu']} "
                    f"({s['device']}, {s['precision']}), {s['steps']} steps, guidance {s['guidance_scale']}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _throughput_lines(axis, concurrency: dict, static_batch: dict) -> None:
    """Images/s against concurrent clients, and each static batch as its bound (a star at N)."""
    for name, runs in concurrency.items():
        clients = [int(c) for c in runs]
        axis.plot(clients, [r["throughput_images_per_s"] for r in runs.values()], marker="o", label=name)
    for name, batches in static_batch.items():
        sizes = [int(batch) for batch in batches]
        axis.plot(sizes, [run["throughput_images_per_s"] for run in batches.values()], linestyle="none",
                  marker="*", markersize=14, color="black", label=f"{name}, N images in one call (the bound)")
    axis.set_xlabel("concurrent clients")
    axis.set_ylabel("images per second")
    axis.set_title("Throughput under load")
    axis.legend(fontsize=8)


def _latency_bars(axis, results: dict) -> None:
    names = list(results["pipelines"])
    latencies = [results["pipelines"][n]["latency"] for n in names]
    # The error bar is the spread of the runs, never below zero.
    lower = [min(l["std_s"], l["mean_s"]) for l in latencies]
    axis.bar(names, [l["mean_s"] for l in latencies], yerr=[lower, [l["std_s"] for l in latencies]], capsize=6,
             color="#4c78a8")
    for index, l in enumerate(latencies):
        axis.annotate(f"p50 {l['p50_s']:.3f}\np99 {l['p99_s']:.3f}", (index, l["mean_s"]),
                      ha="center", va="bottom", fontsize=8, xytext=(0, 8), textcoords="offset points")
    axis.set_ylabel("seconds per image (mean ± std)")
    axis.set_title("End-to-end latency")
    axis.tick_params(axis="x", labelrotation=15)


def _stage_bars(axis, results: dict) -> None:
    names = list(results["pipelines"])
    left = np.zeros(len(names))
    colors = {"text_encoder": "#72b7b2", "vae_encoder": "#54a24b", "controlnet": "#b279a2", "unet": "#4c78a8",
              "vae_decoder": "#f58518", "other": "#bab0ac"}
    for stage in (*stages_of(results), "other"):
        color = colors[stage]
        widths = np.array([results["pipelines"][n]["stages"][stage] for n in names])
        axis.barh(names, widths, left=left, color=color, label=stage)
        left += np.maximum(widths, 0)
    axis.set_xlabel("seconds per image")
    axis.set_title("Where the time goes")
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)


def write_results(results: dict, output_dir: Path, json_path: Path | None = None) -> tuple[Path, Path | None]:
    """Timestamped files, so earlier results are never overwritten (``json_path``: this run's own
    files again, with what it has measured since)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if json_path is None:
        stem = (f"{model_slug(results['settings']['model'])}-{results['settings']['device']}-"
                f"{time.strftime('%Y%m%d-%H%M%S')}")
        json_path = output_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    try:
        return json_path, chart(results, json_path.with_suffix(".png"))
    except ImportError as error:  # a machine without matplotlib: the JSON has everything
        print(f"no chart ({error}): draw it elsewhere with `python scripts/plot_benchmark.py {json_path}`")
        return json_path, None
