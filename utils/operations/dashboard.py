"""The Grafana dashboard of the pipeline (deploy/grafana/sd-triton.json), built here from the specs'
model names and utils/metrics.py, and written by ``python scripts/write_grafana_dashboard.py``; a test
fails where the committed file differs, and another runs every query against a live Prometheus.

Every panel reads Triton's own metrics or the pipeline's (utils/metrics.py). Per-model panels
keep one series per model: an ensemble does no work of its own (its queue time is ~0), so it is
left out of the per-model times rather than averaged in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from utils import families, metrics, sdxl_ensembles, specs
from utils.layout import PROJECT_ROOT

PATH = PROJECT_ROOT / "deploy" / "grafana" / "sd-triton.json"
UID = "sd-triton"
RATE = "$__rate_interval"  # Grafana's: at least four scrape intervals
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def models_regex(*names: str) -> str:
    """The served names of these models, a network's per-GPU copies (``unet_gpu1``) included."""
    return "|".join(f"{name}(_gpu[0-9]+)?" for name in names)


# What a client calls: the BLS pipelines and the ensembles (SDXL's base then refiner's too).
ENTRY_MODELS = models_regex(*(spec.name for spec in specs.BLS_PIPELINES), *specs.ENSEMBLES,
                            *sdxl_ensembles.REFINER_ENSEMBLES)
# What does work: the networks and the Python models (the BLS pipelines and the ensembles' steps), SDXL's too.
WORKING_MODELS = models_regex(*specs.NETWORKS, families.TEXT_ENCODER_2.name, families.REFINER_UNET.name,
                              *specs.PIPELINES, *(step.name for step in sdxl_ensembles.REFINER_STEPS))
UNET = models_regex(specs.UNET.name)
GPU_PANELS = ("GPU utilization", "GPU memory used")  # Triton reports them only where it sees a GPU
IN_PROCESS_UNET = "UNet in the loop's process, share of the time computing"  # only --pipeline-loop with-unet
IN_PROCESS_BATCHES = "UNet in the loop's process, rows per call"
IN_PROCESS_PANELS = (IN_PROCESS_UNET, IN_PROCESS_BATCHES)


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    description: str = ""


def _per_model(counter: str, per: str, models: str) -> str:
    """A microsecond counter per ``per`` (requests or executions), in seconds, per model."""
    return (f"sum by (model) (rate({counter}{{model=~\"{models}\"}}[{RATE}])) / "
            f"sum by (model) (rate({per}{{model=~\"{models}\"}}[{RATE}])) / 1e6")


PANELS = (
    Panel("Images per second", "short", (
        (f"sum(rate({metrics.IMAGES.name}[{RATE}]))", "all"),
        (f"sum by (model) (rate({metrics.IMAGES.name}[{RATE}]))", "{{model}}"),
    ), "Final images sent (a request may make several: prompts x num_images_per_prompt)."),
    Panel("Images per second, by LoRA adapter", "short", (
        (f"sum by (adapter) (rate({metrics.LORA_IMAGES.name}[{RATE}]))", "{{adapter}}"),
    ), "Images made with each LoRA adapter (the deployment's --lora); the rest used the base weights."),
    Panel("End-to-end latency", "s", tuple(
        (f"max by (model) (nv_inference_request_summary_us{{model=~\"{ENTRY_MODELS}\",quantile=\"{q}\"}}) / 1e6",
         f"{{{{model}}}} p{label}")
        for q, label in (("0.5", "50"), ("0.9", "90"), ("0.99", "99"))
    ), "Triton's latency summaries over the last minute, per entry model (the worst pod)."),
    Panel("Requests per second", "reqps", (
        (f"sum by (model) (rate(nv_inference_request_success{{model=~\"{ENTRY_MODELS}\"}}[{RATE}]))", "{{model}}"),
    )),
    Panel("Failures per second, by reason", "reqps", (
        (f"sum by (model, reason) (rate(nv_inference_request_failure{{model=~\"{ENTRY_MODELS}\"}}[{RATE}]))",
         "{{model}} {{reason}}"),
        (f"sum by (model, input) (rate({metrics.REJECTED.name}[{RATE}]))", "refused: {{input}} ({{model}})"),
        (f"sum by (model, reason) (rate({metrics.INVALID_IMAGES.name}[{RATE}]))", "image {{reason}} ({{model}})"),
    ), "Triton's failure reasons, the inputs validation refused, and images refused before sending."),
    Panel("Queue time per request", "s", (
        (_per_model("nv_inference_queue_duration_us", "nv_inference_request_success", WORKING_MODELS), "{{model}}"),
    ), "Waiting for an instance: where it grows, the model is the bottleneck."),
    Panel("Compute time per execution", "s", (
        (_per_model("nv_inference_compute_infer_duration_us", "nv_inference_exec_count", WORKING_MODELS),
         "{{model}}"),
    ), "One execution may hold several requests (the networks' dynamic batching)."),
    Panel("UNet executions and denoising steps per second", "short", (
        (f"sum(rate(nv_inference_exec_count{{model=~\"{UNET}\"}}[{RATE}]))", "UNet executions/s"),
        (f"sum(rate({metrics.STEPS.name}[{RATE}]))", "denoising steps/s"),
    ), "Fewer executions than steps: the dynamic batcher put several requests' steps in one call."),
    Panel("UNet rows per execution", "short", (
        (f"sum(rate(nv_inference_count{{model=~\"{UNET}\"}}[{RATE}])) / "
         f"sum(rate(nv_inference_exec_count{{model=~\"{UNET}\"}}[{RATE}]))", "rows per execution"),
    ), "Rows (a request's step with guidance is two) per UNet call: the batch the engine ran."),
    Panel(IN_PROCESS_UNET, "percentunit", (
        (f"sum by (model) (rate({metrics.UNET_IN_PROCESS_SECONDS.name}[{RATE}]))", "{{model}}"),
    ), "--pipeline-loop with-unet: the UNet of each loop model, which Triton's statistics do not see; near 100 %, "
       "it is the bottleneck."),
    Panel(IN_PROCESS_BATCHES, "short", (
        (f"sum by (model) (rate({metrics.UNET_IN_PROCESS_ROWS.name}[{RATE}])) / "
         f"sum by (model) (rate({metrics.UNET_IN_PROCESS_CALLS.name}[{RATE}]))", "{{model}}"),
    ), "--pipeline-loop with-unet: the batch each loop model's own UNet ran (its loops' steps together; a step "
       "with guidance is two rows)."),
    Panel("UNet step, as the loop sees it", "s", tuple(
        (f"histogram_quantile({q}, sum by (le) (rate({metrics.UNET_STEP_SECONDS.name}_bucket[{RATE}])))", f"p{label}")
        for q, label in (("0.5", "50"), ("0.9", "90"), ("0.99", "99"))
    ), "The sub-request round trip: the UNet's queue and compute, and the tensors' way."),
    Panel("Pending requests", "short", (
        (f"sum by (model) (nv_inference_pending_request_count{{model=~\"{WORKING_MODELS}\"}})", "{{model}}"),
    )),
    Panel("GPU utilization", "percentunit", (("nv_gpu_utilization", "GPU {{gpu_uuid}}"),)),
    Panel("GPU memory used", "bytes", (("nv_gpu_memory_used_bytes", "GPU {{gpu_uuid}}"),)),
)


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard."""
    return [(panel.title, expression) for panel in PANELS for expression, _ in panel.queries]


def dashboard() -> dict:
    panels = []
    for index, panel in enumerate(PANELS):
        panels.append({
            "id": index + 1, "type": "timeseries", "title": panel.title, "description": panel.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expression,
                         "legendFormat": legend} for i, (expression, legend) in enumerate(panel.queries)],
        })
    return {
        "uid": UID, "title": "Stable Diffusion on Triton", "tags": ["triton", "stable-diffusion"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


def to_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def plot(prometheus, start: float, end: float, path, window: str = "20s") -> None:
    """The dashboard's panels as one picture, from a Prometheus's data between ``start`` and
    ``end`` (what Grafana would draw over that time; rates from one ``window`` after ``start``).
    Series that stayed at 0 are left out, and said so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2
    rows = -(-len(PANELS) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(14, 3.2 * rows), squeeze=False)
    first = start + float(window.removesuffix("s"))
    step = max(1.0, (end - first) / 120)
    for axis, panel in zip(axes.flat, PANELS):
        drawn, zeros = 0, 0
        for expression, legend in panel.queries:
            for series in prometheus.query_range(expression.replace(RATE, window), first, end, step):
                times, values = zip(*((float(t) - start, float(v)) for t, v in series["values"]))
                if not any(values):
                    zeros += 1
                    continue
                label = re.sub(r"\{\{(\w+)\}\}", lambda m: series["metric"].get(m[1], ""), legend)
                axis.plot(times, values, label=label, linewidth=1.2)
                drawn += 1
        axis.set_title(panel.title + (f" ({zeros} series at 0 not drawn)" if zeros else ""), fontsize=10, loc="left")
        axis.set_xlabel("seconds", fontsize=8)
        axis.set_ylabel(panel.unit, fontsize=8)
        axis.tick_params(labelsize=7)
        if drawn:
            axis.legend(fontsize=6, ncol=3, loc="upper left")
        else:
            reason = ("no GPU here: Triton reports these only where it sees one" if panel.title in GPU_PANELS
                      else "only with --pipeline-loop with-unet" if panel.title in IN_PROCESS_PANELS
                      else "every series at 0" if zeros else "no data")
            axis.text(0.5, 0.5, reason, ha="center", va="center", transform=axis.transAxes, color="grey")
    for axis in list(axes.flat)[len(PANELS):]:
        axis.axis("off")
    figure.suptitle("Stable Diffusion on Triton (deploy/grafana/sd-triton.json), from a live Prometheus", fontsize=12)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(path, dpi=110)
    plt.close(figure)
