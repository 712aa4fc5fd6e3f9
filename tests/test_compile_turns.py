"""utils/python_backend/compile_turns.py: of processes that compile the same graph at once, the
first runs alone and the others follow it together; another graph does not wait."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each process: its turn at graph KEY, holding it for SECONDS; prints when it held it.
HOLD = """
import json, sys, time
from utils.python_backend.compile_turns import compile_turn
key, folder, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with compile_turn(key, folder, log=lambda line: None) as first:
    start = time.time()
    time.sleep(seconds)
    end = time.time()
print(json.dumps({"key": key, "first": first, "start": start, "end": end}))
"""


def hold_turns(folder: Path, keys: list[str], seconds: float) -> list[dict]:
    processes = [subprocess.Popen([sys.executable, "-c", HOLD, key, str(folder), str(seconds)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True) for key in keys]
    return [json.loads(process.communicate(timeout=60)[0]) for process in processes]


def test_the_first_compiles_alone_then_the_others_together(tmp_path):
    turns = hold_turns(tmp_path, ["unet-2-16", "unet-2-16", "unet-2-16", "unet-2-16", "vae_decoder-dynamic"], 1.5)
    unet = [turn for turn in turns if turn["key"] == "unet-2-16"]
    (first,) = [turn for turn in unet if turn["first"]]
    followers = [turn for turn in unet if not turn["first"]]
    assert len(followers) == 3
    assert all(turn["start"] >= first["end"] for turn in followers)  # after the first, from its cache
    assert max(turn["start"] for turn in followers) < min(turn["end"] for turn in followers)  # together
    (other,) = [turn for turn in turns if turn["key"] == "vae_decoder-dynamic"]
    assert other["first"] and other["start"] < first["end"]  # another graph waits for no one


def test_a_process_that_dies_in_its_turn_blocks_no_one(tmp_path):
    dying = subprocess.Popen([sys.executable, "-c", HOLD, "unet-2", str(tmp_path), "60"], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    lock = tmp_path / "unet-2.lock"
    for _ in range(100):  # until it holds the turn
        if lock.exists():
            break
        subprocess.run(["sleep", "0.1"])
    subprocess.run(["sleep", "1"])
    dying.kill()
    dying.communicate()
    (turn,) = hold_turns(tmp_path, ["unet-2"], 0.1)
    assert turn["first"]
