"""Wall-clock timing: named steps of a script, printed as a table at the end of a run; phases of
a served model's requests, logged when profiling; a question asked at most so often."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable


class StepTimer:
    def __init__(self):
        self.steps: list[tuple[str, float]] = []

    @contextmanager
    def step(self, name: str):
        print(f"==> {name}", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.steps.append((name, seconds))
            print(f"    done in {seconds:.1f} s", flush=True)

    def table(self) -> str:
        width = max(len(name) for name, _ in self.steps)
        lines = [f"{name:<{width}}  {seconds:7.1f} s" for name, seconds in self.steps]
        total = sum(seconds for _, seconds in self.steps)
        return "\n".join(lines + [f"{'total':<{width}}  {total:7.1f} s"])


PROFILE_VARIABLE = "SD_TRITON_PROFILE_BLS"  # =1: the served Python models log where their time goes
PROFILE_EVERY = 100  # a network's calls per logged split


def profiling() -> bool:
    return os.environ.get(PROFILE_VARIABLE) == "1"


class PhaseTimes:
    """Wall time per named phase, summed over calls: what the Python models log when
    SD_TRITON_PROFILE_BLS=1 (where a request's time goes between the networks' own compute, and
    within a network's call)."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def summary(self, total: float, rest: str = "the rest", calls: int = 1) -> str:
        """``total`` seconds split by phase, per call over ``calls``; what the phases leave is ``rest``."""
        parts = [f"{name} {1000 * seconds / calls:.2f} ms" for name, seconds in self.seconds.items()]
        left = total - sum(self.seconds.values())
        return f"{1000 * total / calls:.2f} ms: " + ", ".join(parts + [f"{rest} {1000 * left / calls:.2f} ms"])


# Triton's request.is_cancelled() is a round trip to the server process (0.2 ms a call on an H100
# host, where a step takes ~10 ms): asked before the first step, then at most this often, so a
# cancelled request stops within this time plus a step.
CANCELLATION_CHECK_SECONDS = 0.05


def at_most_every(seconds: float, is_cancelled: Callable[[], bool]) -> Callable[[], bool]:
    """``is_cancelled``, asked at its first call and then only once ``seconds`` have passed since
    it was last asked (False in between)."""
    asked = float("-inf")

    def throttled() -> bool:
        nonlocal asked
        if time.monotonic() - asked < seconds:
            return False
        asked = time.monotonic()
        return is_cancelled()

    return throttled
