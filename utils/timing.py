"""Wall-clock timing of named steps, printed as a table at the end of a run."""

from __future__ import annotations

import time
from contextlib import contextmanager


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
