"""config.pbtxt files generated from the specs, with Triton's own schema.

One generator, three serving backends for the four networks (DESIGN.md section 4):

- ``python``: the portable default, a Python-backend model, so the tritonserver of the
  ``nvidia-pytriton`` wheel can serve it with no Docker. Its runtime is ONNX Runtime on
  ``1/model.onnx`` (CPU) or the torch module of the checkpoint (``torch``: the GPU runtime, with
  CUDA graphs and dynamic batching);
- ``onnxruntime``: Triton's ONNX Runtime backend on ``1/model.onnx`` (NGC Triton image);
- ``tensorrt``: ``2/model.plan`` built by trtexec (NGC images).

The pipeline models and their clients are the same whichever backend runs the networks.
"""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from utils import specs

BACKENDS = ("python", "onnxruntime", "tensorrt")
RUNTIMES = ("onnxruntime", "torch")  # what runs the network inside the python backend
ONNX_VERSION = 1  # 1/model.onnx
ENGINE_VERSION = 2  # 2/model.plan
PIPELINE_INSTANCES = 2
GENERATED_HEADER = "# Generated from utils/specs.py by utils/configs.py: edit those, not this file.\n"


def data_type(dtype: str) -> int:
    """Triton's config enum for a wire dtype (the wire's BYTES is the config's TYPE_STRING)."""
    return mc.DataType.Value("TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}")


def _tensor_fields(tensor: specs.TensorSpec, precision: str, dims: specs.ModelDims | None) -> dict:
    shape = dims.resolve(tensor.wire_dims) if dims is not None else tensor.wire_dims
    fields = dict(name=tensor.name, data_type=data_type(tensor.resolved_dtype(precision)), dims=shape)
    if tensor.wire_dims != tensor.dims:
        fields["reshape"] = mc.ModelTensorReshape(shape=tensor.dims)
    return fields


def network_config(network: specs.NetworkSpec, dims: specs.ModelDims, precision: str, backend: str,
                   runtime: str = "onnxruntime", device: str = "cpu") -> mc.ModelConfig:
    """The config of one network for one serving backend (and, for ``python``, its runtime)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS}.")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not supported; use one of {RUNTIMES}.")
    config = mc.ModelConfig(
        name=network.name,
        max_batch_size=network.profile.max,
        input=[mc.ModelInput(**_tensor_fields(t, precision, dims)) for t in network.inputs],
        output=[mc.ModelOutput(**_tensor_fields(t, precision, dims)) for t in network.outputs],
    )
    version = ENGINE_VERSION if backend == "tensorrt" else ONNX_VERSION
    config.version_policy.specific.versions.append(version)
    if backend == "python":
        return _python_backend(config, runtime, device, precision)
    config.platform = "tensorrt_plan" if backend == "tensorrt" else "onnxruntime_onnx"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    if backend == "tensorrt":
        # Only the batch is dynamic, so each batch size of the profile is one static shape that a
        # CUDA graph can replay: capture one per batch size (launch overhead dominates the UNet).
        config.optimization.cuda.graphs = True
        for batch in range(network.profile.min, network.profile.max + 1):
            config.optimization.cuda.graph_spec.add(batch_size=batch)
    # One request at the profile's optimal batch at load time, so the first user does not pay for
    # lazy initialization (cuDNN/TensorRT tactics, memory pools). Token ids are zeros: random
    # INT32 values would index past the vocabulary.
    warmup = config.model_warmup.add(name=f"batch_{network.profile.opt}", batch_size=network.profile.opt, count=1)
    for tensor in network.inputs:
        fields = _tensor_fields(tensor, precision, dims)
        warmup_input = warmup.inputs[tensor.name]
        warmup_input.data_type = fields["data_type"]
        warmup_input.dims.extend(fields["dims"])
        if tensor.dtype == "INT32":
            warmup_input.zero_data = True
        else:
            warmup_input.random_data = True
    return config


def _python_backend(config: mc.ModelConfig, runtime: str, device: str, precision: str) -> mc.ModelConfig:
    config.backend = "python"
    gpu = device.startswith("cuda")
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=1)
    if runtime == "torch":
        parameters = {"device": "cuda" if gpu else "cpu", "precision": precision}
        if gpu:  # hand GPU tensors from BLS sub-requests over as they are, not copied to the host
            parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        # Requests queued together run as one batch (each UNet sample has its own timestep).
        config.dynamic_batching.SetInParent()
    return config


def pipeline_config(pipeline: specs.PipelineSpec) -> mc.ModelConfig:
    """The config of a Python-backend pipeline model (BLS): no batch dim, one request per image set."""
    config = mc.ModelConfig(
        name=pipeline.name,
        backend="python",
        max_batch_size=0,
        input=[mc.ModelInput(**_tensor_fields(t, "FP32", None), optional=t.optional) for t in pipeline.inputs],
        output=[mc.ModelOutput(**_tensor_fields(t, "FP32", None)) for t in pipeline.outputs],
    )
    config.version_policy.specific.versions.append(ONNX_VERSION)
    # Two instances: while one waits on a sub-request, the other can prepare or finish its own,
    # so concurrent requests overlap instead of queueing behind each other.
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=PIPELINE_INSTANCES)
    return config


def to_pbtxt(config: mc.ModelConfig) -> str:
    return GENERATED_HEADER + text_format.MessageToString(config)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's schema: unknown fields or bad values raise."""
    return text_format.Parse(text, mc.ModelConfig())
