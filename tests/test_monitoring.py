"""A real Prometheus scrapes the local Triton server while requests run: every query of the
dashboard (deploy/grafana/) and every recording rule of the chart returns data for the
pipeline's models."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import yaml
from conftest import report
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.ensemble import EnsemblePipeline
from pipelines.streaming import StreamingPipeline
from utils import metrics, specs
from utils.operations import dashboard
from utils.operations.prometheus import RECORDING_RULES, LocalPrometheus
from utils.request import GenerationRequest, request_to_arrays

pytestmark = pytest.mark.server  # starts tritonserver and prometheus

WINDOW = "20s"  # the dashboard's $__rate_interval here: twenty 1-s scrapes


@pytest.fixture(scope="module")
def scraped(triton_server):
    """Prometheus, after 25 s of traffic through every way (and a refused request)."""
    with LocalPrometheus([triton_server.metrics_url], rule_files=[RECORDING_RULES]) as prometheus:
        stop = threading.Event()

        def traffic():
            bls, ensemble = BlsPipeline(triton_server.grpc_url), EnsemblePipeline(triton_server.grpc_url)
            streaming = StreamingPipeline(triton_server.grpc_url)
            while not stop.is_set():
                bls(["a cat", "a dog"], num_inference_steps=4, seed=1)
                ensemble("a cat", num_inference_steps=4, seed=1)
                image = np.full((1, 64, 64, 3), 90, np.uint8)
                bls("a cat", image=image, num_inference_steps=4, seed=1)
                ensemble("a cat", image=image, num_inference_steps=4, seed=1)
                list(streaming.stream("a cat", num_inference_steps=4, seed=1))
                try:  # past the client's own checks, to the server's
                    bls.infer(request_to_arrays(GenerationRequest(prompt="a cat", num_inference_steps=0)))
                except InferenceServerException:
                    pass

        threads = [threading.Thread(target=traffic) for _ in range(2)]  # two at once: queues and batches
        for thread in threads:
            thread.start()
        time.sleep(25)
        stop.set()
        for thread in threads:
            thread.join()
        assert prometheus.targets_up()
        yield prometheus


def finite_values(series: list[dict]) -> list[float]:
    return [float(s["value"][1]) for s in series if math.isfinite(float(s["value"][1]))]


# The session's server has no GPU and keeps its loops on the CPU: the GPU panels and the in-process
# UNet's (tests/test_loop_with_unet.py checks its metric) have no data here.
@pytest.mark.parametrize("title, expression", [q for q in dashboard.queries()
                                               if q[0] not in (*dashboard.GPU_PANELS, *dashboard.IN_PROCESS_PANELS)])
def test_every_dashboard_query_returns_data(title, expression, scraped):
    series = scraped.query(expression.replace(dashboard.RATE, WINDOW))
    assert finite_values(series), f"{title}: {expression} returned {series}"


def test_per_model_panels_cover_every_model_that_works(scraped):
    """Queue and compute time per model: each network and Python step that ran has its own series,
    and no ensemble (it does no work of its own)."""
    title, expression = next(q for q in dashboard.queries() if q[0] == "Compute time per execution")
    models = {s["metric"]["model"] for s in scraped.query(expression.replace(dashboard.RATE, WINDOW))
              if math.isfinite(float(s["value"][1]))}
    assert models >= {*specs.NETWORKS, "tokenizer", "denoise", "postprocess", "preprocess_image",
                      specs.TEXT_TO_IMAGE.name, specs.IMAGE_TO_IMAGE.name}
    assert not models & set(specs.ENSEMBLES)
    report(f"dashboard: {len(dashboard.queries())} queries, {len(models)} models with compute time, "
           f"against a live Prometheus")


def recording_rules() -> list[dict]:
    groups = yaml.safe_load(RECORDING_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "record" in rule]


@pytest.mark.parametrize("rule", [r["record"] for r in recording_rules()
                                  if not any(m.name in r["expr"] for m in metrics.UNET_IN_PROCESS)])
def test_every_recording_rule_returns_data(rule, scraped):
    series = scraped.query(rule)
    assert finite_values(series), f"{rule} has no finite samples: {series}"
