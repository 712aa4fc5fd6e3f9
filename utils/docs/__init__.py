"""The documentation's statements about the code, rendered from the code.

Each such section of README.md and of the tutorial's chapters (docs/tutorial/) sits between
``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``: a table, a command, a config, an excerpt
of a source file, a few words inside a sentence. NAME is a fact (facts.py), or a renderer with its
arguments after colons (excerpts.py: ``source:utils/specs.py:UNET``, ``config:unet:tensorrt``,
``budget:docs/benchmark-tiny-cpu.json``...). ``make docs`` (scripts/render_docs.py) writes every
section again; a test fails where a document differs from what this package renders.
"""

from __future__ import annotations

import re

from utils.docs.chapter_facts import CHAPTER_FACTS
from utils.docs.excerpts import RENDERERS
from utils.docs.facts import FACTS
from utils.docs.mermaid import DIAGRAMS
from utils.docs.recorded import RECORDED
from utils.layout import PROJECT_ROOT

SECTION = re.compile(r"(<!-- generated: (?P<name>[\w:./-]+) -->)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)
# Each module's renderers by name; a name with arguments (``source:path:name``) takes them.
SECTIONS = {**FACTS, **RENDERERS, **CHAPTER_FACTS, **DIAGRAMS, **RECORDED}
# The documents with generated sections: the README and every page under docs/ but the GPU
# experiment notes (a lab notebook: its figures are each run's own, dated).
NOT_RENDERED = ("docs/gpu-notes.md",)


def documents(root=PROJECT_ROOT) -> list:
    pages = sorted(path for path in (root / "docs").rglob("*.md")
                   if str(path.relative_to(root)) not in NOT_RENDERED)
    return [root / "README.md", *pages]


def render_section(name: str) -> str:
    kind, *arguments = name.split(":")
    if kind not in SECTIONS:
        raise KeyError(f"section {name!r} has no renderer; known: {', '.join(SECTIONS)}")
    return SECTIONS[kind](*arguments)


def render(text: str) -> str:
    """``text`` with every generated section written anew; an unknown section name is an error."""
    def section(match: re.Match) -> str:
        body = render_section(match["name"])
        inline = "\n" not in match["body"]
        return f"{match[1]}{body}{match[4]}" if inline else f"{match[1]}\n{body}\n{match[4]}"

    return SECTION.sub(section, text)


def write_documents(root=PROJECT_ROOT) -> list:
    """Write every document's generated sections again; return the documents that changed."""
    changed = []
    for document in documents(root):
        current = document.read_text()
        rendered = render(current)
        if rendered != current:
            document.write_text(rendered)
            changed.append(document)
    return changed
