"""A recorded run of the README as a user runs it: `make demo`, every walkthrough step's commands
as utils/walkthrough.py writes them, then the two test tiers, each with what it printed and how
long it took, on a machine named with its versions. The README quotes its outputs and times from
the record (docs/walkthrough-tiny-cpu.json), so none is typed by hand.

Written by ``python scripts/record_walkthrough.py``, on a checkout with nothing generated yet
(the record is what a first run prints).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from utils.errors import UsageError
from utils.layout import PROJECT_ROOT
from utils.version import machine_and_versions
from utils.walkthrough import WALKTHROUGH, Step

RECORD = Path("docs/walkthrough-tiny-cpu.json")
# What the walkthrough writes: a record starts with none of it, as a fresh clone does.
GENERATED = (Path("models"), Path("onnx"), Path("outputs"), Path("triton/models"))
CLEAN_COMMAND = "git clean -fdX " + " ".join(map(str, GENERATED))
DEMO, TESTS = "make demo", ("make test-fast", "make test")
READY = "Triton is ready"
KEY_PLACEHOLDER, KEY_SHOWN = "KEY", "<admin key>"


@dataclass
class Run:
    step: str  # a walkthrough step's number, or "demo" / "tests"
    command: str
    output: str  # what it printed on stdout (the documents quote it)
    seconds: float
    errors: str = ""  # on stderr: progress bars and warnings, kept for the record


def generated_files(root: Path = PROJECT_ROOT) -> list[str]:
    """Files the walkthrough generates that are already there (git ignores them)."""
    done = subprocess.run(["git", "clean", "-ndX", *map(str, GENERATED)], cwd=root, capture_output=True, text=True,
                          check=True)
    return [line.removeprefix("Would remove ") for line in done.stdout.splitlines()]


def require_fresh(root: Path = PROJECT_ROOT) -> None:
    existing = generated_files(root)
    if existing:
        raise UsageError(f"the walkthrough's outputs exist already ({', '.join(existing[:4])}...): a record is what a "
                         f"first run prints. Remove them with `{CLEAN_COMMAND}` (they are all generated), then "
                         f"record again.")


def _argv(command: str) -> list[str]:
    """A command as the user types it, run with this environment's Python and make."""
    argv = shlex.split(command)
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


def _environment() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1"}


def run_command(step: str, command: str, root: Path, key: str | None = None, timeout: float = 1800) -> Run:
    shown = command
    if key is not None:
        command = command.replace(KEY_PLACEHOLDER, key)
    print(f"$ {shown}", flush=True)
    start = time.monotonic()
    done = subprocess.run(_argv(command), cwd=root, env=_environment(), capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.monotonic() - start
    output, errors = done.stdout, done.stderr
    if key is not None:
        output, errors = output.replace(key, KEY_SHOWN), errors.replace(key, KEY_SHOWN)
    if done.returncode != 0:
        raise UsageError(f"`{shown}` failed (exit {done.returncode}):\n{(output + errors)[-3000:]}")
    print(f"    {seconds:.1f} s", flush=True)
    return Run(step, shown, output.rstrip(), round(seconds, 1), errors.rstrip())


class BackgroundStep:
    """A step that runs until stopped (the server): started, read until it is ready, stopped at
    the end of the record as Ctrl+C stops it."""

    def __init__(self, step: Step, root: Path):
        (self.command,) = step.commands
        self.step = step
        print(f"$ {self.command} &", flush=True)
        start = time.monotonic()
        self.process = subprocess.Popen(_argv(self.command), cwd=root, env=_environment(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines = []
        for line in self.process.stdout:
            lines.append(line.rstrip())
            if line.startswith(READY):
                lines.append(self.process.stdout.readline().rstrip())  # the admin key's line
                break
        else:
            raise UsageError(f"`{self.command}` ended before it was ready:\n" + "\n".join(lines[-30:]))
        self.seconds = time.monotonic() - start
        # Read on, so that the launcher never blocks on a full pipe while the other steps run (its
        # own start-up time-out ends a server that never gets ready, and with it the loop above).
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        match = re.search(r"admin-key: (\S+)", "\n".join(lines))
        self.key = match[1] if match else None
        self.output = "\n".join(lines).replace(self.key or KEY_SHOWN, KEY_SHOWN)

    def run(self) -> Run:
        return Run(self.step.number, self.command, self.output, round(self.seconds, 1))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:  # not to hide the error that may be ending the record
            os.killpg(self.process.pid, signal.SIGKILL)


def record(root: Path = PROJECT_ROOT, with_tests: bool = True) -> dict:
    """Run the quickstart, then the walkthrough from a clean slate; write the record (RECORD) and
    the documents that quote it; then run the tests on those documents and record them too."""
    from utils.docs import write_documents  # the package renders from this module's record

    require_fresh(root)
    runs = [run_command("demo", DEMO, root)]
    subprocess.run(shlex.split(CLEAN_COMMAND), cwd=root, check=True, capture_output=True)
    server = None
    try:
        for step in WALKTHROUGH:
            if step.background:
                server = BackgroundStep(step, root)
                runs.append(server.run())
                continue
            for command in step.commands:
                runs.append(run_command(step.number, command, root, key=server.key if server else None))
    finally:
        if server is not None:
            server.stop()
    result = {"recorded_at": time.strftime("%Y-%m-%d"), "environment": machine_and_versions(),
              "runs": [asdict(run) for run in runs]}
    write(result, root / RECORD)
    write_documents(root)  # the tests check the documents against the record
    if with_tests:
        result["runs"] += [asdict(run_command("tests", command, root)) for command in TESTS]
        write(result, root / RECORD)
        write_documents(root)
    return result


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def load(path: Path = RECORD, root: Path = PROJECT_ROOT) -> dict:
    return json.loads((root / path).read_text())


def runs_of(record: dict, step: str) -> list[dict]:
    return [run for run in record["runs"] if run["step"] == step]
