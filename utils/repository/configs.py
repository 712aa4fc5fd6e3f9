"""config.pbtxt files generated from the specs, with Triton's own schema.

One generator, three serving backends for the four networks (utils/deployment.py chooses):

- ``python``: the portable default, a Python-backend model, so the tritonserver of the
  ``nvidia-pytriton`` wheel can serve it with no Docker. Its runtime is ONNX Runtime on
  ``1/model.onnx`` (CPU) or the torch module of the checkpoint (``torch``: the GPU runtime, with
  CUDA graphs and dynamic batching);
- ``onnxruntime``: Triton's ONNX Runtime backend on ``1/model.onnx`` (NGC Triton image);
- ``tensorrt``: ``2/model.plan`` built by trtexec (NGC images).

The pipeline models and their clients are the same whichever backend runs the networks.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from utils import layout, sdxl_ensembles, specs
from utils.deployment import CPU, Deployment, Placement
from utils.controlnet import CONTROLNETS_PARAMETER
from utils.lora import CONFIG_PARAMETER

GENERATED_HEADER = "# Generated from utils/specs.py by utils/repository/configs.py: edit those, not this file.\n"


def data_type(dtype: str) -> int:
    """Triton's config enum for a wire dtype (the wire's BYTES is the config's TYPE_STRING)."""
    return mc.DataType.Value("TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}")


def _tensor_fields(tensor: specs.TensorSpec, precision: str, dims: specs.ModelDims | None) -> dict:
    """A config tensor: the checkpoint's sizes, but -1 for the image's height and width (any size
    the deployment serves); without ``dims`` (models that take any checkpoint) every symbolic size."""
    if dims is not None:
        shape = dims.resolve_static(tensor.wire_dims)
    else:
        shape = tuple(d if isinstance(d, int) else -1 for d in tensor.wire_dims)
    fields = dict(name=tensor.name, data_type=data_type(tensor.resolved_dtype(precision)), dims=shape)
    if tensor.wire_dims != tensor.dims:
        fields["reshape"] = mc.ModelTensorReshape(shape=tensor.dims)
    return fields


def network_config(network: specs.NetworkSpec, dims: specs.ModelDims, precision: str, deployment: Deployment,
                   gpu: int | None = None, adapter: str | None = None) -> mc.ModelConfig:
    """The config of one network as ``deployment`` serves it; with a placement on several GPUs,
    of its copy on ``gpu`` (``None``: the one copy); ``adapter``: the UNet with that LoRA fused in."""
    placement = deployment.placement
    config = mc.ModelConfig(
        name=placement.model_name(network.name, gpu, adapter),
        max_batch_size=network.profile.max,
        input=[mc.ModelInput(**_tensor_fields(t, precision, dims)) for t in network.inputs],
        output=[mc.ModelOutput(**_tensor_fields(t, precision, dims)) for t in network.outputs],
    )
    if network is specs.CONTROLLED_UNET:  # the ControlNets it serves with, for a client to read (client_side.py)
        config.parameters[CONTROLNETS_PARAMETER].string_value = ",".join(c.name for c in deployment.controlnets)
    version = layout.ENGINE_VERSION if deployment.backend == "tensorrt" else layout.ONNX_VERSION
    config.version_policy.specific.versions.append(version)
    gpus = placement.gpus if gpu is None else (gpu,)
    if deployment.backend == "python":
        _add_warmup(config, network, precision, dims)
        return _python_backend(config, network, deployment, precision, gpus)
    config.platform = "tensorrt_plan" if deployment.backend == "tensorrt" else "onnxruntime_onnx"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=gpus)
    # Requests queued together run as one batch, as in the torch runtime (each UNet sample has its
    # own timestep, so requests at different steps can share a call). Triton's auto-complete would
    # add it for a batching TensorRT model anyway; written here, the config says what runs.
    config.dynamic_batching.SetInParent()
    if deployment.backend == "tensorrt":
        # A CUDA graph replays one static shape: capture one per batch size of the profile at the
        # checkpoint's own image size (launch overhead dominates the UNet); other sizes run
        # without one.
        config.optimization.cuda.graphs = True
        for batch in range(network.profile.min, network.profile.max + 1):
            graph = config.optimization.cuda.graph_spec.add(batch_size=batch)
            for tensor in network.inputs:
                graph.input[tensor.name].dim.extend(dims.resolve(tensor.wire_dims))
    _add_warmup(config, network, precision, dims)
    return config


def _add_warmup(config: mc.ModelConfig, network: specs.NetworkSpec, precision: str, dims: specs.ModelDims) -> None:
    """One request at the profile's optimal batch and the checkpoint's own size at load time, so
    the first user does not pay for lazy initialization (cuDNN/TensorRT tactics, memory pools);
    its shapes also tell a client what the -1 sizes can be (utils/server/health.py). Token ids are zeros:
    random INT32 values would index past the vocabulary."""
    warmup = config.model_warmup.add(name=f"batch_{network.profile.opt}", batch_size=network.profile.opt, count=1)
    for tensor in network.inputs:
        warmup_input = warmup.inputs[tensor.name]
        warmup_input.data_type = _tensor_fields(tensor, precision, dims)["data_type"]
        warmup_input.dims.extend(dims.resolve(tensor.wire_dims))
        if tensor.dtype == "INT32":
            warmup_input.zero_data = True
        else:
            warmup_input.random_data = True


def _python_backend(config: mc.ModelConfig, network: specs.NetworkSpec, deployment: Deployment, precision: str,
                    gpus: tuple[int, ...]) -> mc.ModelConfig:
    config.backend = "python"
    on_gpu = deployment.torch_on_gpu
    if on_gpu:  # the instance's GPU reaches the model as args["model_instance_device_id"]
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=gpus)
    else:
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.parameters["network"].string_value = network.name  # the served name may carry a GPU suffix
    if deployment.torch_runtime:
        parameters = {"device": "cuda" if on_gpu else "cpu", "precision": precision}
        if on_gpu:  # hand GPU tensors from BLS sub-requests over as they are, not copied to the host
            parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
        # LoRA adapters applied per request (utils/lora_in_place.py).
        if network in (specs.UNET, specs.TEXT_ENCODER) and deployment.adapters_in_place:
            parameters[CONFIG_PARAMETER] = ",".join(adapter.name for adapter in deployment.adapters)
        if layout.network_of(network.name) in deployment.torch_compile:  # compiled at load, before the CUDA graphs
            parameters["torch_compile"] = "yes"
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        # Requests queued together run as one batch (each UNet sample has its own timestep).
        config.dynamic_batching.SetInParent()
    return config


def pipeline_config(pipeline: specs.PipelineSpec, placement: Placement = CPU, precision: str = "FP32") -> mc.ModelConfig:
    """The config of a Python-backend model of the pipeline (a BLS pipeline, or an ensemble's
    Python step): no batch dim, one request at a time. The committed config is the CPU's, in FP32."""
    config = mc.ModelConfig(
        name=pipeline.name,
        backend="python",
        max_batch_size=0,
        input=[mc.ModelInput(**_tensor_fields(t, precision, None), optional=t.optional) for t in pipeline.inputs],
        output=[mc.ModelOutput(**_tensor_fields(t, precision, None)) for t in pipeline.outputs],
    )
    config.version_policy.specific.versions.append(layout.ONNX_VERSION)
    if pipeline.decoupled:
        config.model_transaction_policy.decoupled = True
    if not pipeline.networks:  # a quick step (tokenizer, pre- and post-processing): one instance, on the CPU
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
        return config
    # Several instances: while one waits on a sub-request, the others prepare or finish their own,
    # and on a GPU their UNet calls meet in the UNet's dynamic batcher, so throughput grows with
    # concurrency. On GPUs, each GPU gets its own instances, which call that GPU's networks. With
    # the UNet in the loop's process, one instance runs every request's loop, each in a thread, and
    # batches their steps itself (utils/python_backend/step_batching.py).
    count = 1 if placement.unet_in_process(pipeline) else placement.pipeline_instances
    if not placement.gpus:
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=count)
    for gpu in placement.gpus:
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=count, gpus=[gpu])
    return config


def ensemble_config(ensemble: specs.EnsembleSpec, precision: str = "FP32") -> mc.ModelConfig:
    """A Triton ensemble: its steps' input and output maps name the tensors that flow between
    them. No instances and no batching of its own: its composing models have those."""
    # Every input optional: a missing one reaches the first step that takes it, which says which
    # input is missing (Triton's ensemble itself would answer "unexpected deadlock").
    config = mc.ModelConfig(
        name=ensemble.name,
        platform="ensemble",
        max_batch_size=0,
        input=[mc.ModelInput(**_tensor_fields(t, precision, None), optional=True) for t in ensemble.inputs],
        output=[mc.ModelOutput(**_tensor_fields(t, precision, None)) for t in ensemble.outputs],
    )
    for step in ensemble.steps:
        config.ensemble_scheduling.step.add(model_name=step.model, model_version=-1,
                                            input_map=dict(step.inputs), output_map=dict(step.outputs))
    return config


def committed_models() -> dict[str, specs.PipelineSpec | specs.EnsembleSpec]:
    """Every committed pipeline model and ensemble, by name: SD1.x's (triton/models), and base then
    refiner's, SDXL's own (triton/refiner_models)."""
    return {**specs.PIPELINES, **specs.ENSEMBLES, **{step.name: step for step in sdxl_ensembles.REFINER_STEPS},
            **sdxl_ensembles.REFINER_ENSEMBLES}


def committed_folder(name: str) -> Path:
    """Where a pipeline model or ensemble is committed: triton/models holds what every SD1.x
    deployment serves, ControlNet's and the refiner's models are apart (utils/layout.py)."""
    if name in (specs.ENSEMBLE_CONTROLNET.name, specs.PREPROCESS_CONTROL.name):
        return layout.CONTROLNET_MODELS / name
    return (layout.PROJECT_MODELS if name in specs.PIPELINES or name in specs.ENSEMBLES else layout.REFINER_MODELS) / name


def committed_config(name: str) -> mc.ModelConfig:
    """The config committed for a pipeline model or ensemble: the CPU placement's, in FP32."""
    model = committed_models()[name]
    return ensemble_config(model) if isinstance(model, specs.EnsembleSpec) else pipeline_config(model)


def to_pbtxt(config: mc.ModelConfig) -> str:
    return GENERATED_HEADER + text_format.MessageToString(config)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's schema: unknown fields or bad values raise."""
    return text_format.Parse(text, mc.ModelConfig())
