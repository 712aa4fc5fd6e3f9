"""TensorRT engines: trtexec commands from the specs, and what each engine depends on.

A plan is compiled for one GPU architecture and one TensorRT version. Next to each
``<network>/2/model.plan`` the build writes ``engine.json`` with that provenance, and
``check_engines`` refuses, before serving, a plan built for another GPU or another TensorRT,
with the command that rebuilds it (today users only find out from an opaque load error).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from utils import families, layout, specs
from utils.repository import configs
from utils.errors import UsageError, UserError

PROVENANCE_FILE = "engine.json"
DEFAULT_TIMING_CACHE = Path("engines/timing.cache")
ENGINE_PRECISIONS = ("fp16", "fp32")


class EngineMismatch(UserError, RuntimeError):
    """A plan that cannot run here: missing, or built for another GPU or TensorRT."""


class EngineBuildFailed(UserError, RuntimeError):
    """trtexec failed: the message has its command and last lines."""


def shapes_flag(network: specs.NetworkSpec, dims: specs.ModelDims, batch: int) -> str:
    """``name:BxDxD,...`` for every input at one batch size (a per-sample scalar is just ``B``)."""
    return ",".join(
        f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in network.input_shapes(batch, dims).items()
    )


def profile_levels(network: specs.NetworkSpec, dims: specs.ModelDims,
                   sizes: specs.ImageSizes | None = None) -> dict[str, tuple[int, specs.ModelDims]]:
    """The optimization profile's min, opt and max as (batch, dims): the batch profile's, with the
    smallest, the checkpoint's own and the largest image size the deployment serves."""
    sizes = sizes or specs.ImageSizes.default(dims)
    profile = network.profile
    return {"min": (profile.min, dims.at_size(sizes.min, sizes.min)), "opt": (profile.opt, dims),
            "max": (profile.max, dims.at_size(sizes.max, sizes.max, specs.MAX_PROMPT_CHUNKS))}


def profile_shapes(network: specs.NetworkSpec, dims: specs.ModelDims,
                   sizes: specs.ImageSizes | None = None) -> dict[str, dict[str, list[int]]]:
    levels = profile_levels(network, dims, sizes)
    return {name: {level: list(network.input_shapes(batch, at)[name]) for level, (batch, at) in levels.items()}
            for name in network.input_names}


def plan_path(repository: Path, network: specs.NetworkSpec) -> Path:
    return Path(repository) / network.name / str(layout.ENGINE_VERSION) / layout.PLAN_FILE


def onnx_in_repository(repository: Path, network: specs.NetworkSpec) -> Path:
    return Path(repository) / network.name / str(layout.ONNX_VERSION) / layout.ONNX_FILE


def trtexec_command(network: specs.NetworkSpec, dims: specs.ModelDims, repository: Path,
                    precision: str = "fp16", timing_cache: Path = DEFAULT_TIMING_CACHE,
                    trtexec: str = "trtexec", sizes: specs.ImageSizes | None = None) -> list[str]:
    """The trtexec command that builds ``network``'s engine from the repository's ONNX file, for
    the batch profile and the image sizes (default: ImageSizes.default) the deployment serves."""
    if precision not in ENGINE_PRECISIONS:
        raise UsageError(f"precision={precision!r} is not supported; use one of {ENGINE_PRECISIONS} (--precision).")
    command = [
        trtexec,
        f"--onnx={onnx_in_repository(repository, network)}",
        f"--saveEngine={plan_path(repository, network)}",
        *(f"--{level}Shapes={shapes_flag(network, at, batch)}"
          for level, (batch, at) in profile_levels(network, dims, sizes).items()),
    ]
    if precision == "fp16":
        command.append("--fp16")
    command.append(f"--timingCacheFile={timing_cache}")
    return command


@dataclass(frozen=True)
class Provenance:
    """What a plan depends on, as trtexec reported it when building."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: dict
    command: list

    def save(self, plan: Path) -> Path:
        path = plan.with_name(PROVENANCE_FILE)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, plan: Path) -> Provenance:
        return cls(**json.loads(plan.with_name(PROVENANCE_FILE).read_text()))


def parse_build_log(log: str) -> dict[str, str]:
    """TensorRT version, device name and compute capability from trtexec's device section."""
    patterns = {
        "tensorrt_version": r"TensorRT version: (\S+)",
        "gpu_name": r"Selected Device: (.+)",
        "compute_capability": r"Compute Capability: (\S+)",
    }
    found = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, log)
        if not match:
            raise RuntimeError(f"trtexec's log has no '{pattern.split(':')[0]}' line: cannot record the engine's provenance.")
        found[key] = match.group(1).strip()
    return found


@dataclass(frozen=True)
class Target:
    """Where engines are going to run: the GPU here and the TensorRT of the serving image."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str


def local_gpu() -> tuple[str, str]:
    """(name, compute capability) of GPU 0, from nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        raise EngineMismatch("nvidia-smi not found: TensorRT engines need an NVIDIA GPU and its driver.")
    output = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                            capture_output=True, text=True, check=True).stdout
    name, capability = (part.strip() for part in output.splitlines()[0].split(","))
    return name, capability


def _release(version: str) -> str:
    """TensorRT plans are tied to major.minor.patch (the build number does not matter)."""
    return ".".join(version.split(".")[:3])


def tensorrt_networks(repository: Path) -> list[specs.NetworkSpec]:
    """The networks that the repository serves with TensorRT (config platform tensorrt_plan), each
    named as served: a LoRA adapter's UNet is the UNet's spec under its own name (``unet_<name>``),
    with an engine of its own, and so is each ControlNet (``controlnet_<name>``); an SDXL
    repository's are SDXL's (utils/families.py), its refiner's UNet among them."""
    dims = served_dims(repository)
    family = families.family_of(dims) if dims else families.SD
    order = [*family.networks, *specs.CONTROL_NETWORKS, families.REFINER_UNET.name]  # the walkthrough's order
    found = []
    for config_file in layout.config_files(repository):
        config = configs.parse_pbtxt(config_file.read_text())
        if layout.network_of(config.name) in order and config.platform == "tensorrt_plan":
            found.append(specs.served_network(config.name, family))
    return sorted(found, key=lambda network: (order.index(layout.network_of(network.name)), network.name))


def served_dims(repository: Path, network: specs.NetworkSpec | None = None) -> specs.ModelDims | None:
    """The sizes of the checkpoint a repository serves (step 3 copied its config files to the text
    to image pipeline), or of SDXL's refiner for its UNet; None where it has no pipeline model."""
    files = Path(repository) / specs.TEXT_TO_IMAGE.name / str(layout.ONNX_VERSION) / layout.PIPELINE_FILES
    if network is not None and network.name == families.REFINER_UNET.name:
        files = files / layout.REFINER_FILES
    return specs.ModelDims.from_pretrained(files) if (files / "model_index.json").exists() else None


def check_engines(repository: Path, target: Target) -> list[str]:
    """Refuse any tensorrt_plan model whose engine was built for another GPU or TensorRT.

    Returns the names of the engines checked (none for a repository without TensorRT models).
    """
    checked, problems = [], []
    for network in tensorrt_networks(repository):
        plan = plan_path(repository, network)
        rebuild = "rebuild it here: python scripts/build_tensorrt_engines.py --force (or `make engines`)"
        if not plan.exists():
            problems.append(f"{plan} is missing: build it with python scripts/build_tensorrt_engines.py")
            continue
        if not plan.with_name(PROVENANCE_FILE).exists():
            problems.append(f"{plan} has no {PROVENANCE_FILE}, so where it can run is unknown: {rebuild}")
            continue
        built = Provenance.load(plan)
        if built.compute_capability != target.compute_capability:
            problems.append(
                f"{plan} was built for compute capability {built.compute_capability} ({built.gpu_name}) but this "
                f"GPU is {target.compute_capability} ({target.gpu_name}): {rebuild}"
            )
        if _release(built.tensorrt_version) != _release(target.tensorrt_version):
            problems.append(
                f"{plan} was built with TensorRT {built.tensorrt_version} but the server runs TensorRT "
                f"{target.tensorrt_version}: {rebuild} in the export image of the same NGC release"
            )
        checked.append(network.name)
    if problems:
        raise EngineMismatch("TensorRT engines that cannot be served here:\n- " + "\n- ".join(problems))
    return checked


def build_engine(network: specs.NetworkSpec, dims: specs.ModelDims, repository: Path, log_file: Path,
                 precision: str = "fp16", timing_cache: Path = DEFAULT_TIMING_CACHE,
                 wrap=lambda command: command, sizes: specs.ImageSizes | None = None) -> Provenance:
    """Run trtexec for one network (``wrap`` may prefix it, e.g. with ``docker run``), its output
    going to ``log_file``; record the engine's provenance next to the plan."""
    command = trtexec_command(network, dims, repository, precision, timing_cache, sizes=sizes)
    full_command = wrap(command)
    print("$ " + shlex.join(full_command), flush=True)
    plan_path(repository, network).parent.mkdir(parents=True, exist_ok=True)
    Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        returncode = subprocess.call(full_command, stdout=log, stderr=subprocess.STDOUT)
    output = log_file.read_text(errors="replace")
    if returncode != 0:
        tail = "\n".join(output.splitlines()[-25:])
        raise EngineBuildFailed(
            f"trtexec failed for {network.name} (exit code {returncode}). The command:\n  {' '.join(full_command)}\n"
            f"Its last lines (full log: {log_file}):\n{tail}"
        )
    provenance = Provenance(precision=precision, profiles=profile_shapes(network, dims, sizes), command=command,
                            **parse_build_log(output))
    provenance.save(plan_path(repository, network))
    return provenance
