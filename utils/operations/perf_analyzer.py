"""Triton's own load generator, perf_analyzer, on the project's models.

perf_analyzer (``make tools``, utils/operations/tools.py) keeps a fixed number of requests in flight and
reports what a client sees (throughput, latency percentiles) next to what the server recorded
for the model, and for a BLS pipeline for each network it called (its composing models). This
module builds its command lines and its input file from the specs, runs it, and parses its CSV
report and its summary into ``LoadResult``s; scripts/run_perf_analyzer.py is the command.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from utils import specs
from utils.errors import UsageError, UserError
from utils.server.health import served_shapes
from utils.request import GenerationRequest, request_to_arrays

# What perf_analyzer can drive with one request of fixed inputs and one answer: text to image
# (image to image would carry a whole picture in the JSON; the stream answers many times).
PIPELINES = {specs.TEXT_TO_IMAGE.name: specs.TEXT_TO_IMAGE}
PROTOCOL = "grpc"  # the project's clients speak gRPC; the server's HTTP is off by default
MICROSECONDS = 1e-6


class PerfAnalyzerFailed(UserError, RuntimeError):
    """perf_analyzer ended with an error: the message has its own last words."""


@dataclass(frozen=True)
class Load:
    """How hard and how long perf_analyzer loads the server, at each concurrency.

    With ``requests`` 0, it measures in windows of ``measurement_interval_ms`` until three in a
    row agree within ``stability_percent`` (perf_analyzer's own stabilization); with ``requests``,
    it sends exactly that many and reports them, stable or not: quicker, for a smoke test, but
    perf_analyzer then divides by whole seconds, so the throughput of a run shorter than a few
    seconds is too low (20 requests of 3 ms: 20 per second)."""

    concurrency: tuple[int, int, int] = (1, 1, 1)  # start, end, step
    measurement_interval_ms: int = 3000
    # perf_analyzer's own default is 10: where the client, the server and its stubs share two cores,
    # three windows in a row rarely agree that closely, and the step failed here after ten windows.
    stability_percent: int = 20
    requests: int = 0

    def __post_init__(self):
        start, end, step = self.concurrency
        if not (1 <= start <= end and step >= 1):
            raise UsageError(f"--concurrency {start}:{end}:{step}: give START[:END[:STEP]] with 1 <= START <= END "
                             f"and STEP >= 1, e.g. 1:4.")
        if self.requests < 0 or self.measurement_interval_ms < 1 or not 0 < self.stability_percent <= 100:
            raise UsageError(f"--requests {self.requests}, --measurement-interval {self.measurement_interval_ms}, "
                             f"--stability {self.stability_percent}: give a count of requests of at least 0 (0: time "
                             f"windows), milliseconds of at least 1 and a percentage in (0, 100].")
        if self.requests and start != end:  # perf_analyzer refuses it
            raise UsageError(f"--requests {self.requests} with --concurrency {start}:{end}:{step}: a request count "
                             f"applies to one concurrency; give one (e.g. --concurrency {start}), or measure in time "
                             f"windows (--requests 0).")

    def arguments(self) -> list[str]:
        arguments = ["--concurrency-range", ":".join(map(str, self.concurrency))]
        if self.requests:
            return [*arguments, "--request-count", str(self.requests)]
        return [*arguments, "--measurement-interval", str(self.measurement_interval_ms),
                "--stability-percentage", str(self.stability_percent)]


def parse_concurrency(text: str) -> tuple[int, int, int]:
    """``START[:END[:STEP]]``, as perf_analyzer's --concurrency-range takes it."""
    parts = text.split(":")
    if not (1 <= len(parts) <= 3 and all(part.strip().isdecimal() for part in parts)):
        raise UsageError(f"--concurrency {text!r}: give START[:END[:STEP]] in requests in flight, e.g. 1:4.")
    start, end, step = [*map(int, parts), *[None] * (3 - len(parts))]
    return start, end if end is not None else start, step if step is not None else 1


@dataclass(frozen=True)
class ComposingModel:
    """What the server recorded for a network a BLS pipeline called, per concurrency level."""

    name: str
    executions: int  # calls of the network (several requests' rows may share one with dynamic batching)
    inferences: int  # rows it computed
    latency_s: float  # average, request in to response out, on the server
    queue_s: float
    compute_infer_s: float


@dataclass(frozen=True)
class LoadResult:
    """One concurrency level: the client's view, the server's for the model, and its networks'.
    An inference is a row: ``batch`` of them per request to a network, one image per request to
    the pipeline."""

    concurrency: int
    requests: int  # completed in the measurement
    throughput: float  # inferences per second
    mean_s: float
    p50_s: float
    p90_s: float
    p95_s: float
    p99_s: float
    server_queue_s: float
    server_compute_s: float  # input, infer and output
    composing: tuple[ComposingModel, ...] = field(default=())


def network_arguments(config: Mapping, batch: int, url: str, load: Load,
                      headers: Mapping[str, str] | None = None) -> list[str]:
    """perf_analyzer's arguments for a served network at ``batch`` rows per request, on random
    inputs of the config's dtypes and its served shapes (the checkpoint's sizes where open)."""
    name, max_batch = config["name"], int(config.get("max_batch_size", 0))
    if not 1 <= batch <= max_batch:
        raise UsageError(f"--batch {batch}: {name} takes 1 to {max_batch} rows per request (its batch profile).")
    shapes = [argument for tensor, shape in served_shapes(config).items()
              for argument in ("--shape", f"{tensor}:{','.join(map(str, shape))}")]
    return ["-m", name, "-b", str(batch), *shapes, *_common_arguments(url, load, headers)]


def check_composing_models(client, spec: specs.PipelineSpec, url: str) -> None:
    """perf_analyzer reports the networks a BLS pipeline calls by the names given to it, the
    specs' own: a repository placed on several GPUs serves per-GPU copies instead."""
    missing = [network.name for network in spec.networks if not client.is_model_ready(network.name)]
    if missing:
        raise UsageError(f"--model {spec.name}: the server at {url} does not serve {', '.join(missing)} under those "
                         f"names (on several GPUs each network is served per GPU, e.g. {missing[0]}_gpu0), which "
                         f"perf_analyzer needs to report them: load-test a network copy with --model "
                         f"{missing[0]}_gpu0, or a repository on one GPU.")


def pipeline_input_data(request: GenerationRequest, spec: specs.PipelineSpec = specs.TEXT_TO_IMAGE) -> dict:
    """perf_analyzer's JSON input data: every request carries these tensors, as the project's
    clients send them (utils/request.py), each with its full shape (the model has no batch
    dim, so none is implied)."""
    tensors = {}
    for name, array in request_to_arrays(request, spec).items():
        values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in np.asarray(array).reshape(-1).tolist()]
        tensors[name] = {"content": values, "shape": list(array.shape)}
    return {"data": [tensors]}


def write_input_data(path: Path, request: GenerationRequest, spec: specs.PipelineSpec = specs.TEXT_TO_IMAGE) -> Path:
    path.write_text(json.dumps(pipeline_input_data(request, spec), indent=1))
    return path


def pipeline_arguments(spec: specs.PipelineSpec, input_data: Path, url: str, load: Load,
                       headers: Mapping[str, str] | None = None) -> list[str]:
    """perf_analyzer's arguments for a BLS pipeline: its requests from ``input_data``, and the
    networks it calls named as its composing models, so that their server times are reported
    (perf_analyzer cannot see BLS calls by itself, as it sees an ensemble's steps)."""
    composing = ",".join(network.name for network in spec.networks)
    return ["-m", spec.name, "--input-data", str(input_data), "--bls-composing-models", composing,
            *_common_arguments(url, load, headers)]


def _common_arguments(url: str, load: Load, headers: Mapping[str, str] | None) -> list[str]:
    # perf_analyzer reads the statistics API for the server's side, which this project's servers
    # restrict to the admin key (utils/server/access.py); -H carries it as gRPC metadata too.
    header_arguments = [argument for key, value in (headers or {}).items() for argument in ("-H", f"{key}:{value}")]
    return ["-u", url, "-i", PROTOCOL, *header_arguments, *load.arguments()]


def printable(command: Sequence[str], headers: Mapping[str, str] | None = None) -> str:
    """The command as a shell line, with the admin key (the value of -H and of --admin-key) left out."""
    secrets = set((headers or {}).values())
    shown = list(map(str, command))
    for index in range(1, len(shown)):
        if shown[index - 1] == "-H" and ":" in shown[index]:
            key, value = shown[index].split(":", 1)
            shown[index] = f"{key}:<admin key>" if value in secrets else shown[index]
        elif shown[index - 1] == "--admin-key":
            shown[index] = "<admin key>"
    return shlex.join(shown).replace("'<admin key>'", "<admin key>")


def full_command(arguments: Sequence[str], report: Path) -> list[str]:
    """The command that runs: the installed tool, these arguments (from the builders above), and
    the CSV report that ``measure`` parses."""
    from utils.operations.tools import tool

    return [str(tool("perf_analyzer")), *arguments, "-f", str(report.resolve()), "--verbose-csv"]


def measure(arguments: Sequence[str], report: Path, echo: Callable[[str], None] | None = print,
        cwd: Path | None = None) -> list[LoadResult]:
    """Run perf_analyzer with these arguments (in ``cwd``, where its input data may be), its CSV
    report written to ``report``; ``echo`` gets its own summary line by line as it comes. One
    LoadResult per concurrency level."""
    from utils.operations.tools import environment

    command = full_command(arguments, report)
    report.unlink(missing_ok=True)  # a report left by an earlier run is not this run's
    lines, usage = [], False
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=environment(), cwd=cwd) as process:
        try:
            for line in process.stdout:
                usage = usage or line.startswith("Usage:")  # its whole manual follows a refused argument
                if not usage:
                    lines.append(line.rstrip("\n"))
                    if echo:
                        echo(lines[-1])
        except BaseException:  # Ctrl+C: no perf_analyzer left loading the server
            process.kill()
            raise
    if process.returncode != 0 or not report.exists():
        raise PerfAnalyzerFailed(f"perf_analyzer failed (exit code {process.returncode}): {_last_words(lines)}")
    return parse_results(report.read_text(), "\n".join(lines))


def _last_words(lines: list[str]) -> str:
    """Its error line where it wrote one, else its last two lines (an unstable measurement)."""
    said = [line.strip() for line in lines if line.strip()]
    errors = [line for line in said if "error" in line.lower()]
    words = errors[-1:] or said[-2:]
    return " ".join(re.sub(r"^.*?error:\s*", "", line, flags=re.IGNORECASE) for line in words) or "no output"


def parse_results(csv_text: str, summary: str) -> list[LoadResult]:
    """perf_analyzer's verbose CSV (latencies in microseconds) joined with what only its printed
    summary has: the requests counted, and the composing models' server times."""
    levels = _parse_summary(summary)
    results = []
    for row in csv.DictReader(io.StringIO(csv_text)):
        concurrency = int(row["Concurrency"])
        seconds = lambda column: float(row[column]) * MICROSECONDS  # noqa: E731
        level = levels.get(concurrency, {})
        results.append(LoadResult(
            concurrency=concurrency, requests=level.get("requests", 0), throughput=float(row["Inferences/Second"]),
            mean_s=seconds("Avg latency"), p50_s=seconds("p50 latency"), p90_s=seconds("p90 latency"),
            p95_s=seconds("p95 latency"), p99_s=seconds("p99 latency"), server_queue_s=seconds("Server Queue"),
            server_compute_s=sum(seconds(f"Server Compute {phase}") for phase in ("Input", "Infer", "Output")),
            composing=tuple(level.get("composing", ())),
        ))
    return sorted(results, key=lambda result: result.concurrency)  # the CSV lists them by throughput


_LEVEL = re.compile(r"^Request concurrency: (\d+)")
_REQUEST_COUNT = re.compile(r"^\s+Request count: (\d+)")
_COMPOSING_MODEL = re.compile(r"^\s+(\S+), version: \S*$")
_COUNT = re.compile(r"^\s+(Inference|Execution) count: (\d+)")
_LATENCY = re.compile(r"^\s+Avg request latency: (\d+) usec \((.*)\)")
_PHASE = re.compile(r"([a-z][a-z ]*?) (\d+) usec")


def _parse_summary(summary: str) -> dict[int, dict]:
    """Per concurrency level: the client's request count and the composing models, from the
    summary perf_analyzer prints (its CSV has neither)."""
    levels: dict[int, dict] = {}
    level = model = None
    for line in summary.splitlines():
        if match := _LEVEL.match(line):
            level = levels.setdefault(int(match[1]), {"composing": []})
            model = None
        elif level is None:
            continue
        elif "requests" not in level and (match := _REQUEST_COUNT.match(line)):
            level["requests"] = int(match[1])
        elif match := _COMPOSING_MODEL.match(line):
            model = {"name": match[1]}
        elif model is not None and (match := _COUNT.match(line)):
            model[match[1].lower() + "s"] = int(match[2])
        elif model is not None and (match := _LATENCY.match(line)):
            phases = {name.strip(): int(value) * MICROSECONDS for name, value in _PHASE.findall(match[2])}
            level["composing"].append(ComposingModel(
                name=model["name"], executions=model.get("executions", 0), inferences=model.get("inferences", 0),
                latency_s=int(match[1]) * MICROSECONDS, queue_s=phases.get("queue", 0.0),
                compute_infer_s=phases.get("compute infer", 0.0)))
            model = None
    return levels


def table(results: Sequence[LoadResult]) -> str:
    """The parsed figures: a row per concurrency (the server's columns are the model's own: for a
    BLS pipeline, its queue is the wait for a free instance and its compute the whole loop), then
    for a pipeline each composing model's server times."""
    lines = [f"{'concurrency':>11} {'requests':>8} {'infer/s':>8} {'mean ms':>8} {'p50 ms':>7} {'p90 ms':>7} "
             f"{'p95 ms':>7} {'p99 ms':>7} {'server queue ms':>15} {'server compute ms':>17}"]
    for r in results:
        lines.append(f"{r.concurrency:>11} {r.requests:>8} {r.throughput:>8.2f} {1000 * r.mean_s:>8.1f} "
                     f"{1000 * r.p50_s:>7.1f} {1000 * r.p90_s:>7.1f} {1000 * r.p95_s:>7.1f} {1000 * r.p99_s:>7.1f} "
                     f"{1000 * r.server_queue_s:>15.1f} {1000 * r.server_compute_s:>17.1f}")
    if any(r.composing for r in results):
        lines += ["", f"{'concurrency':>11} {'composing model':<16} {'calls':>6} {'rows':>6} {'rows/call':>9} "
                      f"{'latency ms':>10} {'queue ms':>8} {'infer ms':>8}"]
        for r in results:
            for m in r.composing:
                lines.append(f"{r.concurrency:>11} {m.name:<16} {m.executions:>6} {m.inferences:>6} "
                             f"{m.inferences / max(m.executions, 1):>9.1f} {1000 * m.latency_s:>10.2f} "
                             f"{1000 * m.queue_s:>8.2f} {1000 * m.compute_infer_s:>8.2f}")
    return "\n".join(lines)


def write_record(path: Path, invocation: str, command: str, results: Sequence[LoadResult],
                 environment: Mapping) -> Path:
    """The figures of a run with the commands that measured them (the project's script and the
    perf_analyzer line it ran), the machine and the versions (``--record``)."""
    from utils.operations.tools import TRITONCLIENT_RELEASE

    path.parent.mkdir(parents=True, exist_ok=True)
    environment = {**environment, "perf_analyzer": f"tritonclient {TRITONCLIENT_RELEASE} wheel"}
    record = {"invocation": invocation, "command": command, "environment": environment,
              "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_record(path: Path) -> tuple[str, str, list[LoadResult]]:
    """A recorded run's commands (the script's, perf_analyzer's) and its figures."""
    record = json.loads(path.read_text())
    results = [LoadResult(**{**r, "composing": tuple(ComposingModel(**m) for m in r["composing"])})
               for r in record["results"]]
    return record["invocation"], record["command"], results
