"""Diagrams the documents draw, as Mermaid, generated from the code: the ways' calls and round
trips from the specs and the scheduler, the components from the walkthrough's steps, the
packages from their imports. GitHub draws them; tests/test_diagrams.py renders each with mermaid
itself, so a broken one fails the build."""

from __future__ import annotations

import ast
from typing import Callable

from utils import layout, specs
from utils.repository import configs
from utils.docker import TRITON_VERSION
from utils.docs.facts import network_calls, unet_calls
from utils.layout import PROJECT_ROOT
from utils.models import SD15_SCHEDULER_CLASS
from utils.request import DEFAULT_NUM_INFERENCE_STEPS
from utils.walkthrough import step


def _names(tensors) -> str:
    return ", ".join(tensor.name for tensor in tensors)


def _mermaid(lines: list[str]) -> str:
    return "```mermaid\n" + "\n".join(lines) + "\n```"


def components() -> str:
    """From a checkpoint to the three ways: the walkthrough's steps and what each makes."""
    title = {number: f"{number}. {step(number).title}" for number in ("2", "3", "4", "5", "6", "7", "P4")}
    return _mermaid([
        "flowchart LR",
        '  model["checkpoint<br/>tiny, sd15-random,<br/>hub id or folder"]',
        f'  onnx["onnx/&lt;model&gt;/<br/>{len(specs.NETWORKS)} ONNX graphs"]',
        f'  repository["{layout.DEFAULT_REPOSITORY}/<br/>{layout.CONFIG_FILE} per model"]',
        f'  server["tritonserver {TRITON_VERSION}"]',
        f'  plans["{layout.ENGINE_VERSION}/{layout.PLAN_FILE}<br/>TensorRT engines"]',
        f'  model -- "{title["2"]}" --> onnx',
        f'  onnx -- "{title["3"]}" --> repository',
        f'  onnx -- "{title["P4"]}: trtexec" --> plans',
        f'  repository -- "{title["4"]}" --> server',
        "  plans --> server",
        '  subgraph ways ["the three ways to compose the pipeline"]',
        f'    client["{title["5"]}<br/>the loop in your process"]',
        f'    bls["{title["6"]}<br/>the loop inside Triton"]',
        f'    ensemble["{title["7"]}<br/>a graph Triton runs"]',
        "  end",
        "  client & bls & ensemble -- gRPC --> server",
    ])


def _network_round_trip(caller: str, callee: str, network: specs.NetworkSpec, how: str) -> list[str]:
    return [f"    {caller}->>{callee}: {network.name} ({how}): {_names(network.inputs)}",
            f"    {callee}-->>{caller}: {_names(network.outputs)}"]


def sequence_client_side() -> str:
    """The client-side pipeline: every network call is a gRPC round trip from the client."""
    lines = ["sequenceDiagram", "    participant C as client: the loop", "    participant T as Triton"]
    lines += _network_round_trip("C", "T", specs.TEXT_ENCODER, "gRPC")
    scheduler = SD15_SCHEDULER_CLASS.removesuffix("Scheduler")
    lines.append(f"    loop {unet_calls()} times ({DEFAULT_NUM_INFERENCE_STEPS} {scheduler} steps)")
    lines += ["    " + line for line in _network_round_trip("C", "T", specs.UNET, "gRPC")]
    lines += ["        Note over C: guidance, scheduler.step", "    end"]
    lines += _network_round_trip("C", "T", specs.VAE_DECODER, "gRPC")
    lines.append(f"    Note over C,T: {network_calls()} gRPC round trips per image")
    return _mermaid(lines)


def sequence_bls() -> str:
    """The BLS pipeline: one request; the loop calls the networks as sub-requests inside Triton."""
    pipeline = specs.TEXT_TO_IMAGE
    lines = ["sequenceDiagram", "    participant C as client", "    participant T as Triton",
             f"    participant P as {pipeline.name}: the loop", "    participant N as networks",
             "    C->>T: prompt and options (gRPC)", "    T->>P: execute(requests)"]
    lines += _network_round_trip("P", "N", specs.TEXT_ENCODER, "BLS")
    lines.append(f"    loop {unet_calls()} times")
    lines += ["    " + line for line in _network_round_trip("P", "N", specs.UNET, "BLS, DLPack")]
    lines.append("    end")
    lines += _network_round_trip("P", "N", specs.VAE_DECODER, "BLS")
    lines += [f"    P-->>T: {_names(pipeline.outputs)}", "    T-->>C: uint8 images",
              f"    Note over C,N: 1 gRPC round trip, {network_calls()} BLS sub-requests"]
    return _mermaid(lines)


def sequence_ensemble() -> str:
    """The ensemble: one request; Triton hands each step's outputs to the next step itself."""
    spec = specs.ENSEMBLE_TEXT_TO_IMAGE
    lines = ["sequenceDiagram", "    participant C as client", "    participant T as Triton: the ensemble"]
    lines += [f"    participant S{index} as {graph_step.model}" for index, graph_step in enumerate(spec.steps)]
    lines.append("    C->>T: prompt and options (gRPC)")
    for index, graph_step in enumerate(spec.steps):
        reads = ", ".join(tensor for _, tensor in graph_step.inputs)
        makes = ", ".join(tensor for _, tensor in graph_step.outputs)
        lines += [f"    T->>S{index}: {reads}", f"    S{index}-->>T: {makes}"]
        if graph_step.model == specs.DENOISE.name:
            lines.append(f"    Note over S{index}: {unet_calls()} UNet calls by BLS")
    lines += ["    T-->>C: uint8 images",
              f"    Note over C,T: 1 gRPC round trip, {len(spec.steps)} steps, each an ensemble or a model"]
    return _mermaid(lines)


PACKAGES = ("scripts", "optim", "pipelines", "utils", "triton")


def _package_imports() -> dict[tuple[str, str], int]:
    """Import statements from one of the project's top folders into another, counted."""
    edges: dict[tuple[str, str], int] = {}
    # Of triton/, the committed models only: step 3 writes the networks' model.py files beside them,
    # and the SDXL and production repositories (git-ignored) where they have been written.
    committed = {configs.committed_folder(name) for name in configs.committed_models()} | {PROJECT_ROOT / "triton" /
                                                                                          "examples"}
    for source in PACKAGES:
        for path in (PROJECT_ROOT / source).rglob("*.py"):
            if source == "triton" and not committed & set(path.parents):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                module = node.module if isinstance(node, ast.ImportFrom) and node.level == 0 else None
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [module or ""]
                for name in names:
                    target = name.split(".")[0]
                    if target in PACKAGES and target != source:
                        edges[source, target] = edges.get((source, target), 0) + 1
    return edges


def packages() -> str:
    """The project's top folders and which imports which, counted from the code."""
    described = {"scripts": "scripts/<br/>the steps", "optim": "optim/<br/>the four exports",
                 "triton": "triton/<br/>the Python models", "pipelines": "pipelines/<br/>the loop, the clients,<br/>"
                 "the Triton side", "utils": "utils/<br/>specs, layout, server,<br/>repository, benchmark"}
    lines = ["flowchart TD"] + [f'  {name}["{label}"]' for name, label in described.items()]
    lines += [f"  {source} -- {count} --> {target}" for (source, target), count in sorted(_package_imports().items())]
    return _mermaid(lines)


DIAGRAMS: dict[str, Callable[..., str]] = {
    "components-diagram": components, "sequence-client-side": sequence_client_side, "sequence-bls": sequence_bls,
    "sequence-ensemble": sequence_ensemble, "packages-diagram": packages,
}
