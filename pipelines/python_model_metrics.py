"""The pipeline models' own metrics (utils/metrics.py names them), through the Python backend's
custom metrics API: Triton serves them with its own on the metrics port.

Plumbing, kept apart from the models' requests (pipelines/python_model.py): every update goes
through one thread per model (MetricsWriter, which says why).
"""

from __future__ import annotations

import queue
import re
import threading
from concurrent.futures import Future

import triton_python_backend_utils as pb_utils

from pipelines.stable_diffusion import InvalidImage
from utils import metrics
from utils.request import InvalidRequest


class MetricsWriter:
    """The one thread that talks to Triton's metrics for this model. Each update is a message to
    Triton's process, which a loop's step should not wait for, and the 24.10 backend crashes the
    server (SIGSEGV) when two threads of one stub update metrics at once, which the loops with the
    UNet's threads would do. Updates are queued and made in order; ``flush`` waits for them."""

    def __init__(self, log_error):
        self.log_error = log_error
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self._thread.start()

    def call(self, function, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, function, args))
        return future

    def close(self, wait: bool = False) -> None:
        """Make the updates queued so far, then stop the thread (``wait``: until it has)."""
        self._queue.put(None)
        if wait:
            self._thread.join()

    def flush(self) -> None:
        """Wait until every update queued so far is made (before a request's answer: a client that
        reads the metrics after its answer sees its request counted)."""
        self.call(lambda: None).result()

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            future, function, args = item
            try:
                future.set_result(function(*args))
            except Exception as error:  # an update nobody waits for: say so in the log
                self.log_error(f"metrics: {function} failed: {error}")
                future.set_exception(error)


class QueuedMetric:
    """A series whose updates go through the model's MetricsWriter."""

    def __init__(self, series, writer: MetricsWriter):
        self.series, self.writer = series, writer

    def increment(self, value: float) -> None:
        self.writer.call(self.series.increment, value)

    def observe(self, value: float) -> None:
        self.writer.call(self.series.observe, value)


class PipelineMetrics:
    """This model's series of the pipeline's own metrics. Every instance (a process of its own)
    asks for the same families and series, and Triton hands it the one it already has, so the
    counts add up across instances."""

    def __init__(self, model: str, inputs: set[str]):
        self.model, self.inputs = model, inputs
        self.writer = MetricsWriter(pb_utils.Logger.log_error)
        # pb_utils gains MetricFamily when the stub starts the model, not at import.
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "histogram": pb_utils.MetricFamily.HISTOGRAM}
        self.families = {metric.name: self.writer.call(lambda m=metric: pb_utils.MetricFamily(
                             name=m.name, description=m.description, kind=kinds[m.kind])).result()
                         for metric in metrics.METRICS}
        self.images = self._series(metrics.IMAGES)
        self.steps = self._series(metrics.STEPS)
        self.unet_seconds = self._series(metrics.UNET_STEP_SECONDS)
        self.cache: dict[tuple, object] = {}
        self.counted_lock, self.counted = threading.Lock(), (0.0, 0, 0)  # unet_in_process's
        for reason in (metrics.NOT_FINITE, metrics.FLAT):  # at 0 from the start: a rate over them has data
            self._labelled(metrics.INVALID_IMAGES, reason=reason)

    def _series(self, metric: metrics.Metric, **labels: str) -> QueuedMetric:
        labels = {"model": self.model, **labels}
        histogram = {"buckets": list(metric.buckets)} if metric.buckets else {}
        series = self.writer.call(lambda: self.families[metric.name].Metric(labels=labels, **histogram)).result()
        return QueuedMetric(series, self.writer)

    def _labelled(self, metric: metrics.Metric, **labels: str) -> QueuedMetric:
        key = (metric.name, *labels.values())
        if key not in self.cache:  # two threads may make the same series: Triton hands both the one it has
            self.cache[key] = self._series(metric, **labels)
        return self.cache[key]

    def unet_in_process(self, compute) -> None:
        """The in-process UNet's compute, calls and rows so far (StepBatcher.compute), counted by what
        they grew since the last call: its batches are shared by the requests in flight, so each
        request counts those that have finished since the one before."""
        with self.counted_lock:
            totals = (compute.seconds, compute.calls, compute.rows)
            grown = [now - before for now, before in zip(totals, self.counted)]
            self.counted = tuple(max(now, before) for now, before in zip(totals, self.counted))
        for metric, value in zip(metrics.UNET_IN_PROCESS, grown):
            if value > 0:
                self._labelled(metric).increment(value)

    def rejected(self, error: InvalidRequest) -> None:
        """Count a refused request under the input its message names first (every check's message
        starts with it), or "request" where it names none."""
        match = re.match(r"[a-z_]+", str(error))
        name = match[0] if match and match[0] in self.inputs else "request"
        self._labelled(metrics.REJECTED, input=name).increment(1)

    def adapter_images(self, adapters, count: int) -> None:
        """``count`` images made with each of these LoRA adapters."""
        for name in adapters:
            self._labelled(metrics.LORA_IMAGES, adapter=name).increment(count)

    def invalid_image(self, error: InvalidImage) -> None:
        self._labelled(metrics.INVALID_IMAGES, reason=error.reason).increment(1)
