"""One process compiles a graph first, alone; the others then build theirs from the compile cache,
together.

A server's cold start loads several models that compile the same graph: each loop model's own
UNet, at the same static batches (--pipeline-loop with-unet). Side by side, each compiles it in
full and they contend for the cores: five took 181-187 s each on the H200 where one alone took
135 s, and a process that finds the graph in Inductor's cache (TORCHINDUCTOR_CACHE_DIR) built it
in 24 s, four at once as fast as one (docs/gpu-notes.md, the sixth series). So the first process
to reach a graph compiles it while the others wait for it, and they follow from the cache.

A lock file per graph in the cache's folder: the first takes it exclusively, the others wait for
a shared hold, which they all get at once when the first lets go. The system drops a dead
process's lock, so a crash in the first compilation does not block the others.
"""

from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from pathlib import Path


def compile_cache_dir() -> Path:
    """Inductor's cache folder: TORCHINDUCTOR_CACHE_DIR, or torch's default (as Inductor reads it)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


@contextmanager
def compile_turn(key: str, folder: Path | None = None, log=print):
    """Run the body (a compilation of graph ``key``) first and alone, or after the first one;
    yields whether this is the first."""
    folder = Path(folder) if folder is not None else compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            first = True
        except BlockingIOError:  # another process compiles this graph now
            started = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_SH)
            first = False
            log(f"{key}: waited {time.monotonic() - started:.0f} s for another process's compilation, "
                f"to build from the compile cache")
        try:
            yield first
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
