"""The model repository step: layout, idempotence, and nothing overwritten silently."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ADAPTERS

from utils import specs
from utils.repository import configs
from utils.deployment import Deployment
from utils.layout import CONFIG_FILE, PIPELINE_FILES, SERVING_FILE
from utils.repository.writer import RepositoryConflict, write_repository


def onnx_files(exports):
    return {name: result.path for name, result in exports.items()}


def test_layout(repository):
    for name in specs.NETWORKS:
        assert (repository / name / CONFIG_FILE).is_file()
        assert (repository / name / "1" / "model.onnx").is_file()
        assert (repository / name / "1" / "model.py").is_file()  # python backend
        assert (repository / name / "2").is_dir()  # where trtexec puts model.plan
    pipeline = repository / specs.TEXT_TO_IMAGE.name
    assert (pipeline / CONFIG_FILE).is_file() and (pipeline / "1" / "model.py").is_file()
    files = pipeline / "1" / PIPELINE_FILES
    assert (files / "tokenizer" / "tokenizer.json").is_file()
    assert (files / "scheduler" / "scheduler_config.json").is_file()
    assert not list(files.rglob("*.safetensors")), "the pipeline model needs no weights"
    assert json.loads((pipeline / "1" / SERVING_FILE).read_text()) == {
        "family": "sd", "refiner": False, "precision": "FP32", "device": "cpu", "gpus": [], "loop_device": "cpu",
        "image_sizes": {"min": 48, "max": 96, "step": 8},  # the tiny model's default: 3/4 to 3/2 of its 64
        "adapters": list(ADAPTERS), "adapters_in_place": False,  # the session repository's LoRA adapters, fused: a UNet each
    }


def test_second_run_changes_nothing(repository, tiny_model, exports, adapters):
    report = write_repository(repository, tiny_model, onnx_files(exports), Deployment(adapters=adapters))
    assert report.written == [] and len(report.unchanged) > 10


def test_edited_file_is_not_overwritten_without_force(repository, tiny_model, exports, tmp_path):
    copy = tmp_path / "repository"
    shutil.copytree(repository, copy)
    config = copy / "unet" / CONFIG_FILE
    config.write_text(config.read_text() + "# my tuning\n")
    with pytest.raises(RepositoryConflict, match=r"unet/config.pbtxt exists with other content .* Pass --force"):
        write_repository(copy, tiny_model, onnx_files(exports), Deployment(backend="python"))
    assert config.read_text().endswith("# my tuning\n")
    write_repository(copy, tiny_model, onnx_files(exports), Deployment(backend="python"), force=True)
    assert not config.read_text().endswith("# my tuning\n")


def test_other_backend_needs_force(repository, tiny_model, exports, tmp_path):
    copy = tmp_path / "repository"
    shutil.copytree(repository, copy)
    with pytest.raises(RepositoryConflict):
        write_repository(copy, tiny_model, onnx_files(exports), Deployment(backend="onnxruntime"))
    write_repository(copy, tiny_model, onnx_files(exports), Deployment(backend="onnxruntime"), force=True)
    config = configs.parse_pbtxt((copy / "unet" / CONFIG_FILE).read_text())
    assert config.platform == "onnxruntime_onnx"


def test_graph_that_does_not_match_its_spec_is_refused(tiny_model, exports, tmp_path):
    swapped = onnx_files(exports) | {"unet": exports["vae_decoder"].path}
    with pytest.raises(ValueError, match=r"does not match the unet spec: tensors \['sample'\], the spec says "
                                         r"\['sample', 'timestep', 'encoder_hidden_states'\].*--force"):
        write_repository(tmp_path, tiny_model, swapped)


def test_missing_onnx_file_names_the_export_script(tiny_model, exports, tmp_path):
    missing = onnx_files(exports) | {"unet": tmp_path / "nowhere.onnx"}
    with pytest.raises(FileNotFoundError, match=r"python optim/convert_unet_to_onnx.py"):
        write_repository(tmp_path / "repository", tiny_model, missing)


def test_a_precision_the_graphs_do_not_have_is_refused(tiny_model, exports, tmp_path):
    """--precision FP16 over FP32 graphs would be silently ignored: refused, before anything is written."""
    with pytest.raises(ValueError, match=r"--precision FP16, but the ONNX files are FP32: export them again"):
        write_repository(tmp_path / "repository", tiny_model, onnx_files(exports), Deployment(precision="FP16"))
    assert not (tmp_path / "repository").exists()


def test_without_ensembles_only_the_networks_and_the_bls_pipelines(bls_repository):
    models = sorted(path.name for path in bls_repository.iterdir())
    assert models == sorted([*specs.NETWORKS, *(pipeline.name for pipeline in specs.BLS_PIPELINES)])


def test_with_ensembles_every_ensemble_and_its_steps(repository):
    """All but ControlNet's ensemble and its step: this repository serves no ControlNet."""
    names = {path.name for path in repository.iterdir()}
    adapters = {f"unet_{name}" for name in ADAPTERS}
    control = {specs.ENSEMBLE_CONTROLNET.name, specs.PREPROCESS_CONTROL.name}
    assert (set(specs.ENSEMBLES) | set(specs.PIPELINES)) - control | set(specs.NETWORKS) | adapters == names
    for ensemble in set(specs.ENSEMBLES) - control:
        assert (repository / ensemble / "1").is_dir()  # the empty version folder Triton needs


def test_the_walkthroughs_repository_loads_every_model_it_holds(tiny_model, exports, tmp_path):
    """Step 3 writes into triton/models, whose committed models a server loads whole: written there
    without ControlNets, as the walkthrough does, every pipeline model in it has its serving files
    (ControlNet's own models are committed apart, in triton/controlnet_models, and installed with
    --controlnet). A model left without them failed the server's start."""
    from utils.layout import CONTROLNET_MODELS, ONNX_VERSION, PROJECT_MODELS

    repository = tmp_path / "models"
    committed = [name for name in configs.committed_models() if configs.committed_folder(name).parent == PROJECT_MODELS]
    for name in committed:  # as a clone has them (the project's own may hold what step 3 wrote beside them)
        shutil.copytree(PROJECT_MODELS / name, repository / name)
    write_repository(repository, tiny_model, onnx_files(exports), Deployment())
    pipelines = [name for name in committed if isinstance(configs.committed_models()[name], specs.PipelineSpec)]
    assert pipelines and all((repository / name / str(ONNX_VERSION) / SERVING_FILE).exists() for name in pipelines)
    assert not any((repository / path.name).exists() for path in CONTROLNET_MODELS.iterdir())
