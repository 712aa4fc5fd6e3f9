"""The README and every page under docs/ state what the code says: every generated section (tables,
commands, configs, code excerpts, recorded figures) agrees with what the project renders now."""

from __future__ import annotations

import dataclasses
import re

import pytest

from utils import docs, specs
from utils.layout import PROJECT_ROOT
from utils.models import preset_dims

README = (PROJECT_ROOT / "README.md").read_text()
CHAPTERS = sorted((PROJECT_ROOT / "docs" / "tutorial").glob("[0-9]-*.md"))
DOCUMENTS = {str(path.relative_to(PROJECT_ROOT)): path.read_text() for path in docs.documents()}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_document_agrees_with_the_project(name):
    assert docs.render(DOCUMENTS[name]) == DOCUMENTS[name], "run `make docs`"


def test_every_fact_and_renderer_is_used():
    used = {name.split(":")[0] for text in DOCUMENTS.values()
            for name in re.findall(r"<!-- generated: ([\w:./-]+) -->", text)}
    assert used == set(docs.SECTIONS)


def test_a_changed_profile_changes_the_production_page(monkeypatch):
    """The production page's profile figures follow the specs: change one and the page no longer agrees."""
    larger = dataclasses.replace(specs.UNET, profile=specs.BatchProfile(1, 2, 32))
    monkeypatch.setitem(specs.NETWORKS, "unet", larger)
    monkeypatch.setattr(specs, "UNET", larger)
    page = DOCUMENTS["docs/production.md"]
    rendered = docs.render(page)
    assert rendered != page and "| 1 / 2 / 32 | up to 16 |" in rendered
    assert "maxShapes=sample:32x4x96x96" in rendered and "1-32 rows for unet" in rendered


def test_a_changed_source_changes_its_excerpt(tmp_path, monkeypatch):
    """An excerpt is the code as it is: edit the function and the chapter no longer agrees."""
    from utils.docs import excerpts

    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "example.py").write_text("def step(x):\n    return x + 1\n")
    monkeypatch.setattr(excerpts, "PROJECT_ROOT", tmp_path)
    document = "<!-- generated: source:utils/example.py:step -->\n<!-- end: source:utils/example.py:step -->"
    rendered = docs.render(document)
    assert "def step(x):\n    return x + 1" in rendered and docs.render(rendered) == rendered
    (tmp_path / "utils" / "example.py").write_text("def step(x):\n    return x + 2\n")
    assert docs.render(rendered) != rendered


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.name)
def test_each_chapter_is_linked_and_ends_with_what_to_read_next(chapter):
    text = chapter.read_text()
    assert text.rstrip().split("\n## ")[-1].startswith("Read next")
    assert re.search(r"\]\(https://", text.split("## Read next")[-1]), "Read next names no documentation"
    assert f"docs/tutorial/{chapter.name}" in README  # the README links it
    assert f"]({chapter.name})" in (PROJECT_ROOT / "docs" / "tutorial" / "README.md").read_text()  # and the index


def test_an_unknown_section_is_an_error():
    with pytest.raises(KeyError, match="no renderer"):
        docs.render("<!-- generated: nothing --><!-- end: nothing -->")


def test_preset_sizes_without_building_equal_the_built_checkpoint(tiny_model):
    assert preset_dims("tiny") == specs.ModelDims.from_pretrained(tiny_model)


def test_sd15_sizes():
    dims = preset_dims("sd15-random")
    assert (dims.text_length, dims.text_hidden, dims.latent_height, dims.image_height) == (77, 768, 64, 512)


# Paths the documents name, in backticks or links: each must exist (a moved or renamed file fails).
PATH_IN_TEXT = re.compile(r"(?:`|\]\()((?:[\w.-]+/)+[\w.-]+\.(?:py|md|json|yaml|yml|sh|png|pbtxt|txt|log))[`)#]")


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_file_a_document_names_exists(name):
    document = PROJECT_ROOT / name
    # A path from the project's root or from the document; "1/model.py" inside a model folder is
    # neither, and is not checked; nor is what a run writes (outputs/), there only after that run.
    named = [path for path in PATH_IN_TEXT.findall(DOCUMENTS[name]) if not path.startswith("outputs/")
             and ((PROJECT_ROOT / path.split("/")[0]).exists() or (document.parent / path.split("/")[0]).exists())]
    missing = [path for path in named if not (PROJECT_ROOT / path).exists() and not (document.parent / path).exists()]
    assert not missing, f"{name} names files that do not exist: {missing}"


def test_the_layout_page_names_every_script():
    """The modules of utils/ and pipelines/ are listed by a renderer; the scripts by hand."""
    text = (PROJECT_ROOT / "docs" / "layout.md").read_text()
    unnamed = [str(path.relative_to(PROJECT_ROOT)) for path in (PROJECT_ROOT / "scripts").rglob("*")
               if path.is_file() and path.suffix in (".py", ".sh") and path.name not in text]
    assert not unnamed, f"docs/layout.md does not name: {unnamed}"


def test_counts_the_pages_state_are_the_tests_own():
    """docs/tests.md counts the bad requests and states the pixel tolerance: the tests' own figures."""
    from test_bad_requests import BAD_REQUESTS, ENSEMBLE_BAD_REQUESTS
    from test_end_to_end import MAX_PIXEL_DIFFERENCE

    text = (PROJECT_ROOT / "docs" / "tests.md").read_text()
    assert f"{len(BAD_REQUESTS)} bad requests" in text
    assert f"{len(ENSEMBLE_BAD_REQUESTS)} more through the ensembles" in text
    assert f"max pixel difference ≤ {MAX_PIXEL_DIFFERENCE}" in text
