"""The README states what the code says: every generated section agrees with the code."""

from __future__ import annotations

import dataclasses
import re

import pytest

from utils import docs, specs
from utils.layout import PROJECT_ROOT
from utils.models import build_preset, preset_dims

README = (PROJECT_ROOT / "README.md").read_text()


def test_readme_agrees_with_the_code():
    assert docs.render(README) == README, "run `make docs`"


def test_every_renderer_has_its_section():
    used = set(re.findall(r"<!-- generated: ([\w-]+) -->", README))
    assert used == set(docs.SECTIONS)


def test_a_changed_profile_changes_the_readme(monkeypatch):
    """The README's profile figures follow the specs: change one and the README no longer agrees."""
    larger = dataclasses.replace(specs.UNET, profile=specs.BatchProfile(1, 2, 32))
    monkeypatch.setitem(specs.NETWORKS, "unet", larger)
    monkeypatch.setattr(specs, "UNET", larger)
    rendered = docs.render(README)
    assert rendered != README and "| 1 / 2 / 32 | up to 16 |" in rendered
    assert "maxShapes=sample:32x4x64x64" in rendered and "batch-size must be <= 32 for 'unet'" in rendered


def test_an_unknown_section_is_an_error():
    with pytest.raises(KeyError, match="no renderer"):
        docs.render("<!-- generated: nothing --><!-- end: nothing -->")


@pytest.mark.parametrize("name", ["tiny"])
def test_preset_sizes_without_building_equal_the_built_checkpoint(name, tiny_model):
    assert preset_dims(name) == specs.ModelDims.from_pretrained(tiny_model)


def test_sd15_sizes():
    dims = preset_dims("sd15-random")
    assert (dims.text_length, dims.text_hidden, dims.latent_height, dims.image_height) == (77, 768, 64, 512)
