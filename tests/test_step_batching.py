"""StepBatcher (utils/python_backend/step_batching.py) on its own: the UNet steps of loops that
run in threads of one process meet in one batch, and each loop gets its own rows back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from utils import specs
from utils.python_backend.step_batching import StepBatcher


class Recorder:
    """A network that returns each row's sample times its timestep and records its batch sizes.
    Its first call holds the worker until ``release`` is set, so that the next calls queue."""

    def __init__(self):
        self.batches: list[int] = []
        self.busy, self.release = threading.Event(), threading.Event()

    def __call__(self, sample, timestep, hidden):
        if not self.busy.is_set():
            self.busy.set()
            assert self.release.wait(timeout=10)
        self.batches.append(sample.shape[0])
        if (timestep < 0).any():
            raise ValueError("negative timestep")
        return sample * timestep.view(-1, 1, 1, 1) + hidden.sum()


def new_batcher(network, max_batch: int = 16) -> StepBatcher:
    return StepBatcher(network, max_batch, torch.device("cpu"), [torch.float32] * 3)


def step(batcher, rows: int, value: float, size: int = 4, timestep: float = 2.0):
    return batcher(torch.full((rows, 4, size, size), value), torch.full((rows,), timestep), torch.zeros(rows, 3, 5))


def queue_behind_a_busy_worker(batcher, network, threads, calls):
    """Start one call that holds the worker, queue ``calls`` behind it, then let the worker go."""
    first = threads.submit(step, batcher, 2, 1.0)
    assert network.busy.wait(timeout=10)
    futures = [threads.submit(call) for call in calls]
    deadline = time.monotonic() + 10
    while len(batcher._pending) < len(calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    network.release.set()
    return first, futures


def test_calls_that_wait_together_run_as_one_batch_and_each_gets_its_own_rows():
    network = Recorder()
    batcher = new_batcher(network)
    with ThreadPoolExecutor(6) as threads:
        first, others = queue_behind_a_busy_worker(
            batcher, network, threads, [lambda v=v: step(batcher, 2, float(v)) for v in range(2, 7)])
        results = [first.result(timeout=10)] + [future.result(timeout=10) for future in others]
    for value, result in zip(range(1, 7), results, strict=True):
        assert result.shape == (2, 4, 4, 4) and torch.equal(result, torch.full_like(result, 2.0 * value))
    assert network.batches == [2, 10]  # the five waiting calls in one batch
    assert (batcher.batches, batcher.rows) == (2, 12)


def test_a_batch_larger_than_the_profile_runs_in_chunks():
    network = Recorder()
    network.busy.set()
    batcher = new_batcher(network, max_batch=4)
    result = step(batcher, 10, 3.0)
    assert network.batches == [4, 4, 2] and torch.equal(result, torch.full_like(result, 6.0))


def test_other_image_sizes_run_in_batches_of_their_own():
    network = Recorder()
    batcher = new_batcher(network)
    with ThreadPoolExecutor(3) as threads:
        first, others = queue_behind_a_busy_worker(
            batcher, network, threads, [lambda: step(batcher, 2, 1.0, 4), lambda: step(batcher, 2, 1.0, 6)])
        shapes = [tuple(future.result(timeout=10).shape) for future in (first, *others)]
    assert shapes == [(2, 4, 4, 4), (2, 4, 4, 4), (2, 4, 6, 6)]
    assert network.batches == [2, 2, 2]  # the first alone, then one batch per size


def test_a_failing_batch_fails_only_the_call_that_broke_it():
    network = Recorder()
    batcher = new_batcher(network)
    with ThreadPoolExecutor(3) as threads:
        first, (good, bad) = queue_behind_a_busy_worker(
            batcher, network, threads, [lambda: step(batcher, 2, 5.0), lambda: step(batcher, 2, 1.0, timestep=-1.0)])
        assert torch.equal(good.result(timeout=10), torch.full((2, 4, 4, 4), 10.0))
        with pytest.raises(ValueError, match="negative timestep"):
            bad.result(timeout=10)
        assert torch.equal(first.result(timeout=10), torch.full((2, 4, 4, 4), 2.0))
    assert network.batches == [2, 4, 2, 2]  # the batch of both failed; then each alone


def test_the_worker_waits_for_every_loop_in_flight_so_the_loops_stay_in_step():
    """Three loops of 5 steps that do not start together: once all three are in their loops,
    each batch holds one step of each, and a loop that ends stops being waited for."""
    network = Recorder()
    network.busy.set()
    batcher = StepBatcher(network, 16, torch.device("cpu"), [torch.float32] * 3, max_wait=10)  # no time-outs here
    started = threading.Barrier(3)

    def run_loop(steps: int, delay: float):
        time.sleep(delay)
        with batcher.loop():
            started.wait(timeout=10)  # all three in their loops before any step
            for _ in range(steps):
                step(batcher, 2, 1.0)
                time.sleep(0.002)  # the scheduler's work between two steps

    with ThreadPoolExecutor(3) as threads:
        for future in [threads.submit(run_loop, 5, 0.0), threads.submit(run_loop, 5, 0.01),
                       threads.submit(run_loop, 3, 0.02)]:
            future.result(timeout=30)
    assert network.batches == [6, 6, 6, 4, 4]  # three loops' steps together, then the two longer ones


def test_a_loop_that_fails_is_no_longer_waited_for_and_a_broken_batch_fails_its_callers():
    network = Recorder()
    network.busy.set()
    batcher = StepBatcher(network, 16, torch.device("cpu"), [torch.float32] * 3, max_wait=10)

    def failing_loop():
        with batcher.loop():
            step(batcher, 2, 1.0)
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        failing_loop()
    started = time.monotonic()
    with batcher.loop():  # a loop alone runs at once: the failed one is not waited for
        assert torch.equal(step(batcher, 2, 3.0), torch.full((2, 4, 4, 4), 6.0))
    assert time.monotonic() - started < 5
    # Inputs that cannot even be grouped (no shape) fail their caller; the worker lives on.
    with pytest.raises(Exception):
        batcher(3.0, 2.0, 1.0)
    assert torch.equal(step(batcher, 2, 1.0), torch.full((2, 4, 4, 4), 2.0))


def test_measure_loop_times_the_shared_loop_per_step(tiny_model, tmp_path):
    """scripts/gpu_host/measure_loop.py: what a served step costs besides its UNet call."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_host" / "measure_loop.py"
    output = tmp_path / "loop.json"
    result = subprocess.run([sys.executable, str(script), "--model", str(tiny_model), "--num-inference-steps", "4", "--runs", "1",
                             "--output", str(output)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(output.read_text())["ms_per_step"]
    assert {"cpu FP16", "cpu FP32"} <= set(figures) and all(0 < value < 1000 for value in figures.values())
    assert "loop on cpu, FP16:" in result.stdout


def test_close_answers_the_calls_waiting_then_ends_the_worker_and_counts_the_compute_time():
    network = Recorder()
    batcher = new_batcher(network)
    with ThreadPoolExecutor(2) as threads:
        first, (queued,) = queue_behind_a_busy_worker(batcher, network, threads, [lambda: step(batcher, 2, 3.0)])
        batcher.close()
        assert torch.equal(first.result(timeout=10), torch.full((2, 4, 4, 4), 2.0))
        assert torch.equal(queued.result(timeout=10), torch.full((2, 4, 4, 4), 6.0))
    batcher._worker.join(timeout=10)
    assert not batcher._worker.is_alive()  # a model's unload does not wait for it
    # On the CPU the batches ran when they were timed: the worker held the first one until released.
    assert 0 < batcher.compute_seconds() < 10


def test_a_request_whose_loop_has_not_started_is_waited_for_and_one_that_leaves_without_a_loop_is_not():
    batches = []

    def network(sample, timestep, hidden):
        batches.append(sample.shape[0])
        return sample

    batcher = StepBatcher(network, 16, torch.device("cpu"), [torch.float32] * 3, max_wait=5.0)
    started = threading.Event()

    def request(before_loop: float, loop: bool = True):
        with batcher.request():
            started.set()
            time.sleep(before_loop)  # the text encoder, say
            if loop:
                with batcher.loop():
                    return step(batcher, 2, 1.0)

    with ThreadPoolExecutor(2) as threads:
        late = threads.submit(request, 0.3)
        assert started.wait(timeout=10)
        start = time.monotonic()
        first = threads.submit(request, 0.0)
        first.result(timeout=10), late.result(timeout=10)
    assert batches == [4]  # the first request's step waited for the late one's, not for max_wait
    assert time.monotonic() - start < 4

    batches.clear()
    with ThreadPoolExecutor(2) as threads:
        refused = threads.submit(request, 0.2, loop=False)  # e.g. an invalid request: no loop at all
        start = time.monotonic()
        threads.submit(request, 0.0).result(timeout=10)
        refused.result(timeout=10)
    assert batches == [2] and time.monotonic() - start < 4  # not held for max_wait by the one that left


def test_the_in_process_unet_is_built_for_one_step_the_profiles_largest_batch_and_every_loops_step():
    """16 loops in flight fill 32 rows a round: one call of a static batch of 32, not two of 16."""
    from utils.python_backend.step_batching import static_batches

    largest = specs.UNET.profile.max
    assert static_batches(1) == static_batches(largest // 2) == (2, largest)
    assert static_batches(16) == (2, largest, 32)
