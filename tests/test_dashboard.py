"""The Grafana dashboard: generated from the code, every query valid PromQL over known metrics."""

from __future__ import annotations

import json
import re

import promql_parser
import pytest

from utils import metrics
from utils.operations import dashboard

# Triton 2.51's metric families this dashboard reads (with --metrics-config=summary_latencies=true).
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                  "nv_inference_exec_count", "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                  "nv_inference_pending_request_count", "nv_inference_request_summary_us", "nv_gpu_utilization",
                  "nv_gpu_memory_used_bytes"}


def test_committed_dashboard_is_generated_from_the_code():
    assert json.loads(dashboard.PATH.read_text()) == dashboard.dashboard(), \
        "deploy/grafana/sd-triton.json differs: run `python scripts/write_grafana_dashboard.py`"


@pytest.mark.parametrize("title, expression", dashboard.queries())
def test_every_query_parses_and_reads_known_metrics(title, expression):
    promql_parser.parse(expression.replace(dashboard.RATE, "1m"))
    names = set(re.findall(r"\b((?:nv|sd)_[a-z_]+)", expression))
    ours = {m.name for m in metrics.METRICS} | {f"{metrics.UNET_STEP_SECONDS.name}_bucket"}
    assert names and names <= TRITON_METRICS | ours, names - TRITON_METRICS - ours


def test_every_metric_of_the_pipeline_is_on_the_dashboard():
    text = dashboard.PATH.read_text()
    assert all(metric.name in text for metric in metrics.METRICS)


def test_ensembles_are_not_among_the_models_that_work():
    assert re.fullmatch(dashboard.WORKING_MODELS, "unet_gpu1") and re.fullmatch(dashboard.WORKING_MODELS, "denoise")
    assert not re.fullmatch(dashboard.WORKING_MODELS, "ensemble_text_to_image")
    assert not re.fullmatch(dashboard.WORKING_MODELS, "decode")


def test_sdxl_models_are_on_the_dashboard():
    """SDXL's own models: its second text encoder, the refiner's UNet and steps do work; base then
    refiner's ensembles are what a client calls."""
    for model in ("text_encoder_2", "refiner_unet", "refiner_denoise", "refiner_tokenizer"):
        assert re.fullmatch(dashboard.WORKING_MODELS, model) and not re.fullmatch(dashboard.ENTRY_MODELS, model)
    for model in ("ensemble_text_to_image_refined", "refine_latents"):
        assert re.fullmatch(dashboard.ENTRY_MODELS, model) and not re.fullmatch(dashboard.WORKING_MODELS, model)
