"""The code reads top to bottom: imports point one way (scripts -> pipelines -> utils), files and
functions stay short enough to read whole, and each command-line flag has one definition."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from utils.layout import PROJECT_ROOT

SOURCE_FOLDERS = ("utils", "pipelines", "scripts", "optim", "triton")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def sources(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (PROJECT_ROOT / folder).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a file imports, wherever in the file (lazy imports count too)."""
    packages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            packages |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            packages.add(node.module.split(".")[0])
    return packages


def test_utils_never_imports_pipelines():
    """utils/ is what the pipelines stand on (specs, layout, the server, the repository, the
    benchmark's measurements); the pipelines import it, never the other way round."""
    offenders = [str(path.relative_to(PROJECT_ROOT)) for path in sources("utils")
                 if "pipelines" in imported_packages(path)]
    assert not offenders, f"utils modules importing pipelines: {offenders}"


def test_the_layering_check_sees_a_lazy_import(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("def f():\n    from pipelines.bls import BlsPipeline\n    return BlsPipeline\n")
    assert "pipelines" in imported_packages(module)


def test_nothing_but_scripts_imports_a_script():
    offenders = [str(path.relative_to(PROJECT_ROOT)) for path in sources("utils", "pipelines", "triton", "optim")
                 if "scripts" in imported_packages(path)]
    assert not offenders


@pytest.mark.parametrize("path", sources(*SOURCE_FOLDERS), ids=lambda path: str(path.relative_to(PROJECT_ROOT)))
def test_files_and_functions_are_short_enough_to_read_whole(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"over {MAX_FILE_LINES} lines: split it"
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({node.end_lineno - first + 1} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_num_inference_steps_is_diffusers_name_and_steps_its_alias():
    from utils.cli import add_generation_arguments

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    assert parser.parse_args(["--num-inference-steps", "7"]).num_inference_steps == 7
    assert parser.parse_args(["--steps", "7"]).num_inference_steps == 7
    assert parser.parse_args([]).num_inference_steps == 50


def test_a_script_takes_some_generation_flags_with_defaults_of_its_own():
    from utils.cli import add_generation_arguments

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser, ("prompt", "num_inference_steps"), num_inference_steps=10)
    args = parser.parse_args([])
    assert vars(args) == {"prompt": "a photo of an astronaut riding a horse on mars", "num_inference_steps": 10}


def test_generation_flags_are_defined_only_in_utils_cli():
    """No script adds a generation flag of its own: they all come from utils.cli.GENERATION_FLAGS."""
    from utils.cli import GENERATION_FLAGS

    flags = {flag for names, _ in GENERATION_FLAGS.values() for flag in names}
    offenders = []
    for path in sources("scripts", "utils", "pipelines"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                spelled = {arg.value for arg in node.args if isinstance(arg, ast.Constant)} & flags
                if spelled:
                    offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}: {sorted(spelled)}")
    assert not offenders, offenders
