"""A bounded load test on the tiny default: 8 concurrent clients, a few hundred requests.

No failed request; the same seed gives byte-identical images whichever instance serves it, under
concurrency and after a restart; the memory of the server and its stubs does not creep; nothing
is left behind (shared-memory regions, zombie processes). Prints throughput and percentiles.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import report, stub_count

from pipelines.bls import BlsPipeline
from utils import server as server_module
from utils.server import TritonServer

pytestmark = pytest.mark.server  # starts tritonserver

CLIENTS = 8
WARMUP_REQUESTS = 24
REQUESTS = 200
SEEDS = (1, 2, 3, 4, 5)
OPTIONS = dict(prompt="a red bicycle", num_inference_steps=4)
MAX_RSS_GROWTH = 0.10


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (the server and its Python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack += children.get(pid, [])
    return tree


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def zombie_children() -> list[int]:
    me = os.getpid()
    zombies = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == me:
                zombies.append(int(entry.name))
    return zombies


@pytest.fixture(scope="module")
def load_repository(bls_repository, tmp_path_factory):
    copy = tmp_path_factory.mktemp("load") / "repository"
    shutil.copytree(bls_repository, copy)
    return copy


def test_bounded_load(load_repository):
    server, regions = TritonServer(load_repository), set()
    try:
        server.start()
        regions = set(server.shm_regions)  # one per stub of this server
        assert len(regions) == stub_count(load_repository), regions
        reference = {seed: BlsPipeline(server.grpc_url)(seed=seed, **OPTIONS) for seed in SEEDS}
        local = threading.local()
        latencies, failures, mismatches = [], [], []

        def request(index: int) -> None:
            if not hasattr(local, "pipeline"):
                local.pipeline = BlsPipeline(server.grpc_url, retry_for=0)  # a failure must show
            seed = SEEDS[index % len(SEEDS)]
            start = time.perf_counter()
            try:
                images = local.pipeline(seed=seed, **OPTIONS)
            except Exception as error:
                failures.append(f"{type(error).__name__}: {error}")
                return
            latencies.append(time.perf_counter() - start)
            if not np.array_equal(images, reference[seed]):
                mismatches.append(seed)

        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(request, range(WARMUP_REQUESTS)))
            rss_after_warmup = rss_bytes(process_tree(server.process.pid))
            latencies.clear()
            started = time.perf_counter()
            list(pool.map(request, range(REQUESTS)))
            wall = time.perf_counter() - started
        rss_at_end = rss_bytes(process_tree(server.process.pid))
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        growth = rss_at_end / rss_after_warmup - 1
        report(f"load: {CLIENTS} clients, {REQUESTS} requests ({OPTIONS['num_inference_steps']} steps each): "
               f"{len(latencies) / wall:.1f} requests/s, latency p50 {p50:.3f} s p90 {p90:.3f} s p99 {p99:.3f} s, "
               f"{len(failures)} failed; server+stubs RSS {rss_after_warmup / 2**20:.0f} -> "
               f"{rss_at_end / 2**20:.0f} MiB ({100 * growth:+.1f} %)")
        assert not failures, failures[:3]
        assert not mismatches, f"images differ from the reference for seeds {sorted(set(mismatches))}"
        assert len(latencies) == REQUESTS
        assert growth <= MAX_RSS_GROWTH

        server.restart()
        for seed in SEEDS[:2]:
            assert np.array_equal(BlsPipeline(server.grpc_url)(seed=seed, **OPTIONS), reference[seed])
    finally:
        server.stop()
    assert regions & server_module.shm_regions() == set(), "shared-memory regions left behind"
    assert zombie_children() == []
