"""Facts the tutorial's chapters state, rendered from the code or the recorded runs.

A chapter names each as ``<!-- generated: NAME:ARGUMENTS -->``: ``value:NAME`` for a few words
inside a sentence (a size, a count, a file name), ``step:2`` for a walkthrough step,
``config-diff:unet:python:tensorrt`` for how one generated config differs from another,
``ensemble-graph:ensemble_text_to_image`` for an ensemble drawn from its generated config.
tests/test_chapters.py changes the code under some of them and sees the chapter change.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from typing import Callable

from utils import families, layout, sdxl_ensembles, specs, walkthrough
from utils.repository import configs
from utils.docker import TRITON_VERSION
from utils.docs.facts import scheduler_timesteps
from utils.repository.engines import PROVENANCE_FILE, Provenance, shapes_flag
from utils.layout import DEFAULT_REPOSITORY, PROJECT_ROOT
from utils.mask import MASK_THRESHOLD
from utils.models import SD15_SCHEDULER_CLASS, preset_dims
from utils.request import (DEFAULT_INPAINT_STRENGTH, DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_PREVIEW_EVERY,
                           MAX_PROMPT_BYTES)

SD15 = preset_dims("sd15-random")  # SD1.5's architecture, so its sizes


# --- Steps, sizes, names: a few words inside a sentence ---------------------------------------


def step(number: str) -> str:
    """A walkthrough step as a chapter names it, from the one table of steps (utils/walkthrough.py)."""
    return f"step {number} ({walkthrough.step(number).title})"


def chapter_steps(chapter: str) -> str:
    """The steps a chapter explains, as the table of steps assigns them: "3", "4-6", "P2-P6" (a
    range where they follow one another in the table, else a list)."""
    places = [i for i, s in enumerate(walkthrough.STEPS) if s.chapter == chapter]
    numbers = [walkthrough.STEPS[i].number for i in places]
    if len(numbers) > 1 and places == list(range(places[0], places[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ", ".join(numbers) or "-"


def _cuda_graphs() -> str:
    """The CUDA graphs the UNet's TensorRT config asks Triton to capture (SD1.5's sizes)."""
    from utils.deployment import Deployment

    config = configs.network_config(specs.NETWORKS["unet"], SD15, "FP16", Deployment(backend="tensorrt"))
    graphs = config.optimization.cuda.graph_spec
    sizes = {tuple(graph.input[specs.UNET.inputs[0].name].dim) for graph in graphs}
    (sample,) = sizes  # one image size for every graph: the checkpoint's own
    batches = [graph.batch_size for graph in graphs]
    return (f"{len(graphs)} CUDA graphs, one per batch size from {batches[0]} to {batches[-1]}, all with a "
            f"{'x'.join(map(str, sample))} `sample` ({SD15.image_height}x{SD15.image_width} pixels)")


def _check_size() -> str:
    from utils.export import check_size

    checked = check_size(SD15)
    return f"{checked.image_height}x{checked.image_width}"


def _tolerances() -> str:
    from utils.export import TOLERANCE

    return ", ".join(f"{tolerance:g} in {precision}" for precision, tolerance in TOLERANCE.items())


def _pipeline_instances() -> str:
    (group,) = configs.committed_config(specs.TEXT_TO_IMAGE.name).instance_group
    return str(group.count)


def _model_control() -> str:
    from utils.server.access import AccessPolicy

    return f"`--model-control-mode={AccessPolicy().model_control}`"


def _gateway_body_limit() -> str:
    from utils.gateway import MAX_BODY_BYTES

    return f"{MAX_BODY_BYTES // 2**20} MiB"


# Each a few words of a sentence; the name says what it is.
VALUES: dict[str, Callable[[], str]] = {
    "sd15-image-sizes": lambda: "{0.min}-{0.max}".format(specs.ImageSizes.default(SD15)),
    "sd15-image-size": lambda: f"{SD15.image_height}x{SD15.image_width}",
    "sd15-tokens": lambda: f"{SD15.text_length} tokens",
    "max-prompt-tokens": lambda: f"{specs.MAX_PROMPT_CHUNKS * (SD15.text_length - 2)} tokens "
                                 f"({specs.MAX_PROMPT_CHUNKS} windows)",
    "prompt-lengths": lambda: f"{SD15.text_length} to {specs.MAX_PROMPT_CHUNKS * SD15.text_length}",
    "text-encoder-rows": lambda: f"{specs.TEXT_ENCODER.profile.max} text encoder rows",
    "gateway-body-limit": _gateway_body_limit,
    "sd15-check-size": _check_size,
    "tolerances": _tolerances,
    "cuda-graphs": _cuda_graphs,
    "onnx-data-file": lambda: f"`{layout.ONNX_DATA_FILE}`",
    "onnx-version": lambda: str(layout.ONNX_VERSION),
    "engine-version": lambda: str(layout.ENGINE_VERSION),
    "gpu-copy": lambda: f"`{layout.served_name(specs.UNET.name, 1)}`",
    "unet-max-batch": lambda: str(specs.UNET.profile.max),
    "unet-opt-shapes": lambda: shapes_flag(specs.UNET, SD15, specs.UNET.profile.opt),  # as --optShapes has it
    "pipeline-instances": _pipeline_instances,
    "model-control": _model_control,
    "triton-version": lambda: TRITON_VERSION,
    "provenance-file": lambda: f"`{PROVENANCE_FILE}`",
    "provenance-fields": lambda: ", ".join(f"`{field.name}`" for field in dataclasses.fields(Provenance)),
    "plan-file": lambda: f"`{layout.PLAN_FILE}`",
    "max-prompt-bytes": lambda: str(MAX_PROMPT_BYTES),
    "default-steps": lambda: str(DEFAULT_NUM_INFERENCE_STEPS),
    "preview-every": lambda: str(DEFAULT_PREVIEW_EVERY),
    "mask-threshold": lambda: str(MASK_THRESHOLD),
    "inpaint-strength": lambda: str(DEFAULT_INPAINT_STRENGTH),
}


def value(name: str) -> str:
    return VALUES[name]()


# --- Chapter 1: what the export leaves dynamic --------------------------------------------------


def dynamic_axes_table() -> str:
    """Each tensor's shape in the exported graph: the dynamic axes by name, the rest SD1.5's sizes."""
    rows = ["| network | tensor | shape in the ONNX graph |", "| --- | --- | --- |"]
    for network in specs.NETWORKS.values():
        axes = network.dynamic_axes()
        for tensor in network.tensors:
            sizes = network.shape(tensor, 1, SD15)
            shape = [axes[tensor.name].get(axis, str(size)) for axis, size in enumerate(sizes)]
            rows.append(f"| {network.name} | `{tensor.name}` | [{', '.join(shape)}] |")
    return "\n".join(rows)


# --- Chapter 2: the repository and its configs --------------------------------------------------


def repository_tree() -> str:
    """The model repository's layout, with the file names of utils/layout.py."""
    one, two = layout.ONNX_VERSION, layout.ENGINE_VERSION
    (builds,) = [s for s in walkthrough.STEPS if "scripts/build_tensorrt_engines.py" in s.scripts]
    rows = [
        ("├── unet/", "one network (the other three are laid out the same way)"),
        (f"│   ├── {layout.CONFIG_FILE}", "what Triton needs to know, generated from utils/specs.py"),
        (f"│   ├── {one}/{layout.ONNX_FILE}", f"version {one}: the ONNX graph ({layout.ONNX_DATA_FILE} beside it over 2 GB)"),
        (f"│   ├── {one}/model.py", f"python backend only: the code that serves version {one}"),
        (f"│   ├── {one}/{layout.CHECKPOINT_DIR}/", "the python backend's torch runtime: the checkpoint, instead of the graph"),
        (f"│   └── {two}/{layout.PLAN_FILE}", f"version {two}: the TensorRT engine, where step {builds.number} builds one"),
        (f"├── {specs.TEXT_TO_IMAGE.name}/", f"a Python model: {layout.CONFIG_FILE}, {one}/model.py, "
                                            f"{one}/{layout.PIPELINE_FILES}/, {one}/{layout.SERVING_FILE}"),
        (f"└── {specs.ENSEMBLE_TEXT_TO_IMAGE.name}/", f"an ensemble: {layout.CONFIG_FILE} and an empty {one}/"),
    ]
    return "```\n" + "\n".join([f"{DEFAULT_REPOSITORY}/"] + [f"{path:<30} {what}" for path, what in rows]) + "\n```"


def _config_text(model: str, backend: str, precision: str) -> str:
    """The config.pbtxt a ``config:`` section shows (SD1.5's sizes), without its fence."""
    from utils.docs.excerpts import config

    return config(model, backend, precision).split("\n", 1)[1].rsplit("\n```", 1)[0]


def _fold_graph_specs(text: str) -> str:
    """Keep the first ``graph_spec`` of a TensorRT config and say what the others are: they differ
    only in their batch size (checked here), so sixteen copies would only bury the diff."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "graph_spec {"]
    if len(starts) < 2:
        return text
    indent = lines[starts[0]][:-len("graph_spec {")]
    end = next(i for i in range(starts[-1], len(lines)) if lines[i] == indent + "}") + 1
    blocks = [lines[a:b] for a, b in zip(starts, starts[1:] + [end])]
    batches = [int(re.search(r"batch_size: (\d+)", "\n".join(block))[1]) for block in blocks]
    strip = lambda block: [line for line in block if "batch_size:" not in line]  # noqa: E731
    assert all(strip(block) == strip(blocks[0]) for block in blocks), "graph_spec entries differ beyond their batch"
    note = f"{indent}# ... and one graph_spec like it for each batch_size from {batches[1]} to {batches[-1]}"
    return "\n".join(lines[:starts[1]] + [note] + lines[end:])


def config_diff(model: str, old: str, new: str, precision: str = "FP16") -> str:
    """How the config of a network for backend ``new`` differs from the one for ``old``, for graphs of
    one precision (FP16: the GPU's), so that only what the backends do differently shows."""
    before, after = (_fold_graph_specs(_config_text(model, backend, precision)).splitlines() for backend in (old, new))
    diff = difflib.unified_diff(before, after, f"{model}/config.pbtxt ({old}, {precision})",
                                f"{model}/config.pbtxt ({new}, {precision})", lineterm="", n=1)
    return "```diff\n" + "\n".join(diff) + "\n```"


# --- Chapter 4: an ensemble of ensembles, drawn from its generated configs ----------------------


@dataclass(frozen=True)
class Edge:
    source: str  # a node's id: "request", "response", or the path of a model through its ensembles
    target: str
    tensor: str  # its name where it is consumed: the consumer's input_map value (or the response's)


def _kind(model: str) -> str:
    if model in specs.NETWORKS or model in families.SDXL.networks:
        return "network"
    calls = configs.committed_models()[model].networks  # (SDXL's steps call what SD1.x's do, by the same names)
    return "python" + (f"; calls {', '.join(n.name for n in calls)} by BLS" if calls else "")


def _graphs(name: str) -> dict[str, specs.EnsembleSpec]:
    """The ensembles an ensemble of this name is made of: SD1.x's, or SDXL's (base then refiner's)."""
    return specs.ENSEMBLES if name in specs.ENSEMBLES else sdxl_ensembles.ensembles_of("sdxl", refiner=True)[1]


def ensemble_flow(name: str) -> tuple[list[str], list[Edge]]:
    """An ensemble's models, its nested ensembles opened, and the tensors between them, read from
    the generated configs (``ensemble_scheduling.step``: model_name, input_map, output_map).
    Returns Mermaid's lines for the subgraphs and boxes, and the edges."""
    boxes, edges, graphs = [], [], _graphs(name)

    def walk(ensemble: str, path: str, inputs: dict[str, tuple], depth: int) -> dict[str, tuple]:
        """``inputs``: the node that produces each of this ensemble's inputs, and its name for it;
        returns the same for each of its tensors, outputs included."""
        producer = dict(inputs)
        boxes.append(f'{"  " * depth}subgraph {path}["{ensemble} (ensemble)"]')
        for step in configs.ensemble_config(graphs[ensemble]).ensemble_scheduling.step:
            node = f"{path}__{step.model_name}"
            # Sorted by the model's tensor names, as the config's text has them: a protobuf map's
            # own order is not defined, and the document must render the same every time.
            input_map, output_map = sorted(step.input_map.items()), sorted(step.output_map.items())
            if step.model_name in graphs:  # its inputs keep their producers, under its names
                made = walk(step.model_name, node, {key: producer[value] for key, value in input_map}, depth + 1)
                producer.update({value: made[key] for key, value in output_map})
                continue
            boxes.append(f'{"  " * (depth + 1)}{node}["{step.model_name} ({_kind(step.model_name)})"]')
            for _, value in input_map:  # a tensor renamed on its way (into an inner ensemble): "made as used"
                source, made_as = producer[value]
                edges.append(Edge(source, node, value if made_as == value else f"{made_as} as {value}"))
            producer.update({value: (node, value) for _, value in output_map})
        boxes.append(f'{"  " * depth}end')
        return producer

    config = configs.ensemble_config(graphs[name])
    made = walk(name, name, {tensor.name: ("request", tensor.name) for tensor in config.input}, 0)
    edges.extend(Edge(made[tensor.name][0], "response", tensor.name) for tensor in config.output)
    return boxes, edges


def ensemble_graph(name: str) -> str:
    """An ensemble as a Mermaid flowchart: a frame per ensemble, a box per model, an arrow per pair
    of models labelled with the tensors that flow between them."""
    boxes, edges = ensemble_flow(name)
    labels: dict[tuple[str, str], list[str]] = {}
    for edge in edges:  # one arrow per pair of models, in the order the configs give them
        labels.setdefault((edge.source, edge.target), []).append(edge.tensor)
    arrows = [f'{source} -->|"{"<br/>".join(tensors)}"| {target}' for (source, target), tensors in labels.items()]
    lines = ['request(["request"])', *boxes, 'response(["response"])', *arrows]
    return "```mermaid\nflowchart LR\n" + "\n".join(f"  {line}" for line in lines) + "\n```"


# --- Chapters 5 and 6: UNet calls and recorded runs ---------------------------------------------


def _settings(path: str) -> dict:
    return json.loads((PROJECT_ROOT / path).read_text())["settings"]


def denoising_calls(path: str = "") -> str:
    """UNet calls per image, for a recorded benchmark's scheduler and steps (without ``path``: SD1.5's
    default request), and why they are not the steps where they differ."""
    settings = _settings(path) if path else {"scheduler": SD15_SCHEDULER_CLASS, "steps": DEFAULT_NUM_INFERENCE_STEPS}
    timesteps = scheduler_timesteps(settings["scheduler"], settings["steps"])
    words = f"{len(timesteps)} UNet calls for {settings['scheduler']}'s {settings['steps']} steps"
    repeated = [t for i, t in enumerate(timesteps) if t in timesteps[:i]]
    return words + (f" (it runs timestep {repeated[0]} twice)" if repeated else "")


def run_summary(path: str) -> str:
    """What a recorded benchmark ran, on what: from its JSON."""
    results = json.loads((PROJECT_ROOT / path).read_text())
    settings, environment = results["settings"], results["environment"]
    compiled = settings.get("torch_compile") or settings.get("deployment", {}).get("torch_compile")
    height, width = settings["resolution"]
    machine = environment["gpu"] or f"{environment['cpu']} ({environment['cpu_count']} cores)"
    words = [settings["model"], settings["precision"], f"{height}x{width}",
             f"{settings['steps']} {settings['scheduler']} steps"]
    words += [f"torch.compile on {', '.join(compiled)}"] if compiled else []
    return ", ".join(words) + f", on {machine}"


def overhead_per_step(path: str, pipeline: str) -> str:
    """A pipeline's overhead over its networks' compute in a recorded benchmark, per UNet call."""
    from utils.benchmark.report import compute_budget

    overhead = compute_budget(json.loads((PROJECT_ROOT / path).read_text()))[pipeline]["overhead_s"]
    settings = _settings(path)
    calls = len(scheduler_timesteps(settings["scheduler"], settings["steps"]))
    return f"{overhead:.3f} s over {calls} UNet calls: {1000 * overhead / calls:.1f} ms a step"


def batching_at(path: str, pipeline: str, clients: str) -> str:
    """The UNet's batching in one concurrency run of a recorded benchmark."""
    unet = json.loads((PROJECT_ROOT / path).read_text())["concurrency"][pipeline][clients]["unet"]
    return (f"with {clients} clients the UNet ran {unet['mean_batch']:.1f} rows per execution and was busy "
            f"{unet['busy_fraction']:.0%} of the time")


def recorded_unet_profile(path: str) -> str:
    """The UNet's ``sample`` profile in a recorded printout of trtexec commands (min to max)."""
    command = next(line for line in (PROJECT_ROOT / path).read_text().splitlines() if "/unet/" in line)
    shapes = [re.search(rf"--{level}Shapes=(sample:[\dx]+)", command)[1] for level in ("min", "max")]
    return f"`{shapes[0]}` to `{shapes[1]}`"


CHAPTER_FACTS: dict[str, Callable[..., str]] = {
    "value": value, "step": step, "chapter-steps": chapter_steps, "dynamic-axes": dynamic_axes_table,
    "repository-tree": repository_tree, "config-diff": config_diff, "ensemble-graph": ensemble_graph,
    "denoising-calls": denoising_calls, "run-summary": run_summary, "overhead-per-step": overhead_per_step,
    "batching-at": batching_at, "recorded-unet-profile": recorded_unet_profile,
}
