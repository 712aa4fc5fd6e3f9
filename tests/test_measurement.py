"""The benchmark's measurement rules, on made-up timings: outliers are reported, runs that
compiled are measured again, warm-up goes on while runs still get faster. (The benchmark itself
runs in tests/test_benchmark.py.)"""

from __future__ import annotations

import pytest

from utils.benchmark.measure import latency_summary, measured_runs, warm_up
from utils.benchmark.report import table
from utils.benchmark.settings import Settings


class Contender:
    """Runs that take the given seconds (through a fake clock) and compile where told."""

    served = False

    def __init__(self, seconds, compiles_at=()):
        self.seconds, self.compiles_at, self.calls, self.graphs = list(seconds), set(compiles_at), 0, 0

    def compilations(self) -> int:
        return self.graphs

    def generate(self, clock, **options):
        clock.now += self.seconds[self.calls]
        self.graphs += self.calls in self.compiles_at
        self.calls += 1
        return "images"


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_outliers_are_reported_and_stay_in_the_figures():
    summary = latency_summary([1.0, 1.1, 0.9, 16.0])
    assert summary["outliers_s"] == [16.0] and summary["raw_s"][-1] == 16.0
    results = {"pipelines": {"diffusers-compiled": {
        "latency": summary, "discarded_recompilations_s": [12.0],
        "stages": dict(text_encoder=0.1, unet=0.5, unet_per_call=0.01, vae_decoder=0.1, other=0.35, end_to_end=1.05)}}}
    text = table(results)
    assert "diffusers-compiled: 1 measured run(s) over 3x the median (16.000 s)" in text
    assert "1 run(s) recompiled the model (12.000 s): left out and run again" in text
    # The compute budget: the networks' compute (0.7 s) against the end-to-end time (1.05 s).
    assert "diffusers-compiled        0.700         1.050         0.350       33%" in text


def test_a_run_that_compiled_is_measured_again(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("utils.benchmark.measure.time.perf_counter", clock)
    contender = Contender([1.0, 9.0, 1.1, 1.2], compiles_at={1})
    latencies, discarded, _ = measured_runs("x", contender, lambda **o: contender.generate(clock, **o),
                                            Settings(runs=3))
    assert latencies == pytest.approx([1.0, 1.1, 1.2]) and discarded == pytest.approx([9.0])


def test_warm_up_goes_on_while_runs_still_get_faster(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("utils.benchmark.measure.time.perf_counter", clock)
    contender = Contender([5.0, 1.0, 6.0, 1.0, 1.0] + [1.0] * 10)
    warm_up("x", contender, lambda **o: contender.generate(clock, **o), Settings(warmup=3))
    assert contender.calls == 4  # the third run was 6x the second: one more, which settled
    settled = Contender([1.0] * 10)
    warm_up("x", settled, lambda **o: settled.generate(clock, **o), Settings(warmup=3))
    assert settled.calls == 3


def test_postprocess_refuses_a_blank_or_broken_image_by_name():
    """What the postprocess step (and every pipeline) does with a decoded image that is not a
    picture: an error naming the image, never a black image sent as a success."""
    import torch

    from pipelines.stable_diffusion import InvalidImage, StableDiffusion

    good = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    images = StableDiffusion.postprocess(good)
    assert images.dtype == torch.uint8 and images.shape == (2, 4, 4, 3)
    broken = good.clone()
    broken[1, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidImage, match=r"image 1 is not finite"):
        StableDiffusion.postprocess(broken)
    flat = good.clone()
    flat[0] = 0.25
    with pytest.raises(InvalidImage, match=r"image 0 is one flat colour"):
        StableDiffusion.postprocess(flat)
