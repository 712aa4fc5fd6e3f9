"""Shared fixtures: one tiny model, one export, one repository and one real Triton server per run.

A server start costs ~10 s and ~360 MiB on a 2-core machine, so every end-to-end test shares
the session's server; tests that need a server of their own (launcher failures) start small ones.
"""

from __future__ import annotations

import utils  # noqa: F401  (first: keeps the repository's triton/ folder from shadowing a package)

from contextlib import contextmanager
from pathlib import Path

import pytest

from utils import specs
from utils.deployment import Deployment
from utils.export import adapter_onnx_path, export_network, onnx_path
from utils.layout import served_name
from utils.lora import TINY, TINY_WITH_TEXT_ENCODER, LoraAdapter, adapter_file, fused_model
from utils.models import build_preset
from utils.repository.writer import write_repository
from utils.server import TritonServer

REPORT: list[str] = []  # figures printed at the end of the run (pytest_terminal_summary)
ADAPTERS = ("style", "lcm")  # the session repository's LoRA adapters: tiny ones, built with peft
TEXT_ENCODER_ADAPTER = "words"  # and one with a text encoder part, served in place only


@contextmanager
def profiled_server(repository):
    """A started server whose Python models log where their time goes (SD_TRITON_PROFILE_BLS=1,
    which they inherit), stopped on leaving."""
    from utils.timing import PROFILE_VARIABLE

    with pytest.MonkeyPatch.context() as environment:
        environment.setenv(PROFILE_VARIABLE, "1")
        server = TritonServer(repository).start()
    try:
        yield server
    finally:
        server.stop()


def report(line: str) -> None:
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("measured")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_preset("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory):
    """The tiny checkpoint with an inpainting UNet (9 input channels)."""
    return build_preset("tiny-inpaint", tmp_path_factory.mktemp("models") / "tiny-inpaint", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(models_dir):
    """SDXL's tiny base, and below its refiner (tests/test_sdxl.py, test_sdxl_served.py)."""
    return build_preset("tiny-sdxl", models_dir / "tiny-sdxl", seed=0, models_dir=models_dir)


@pytest.fixture(scope="session")
def tiny_refiner(models_dir, tiny_sdxl):
    return build_preset("tiny-sdxl-refiner", models_dir / "tiny-sdxl-refiner", seed=0, models_dir=models_dir)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """Where the adapters and the checkpoints with an adapter fused in are written."""
    return tmp_path_factory.mktemp("lora-models")


@pytest.fixture(scope="session")
def adapters(tiny_model, models_dir) -> tuple[LoraAdapter, ...]:
    """The session repository's adapters, as files (diffusers' LoRA format)."""
    return tuple(LoraAdapter(name, adapter_file(LoraAdapter(name, TINY), tiny_model, models_dir)) for name in ADAPTERS)


@pytest.fixture(scope="session")
def in_place_adapters(tiny_model, adapters, models_dir) -> tuple[LoraAdapter, ...]:
    """The adapters of the repositories that apply them in place (the torch runtime): the
    session's, and one with a text encoder part too, which only they serve."""
    kind = LoraAdapter(TEXT_ENCODER_ADAPTER, Path(TINY_WITH_TEXT_ENCODER))
    return adapters + (LoraAdapter(TEXT_ENCODER_ADAPTER, adapter_file(kind, tiny_model, models_dir)),)


@pytest.fixture(scope="session")
def exports(tiny_model, adapters, models_dir, tmp_path_factory):
    """ExportResult per served network (the four, and each adapter's UNet), exported once for the whole run."""
    onnx_dir = tmp_path_factory.mktemp("onnx")
    results = {name: export_network(network, tiny_model, onnx_path(onnx_dir, "tiny", name))
               for name, network in specs.NETWORKS.items()}
    for adapter in adapters:
        results[served_name(specs.UNET.name, adapter=adapter.name)] = export_network(
            specs.UNET, fused_model(tiny_model, adapter, models_dir),
            adapter_onnx_path(onnx_dir, "tiny", tiny_model, adapter, models_dir))
    return results


@pytest.fixture(scope="session")
def repository(tiny_model, exports, adapters, tmp_path_factory):
    """The walkthrough's repository, with two LoRA adapters."""
    path = tmp_path_factory.mktemp("repository")
    write_repository(path, tiny_model, {name: result.path for name, result in exports.items()},
                     Deployment(backend="python", adapters=adapters))
    return path


@pytest.fixture(scope="session")
def bls_repository(tiny_model, exports, tmp_path_factory):
    """The networks and the BLS pipelines only (no ensembles): fewer processes, for the tests that
    start servers of their own to break or load them."""
    path = tmp_path_factory.mktemp("bls-repository")
    write_repository(path, tiny_model, {name: result.path for name, result in exports.items()},
                     Deployment(ensembles=False))
    return path


def stub_count(repository) -> int:
    """How many Python-backend stub processes a server of this repository runs: one per instance."""
    from utils.repository.configs import parse_pbtxt
    from utils.layout import config_files

    configs = [parse_pbtxt(path.read_text()) for path in config_files(repository)]
    return sum(group.count for config in configs if config.backend == "python" for group in config.instance_group)


@pytest.fixture(scope="session")
def triton_server(repository):
    server = TritonServer(repository, http=True)  # the HTTP tests document what Triton's frontend does
    server.start()
    yield server
    server.stop()
