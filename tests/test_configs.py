"""Every config.pbtxt parses with Triton's own schema and agrees with the specs and the ONNX graphs."""

from __future__ import annotations

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from utils import specs
from utils.repository import configs
from utils.deployment import BACKENDS, Deployment
from utils.layout import CONFIG_FILE, ENGINE_VERSION, ONNX_VERSION
from utils.repository.writer import write_repository

TINY = specs.ModelDims(text_length=16, text_hidden=32, latent_channels=4, latent_height=8, latent_width=8,
                       vae_scale_factor=8)
ONNX_TYPES = {"FP32": onnx.TensorProto.FLOAT, "FP16": onnx.TensorProto.FLOAT16, "INT32": onnx.TensorProto.INT32}


def assert_tensor_matches(config_tensor, spec_tensor: specs.TensorSpec, precision: str, dims: specs.ModelDims):
    assert config_tensor.name == spec_tensor.name
    assert config_tensor.data_type == configs.data_type(spec_tensor.resolved_dtype(precision))
    assert list(config_tensor.dims) == list(dims.resolve_static(spec_tensor.wire_dims))
    if spec_tensor.dims != spec_tensor.wire_dims:  # what the model sees after Triton's reshape
        assert list(config_tensor.reshape.shape) == list(dims.resolve(spec_tensor.dims))
    else:
        assert not config_tensor.HasField("reshape")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network", specs.NETWORKS.values(), ids=list(specs.NETWORKS))
@pytest.mark.parametrize("precision", specs.PRECISIONS)
def test_network_config_parses_and_matches_the_spec(network, backend, precision):
    text = configs.to_pbtxt(configs.network_config(network, TINY, precision, Deployment(backend=backend)))
    config = configs.parse_pbtxt(text)  # Triton's schema: a wrong field name or value raises
    assert config.name == network.name
    assert config.max_batch_size == network.profile.max
    if config.platform == "tensorrt_plan":  # a CUDA graph per batch size of the profile, a warm-up
        assert [g.batch_size for g in config.optimization.cuda.graph_spec] == list(
            range(network.profile.min, network.profile.max + 1))
    if config.platform:  # requests batched across callers, a warm-up at load
        assert config.HasField("dynamic_batching")
        (warmup,) = config.model_warmup
        assert warmup.batch_size == network.profile.opt and set(warmup.inputs) == set(network.input_names)
    assert len(config.input) == len(network.inputs) and len(config.output) == len(network.outputs)
    for config_tensor, spec_tensor in zip([*config.input, *config.output], network.tensors):
        assert_tensor_matches(config_tensor, spec_tensor, precision, TINY)
    expected = {
        "python": ("python", "", ONNX_VERSION, mc.ModelInstanceGroup.KIND_CPU),
        "onnxruntime": ("", "onnxruntime_onnx", ONNX_VERSION, mc.ModelInstanceGroup.KIND_GPU),
        "tensorrt": ("", "tensorrt_plan", ENGINE_VERSION, mc.ModelInstanceGroup.KIND_GPU),
    }[backend]
    assert (config.backend, config.platform, *config.version_policy.specific.versions,
            config.instance_group[0].kind) == expected


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"backend='torchscript' is not supported; use one of"):
        Deployment(backend="torchscript")


def test_schema_is_enforced():
    with pytest.raises(text_format.ParseError):
        configs.parse_pbtxt('name: "x"\nmax_batch_sise: 4\n')


@pytest.mark.parametrize("pipeline", specs.PIPELINES.values(), ids=list(specs.PIPELINES))
def test_committed_pipeline_config_is_generated_from_the_specs(pipeline):
    committed = (configs.committed_folder(pipeline.name) / CONFIG_FILE).read_text()
    assert committed == configs.to_pbtxt(configs.pipeline_config(pipeline)), \
        "run `python scripts/write_pipeline_configs.py`"
    config = configs.parse_pbtxt(committed)
    assert config.backend == "python" and config.max_batch_size == 0
    for config_tensor, spec_tensor in zip(config.input, pipeline.inputs):
        assert config_tensor.name == spec_tensor.name
        assert config_tensor.optional == spec_tensor.optional
    required = {specs.TEXT_TO_IMAGE.name: ["prompt"], specs.IMAGE_TO_IMAGE.name: ["prompt", "image"]}
    assert [t.name for t in config.input if not t.optional] == required.get(
        pipeline.name, [t.name for t in pipeline.inputs if not t.optional])


@pytest.mark.parametrize("ensemble", specs.ENSEMBLES.values(), ids=list(specs.ENSEMBLES))
def test_committed_ensemble_config_is_generated_from_the_specs_and_connects(ensemble):
    """Each step's maps name inputs and outputs its model has; every ensemble input feeds a step;
    every tensor a step reads is an ensemble input or an earlier step's output; the ensemble's
    outputs are produced; every input is optional (the steps refuse a missing one by name)."""
    committed = (configs.committed_folder(ensemble.name) / CONFIG_FILE).read_text()
    assert committed == configs.to_pbtxt(configs.ensemble_config(ensemble)), \
        "run `python scripts/write_pipeline_configs.py`"
    config = configs.parse_pbtxt(committed)
    assert config.platform == "ensemble" and config.max_batch_size == 0 and not config.instance_group
    assert all(tensor.optional for tensor in config.input)
    models = {**specs.NETWORKS, **specs.PIPELINES, **specs.ENSEMBLES}
    available, consumed = {t.name for t in config.input}, set()
    for step in config.ensemble_scheduling.step:
        model = models[step.model_name]
        assert set(step.input_map) <= {t.name for t in model.inputs}, step.model_name
        assert set(step.output_map) <= {t.name for t in model.outputs}, step.model_name
        assert set(step.input_map.values()) <= available, (step.model_name, "reads a tensor nothing made yet")
        consumed |= set(step.input_map.values())
        available |= set(step.output_map.values())
    assert {t.name for t in config.input} <= consumed  # Triton refuses an input that feeds no step
    assert {t.name for t in config.output} <= available


@pytest.fixture(scope="module", params=BACKENDS)
def written_repository(request, repository, tiny_model, exports, tmp_path_factory):
    """The repository step's output for each backend (the python one is the session's)."""
    if request.param == "python":
        return repository
    path = tmp_path_factory.mktemp(request.param)
    write_repository(path, tiny_model, {name: r.path for name, r in exports.items()}, Deployment(backend=request.param))
    return path


@pytest.mark.parametrize("name", specs.NETWORKS)
def test_written_configs_agree_with_the_exported_onnx_graphs(name, written_repository):
    """The configs the repository step wrote, against the graphs it copied next to them."""
    repository = written_repository
    config = configs.parse_pbtxt((repository / name / CONFIG_FILE).read_text())
    graph = onnx.load(str(repository / name / "1" / "model.onnx"), load_external_data=False).graph
    network = specs.NETWORKS[name]
    for config_tensors, graph_tensors in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in config_tensors] == [t.name for t in graph_tensors]
        for config_tensor, graph_tensor in zip(config_tensors, graph_tensors):
            graph_type = graph_tensor.type.tensor_type
            # The image's height and width: named axes in the graph, -1 in the config.
            graph_dims = [-1 if d.dim_param in specs.DYNAMIC else d.dim_param or d.dim_value
                          for d in graph_type.shape.dim]
            model_dims = list(config_tensor.reshape.shape) if config_tensor.HasField("reshape") else list(config_tensor.dims)
            assert graph_dims == ["batch", *model_dims]
            assert graph_type.elem_type == ONNX_TYPES[mc.DataType.Name(config_tensor.data_type).removeprefix("TYPE_")]
    assert config.max_batch_size == network.profile.max


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_runtime_config(device):
    config = configs.parse_pbtxt(configs.to_pbtxt(
        configs.network_config(specs.UNET, TINY, "FP16", Deployment(runtime="torch", device=device))))
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert config.backend == "python" and config.HasField("dynamic_batching")
    assert parameters["device"] == device and parameters["precision"] == "FP16"
    gpu = device == "cuda"
    assert config.instance_group[0].kind == (mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)
    # GPU tensors from BLS sub-requests are handed over as they are only when this is "no".
    assert parameters.get("FORCE_CPU_ONLY_INPUT_TENSORS") == ("no" if gpu else None)
