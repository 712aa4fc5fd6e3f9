"""The tutorial's chapters say what the code says: their diagrams of the ensembles are the generated
configs' maps, their config diffs are the generated configs' differences, their counts follow the
code they are rendered from, and what they point to exists."""

from __future__ import annotations

import dataclasses
import re

import pytest

from utils import docs, specs
from utils.repository import configs
from utils.docs import chapter_facts, excerpts, facts, mermaid, recorded
from utils.layout import PROJECT_ROOT

TUTORIAL = PROJECT_ROOT / "docs" / "tutorial"
# The pages this test holds: the chapters other than 3 (Python models), and the tutorial's index.
PAGES = [TUTORIAL / name for name in ("1-export.md", "2-repository.md", "4-ensembles.md", "5-tensorrt.md",
                                      "6-statistics.md", "README.md")]
TOP_ENSEMBLES = (specs.ENSEMBLE_TEXT_TO_IMAGE.name, specs.ENSEMBLE_IMAGE_TO_IMAGE.name)
EDGE = re.compile(r'^\s*(\w+) -->\|"([^"]*)"\| (\w+)$')


def drawn_edges(graph: str) -> dict[tuple[str, str], list[str]]:
    """The arrows of a rendered Mermaid graph: (source, target) -> the tensors on the arrow."""
    return {(m[1], m[3]): m[2].split("<br/>") for m in map(EDGE.match, graph.splitlines()) if m}


def leaf_steps(ensemble: str, path: str) -> list[tuple]:
    """Every step of an ensemble that is a model, not an ensemble: (its node's path, the step)."""
    found = []
    for step in configs.ensemble_config(specs.ENSEMBLES[ensemble]).ensemble_scheduling.step:
        node = f"{path}__{step.model_name}"
        found += leaf_steps(step.model_name, node) if step.model_name in specs.ENSEMBLES else [(node, step)]
    return found


@pytest.mark.parametrize("name", TOP_ENSEMBLES)
def test_the_ensemble_graph_is_its_configs_input_and_output_maps(name):
    edges = drawn_edges(chapter_facts.ensemble_graph(name))
    steps = dict(leaf_steps(name, name))
    outputs = {node: set(step.output_map.values()) for node, step in steps.items()}
    top = configs.ensemble_config(specs.ENSEMBLES[name])
    outputs["request"] = {tensor.name for tensor in top.input}
    # A tensor renamed on its way into an inner ensemble is drawn "its maker's name as its user's".
    for node, step in steps.items():  # what reaches a model is exactly what its input_map names
        arriving = sorted(t.split(" as ")[-1] for (_, target), tensors in edges.items() if target == node
                          for t in tensors)
        assert arriving == sorted(step.input_map.values()), node
    for (source, target), tensors in edges.items():  # and it comes from the model that makes it
        assert {t.split(" as ")[0] for t in tensors} <= outputs[source], (source, target, tensors)
    answered = [t for (_, target), tensors in edges.items() if target == "response" for t in tensors]
    assert sorted(answered) == sorted(t.name for t in top.output)


def test_a_changed_ensemble_changes_its_graph_and_the_chapter(monkeypatch):
    """Rename the tensor between the VAE decoder and postprocess in the decode ensemble's spec:
    the graph and chapter 4 follow."""
    decode = specs.ENSEMBLES["decode"]
    decoder, post = decode.steps
    renamed = dataclasses.replace(decode, steps=(
        dataclasses.replace(decoder, outputs=((decoder.outputs[0][0], "pixels"),)),
        dataclasses.replace(post, inputs=((post.inputs[0][0], "pixels"),))))
    chapter = (TUTORIAL / "4-ensembles.md").read_text()
    monkeypatch.setitem(specs.ENSEMBLES, "decode", renamed)
    edges = drawn_edges(chapter_facts.ensemble_graph(specs.ENSEMBLE_TEXT_TO_IMAGE.name))
    path = f"{specs.ENSEMBLE_TEXT_TO_IMAGE.name}__decode"
    assert edges[(f"{path}__vae_decoder", f"{path}__postprocess")] == ["pixels"]
    assert docs.render(chapter) != chapter


def test_the_config_diff_is_the_difference_of_the_two_configs():
    diff = chapter_facts.config_diff("unet", "python", "tensorrt").splitlines()[3:-1]
    python, tensorrt = (chapter_facts._config_text("unet", backend, "FP16").splitlines()
                        for backend in ("python", "tensorrt"))
    assert {line[1:] for line in diff if line.startswith("-")} <= set(python)
    added = [line[1:] for line in diff if line.startswith("+")]
    folded = [line for line in added if line.strip().startswith("#")]
    assert set(added) - set(folded) <= set(tensorrt)
    batches = range(specs.UNET.profile.min + 1, specs.UNET.profile.max + 1)
    assert folded == [f"    # ... and one graph_spec like it for each batch_size from {batches[0]} to {batches[-1]}"]


def test_folding_refuses_graph_specs_that_differ_beyond_their_batch():
    text = "graph_spec {\n  batch_size: 1\n  a: 1\n}\ngraph_spec {\n  batch_size: 2\n  a: 2\n}\n"
    with pytest.raises(AssertionError, match="differ beyond their batch"):
        chapter_facts._fold_graph_specs(text)


def test_the_backends_configs_differ_as_chapter_2_says():
    """TensorRT's config has a platform instead of a backend and parameters, the engine's version,
    a GPU instance, dynamic batching and CUDA graphs; the ONNX Runtime backend gets the TensorRT
    config without its `optimization`, with its own platform and the ONNX version folder."""
    from utils.deployment import Deployment
    from utils.layout import ENGINE_VERSION, ONNX_VERSION

    python, onnxruntime, tensorrt = (
        configs.network_config(specs.UNET, excerpts.SD15, "FP16", Deployment(backend=backend))
        for backend in ("python", "onnxruntime", "tensorrt"))
    assert (python.backend, python.platform, tensorrt.backend, tensorrt.platform) == ("python", "", "", "tensorrt_plan")
    assert python.parameters and not tensorrt.parameters
    assert list(tensorrt.version_policy.specific.versions) == [ENGINE_VERSION]
    assert [g.kind for g in tensorrt.instance_group] == [tensorrt.instance_group[0].KIND_GPU]
    assert tensorrt.HasField("dynamic_batching") and not python.HasField("dynamic_batching")
    assert tensorrt.optimization.cuda.graphs and not python.HasField("optimization")
    assert tensorrt.optimization.cuda.graph_spec and not onnxruntime.HasField("optimization")
    tensorrt.ClearField("optimization")
    tensorrt.platform = "onnxruntime_onnx"
    tensorrt.version_policy.specific.versions[:] = [ONNX_VERSION]
    assert tensorrt == onnxruntime


def test_a_changed_profile_changes_the_cuda_graphs_of_chapters_2_and_5(monkeypatch):
    larger = dataclasses.replace(specs.UNET, profile=specs.BatchProfile(1, 2, 8))
    monkeypatch.setitem(specs.NETWORKS, "unet", larger)
    assert chapter_facts.value("cuda-graphs").startswith("8 CUDA graphs, one per batch size from 1 to 8")
    for chapter in ("2-repository.md", "5-tensorrt.md"):
        text = (TUTORIAL / chapter).read_text()
        assert docs.render(text) != text


def test_denoising_calls_follow_the_scheduler_and_the_steps(monkeypatch):
    assert chapter_facts.denoising_calls() == "51 UNet calls for PNDMScheduler's 50 steps (it runs timestep 961 twice)"
    monkeypatch.setattr(chapter_facts, "DEFAULT_NUM_INFERENCE_STEPS", 20)
    assert chapter_facts.denoising_calls().startswith("21 UNet calls for PNDMScheduler's 20 steps")
    monkeypatch.setattr(chapter_facts, "SD15_SCHEDULER_CLASS", "DDIMScheduler")
    assert chapter_facts.denoising_calls() == "20 UNet calls for DDIMScheduler's 20 steps"


def test_the_recorded_trtexec_commands_have_fixed_image_sizes():
    """Chapter 5: the H100 rehearsal printed the commands of a commit when only the batch was
    dynamic, so in its printout every network's profile keeps one image size."""
    printout = (PROJECT_ROOT / "docs/rehearsal-sd15-random-h100/trtexec-commands.txt").read_text()
    commands = [line for line in printout.splitlines() if line.startswith("$ trtexec")]
    assert len(commands) == len(specs.NETWORKS)
    for command in commands:
        levels = [dict(re.findall(r"(\w+):([\dx]+)", re.search(rf"--{level}Shapes=(\S+)", command)[1]))
                  for level in ("min", "opt", "max")]
        for tensor in levels[0]:
            sizes = {shapes[tensor].split("x", 1)[1] if "x" in shapes[tensor] else "" for shapes in levels}
            assert len(sizes) == 1, (tensor, command)


def test_step_references_come_from_the_table_of_steps():
    assert chapter_facts.step("P4") == "step P4 (Build the engines)"
    with pytest.raises(KeyError, match="no step '3b'"):
        chapter_facts.step("3b")
    assert chapter_facts.chapter_steps("5-tensorrt.md") == "P2-P6"


def test_the_chapters_renderers_shadow_no_other():
    others = {**facts.FACTS, **excerpts.RENDERERS, **mermaid.DIAGRAMS, **recorded.RECORDED}
    assert not set(chapter_facts.CHAPTER_FACTS) & set(others)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


LINK = re.compile(r"\]\((?!https?://)([^)#\s]*)(?:#([^)\s]+))?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_what_the_chapters_point_to_exists(page):
    """Every relative link resolves (the file, and the heading an anchor names), and every project
    path a chapter names in backticks exists: a moved file fails here, not in a reader's hands."""
    text = page.read_text()
    for target, anchor in LINK.findall(text):
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: {target} has no heading #{anchor}"
    for name in re.findall(r"`((?:utils|pipelines|scripts|optim|docs|tests|triton)/[\w./-]+)`", text):
        assert (PROJECT_ROOT / name).exists(), f"{page.name} names {name}, which does not exist"
