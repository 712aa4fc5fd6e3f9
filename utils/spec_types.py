"""What the specs (utils/specs.py) are made of: a tensor's contract, a TensorRT batch profile,
and a network's whole contract, with what the export, the configs and the engines read from it."""

from __future__ import annotations

from dataclasses import dataclass

from utils.model_dims import DYNAMIC, Dim, ModelDims

# Float activations are FP16 in GPU engines and FP32 for the CPU default: a spec says
# ACTIVATION and the precision is chosen when the network is exported.
ACTIVATION = "ACTIVATION"
PRECISIONS = ("FP32", "FP16")
ONNX_FLOAT_PRECISIONS = {"FLOAT": "FP32", "FLOAT16": "FP16"}  # ONNX's element type names

BATCH_AXIS = "batch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type without the TYPE_ prefix, or ACTIVATION
    dims: tuple[Dim, ...]  # without the batch dim; str = symbol resolved by ModelDims, -1 = any
    optional: bool = False

    def resolved_dtype(self, precision: str) -> str:
        return precision if self.dtype == ACTIVATION else self.dtype

    @property
    def wire_dims(self) -> tuple[Dim, ...]:
        """Triton needs at least one dim: a per-sample scalar travels as [batch, 1], and the
        config's ``reshape`` hands it to the model as [batch], the shape it was exported with."""
        return self.dims or (1,)

    def to_wire(self, batched):
        """Reshape a batched tensor (torch or numpy) from the model's shape to the wire shape."""
        return batched if self.dims else batched.reshape(-1, 1)


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimization profile on the network's own batch dimension (min/opt/max)."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class NetworkSpec:
    """One exported network, served as one Triton model with a batch dimension."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: BatchProfile
    # Classifier-free guidance: the text encoder and the UNet see the unconditional and the
    # conditional rows together, unconditional first, so their batch is 2x the prompt batch.
    cfg_doubled: bool = False

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The batch, and the sizes that follow the image's (its height and width, ...) where a tensor has them."""
        return {t.name: {0: BATCH_AXIS, **{i + 1: d for i, d in enumerate(t.dims) if d in DYNAMIC}}
                for t in self.tensors}

    def shape(self, tensor: TensorSpec, batch: int, dims: ModelDims) -> tuple[int, ...]:
        return (batch, *dims.resolve(tensor.dims))

    def input_shapes(self, batch: int, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        return {t.name: self.shape(t, batch, dims) for t in self.inputs}

    def max_prompts(self) -> int:
        """How many prompts one call of this network can take at most."""
        return self.profile.max // (2 if self.cfg_doubled else 1)
