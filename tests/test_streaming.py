"""The streaming (decoupled) pipelines, text to image and image to image: progress, previews, the
final images, and cancellation when the client closes its stream."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import report
from test_end_to_end import init_images
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.streaming import StreamingPipeline
from utils import specs

pytestmark = pytest.mark.server  # starts tritonserver

ROOT = Path(__file__).resolve().parents[1]
# DDIM: one UNet call per step (PNDM makes one more), so the step counts are the request's.
OPTIONS = dict(prompt=["a red kite", "a green kite"], seed=3, num_inference_steps=6, scheduler="DDIMScheduler")


@pytest.fixture(scope="module")
def streaming(triton_server):
    return StreamingPipeline(triton_server.grpc_url)


def test_progress_previews_then_the_bls_image(streaming, triton_server):
    received = list(streaming.stream(preview_every=2, **OPTIONS))
    assert [(p.step, p.total_steps, p.final) for p in received] == [(2, 6, False), (4, 6, False), (6, 6, True)]
    for preview in received[:-1]:  # the latents' size, one per image
        assert preview.images.shape == (2, 8, 8, 3) and preview.images.dtype == np.uint8
    assert not np.array_equal(received[0].images, received[1].images)  # the picture moves with the steps
    final = received[-1].images
    assert np.array_equal(final, BlsPipeline(triton_server.grpc_url)(**OPTIONS))  # the same loop, the same image
    report(f"streaming pipeline: {len(received) - 1} previews of {received[0].images.shape[1:3]}, then the "
           f"final images {final.shape[1:3]}, equal to the BLS pipeline's")


def test_image_to_image_streams_its_previews_then_the_bls_image(streaming, triton_server, tiny_model):
    # Strength 0.5 of 6 steps: the last 3 run, as in StableDiffusionImg2ImgPipeline.
    options = dict(prompt="a red kite", image=init_images(1, tiny_model), strength=0.5, seed=3, num_inference_steps=6,
                   scheduler="DDIMScheduler")
    received = list(streaming.stream(preview_every=1, **options))
    assert [(p.step, p.total_steps, p.final) for p in received] == [(1, 3, False), (2, 3, False), (3, 3, True)]
    assert received[0].images.shape == (1, 8, 8, 3)
    final = received[-1].images
    assert np.array_equal(final, BlsPipeline(triton_server.grpc_url)(**options))
    report(f"streaming image to image: {len(received) - 1} previews, then the final image {final.shape[1:3]}, "
           f"equal to the BLS pipeline's")


def test_closing_the_stream_cancels_the_request_on_the_server(streaming, triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)

    def unet_executions() -> int:
        (stats,) = client.get_inference_statistics(specs.UNET.name, headers=triton_server.admin_headers(),
                                                   as_json=True)["model_stats"]
        return int(stats.get("execution_count", 0))

    stream = streaming.stream(preview_every=1, prompt="a long walk", num_inference_steps=900, seed=1,
                              scheduler="DDIMScheduler")
    first = next(stream)
    assert first.step == 1 and first.total_steps == 900
    stream.close()  # what leaving a for loop early does
    time.sleep(1.0)  # the loop notices at its next step
    stopped_at = unet_executions()
    time.sleep(2.0)
    assert unet_executions() == stopped_at, "the UNet is still being called: the request was not cancelled"
    report(f"streaming pipeline: closing the stream after step {first.step} of 900 stopped the loop")
    assert BlsPipeline(triton_server.grpc_url)("a cat", num_inference_steps=2, seed=1).shape == (1, 64, 64, 3)


def test_a_bad_stream_request_gets_its_error_and_the_model_keeps_streaming(streaming):
    with pytest.raises(InferenceServerException, match=r"preview_every=-1 is not allowed: use a number of steps"):
        list(streaming.stream(preview_every=-1, prompt="a cat", num_inference_steps=2))
    with pytest.raises(InferenceServerException, match=r"height=40 is not served: use a multiple of 8 in \[48, 96\]"):
        list(streaming.stream(prompt="a cat", num_inference_steps=2, height=40))
    assert streaming("a cat", num_inference_steps=2, seed=1, height=48, width=80).shape == (1, 48, 80, 3)


def test_the_walkthroughs_streaming_step_prints_what_its_record_says(triton_server, tmp_path):
    """Step 6's streaming command, as the step table writes it, with the session's server: it
    prints what the recorded run quotes (the script's output has no timings), and its previews."""
    from utils.docs.recording import load, runs_of

    (run,) = [run for run in runs_of(load(), "6") if "run_streaming_pipeline.py" in run["command"]]
    python, script, *arguments = shlex.split(run["command"])
    done = subprocess.run([sys.executable, str(ROOT / script), *arguments, "--url", triton_server.grpc_url],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip() == run["output"], "the script prints otherwise now: record the walkthrough again"
    assert "denoising on the server" in done.stderr
    previews = sorted(p.name for p in (tmp_path / "outputs" / "previews").iterdir())
    assert previews and previews == [f"step-{i:03d}.png" for i in range(1, len(previews) + 1)]
