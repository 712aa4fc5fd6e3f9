"""One error policy for every script: --help only prints help, a user error is one line with the
fix and exit code 2, a missing server is named within seconds, Ctrl+C ends cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.layout import CONFIG_FILE, PROJECT_ROOT
from utils.server import free_port
from utils.version import project_version, source_files, tree_hash

PYTHON_SCRIPTS = sorted(str(p.relative_to(PROJECT_ROOT)) for p in [*PROJECT_ROOT.glob("scripts/**/*.py"),
                                                                    *PROJECT_ROOT.glob("optim/*.py")])
SHELL_SCRIPTS = sorted(str(p.relative_to(PROJECT_ROOT)) for p in PROJECT_ROOT.glob("scripts/**/*.sh")
                       if not p.name == "setup.sh")  # setup.sh is sourced, not run


def run(*argv: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else os.environ | env)


@pytest.mark.slow
@pytest.mark.parametrize("script", PYTHON_SCRIPTS + SHELL_SCRIPTS)
def test_help_only_prints_help(script, tmp_path):
    interpreter = ["bash"] if script.endswith(".sh") else [sys.executable]
    done = run(*interpreter, str(PROJECT_ROOT / script), "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() and "Traceback" not in done.stderr
    if not script.endswith(".sh"):
        assert done.stdout.startswith("usage: ")
    assert list(tmp_path.iterdir()) == []  # nothing built, installed, downloaded or written


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("arguments, message", [
    (["scripts/move_onnx_models_to_triton.py", "--model", "no-such-preset"],
     "--model 'no-such-preset' is neither a preset"),
    (["scripts/move_onnx_models_to_triton.py", "--backend", "tensorrt", "--runtime", "torch"],
     "--runtime torch runs inside the python backend, not --backend tensorrt"),
    (["scripts/move_onnx_models_to_triton.py", "--model", "someone/no-such-model"],
     "could not download it from the Hugging Face hub"),
    (["scripts/benchmark_pipelines.py", "--runs", "1"], "--runs 1: at least 2 measured runs"),
    (["scripts/benchmark_pipelines.py", "--device", "cuda"], "--device cuda applies to --runtime torch"),
    (["scripts/plot_benchmark.py", "missing.json"], "missing.json: not a benchmark JSON"),
    (["scripts/build_tensorrt_engines.py", "--print-commands"], "does not serve text_encoder, unet"),
    (["optim/convert_unet_to_onnx.py", "--model", "."], "is a folder but not a diffusers pipeline"),
    (["scripts/launch_openai_gateway.py", "--repository", "."], "has no pipeline_text_to_image model"),
])
def test_user_errors_are_one_line_with_the_fix(arguments, message, tmp_path):
    done = run(sys.executable, str(PROJECT_ROOT / arguments[0]), *arguments[1:], cwd=tmp_path,
               env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert message in one_line_error(done)


@pytest.mark.slow
def test_a_repository_conflict_is_one_line(tiny_model, exports, tmp_path):
    onnx_dir = exports["unet"].path.parents[1]
    edited = tmp_path / "repository" / "unet" / CONFIG_FILE
    edited.parent.mkdir(parents=True)
    edited.write_text("# my tuning\n")
    done = run(sys.executable, str(PROJECT_ROOT / "scripts/move_onnx_models_to_triton.py"), "--model", str(tiny_model),
               "--onnx-dir", str(onnx_dir), "--repository", str(tmp_path / "repository"), cwd=tmp_path)
    assert "unet/config.pbtxt exists with other content" in one_line_error(done)
    assert edited.read_text() == "# my tuning\n"


@pytest.mark.slow
@pytest.mark.parametrize("arguments", [
    ["scripts/run_bls_pipeline.py"],
    ["scripts/run_client_side_pipeline.py", "--model", "tiny"],
    ["scripts/query_model.py", "unet"],
])
def test_no_server_is_named_within_seconds_with_the_command_that_starts_one(arguments, tiny_model, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model)  # the preset, already built
    url = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = run(sys.executable, str(PROJECT_ROOT / arguments[0]), *arguments[1:], "--url", url, cwd=tmp_path)
    seconds = time.monotonic() - start
    line = one_line_error(done)
    assert f"no Triton server answers at {url}: start one with `python scripts/launch_triton_server.py`" in line
    assert seconds < 30  # the imports take most of it; the retries (60 s) are for restarts


@pytest.mark.slow
def test_ctrl_c_ends_a_script_cleanly(tmp_path):
    # Ctrl+C's default, whatever this suite inherited: a suite started in the background (`make test &`)
    # ignores SIGINT, and a child would inherit that and never see the Ctrl+C this test sends.
    process = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "scripts/quickstart.py")], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:  # until it is at work
        if line.startswith("==> 2."):
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted"


def test_version_is_the_projects_own_not_an_enclosing_repositorys(tmp_path):
    """A copy of the project inside another git repository records no commit (the other
    repository's would be a lie), and the hash of its sources, equal to the original's."""
    outer = tmp_path / "outer"
    copy = outer / "vendored" / "project"
    for path in source_files():
        target = copy / path.relative_to(PROJECT_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "outer"], check=True)
    version = project_version(copy)
    assert "git_commit" not in version
    assert version["tree_sha256"] == tree_hash(PROJECT_ROOT)
    own = project_version(PROJECT_ROOT)
    if (PROJECT_ROOT / ".git").exists():
        assert len(own["git_commit"]) == 40


def test_pack_wheels_runs_before_anything_is_installed():
    """The GPU host's wheels are packed by a Python that has nothing of this project (or of its
    requirements) yet: the script needs the standard library and pip only, and packs
    requirements.txt's versions, scipy among them (diffusers' LMS scheduler)."""
    script = PROJECT_ROOT / "scripts/gpu_host/pack_wheels.py"
    # -I -S: no site-packages, so neither this project nor its requirements can be imported.
    done = run(sys.executable, "-I", "-S", str(script), "--help", cwd=PROJECT_ROOT)
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr[-2000:]
    code = f"import runpy; print(runpy.run_path({str(script)!r})['pinned']())"
    done = run(sys.executable, "-I", "-S", "-c", code, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    requirements = (PROJECT_ROOT / "requirements.txt").read_text()
    for pin in ("nvidia-pytriton", "diffusers", "tritonclient", "numpy", "scipy"):
        version = next(line.split("==")[1].split()[0] for line in requirements.splitlines()
                       if line.split("==")[0].split("[")[0] == pin)
        assert f"'{pin}=={version}'" in done.stdout, done.stdout
