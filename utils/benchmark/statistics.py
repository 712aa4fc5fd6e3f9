"""Triton's per-model statistics, diffed around the measured runs.

Figures are summed per network across its served copies (``unet_gpu0``, ``unet_gpu1``, ...:
utils/layout.py names them), so a repository on several GPUs reports like one on a single GPU.
"""

from __future__ import annotations

import time

from tritonclient.utils import InferenceServerException

from utils import metrics, specs
from utils.benchmark.settings import STAGES
from utils.errors import UsageError
from utils.grpc_client import connect
from utils.layout import network_of

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
IN_PROCESS_KEYS = ("seconds", "calls", "rows")  # of metrics.UNET_IN_PROCESS, in its order


def inference_statistics(client, url: str, headers: dict[str, str] | None, reader: str, model: str = "") -> dict:
    """Triton's statistics (JSON) for ``model`` (every model: ""), which this project's servers
    restrict to the admin key (utils/server/access.py): without it, or with another key, one line
    naming --admin-key and who reads the API (``reader``)."""
    try:
        return client.get_inference_statistics(model, as_json=True, headers=headers)
    except InferenceServerException as error:
        if "restricted" not in (error.message() or ""):
            raise
        given = f"{next(iter(headers.values()))!r} is not the server's key" if headers else "is needed"
        raise UsageError(f"--admin-key {given}: {reader} the statistics API of the server at {url}, which needs "
                         f"the key the launcher printed at start.") from None


class TritonStatistics:
    """Cumulative per-network figures from Triton's statistics API."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, metrics_url: str | None = None):
        self.url = url
        self.client = connect(url)
        self.headers = headers  # the admin key, where the statistics API is restricted
        self.metrics_url = metrics_url  # host:port of its metrics, for what the statistics do not see

    def unet_in_process(self) -> dict[str, float] | None:
        """The compute seconds, network calls and rows of the UNets in the loop models' own
        processes (--pipeline-loop with-unet), which Triton's statistics do not see, so far: from
        the pipeline's own metrics (None without the server's metrics address). Each request
        counts them before it is answered."""
        samples = self._metrics()
        if samples is None:
            return None
        return {key: metrics.total(samples, metric) for key, metric in zip(IN_PROCESS_KEYS, metrics.UNET_IN_PROCESS)}

    def loop_unet_calls(self) -> dict[str, float] | None:
        """The UNet calls the loop models made so far and their seconds as the loops saw them
        (the pipeline's histogram sd_unet_step_seconds; None without the metrics address)."""
        samples = self._metrics()
        if samples is None:
            return None
        histogram = metrics.UNET_STEP_SECONDS.name
        return {"seconds": sum(v for (name, _), v in samples.items() if name == f"{histogram}_sum"),
                "calls": sum(v for (name, _), v in samples.items() if name == f"{histogram}_count")}

    def _metrics(self) -> dict | None:
        """The server's metrics now; None without its address, or where it is not a metrics port
        (the figures that need them are then simply missing, as without an address)."""
        if self.metrics_url is None:
            return None
        try:
            return metrics.scrape(self.metrics_url)
        except OSError:
            return None

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
        statistics = inference_statistics(self.client, self.url, self.headers, "the benchmark reads")
        return per_network(statistics.get("model_stats", []))

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
        """What each network's figures grew by between two snapshots."""
        return {name: {key: after[name][key] - before.get(name, {}).get(key, 0) for key in after[name]}
                for name in after}

    @staticmethod
    def stages(before: dict, after: dict, runs: int, stages: tuple[str, ...] = STAGES) -> dict:
        """Seconds per run spent computing in each of these networks, and per UNet call."""
        delta = TritonStatistics.delta(before, after)
        stages = {stage: delta.get(stage, {}).get("compute_ns", 0) / 1e9 / runs for stage in stages}
        calls = delta.get("unet", {}).get("executions", 0)
        stages["unet_per_call"] = delta["unet"]["compute_ns"] / 1e9 / calls if calls else 0.0
        stages["unet_calls_per_run"] = calls / runs
        # Milliseconds per request in each phase of each model, to see where "other" goes.
        stages["per_request_ms"] = {
            name: {phase: figures[f"{phase}_ns"] / 1e6 / figures["requests"] for phase in PHASES}
            for name, figures in delta.items() if figures.get("requests")
        }
        return stages


def per_network(model_stats: list[dict]) -> dict[str, dict[str, int]]:
    """The statistics API's models, each network's served copies summed under its own name (each
    ControlNet's under ``controlnet``; the controlled UNet's under ``unet``: a denoising step's
    UNet call, with a ControlNet's residuals or without)."""
    figures: dict[str, dict[str, int]] = {}
    for model in model_stats:
        name = network_of(model["name"])
        network = figures.setdefault(specs.UNET.name if name == specs.CONTROLLED_UNET.name else name, {})
        for key, value in _model_figures(model).items():
            network[key] = network.get(key, 0) + value
    return figures


def _model_figures(model: dict) -> dict[str, int]:
    """One model's cumulative figures from the statistics API's JSON."""
    stats = model.get("inference_stats", {})
    ns = {phase: int(stats.get(phase, {}).get("ns", 0)) for phase in PHASES}
    batches = model.get("batch_stats", [])
    return {
        "executions": int(model.get("execution_count", 0)),
        "requests": int(stats.get("success", {}).get("count", 0)),
        "compute_ns": ns["compute_input"] + ns["compute_infer"] + ns["compute_output"],
        **{f"{phase}_ns": value for phase, value in ns.items()},
        # Per execution, not per request: a batch's requests each record the batch's time.
        "batch_rows": sum(int(b.get("batch_size", 0)) * int(b.get("compute_infer", {}).get("count", 0))
                          for b in batches),
        "busy_ns": sum(int(b.get(phase, {}).get("ns", 0)) for b in batches for phase in PHASES[1:]),
    }
