"""One table of steps (utils/walkthrough.py): the README renders it, each script's --help names its
step from it, and the recorded run ran exactly its commands."""

from __future__ import annotations

import re
import shlex

import pytest

from utils.docs.recording import DEMO, RECORD, TESTS, load
from utils.layout import PROJECT_ROOT
from utils.walkthrough import STEPS, WALKTHROUGH, describe, steps_of

SCRIPTS = sorted({script for step in STEPS for script in step.scripts})


def test_every_command_names_a_file_of_the_project():
    for step in STEPS:
        for command in step.commands:
            for word in shlex.split(command.replace("\\\n", " ")):
                if word.endswith(".py") and "$" not in word:
                    assert (PROJECT_ROOT / word).is_file(), f"step {step.number}: {word} does not exist"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_scripts_help_names_its_steps_from_the_table(script):
    """The description comes from describe(), so the number is typed nowhere else; the docstring
    itself carries no step number that could disagree."""
    source = (PROJECT_ROOT / script).read_text()
    assert "script_parser(" in source or "export_cli(" in source
    assert not re.search(r"\bStep [0-9P]", source.split('"""')[1]), "a step number typed in the docstring"
    description = describe(script, source.split('"""')[1])
    for step in steps_of(script):
        assert step.label in description


def test_a_step_number_in_a_help_text_comes_from_the_table():
    assert describe("scripts/query_model.py", "Query one network.\n\nMore.") == "Step 8: Query one network."
    assert describe("scripts/benchmark_pipelines.py", "Benchmark.") == "Benchmark."  # not a step


def test_the_recorded_run_ran_the_tables_commands():
    """A changed command needs a new record (scripts/record_walkthrough.py): the README quotes what
    the recorded command printed, and would otherwise show another command's output."""
    record = load(RECORD)
    ran = [(run["step"], run["command"]) for run in record["runs"]]
    expected = [("demo", DEMO)] + [(step.number, command) for step in WALKTHROUGH for command in step.commands]
    if ran[len(expected):]:  # the tests are recorded last, once the documents quote the rest
        expected += [("tests", command) for command in TESTS]
    assert ran == expected, "run `python scripts/record_walkthrough.py` on a fresh checkout"


def test_the_readme_shows_every_step_in_order():
    readme = (PROJECT_ROOT / "README.md").read_text()
    positions = [readme.index(f"### {step.number}. {step.title}") for step in WALKTHROUGH]
    assert positions == sorted(positions)
