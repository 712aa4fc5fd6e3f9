"""config.pbtxt files generated from the specs, with Triton's own schema.

One generator, three serving backends for the four networks (DESIGN.md section 4):

- ``python``: the portable default, a Python-backend model, so the tritonserver of the
  ``nvidia-pytriton`` wheel can serve it with no Docker. Its runtime is ONNX Runtime on
  ``1/model.onnx`` (CPU) or the torch module of the checkpoint (``torch``: the GPU runtime, with
  CUDA graphs and dynamic batching);
- ``onnxruntime``: Triton's ONNX Runtime backend on ``1/model.onnx`` (NGC Triton image);
- ``tensorrt``: ``2/model.plan`` built by trtexec (NGC images).

The pipeline models and their clients are the same whichever backend runs the networks.
``Placement`` says where instances run: the CPU, one GPU, or a copy of each network per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from utils import specs

BACKENDS = ("python", "onnxruntime", "tensorrt")
RUNTIMES = ("onnxruntime", "torch")  # what runs the network inside the python backend
ONNX_VERSION = 1  # 1/model.onnx
ENGINE_VERSION = 2  # 2/model.plan
PIPELINE_INSTANCES = 2  # BLS instances on the CPU
# Per GPU: each instance runs one request's loop; 8 in flight let the UNet batch 8 requests' steps.
GPU_PIPELINE_INSTANCES = 8
GENERATED_HEADER = "# Generated from utils/specs.py by utils/configs.py: edit those, not this file.\n"


@dataclass(frozen=True)
class Placement:
    """Where the models' instances run: on the CPU (no GPUs), or on these GPUs.

    On several GPUs each network is served once per GPU (``unet_gpu0``, ``unet_gpu1``, ...) and
    each pipeline instance calls the copies on its own GPU: a BLS sub-request cannot choose the
    instance of the model it calls, so one model spread over the GPUs would move a request's
    tensors between devices at every step. On one GPU the names stay the specs' own.
    """

    gpus: tuple[int, ...] = ()
    pipeline_instances: int = PIPELINE_INSTANCES  # BLS instances on the CPU, or on each GPU
    # Where a pipeline instance keeps its loop's tensors (latents, scheduler state). "cpu" keeps
    # each BLS process off the GPU, so no CUDA context per instance competes with the networks for
    # it; the networks copy a few hundred KB each way. Measured on the H100 (docs/gpu-notes.md):
    # faster than "gpu" (GPU tensors through DLPack) both alone and under load.
    pipeline_loop: str = "cpu"

    @classmethod
    def default(cls, runtime: str, device: str) -> Placement:
        """GPU 0 for the torch runtime on CUDA (its GPU runtime), else the CPU."""
        if runtime == "torch" and device.startswith("cuda"):
            return cls(gpus=(0,), pipeline_instances=GPU_PIPELINE_INSTANCES)
        return cls()

    def __post_init__(self):
        if len(set(self.gpus)) != len(self.gpus) or any(g < 0 for g in self.gpus):
            raise ValueError(f"gpus={list(self.gpus)}: list distinct GPU indices, e.g. 0,1 (or 'all').")
        if self.pipeline_loop not in ("gpu", "cpu"):
            raise ValueError(f"pipeline_loop={self.pipeline_loop!r}: use 'gpu' or 'cpu'.")
        if self.pipeline_instances < 1:
            raise ValueError(f"pipeline_instances={self.pipeline_instances}: at least 1 instance is needed.")

    @property
    def per_gpu_models(self) -> bool:
        return len(self.gpus) > 1

    def model_name(self, network_name: str, gpu: int | None = None) -> str:
        """The served name of a network (on ``gpu``, where each GPU has its own copy)."""
        return f"{network_name}_gpu{gpu}" if self.per_gpu_models else network_name

    def network_gpus(self) -> tuple[int | None, ...]:
        """One served copy per entry: per GPU, or one for all (``None``)."""
        return self.gpus if self.per_gpu_models else (None,)


CPU = Placement()


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
                   runtime: str = "onnxruntime", device: str = "cpu", placement: Placement = CPU,
                   gpu: int | None = None, torch_compile: bool = False) -> mc.ModelConfig:
    """The config of one network for one serving backend (and, for ``python``, its runtime); with
    a placement on GPUs, of its copy on ``gpu`` (or of the one copy, ``gpu=None``, on one GPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {BACKENDS}.")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not supported; use one of {RUNTIMES}.")
    config = mc.ModelConfig(
        name=placement.model_name(network.name, gpu),
        max_batch_size=network.profile.max,
        input=[mc.ModelInput(**_tensor_fields(t, precision, dims)) for t in network.inputs],
        output=[mc.ModelOutput(**_tensor_fields(t, precision, dims)) for t in network.outputs],
    )
    version = ENGINE_VERSION if backend == "tensorrt" else ONNX_VERSION
    config.version_policy.specific.versions.append(version)
    gpus = placement.gpus if gpu is None else (gpu,)
    if backend == "python":
        return _python_backend(config, network, runtime, device, precision, gpus, torch_compile)
    config.platform = "tensorrt_plan" if backend == "tensorrt" else "onnxruntime_onnx"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=gpus)
    # Requests queued together run as one batch, as in the torch runtime (each UNet sample has its
    # own timestep, so requests at different steps can share a call). Triton's auto-complete would
    # add it for a batching TensorRT model anyway; written here, the config says what runs.
    config.dynamic_batching.SetInParent()
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


def _python_backend(config: mc.ModelConfig, network: specs.NetworkSpec, runtime: str, device: str,
                    precision: str, gpus: tuple[int, ...], torch_compile: bool = False) -> mc.ModelConfig:
    config.backend = "python"
    on_gpu = device.startswith("cuda")
    if on_gpu:  # the instance's GPU reaches the model as args["model_instance_device_id"]
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=gpus)
    else:
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.parameters["network"].string_value = network.name  # the served name may carry a GPU suffix
    if runtime == "torch":
        parameters = {"device": "cuda" if on_gpu else "cpu", "precision": precision}
        if on_gpu:  # hand GPU tensors from BLS sub-requests over as they are, not copied to the host
            parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
        if torch_compile:  # compiled at load, before the CUDA graphs are captured (a minute or more)
            parameters["torch_compile"] = "yes"
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        # Requests queued together run as one batch (each UNet sample has its own timestep).
        config.dynamic_batching.SetInParent()
    return config


def pipeline_config(pipeline: specs.PipelineSpec, placement: Placement = CPU) -> mc.ModelConfig:
    """The config of a Python-backend pipeline model (BLS): no batch dim, one request per image set.
    The committed config is the CPU placement's."""
    config = mc.ModelConfig(
        name=pipeline.name,
        backend="python",
        max_batch_size=0,
        input=[mc.ModelInput(**_tensor_fields(t, "FP32", None), optional=t.optional) for t in pipeline.inputs],
        output=[mc.ModelOutput(**_tensor_fields(t, "FP32", None)) for t in pipeline.outputs],
    )
    config.version_policy.specific.versions.append(ONNX_VERSION)
    # Several instances: while one waits on a sub-request, the others prepare or finish their own,
    # and on a GPU their UNet calls meet in the UNet's dynamic batcher, so throughput grows with
    # concurrency. On GPUs, each GPU gets its own instances, which call that GPU's networks.
    if not placement.gpus:
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=placement.pipeline_instances)
    for gpu in placement.gpus:
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=placement.pipeline_instances, gpus=[gpu])
    return config


def to_pbtxt(config: mc.ModelConfig) -> str:
    return GENERATED_HEADER + text_format.MessageToString(config)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's schema: unknown fields or bad values raise."""
    return text_format.Parse(text, mc.ModelConfig())
