"""The Mermaid diagrams of the project's Markdown, found and rendered by mermaid itself.

GitHub draws a ```mermaid block in the browser, and a diagram it cannot parse shows as an error
box in the README, with nothing failing anywhere. Here ``mmdc`` (``@mermaid-js/mermaid-cli``,
``make tools``, utils/operations/tools.py) renders every block in headless chromium, so the test suite fails
instead (tests/test_diagrams.py, for which this is the helper); the error names the document, the block's line and mermaid's
message.

mmdc takes a Markdown file and renders all its blocks in one browser start (about a second, then
about a second a diagram on 2 cores), so the blocks are rendered together, from one Markdown file
written here, rather than one mmdc run each.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from utils.errors import UserError
from utils.layout import PROJECT_ROOT
from utils.operations.tools import INSTALL_COMMAND, tool

# CommonMark fences: three or more backticks or tildes; the info string's first word is the language.
# Any indentation, as mmdc reads it (a fence inside a list item is indented).
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
# mmdc's own pattern ends a block at the first line of three backticks or colons, whatever opened it.
_MMDC_CLOSING = re.compile(r"^[^\S\n]*[`:]{3}[^\S\n]*$", re.MULTILINE)
# Where mmdc's message ends and the stack trace of the browser page and of puppeteer begins.
_TRACE = re.compile(r"^\s+at |mermaid-cli-intercept\.invalid|^\S+ \((file|https?)://")
_BROWSER_FAILURE = re.compile(r"Failed to launch|Browser was not found|Could not find Chrom|TimeoutError|"
                              r"Target closed|Protocol error")
_ERROR_DIAGRAM = 'aria-roledescription="error"'  # what mermaid draws instead of a diagram it cannot
SECONDS_PER_DIAGRAM = 15  # about 1 s each on 2 cores; the rest is headroom for a loaded CI runner
START_SECONDS = 60  # chromium's start, which puppeteer itself gives up on after 30 s


class DiagramError(UserError):
    """A Mermaid diagram that does not render: the message names the document, the block's line
    and mermaid's message, or why mmdc could not run."""


@dataclass(frozen=True)
class MermaidBlock:
    document: Path
    line: int  # of the opening fence, from 1 (what an editor shows)
    source: str  # the diagram, without its fences

    def __str__(self) -> str:
        return f"{_name(self.document)} line {self.line}"


def documents(root: Path = PROJECT_ROOT) -> list[Path]:
    """The Markdown whose diagrams must render: README.md and docs/**/*.md."""
    readme = [root / "README.md"] if (root / "README.md").exists() else []
    return readme + sorted((root / "docs").rglob("*.md"))


def mermaid_blocks(text: str, document: Path = Path("<text>")) -> list[MermaidBlock]:
    """Every ```mermaid (or ~~~mermaid) fenced block of a Markdown text, in order. A mermaid
    fence shown inside another fenced block (a Markdown example) is text, as GitHub reads it."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        # An unclosed fence runs to the end of the document (CommonMark), as on GitHub.
        if opening["info"].split()[:1] == ["mermaid"]:
            body = [_dedent(line, indent) for line in lines[index + 1:end]]
            blocks.append(MermaidBlock(document, index + 1, "".join(f"{line}\n" for line in body)))
        index = end + 1
    return blocks


def document_blocks(paths: Iterable[Path]) -> list[MermaidBlock]:
    """The mermaid blocks of Markdown files, file after file."""
    return [block for path in paths for block in mermaid_blocks(Path(path).read_text(encoding="utf-8"), Path(path))]


def render(blocks: Sequence[MermaidBlock]) -> list[str]:
    """The SVG of each block, in order, rendered by mmdc in headless chromium; a DiagramError
    names every block that does not render."""
    blocks = list(blocks)
    for block in blocks:
        if _MMDC_CLOSING.search(block.source):
            raise DiagramError(f"{block}: a line of three backticks or colons inside the diagram ends it early for "
                               f"mmdc; write the diagram without it.")
    svgs: list[str | None] = [None] * len(blocks)
    errors: list[str] = []
    # In parallel, the first failure stops the run and its neighbours with it, so which block
    # failed is known only once the rest are rendered one at a time, from the first missing one.
    jobs = max(1, min(4, os.cpu_count() or 1))
    start = 0
    with tempfile.TemporaryDirectory(prefix="diagrams-") as work:
        while start < len(blocks):
            run_directory = Path(work) / f"from-{start}-jobs-{jobs}"
            returncode, message, outputs = _run_mmdc(blocks[start:], run_directory, jobs)
            rendered = next((k for k, svg in enumerate(outputs) if svg is None), len(outputs))
            svgs[start:start + rendered] = outputs[:rendered]
            if rendered == len(outputs):
                if returncode != 0:
                    raise DiagramError(f"mmdc failed after rendering every diagram of {_names(blocks)}:{message}")
                break
            if returncode == 0:
                raise DiagramError(f"mmdc rendered {rendered} of {len(outputs)} diagrams of {_names(blocks)} and "
                                   f"reported no error (did it read them as blocks other than ours?)")
            if _BROWSER_FAILURE.search(message):
                raise DiagramError(f"mmdc could not run chromium to render {_names(blocks)} (run `{INSTALL_COMMAND}`; "
                                   f"it writes chromium's path and flags to .tools/node/puppeteer-config.json):"
                                   f"{message}")
            if jobs > 1:
                jobs, start = 1, start + rendered
                continue
            errors.append(f"{blocks[start + rendered]}: the mermaid diagram does not render (mmdc):{message}")
            start += rendered + 1
    for block, svg in zip(blocks, svgs):
        if svg is not None and _ERROR_DIAGRAM in svg:
            errors.append(f"{block}: mermaid drew its error diagram instead of this one")
    if errors:
        raise DiagramError("\n".join(errors))
    return svgs


def render_documents(paths: Iterable[Path]) -> list[tuple[MermaidBlock, str]]:
    """Each mermaid block of the Markdown files with its SVG, all rendered in one mmdc run (a
    DiagramError names every block that does not render)."""
    blocks = document_blocks(paths)
    return list(zip(blocks, render(blocks))) if blocks else []


def _run_mmdc(blocks: Sequence[MermaidBlock], directory: Path, jobs: int) -> tuple[int, str, list[str | None]]:
    """mmdc on one Markdown file holding the blocks: its exit status, its message, and the SVG of
    each block (None where it wrote none)."""
    mmdc = tool("mmdc")
    output = directory / "out"
    output.mkdir(parents=True)
    source = directory / "diagrams.md"
    source.write_text("".join(f"```mermaid\n{block.source}```\n\n" for block in blocks), encoding="utf-8")
    timeout = START_SECONDS + SECONDS_PER_DIAGRAM * len(blocks)
    # Its own session, so that on a timeout chromium's processes go with mmdc rather than linger.
    process = subprocess.Popen([str(mmdc), "--quiet", "--jobs", str(jobs), "-i", str(source),
                                "-o", str(output / "diagrams.md")], cwd=directory, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise DiagramError(f"mmdc did not render {_names(blocks)} in {timeout} s: chromium may be waiting on the "
                           f"network (see the flags in .tools/node/puppeteer-config.json; run `{INSTALL_COMMAND}`)")
    svgs = []
    for number in range(1, len(blocks) + 1):
        svg = output / f"diagrams-{number}.svg"
        svgs.append(svg.read_text(encoding="utf-8") if svg.exists() else None)
    return process.returncode, _message(stderr or stdout), svgs


def _message(output: str) -> str:
    """mmdc's error without the stack traces that follow it."""
    lines = output.strip().splitlines()
    start = next((k for k, line in enumerate(lines) if re.match(r"\w*Error\b", line)), 0)
    kept = []
    for line in lines[start:]:
        if _TRACE.search(line):
            break
        kept.append(line.rstrip())
    # Its lines stay apart, indented alike: mermaid points at the error with a caret line.
    message = "\n".join(f"    {line}" for line in kept if line)[:1500]
    return f"\n{message}" if message else f" (no message; its output: {output.strip()[-500:]!r})"


def _dedent(line: str, indent: int) -> str:
    removable = len(line) - len(line.lstrip(" \t"))
    return line[min(indent, removable):]


def _name(document: Path) -> str:
    try:
        return str(Path(document).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(document)


def _names(blocks: Sequence[MermaidBlock]) -> str:
    documents = sorted({_name(block.document) for block in blocks})
    return f"{len(blocks)} block(s) of {', '.join(documents)}"
