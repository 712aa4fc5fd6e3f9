"""The loop in the UNet's process: every in-flight request's UNet step, gathered into one batch.

A served UNet costs each denoising step a Triton request and response, through the Python
backend's stubs on both sides: about 4 ms a step on an H100, against 6.5 ms of the UNet's own
kernels (docs/gpu-notes.md). With ``--pipeline-loop with-unet`` a loop model holds a UNet of its
own: it runs each request's loop (the shared one, pipelines/stable_diffusion.py) in a thread, and
each step's UNet call comes here instead. One worker thread waits until every loop in flight has
asked for its step (``loop()`` counts them), runs their calls as one batch (in chunks the UNet's
profile allows) and hands each caller its rows: the dynamic batching Triton's scheduler does for
the served UNet, without a request per step. Waiting for every loop, rather than taking whatever
is waiting when the worker is free, keeps the loops in step: otherwise a request that arrives
while a batch runs starts a second group, and the groups take turns at half the batch each.

On a GPU the steps are queued rather than waited for: the loops keep their tensors on it, a batch
is queued and its rows handed back at once, and each loop goes on to queue its scheduler
arithmetic and its next step while the UNet runs, up to ``STEPS_QUEUED`` steps ahead of the GPU.
So the CPU's work of a step (the loops' Python, the hand-over, metric updates) overlaps the
UNet's kernels instead of adding to them, and a cancelled loop stops within that many steps. (A
scheduler that draws its noise on the CPU each step, like Euler ancestral, waits for the GPU
when it copies the noise over; so does every Triton sub-request, for the work queued so far.)
A loop waits for all its queued steps when it ends, so that its latents are ready for whatever
reads them next, on whichever GPU.

Kept free of Triton's ``triton_python_backend_utils``, so that it can be tested on its own.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable

import torch

from utils import specs
from utils.networks import run_in_chunks

Network = Callable[..., torch.Tensor]


def static_batches(loops_in_flight: int) -> tuple[int, ...]:
    """The batch sizes a compiled in-process UNet is built for (GraphedNetwork's static_batches):
    one request's step with guidance, alone; the served UNet's largest batch; and, where more
    loops are in flight, all of their steps at once (one prompt each), which the loops fill under
    load: one call of the same kernels for the whole round, as one static batch runs it (two calls
    of half the batch cost more per row). The batches between run in the next one up; larger ones
    in chunks of the largest."""
    one_step, full = specs.UNET.profile.opt, specs.UNET.profile.max
    every_loop = loops_in_flight * specs.UNET.profile.opt
    return (one_step, full, every_loop) if every_loop > full else (one_step, full)

# Steps a loop on the GPU may have queued and not finished: one to run while the CPU prepares the
# next, and one to spare for a slow turn of the CPU (Python's garbage collector, the GIL).
STEPS_QUEUED = 2


class StepBatcher:
    """Call it like the network, from any thread: ``noise = batcher(sample, timestep, hidden)``.

    Calls wait until every loop inside ``loop()`` has called (or ``max_wait`` seconds passed,
    should one be slow to come back), then run together: calls of one input shape (an image size)
    and one set of LoRA ``adapters`` as one batch, ``max_batch`` rows at a time, the adapters
    applied to the network's weights first (``lora``: utils/lora.py's InPlaceAdapters). Inputs are
    moved to ``dtypes`` on ``device``; the output stays there. On a GPU a call returns once its
    batch is queued and this loop's step ``STEPS_QUEUED`` back has finished.
    """

    def __init__(self, network: Network, max_batch: int, device: torch.device, dtypes: list[torch.dtype],
                 name: str = "unet", max_wait: float = 0.05, lora=None):
        self.network, self.max_batch, self.device, self.dtypes = network, max_batch, device, dtypes
        self.lora = lora  # applies a batch's adapters in place (None: the network has none)
        self.on_gpu = device.type == "cuda"
        self.max_wait = max_wait
        self.batches, self.rows = 0, 0  # network calls made, rows run: rows / batches is the mean batch
        # Each batch's compute time: CUDA events on a GPU (read once the batch has run; an upper
        # bound, as kernels that other loops queue between a batch's two events count too: their
        # scheduler arithmetic, a few per cent under load at most), the wall time of the call on a
        # CPU (where it has run when it returns).
        self._events: list[tuple] = []  # (start, end, network calls) of batches not read yet
        self._timing = threading.Lock()
        self._compute = ComputeTime()
        self._loops = 0  # loops in flight: each will call before its next step is done
        self._arrivals: dict[int, float] = {}  # requests whose loop has not started: when each came
        self._closed = False
        self._pending: list[tuple[tuple[torch.Tensor, ...], Future, tuple]] = []  # inputs, answer, adapters
        self._wake = threading.Condition()
        self._queued = threading.local()  # per request (a thread each): its queued steps' events, oldest first
        self._worker = threading.Thread(target=self._serve, name=f"{name} steps", daemon=True)
        self._worker.start()

    @contextmanager
    def request(self):
        """Around a whole request that will run a loop: until its loop starts (after the text
        encoder), the batches wait for its first step too, for at most ``max_wait`` after it
        came. Requests that arrive together (a round of clients answered at once) then start in
        full batches rather than the first ones a step or more ahead, in batches the others join
        late; one that is slow to start (a long text encoding under load) holds them up once."""
        key = threading.get_ident()
        with self._wake:
            self._arrivals[key] = time.monotonic()
        try:
            yield
        finally:
            self._arrived()  # never reached its loop (refused, cancelled, failed)

    def _arrived(self) -> None:
        with self._wake:
            if self._arrivals.pop(threading.get_ident(), None) is not None:
                self._wake.notify()

    @contextmanager
    def loop(self):
        """Around one request's denoising loop: the batches wait for its steps while it runs. At
        its end it waits for its queued steps, so that its latents are ready when it returns."""
        self._queued.steps = deque()
        self._arrived()
        with self._wake:
            self._loops += 1
        try:
            yield
        finally:
            with self._wake:
                self._loops -= 1
                self._wake.notify()  # the worker may have been waiting for this loop's next step
            if self.on_gpu:  # its last steps and the scheduler's arithmetic after them, done
                torch.cuda.current_stream(self.device).synchronize()
            self._queued.steps = deque()

    def __call__(self, *inputs: torch.Tensor, adapters: tuple[tuple[str, float], ...] = ()) -> torch.Tensor:
        if adapters and self.lora is None:
            raise ValueError(f"this UNet applies no LoRA adapters, and the call asks for {adapters}.")
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the UNet's worker has stopped: the model is unloading")
            self._pending.append((inputs, future, tuple(adapters)))
            self._wake.notify()
        output, finished = future.result()
        if finished is not None:  # a GPU batch, queued: wait only for this loop's step STEPS_QUEUED back
            queued = self._queued.__dict__.setdefault("steps", deque())  # a call outside loop() too
            queued.append(finished)
            while len(queued) > STEPS_QUEUED:
                queued.popleft().synchronize()
        return output

    def close(self, wait: bool = False) -> None:
        """Stop the worker once the calls waiting now are answered (the model's unload); a call
        after this fails at once. ``wait``: until the worker has stopped, its tensors let go."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if wait:
            self._worker.join()

    def _serve(self) -> None:
        if self.on_gpu:
            torch.cuda.set_device(self.device)  # the current device is per thread
        while (calls := self._next_calls()) is not None:
            self._run_batch(calls)  # its tensors are let go on return, not kept while the worker waits

    def _next_calls(self) -> list | None:
        """The calls of the next batch, once every loop in flight and every request that came
        less than ``max_wait`` ago has called, or ``max_wait`` has passed (None: closed)."""
        def everyone_called() -> bool:
            now = time.monotonic()
            arriving = sum(now - came < self.max_wait for came in self._arrivals.values())
            return len(self._pending) >= self._loops + arriving

        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            self._wake.wait_for(everyone_called, timeout=self.max_wait)
            calls, self._pending = self._pending, []
        return calls or None

    def _run_batch(self, calls: list[tuple[tuple[torch.Tensor, ...], Future, tuple]]) -> None:
        try:
            # Requests of different image sizes cannot share a batch, nor those of different adapters:
            # each group runs with its own weights (on a GPU, queued in order on this thread's stream).
            groups = defaultdict(list)
            for inputs, future, adapters in calls:
                groups[adapters, tuple(tuple(t.shape[1:]) for t in inputs)].append((inputs, future))
            for (adapters, _), group in sorted(groups.items(), key=lambda item: item[0][0] != self._applied()):
                if self.lora is not None:
                    self.lora.apply(adapters)
                self._answer(group)
        except Exception as error:  # the worker lives on: every loop waiting on this batch hears why
            for _, future, _ in calls:
                if not future.done():
                    future.set_exception(error)

    def _applied(self) -> tuple:
        """The adapters the network's weights hold now: their group runs first, with no switch."""
        return self.lora.current if self.lora is not None else ()

    def _answer(self, calls: list[tuple[tuple[torch.Tensor, ...], Future]]) -> None:
        """Run the calls as one batch; where the batch fails, each call alone, so that one bad call
        fails by itself (as the served UNet answers a batch of requests)."""
        try:
            outputs = self._run([inputs for inputs, _ in calls])
        except Exception:
            for inputs, future in calls:
                try:
                    output = self._run([inputs])[0]
                    future.set_result((output, self._queued_event()))
                except Exception as error:
                    future.set_exception(error)
            return
        finished = self._queued_event()
        for (_, future), output in zip(calls, outputs, strict=True):
            future.set_result((output, finished))

    def _queued_event(self):
        """On a GPU, an event that fires once the work queued so far has run (None on a CPU, where
        the batch has run already)."""
        if not self.on_gpu:
            return None
        event = torch.cuda.Event(blocking=True)  # a waiting loop sleeps rather than spins a core
        event.record()
        return event

    def _run(self, calls: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        sizes = [inputs[0].shape[0] for inputs in calls]
        with torch.inference_mode():
            merged = [torch.cat(column).to(device=self.device, dtype=dtype)
                      for column, dtype in zip(zip(*calls), self.dtypes, strict=True)]
            events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) if self.on_gpu else ()
            if events:
                events[0].record()
            start = time.perf_counter()
            output = run_in_chunks(self.network, merged, self.max_batch)
            network_calls = math.ceil(sum(sizes) / self.max_batch)  # run_in_chunks' calls
            with self._timing:
                if events:
                    events[1].record()
                    self._events.append((*events, network_calls, sum(sizes)))
                else:
                    self._compute.add(time.perf_counter() - start, network_calls, sum(sizes))
        self.batches += network_calls
        self.rows += sum(sizes)
        return list(output.split(sizes))

    def compute(self) -> ComputeTime:
        """The compute time, network calls and rows of the batches run so far (on a GPU: those
        that have finished)."""
        with self._timing:
            while self._events and self._events[0][1].query():  # finished batches, oldest first
                start, end, network_calls, rows = self._events.pop(0)
                self._compute.add(start.elapsed_time(end) / 1000, network_calls, rows)
            return self._compute

    def compute_seconds(self) -> float:
        """The compute time of the batches run so far (on a GPU: those that have finished)."""
        return self.compute().seconds

    def compute_report(self) -> str:
        """The batches' compute time per network call so far, and how busy they kept the device
        since the last report (of the wall time): under load, whether the GPU waits for the loops."""
        self.compute()
        with self._timing:
            return self._compute.report("GPU" if self.on_gpu else "CPU")


class ComputeTime:
    """The UNet's compute time, network calls and rows so far, and what ``report`` last said."""

    def __init__(self):
        self.seconds, self.calls, self.rows = 0.0, 0, 0
        self.reported_at, self.reported_seconds = None, 0.0  # None: since the first call

    def add(self, seconds: float, calls: int, rows: int) -> None:
        if self.reported_at is None:
            self.reported_at = time.monotonic() - seconds
        self.seconds, self.calls, self.rows = self.seconds + seconds, self.calls + calls, self.rows + rows

    def report(self, device: str) -> str:
        now = time.monotonic()
        since = now - (self.reported_at if self.reported_at is not None else now)
        busy = (self.seconds - self.reported_seconds) / max(since, 1e-9)
        self.reported_at, self.reported_seconds = now, self.seconds
        per_call = 1000 * self.seconds / max(self.calls, 1)
        return f"{per_call:.2f} ms per call on the {device}, busy {100 * busy:.0f} % since the last report"
