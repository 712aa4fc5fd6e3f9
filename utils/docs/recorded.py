"""What the documents quote from recorded runs (docs/*.json): the walkthrough's outputs and times,
the benchmark's tables and headline figures, each with the machine and versions it ran on."""

from __future__ import annotations

import json
from typing import Callable

from utils.layout import PROJECT_ROOT
from utils.walkthrough import WALKTHROUGH, Step
from utils.docs.recording import DEMO, KEY_PLACEHOLDER, RECORD, TESTS, load, runs_of

WALKTHROUGH_JSON = str(RECORD)


def _json(path: str) -> dict:
    return json.loads((PROJECT_ROOT / path).read_text())


def _trimmed(output: str, shown: int) -> str:
    """A long output as its first line, "...", and its last ``shown`` lines."""
    lines = output.splitlines()
    return output if len(lines) <= shown + 2 else "\n".join([lines[0], "...", *lines[-shown:]])


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def machine(path: str = WALKTHROUGH_JSON) -> str:
    """The machine and versions a record ran on, in a sentence's words."""
    record = _json(path)
    environment = record["environment"]
    versions = environment["versions"]
    device = environment.get("gpu") or "no GPU"
    when = record.get("recorded_at") or record.get("started_at", "")[:10]
    commit = environment.get("project", environment).get("git_commit", "")[:7]
    return (f"{environment['cpu_count']} cores ({environment['cpu']}), {device}, Python {environment['python']}, "
            f"torch {versions['torch']}; {when}, commit {commit}")


def quickstart(path: str = WALKTHROUGH_JSON) -> str:
    """`make demo`'s output as recorded, and the test tiers' last lines and times."""
    record = _json(path)
    (demo,) = runs_of(record, "demo")
    lines = [f"$ {DEMO}", _demo_output(demo["output"]), ""]
    for run in runs_of(record, "tests"):
        lines.append(f"$ {run['command']}")
        lines.append(run["output"].splitlines()[-1].strip("= "))
        lines.append("")
    return "```\n" + "\n".join(lines).rstrip() + "\n```"


def _demo_output(output: str) -> str:
    """The demo's summary: the images it saved (on one line) and each of its steps' times."""
    lines = output.splitlines()
    images, times = lines.index("Images:"), lines.index("Times:")
    saved = [line.strip() for line in lines[images + 1:times] if line.strip()]
    return "\n".join([f"Images: {', '.join(saved)}", *lines[times:]])


NOT_YET = "(not recorded yet: scripts/record_walkthrough.py records them)"


def test_times(path: str = WALKTHROUGH_JSON) -> str:
    """How long each test tier took in the recorded run, in a sentence's words."""
    record = _json(path)
    times = {run["command"]: _seconds(run["seconds"]) for run in runs_of(record, "tests")}
    return ", ".join(f"`{command}` {times[command]}" for command in TESTS if command in times) or NOT_YET


def test_measurements(path: str = WALKTHROUGH_JSON) -> str:
    """The `measured` section `make test` printed in the recorded run: what the tests measured."""
    runs = [run for run in runs_of(_json(path), "tests") if run["command"] == "make test"]
    if not runs:
        return NOT_YET
    lines = runs[0]["output"].splitlines()
    start = next(i for i, line in enumerate(lines) if " measured " in line and line.startswith("="))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("="))
    return "```\n" + "\n".join(lines[start + 1:end]) + "\n```"


def walkthrough(path: str = WALKTHROUGH_JSON) -> str:
    """Each step of the walkthrough: its title, what it does, its commands, and what they printed
    in the recorded run, with how long they took."""
    record = load(path)
    return "\n\n".join(_step(step, runs_of(record, step.number)) for step in WALKTHROUGH)


def _step(step: Step, runs: list[dict]) -> str:
    chapter = f" ([chapter](docs/tutorial/{step.chapter}))" if step.chapter else ""
    seconds = _seconds(sum(run["seconds"] for run in runs))
    took = "" if not runs else f" (ready after {seconds})" if step.background else f" ({seconds})"
    parts = [f"### {step.number}. {step.title}{took}", f"{step.does[0].upper()}{step.does[1:]}.{chapter}"]
    if not step.commands:
        return "\n\n".join(parts)
    if step.background:
        parts.append("It serves until Ctrl+C:")
    elif any(KEY_PLACEHOLDER in command for command in step.commands):
        server = next(s for s in WALKTHROUGH if s.background)
        parts.append(f"`{KEY_PLACEHOLDER}` is the admin key {server.label.lower()} printed:")
    parts.append("```bash\n" + "\n".join(step.commands) + "\n```")
    outputs = "\n".join(_trimmed(run["output"], step.shown) for run in runs)
    parts.append(f"```\n{outputs}\n```")
    return "\n\n".join(parts)


def recorded_run(number: str, index: str = "0", shown: str = "", path: str = WALKTHROUGH_JSON) -> str:
    """One command of a walkthrough step, and what it printed in the recorded run (its first line
    and last ``shown`` lines, where given)."""
    run = runs_of(load(path), number)[int(index)]
    output = _trimmed(run["output"], int(shown)) if shown else run["output"]
    return f"```bash\n{run['command']}\n```\n\n```\n{output}\n```"


def benchmark_table(path: str) -> str:
    """A recorded benchmark's tables, as scripts/benchmark_pipelines.py printed them."""
    from utils.benchmark.report import table

    return "```\n" + table(_json(path)) + "\n```"


def benchmark_setting(path: str) -> str:
    """What a recorded benchmark ran: model, size, steps, scheduler, guidance, precision, runs."""
    settings = _json(path)["settings"]
    height, width = settings["resolution"]
    return (f"{settings['model']}, {height}x{width}, {settings['steps']} {settings['scheduler'].removesuffix('Scheduler')} "
            f"steps, guidance {settings['guidance_scale']}, {settings['precision']} on {settings['device']}, "
            f"{settings['warmup']} warm-up and {settings['runs']} measured runs")


def gpu_benchmark_command(path: str) -> str:
    """The GPU benchmark script's command that makes a recorded run again: its settings as the
    script's variables (scripts/gpu_host/benchmark.sh)."""
    results = _json(path)
    settings = results["settings"]
    deployment = settings.get("deployment", settings)  # older records keep the deployment flat
    variables = {
        "PIPELINE_LOOP": deployment["pipeline_loop"], "PIPELINE_INSTANCES": deployment["pipeline_instances"],
        "TORCH_COMPILE": " ".join(deployment["torch_compile"]), "CONCURRENCY": " ".join(map(str, settings["concurrency"])),
        "REQUESTS": settings["requests"], "WARMUP": settings["warmup"], "RUNS": settings["runs"],
        "PIPELINES": " ".join(results["pipelines"]),
    }
    if settings.get("static_batches"):
        variables["STATIC_BATCH"] = " ".join(map(str, settings["static_batches"]))
    words = [f'{name}="{value}"' if " " in str(value) else f"{name}={value}" for name, value in variables.items()]
    lines, line = [], ""
    for word in words:
        if len(line) + len(word) > 90:
            lines.append(line)
            line = ""
        line += word + " "
    lines.append(line + "bash scripts/gpu_host/benchmark.sh")
    lines = [text.rstrip() for text in lines]
    return "```bash\n" + " \\\n  ".join(lines) + "\n```"


# The strongest diffusers a run measured, and how the headline names it.
DIFFUSERS_NAMES = {"diffusers-fast": "diffusers with its own speed recipe",
                   "diffusers-compiled": "diffusers with its UNet compiled"}


def gpu_headline(path: str) -> str:
    """The GPU run's figures that answer "is it fast": BLS per image against the strongest
    diffusers of the same run, and its best images/s under load."""
    results = _json(path)
    pipelines = results["pipelines"]
    baseline = next(name for name in DIFFUSERS_NAMES if name in pipelines)
    bls, diffusers = (pipelines[name]["latency"]["mean_s"] for name in ("triton-bls", baseline))
    runs = results["concurrency"]["triton-bls"]
    clients = max(runs, key=lambda c: runs[c]["throughput_images_per_s"])
    height, width = results["settings"]["resolution"]
    return (f"on one {results['environment']['gpu']}, the BLS pipeline makes a {height}x{width}, "
            f"{results['settings']['steps']}-step image of SD1.5's architecture in {bls:.3f} s, "
            f"{diffusers / bls:.2f}x {DIFFUSERS_NAMES[baseline]} in the same run, and serves "
            f"{runs[clients]['throughput_images_per_s']:.2f} images/s to {clients} clients")


RECORDED: dict[str, Callable[..., str]] = {
    "machine": machine, "quickstart": quickstart, "test-times": test_times, "test-measurements": test_measurements,
    "walkthrough": walkthrough, "recorded-run": recorded_run, "benchmark-table": benchmark_table, "benchmark-setting": benchmark_setting,
    "gpu-headline": gpu_headline, "gpu-benchmark-command": gpu_benchmark_command,
}
