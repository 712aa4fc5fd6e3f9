"""The pipeline's own Prometheus metrics, next to Triton's ``nv_*`` metrics on the metrics port
(8002, ``/metrics``).

Triton counts requests and executions per model; it cannot know that one request of
``pipeline_text_to_image`` made four images in 50 steps, or why a request was refused. The Python
models report that through the Python backend's custom metrics API
(pipelines/python_model.py), every series labelled with the model that reported it.
The dashboard and the recording rules (deploy/) read these names from here by way of a test.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter | histogram
    description: str
    labels: tuple[str, ...] = ("model",)
    buckets: tuple[float, ...] = ()  # a histogram's upper bounds, in the metric's unit


IMAGES = Metric("sd_images_total", "counter", "Images generated and sent (final images; not the streamed previews).")
STEPS = Metric("sd_denoising_steps_total", "counter", "Denoising steps run: one UNet call (both CFG halves) each.")
UNET_STEP_SECONDS = Metric(
    "sd_unet_step_seconds", "histogram",
    "One UNet call as the denoising loop sees it: the sub-request, its queue and the tensors' way there and back "
    "(a UNet in the loop's process: the batch of steps, and on a GPU the wait for the loop's queued steps).",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
)
UNET_IN_PROCESS_SECONDS = Metric(
    "sd_unet_in_process_seconds_total", "counter",
    "Compute time of the UNet batches a loop model ran in its own process (--pipeline-loop with-unet; CUDA events "
    "on a GPU, an upper bound: kernels other loops queue between a batch's events count too): the UNet's compute, "
    "which Triton's statistics do not see. Its rate is the share of the time that UNet computes.")
UNET_IN_PROCESS_CALLS = Metric(
    "sd_unet_in_process_calls_total", "counter",
    "Network calls of the UNet batches a loop model ran in its own process (--pipeline-loop with-unet): with "
    "the seconds and the rows, the compute per call and how full the batches were.")
UNET_IN_PROCESS_ROWS = Metric(
    "sd_unet_in_process_rows_total", "counter",
    "Rows (samples, 2 per image with guidance) of the UNet batches a loop model ran in its own process "
    "(--pipeline-loop with-unet): rows per call is the mean batch.")
UNET_IN_PROCESS = (UNET_IN_PROCESS_SECONDS, UNET_IN_PROCESS_CALLS, UNET_IN_PROCESS_ROWS)
REJECTED = Metric("sd_requests_rejected_total", "counter",
                  "Requests refused by validation (INVALID_ARG), by the input they got wrong.",
                  labels=("model", "input"))
INVALID_IMAGES = Metric("sd_invalid_images_total", "counter",
                        "Generated images refused before sending: not finite (NaN or infinity), or one flat colour.",
                        labels=("model", "reason"))
NOT_FINITE, FLAT = "not_finite", "flat"  # INVALID_IMAGES' reasons
LORA_IMAGES = Metric("sd_lora_images_total", "counter",
                     "Images made with a LoRA adapter, by adapter, counted by the model that ran their loop (a BLS "
                     "pipeline, or the ensembles' denoise step); the images without one are sd_images_total less these.",
                     labels=("model", "adapter"))
METRICS = (IMAGES, STEPS, UNET_STEP_SECONDS, *UNET_IN_PROCESS, REJECTED, INVALID_IMAGES, LORA_IMAGES)

# One sample of Prometheus' text format as Triton writes it: name{labels} value (no timestamps).
SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def scrape(metrics_url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample on a Triton metrics port (``host:port``): (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            samples[(match["name"], labels)] = float(match["value"])
    return samples


def total(samples: dict[tuple[str, frozenset], float], metric: Metric) -> float:
    """A metric's samples summed over their labels (every model's series)."""
    return sum(value for (name, _), value in samples.items() if name == metric.name)
