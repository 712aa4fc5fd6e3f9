"""How the networks and the pipeline models are deployed: one frozen object, checked once.

What runs the networks (``backend``, and inside the python backend its ``runtime``), on which
device and at which precision, where the instances go (``Placement``), which networks are
compiled, and which Python environment the pipeline models run in. Every combination that cannot
work is refused here, with the flag to change; the repository writer, the configs, the
benchmark and the scripts take a ``Deployment`` and decide nothing of this again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from utils import layout, specs
from utils import controlnet
from utils.controlnet import ServedControlNet
from utils.errors import UsageError
from utils.families import family_of
from utils.lora import LoraAdapter, check_names

BACKENDS = ("python", "onnxruntime", "tensorrt")
# What runs a network inside the python backend: its ONNX graph (with ONNX Runtime, on the CPU), or
# the checkpoint's torch module. Not to be mixed up with --backend onnxruntime, Triton's own backend.
RUNTIMES = ("onnx", "torch")
PIPELINE_LOOPS = ("cpu", "gpu", "with-unet")
WITH_UNET = "with-unet"  # the loop in the UNet's process (utils/python_backend/step_batching.py)
PIPELINE_INSTANCES = 2  # BLS instances on the CPU
# Per GPU: each instance runs one request's loop; 8 in flight let the UNet batch 8 requests' steps.
GPU_PIPELINE_INSTANCES = 8


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
    # it; the networks' answers are copied a few hundred KB each way. Measured on an H100
    # (docs/gpu-notes.md): faster than "gpu" (GPU tensors through DLPack) both alone and under load.
    # "with-unet": each model that runs the loop holds a UNet of its own and runs every in-flight
    # request's loop in one process, batching their steps, with no Triton call per step, the loop's
    # tensors on the UNet's device (the torch runtime only; ``pipeline_instances`` is then the
    # loops in flight per model).
    pipeline_loop: str = "cpu"

    def __post_init__(self):
        if len(set(self.gpus)) != len(self.gpus) or any(g < 0 for g in self.gpus):
            raise UsageError(f"gpus={list(self.gpus)}: list distinct GPU indices, e.g. 0,1 (or 'all').")
        if self.pipeline_loop not in PIPELINE_LOOPS:
            raise UsageError(f"--pipeline-loop {self.pipeline_loop}: use one of {', '.join(PIPELINE_LOOPS)}.")
        if self.pipeline_instances < 1:
            raise UsageError(f"--pipeline-instances {self.pipeline_instances}: at least 1 instance is needed.")

    @classmethod
    def on_gpus(cls, gpus: tuple[int, ...] = (0,), **options) -> Placement:
        return cls(gpus=gpus, **{"pipeline_instances": GPU_PIPELINE_INSTANCES, **options})

    @property
    def per_gpu_models(self) -> bool:
        return len(self.gpus) > 1

    @property
    def loop_with_unet(self) -> bool:
        return self.pipeline_loop == WITH_UNET

    def unet_in_process(self, pipeline: specs.PipelineSpec) -> bool:
        """Whether this pipeline model holds a UNet of its own: with-unet, for the models that run
        the loop."""
        return self.loop_with_unet and specs.UNET in pipeline.networks

    def loop_on_gpu(self, pipeline: specs.PipelineSpec) -> bool:
        """Whether this pipeline model keeps its loop's tensors on its GPU (where the networks
        are): with ``--pipeline-loop gpu``, and a model that holds a UNet of its own, whose loops
        then queue their steps on the GPU without waiting for each (step_batching.py)."""
        return self.pipeline_loop == "gpu" or self.unet_in_process(pipeline)

    def model_name(self, network_name: str, gpu: int | None = None, adapter: str | None = None) -> str:
        """The served name of a network (on ``gpu``, where each GPU has its own copy; with a LoRA
        ``adapter`` fused in)."""
        return layout.served_name(network_name, gpu if self.per_gpu_models else None, adapter)

    def network_gpus(self) -> tuple[int | None, ...]:
        """One served copy per entry: per GPU, or one for all (``None``)."""
        return self.gpus if self.per_gpu_models else (None,)


CPU = Placement()


@dataclass(frozen=True)
class Deployment:
    """What serves the networks, where, and how; the defaults are the CPU walkthrough's."""

    backend: str = "python"  # python (portable, the pip-installed server) | onnxruntime | tensorrt
    runtime: str = "onnx"  # inside the python backend: onnx (1/model.onnx, ONNX Runtime) | torch
    device: str = "cpu"  # the torch runtime's: cpu | cuda
    # FP32 | FP16. The torch runtime loads its weights at it (default: FP16 on cuda, FP32 on the
    # CPU); the ONNX routes export at it, and the repository step checks the graphs against it.
    precision: str | None = None
    placement: Placement | None = None  # None: GPU 0 for the torch runtime on cuda, else the CPU
    torch_compile: tuple[str, ...] = ()  # networks the torch runtime compiles at load
    pipeline_environment: Path | None = None  # a Python environment for the pipeline models
    # The ensembles and their Python steps (4 more processes); without them only the BLS pipelines
    # and the networks are served. Never with a copy of each network per GPU: an ensemble names
    # the models it runs, and there would be two of each.
    ensembles: bool = True
    # The heights and widths served, (min, max) in pixels; None: ImageSizes.default, around the
    # checkpoint's own size. The TensorRT profiles are built for them and the pipelines refuse
    # others, so a wider range costs engine build time and, at the extremes, some speed.
    image_sizes: tuple[int, int] | None = None
    # LoRA adapters (utils/lora.py): on the ONNX and TensorRT routes each served as a UNet of its own
    # with the adapter fused in; the torch runtime's UNet applies them in place, per request.
    adapters: tuple[LoraAdapter, ...] = ()
    # ControlNets (utils/controlnet.py): each served as controlnet_<name>, with controlled_unet.
    controlnets: tuple[ServedControlNet, ...] = ()
    # SDXL's refiner (a preset, folder or hub id), served as refiner_unet beside an SDXL base: requests
    # with high_noise_frac hand it their last steps (pipelines/sdxl.py).
    refiner: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UsageError(f"backend={self.backend!r} is not supported; use one of {BACKENDS} (--backend).")
        if self.runtime not in RUNTIMES:
            raise UsageError(f"runtime={self.runtime!r} is not supported; use one of {RUNTIMES} (--runtime).")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise UsageError(f"--device {self.device}: use cpu or cuda.")
        if self.precision not in (None, *specs.PRECISIONS):
            raise UsageError(f"--precision {self.precision}: use one of {', '.join(specs.PRECISIONS)}.")
        if self.runtime == "torch" and self.backend != "python":
            raise UsageError(f"--runtime torch runs inside the python backend, not --backend {self.backend}: "
                             f"use --backend python, or leave --runtime out.")
        if self.device != "cpu" and not self.torch_runtime:
            raise UsageError(f"--device {self.device} applies to --runtime torch (the python backend's ONNX Runtime "
                             f"runs on the CPU; the onnxruntime and tensorrt backends find their GPUs themselves): "
                             f"add --runtime torch, or leave --device out.")
        compilable = [*specs.NETWORKS, *specs.CONTROL_NETWORKS]  # controlnet: each ControlNet served
        unknown = set(self.torch_compile) - set(compilable)
        if unknown or (self.torch_compile and not self.torch_runtime):
            raise UsageError(f"torch_compile={list(self.torch_compile)}: name networks of {compilable}, "
                             f"with runtime='torch' (got runtime={self.runtime!r}; --torch-compile).")
        if self.placement is None:
            object.__setattr__(self, "placement", Placement.on_gpus() if self.torch_on_gpu else CPU)
        if self.placement.gpus and not self.torch_on_gpu:
            raise UsageError(
                f"--gpus {','.join(map(str, self.placement.gpus))} needs --backend python --runtime torch --device cuda "
                f"(got --backend {self.backend} --runtime {self.runtime} --device {self.device}; the TensorRT and "
                f"ONNX Runtime backends run on every visible GPU: leave --gpus out)."
            )
        if self.placement.loop_with_unet and (not self.torch_runtime or self.placement.per_gpu_models):
            raise UsageError(
                f"--pipeline-loop {WITH_UNET} loads the UNet into the loop's own process, which the torch runtime "
                f"on one device does (got --backend {self.backend} --runtime {self.runtime}, "
                f"--gpus {','.join(map(str, self.placement.gpus)) or 'none'}): add --runtime torch, keep to one GPU, "
                f"or use --pipeline-loop cpu.")
        check_names(self.adapters)
        controlnet.check_names(self.controlnets)

    def sizes(self, dims: specs.ModelDims) -> specs.ImageSizes:
        """The image sizes served, for a checkpoint of ``dims``."""
        if self.image_sizes is None:
            return specs.ImageSizes.default(dims)
        low, high = self.image_sizes
        step = dims.size_step
        if not (0 < low <= high and low % step == 0 and high % step == 0):
            raise UsageError(f"--image-sizes {low}-{high}: give MIN-MAX in pixels, multiples of {step} "
                             f"(one latent pixel), the smaller first, e.g. "
                             f"{specs.ImageSizes.default(dims).min}-{specs.ImageSizes.default(dims).max}.")
        return specs.ImageSizes(low, high, step)

    @property
    def torch_runtime(self) -> bool:
        return self.backend == "python" and self.runtime == "torch"

    @property
    def adapters_in_place(self) -> bool:
        """Whether the UNet applies the adapters itself (the torch runtime) rather than one UNet
        per adapter with it fused in (graphs and engines, whose weights are fixed when built)."""
        return bool(self.adapters) and self.torch_runtime

    @property
    def torch_on_gpu(self) -> bool:
        """The torch runtime on CUDA: the portable backend's GPU runtime."""
        return self.torch_runtime and self.device.startswith("cuda")

    @property
    def serves_ensembles(self) -> bool:
        return self.ensembles and not self.placement.per_gpu_models

    @property
    def served_precision(self) -> str:
        """The precision the networks are served at, where the deployment decides it (the torch
        runtime, or an export it makes); the ONNX routes otherwise take their graphs'."""
        return self.precision or ("FP16" if self.torch_on_gpu else "FP32")

    def describe(self) -> dict:
        """The settings as plain values, for a benchmark's JSON."""
        return {"backend": self.backend, "runtime": self.runtime, "device": self.device,
                "precision": self.served_precision, "torch_compile": list(self.torch_compile),
                "gpus": list(self.placement.gpus), "pipeline_instances": self.placement.pipeline_instances,
                "pipeline_loop": self.placement.pipeline_loop,
                "pipeline_environment": str(self.pipeline_environment) if self.pipeline_environment else None,
                "ensembles": self.serves_ensembles,
                "image_sizes": list(self.image_sizes) if self.image_sizes else "default",
                "adapters": [adapter.name for adapter in self.adapters],
                "controlnets": [controlnet.name for controlnet in self.controlnets], "refiner": self.refiner}

    def control_networks(self) -> tuple[specs.NetworkSpec, ...]:
        """The networks ControlNet adds, as served: each ControlNet's, then the UNet that adds their residuals."""
        if not self.controlnets:
            return ()
        return (*(specs.controlnet_model(controlnet.name) for controlnet in self.controlnets), specs.CONTROLLED_UNET)


@dataclass(frozen=True)
class InProcessUnet:
    """A loop model's own UNet (--pipeline-loop with-unet): the served one's weights, loaded again."""

    model: str  # the served UNet whose checkpoint it loads
    compile: bool  # under torch.compile, as --torch-compile asks of the served one
    loops_in_flight: int  # requests whose loops run at once, their steps batched


@dataclass(frozen=True)
class Serving:
    """What a pipeline model's ``1/serving.json`` records: how its networks are served, which the
    repository step knows and the model reads at load (it cannot see the deployment)."""

    precision: str  # the networks' (FP32 or FP16): the loop sends its tensors at it
    device: str  # where the networks run: cpu or cuda
    image_sizes: specs.ImageSizes  # the heights and widths served; others are refused
    gpus: tuple[int, ...] = ()
    loop_device: str = "cpu"  # where the loop keeps its tensors
    unet_in_process: InProcessUnet | None = None
    adapters: tuple[str, ...] = ()  # the LoRA adapters served: each as unet_<name>, or
    adapters_in_place: bool = False  # by the UNet itself, any mix per request (utils/lora.py)
    controlnets: tuple[str, ...] = ()  # the ControlNets served, each as controlnet_<name>
    family: str = "sd"  # the checkpoint's (utils/families.py): sd or sdxl
    refiner: bool = False  # SDXL's refiner served (refiner_unet)

    @classmethod
    def of(cls, deployment: Deployment, pipeline: specs.PipelineSpec, precision: str,
           dims: specs.ModelDims) -> Serving:
        """What ``deployment`` serves ``pipeline`` with, for a checkpoint of ``dims``."""
        placement, on_gpu = deployment.placement, deployment.torch_on_gpu
        unet = None
        if placement.unet_in_process(pipeline):
            unet = InProcessUnet(model=placement.model_name(specs.UNET.name),
                                 compile=specs.UNET.name in deployment.torch_compile,
                                 loops_in_flight=placement.pipeline_instances)
        return cls(precision=precision, device="cuda" if on_gpu else "cpu", image_sizes=deployment.sizes(dims),
                   gpus=placement.gpus, loop_device="cuda" if on_gpu and placement.loop_on_gpu(pipeline) else "cpu",
                   unet_in_process=unet, adapters=tuple(adapter.name for adapter in deployment.adapters),
                   adapters_in_place=deployment.adapters_in_place,
                   controlnets=tuple(controlnet.name for controlnet in deployment.controlnets),
                   family=family_of(dims).name, refiner=deployment.refiner is not None)

    @property
    def placement(self) -> Placement:
        return Placement(gpus=self.gpus)

    def to_json(self) -> str:
        record = {"family": self.family, "refiner": self.refiner, "precision": self.precision, "device": self.device,
                  "gpus": list(self.gpus), "loop_device": self.loop_device, "image_sizes": asdict(self.image_sizes)}
        if self.adapters:
            record["adapters"] = list(self.adapters)
            record["adapters_in_place"] = self.adapters_in_place
        if self.controlnets:
            record["controlnets"] = list(self.controlnets)
        if self.unet_in_process is not None:
            record["unet_in_process"] = asdict(self.unet_in_process)
        return json.dumps(record, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Serving:
        record = json.loads(text)
        unet = record.get("unet_in_process")
        return cls(precision=record["precision"], device=record["device"], gpus=tuple(record["gpus"]),
                   loop_device=record["loop_device"], image_sizes=specs.ImageSizes(**record["image_sizes"]),
                   unet_in_process=InProcessUnet(**unet) if unet else None,
                   adapters=tuple(record.get("adapters", ())),
                   adapters_in_place=record.get("adapters_in_place", False),
                   controlnets=tuple(record.get("controlnets", ())), family=record.get("family", "sd"),
                   refiner=record.get("refiner", False))

    @classmethod
    def read(cls, repository: Path, pipeline: str) -> Serving | None:
        """A repository's record for ``pipeline``; None where it has none."""
        path = layout.serving_file(repository, pipeline)
        return cls.from_json(path.read_text()) if path.exists() else None


def served_sizes(repository: Path, pipeline: str, dims: specs.ModelDims) -> specs.ImageSizes:
    """The image sizes a repository serves ``pipeline`` at: its record's, or the default."""
    serving = Serving.read(repository, pipeline)
    return serving.image_sizes if serving is not None else specs.ImageSizes.default(dims)


def served_network_names(repository: Path, pipeline: str) -> dict[str, list[str]]:
    """Per network, the names a repository serves it under (one, or one per GPU), from what the
    pipeline's serving.json records."""
    serving = Serving.read(repository, pipeline)
    placement = serving.placement if serving is not None else CPU
    return {network: [placement.model_name(network, gpu) for gpu in placement.network_gpus()]
            for network in specs.NETWORKS}
