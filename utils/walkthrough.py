"""The walkthrough's steps, numbered once: the README renders them from here, each script's
``--help`` names its step from here, and the recorded run (scripts/record_walkthrough.py) runs
their commands as written here.

Steps 1-9 run on a CPU with no Docker (the tiny default); P1-P6 are the production path with the
NGC images and TensorRT (docs/production.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from utils.docker import EXPORT_IMAGE, TRITON_VERSION
from utils.layout import PROJECT_ROOT

PROMPT = '"a photo of an astronaut riding a horse on mars"'
# Step 7's image to image, which the quickstart runs too.
IMAGE_TO_IMAGE_PROMPT = "the same scene at night, oil painting"
IMAGE_TO_IMAGE_STRENGTH = 0.6
INPAINT_PROMPT = "a full moon"  # the quickstart's inpainting: the middle of the BLS image repainted
CONTROLNET_PROMPT = "a castle on a hill"  # the quickstart's ControlNet: the BLS image's edges guide it


@dataclass(frozen=True)
class Step:
    number: str
    title: str
    does: str  # one line: what it does, for a reader deciding whether to read on
    commands: tuple[str, ...] = ()  # as a user types them, from the repository root
    scripts: tuple[str, ...] = ()  # the scripts whose --help says "Step <number>"
    chapter: str = ""  # the tutorial chapter that explains it (docs/tutorial/)
    background: bool = False  # runs until stopped: in a second terminal
    shown: int = 8  # the README shows each command's first line and this many of its last

    @property
    def label(self) -> str:
        return f"Step {self.number}"


WALKTHROUGH = (
    Step("1", "Choose a model",
         "the steps that read a checkpoint (the exports, the repository, the client-side pipeline) take `--model`: "
         "the tiny random preset by default, SD1.5's architecture with random weights, a hub id or a diffusers folder; "
         "SDXL likewise (tiny-sdxl, sdxl-random, its hub id; its refiner with --refiner: [docs/sdxl.md](docs/sdxl.md)), "
         "and the repository records which family it serves",
         chapter="1-export.md"),
    Step("2", "Export the four networks to ONNX",
         "traces each network with the specs' tensor names and dynamic axes, checks it with ONNX Runtime against "
         "torch, writes onnx/<model>/<network>.onnx",
         commands=tuple(f"python optim/convert_{network}_to_onnx.py"
                        for network in ("text_encoder", "unet", "vae_encoder", "vae_decoder")),
         scripts=tuple(f"optim/convert_{network}_to_onnx.py"
                       for network in ("text_encoder", "unet", "vae_encoder", "vae_decoder")),
         chapter="1-export.md"),
    Step("3", "Write the Triton model repository",
         "checks each graph against the specs, writes every config.pbtxt with Triton's own schema, installs the "
         "pipeline models and the ensembles",
         commands=("python scripts/move_onnx_models_to_triton.py",), shown=2,
         scripts=("scripts/move_onnx_models_to_triton.py",), chapter="2-repository.md"),
    Step("4", "Start Triton",
         f"the real tritonserver {TRITON_VERSION} from the nvidia-pytriton wheel, on 127.0.0.1, the admin APIs behind "
         f"a fresh key; run it in the environment (`source .venv/bin/activate`) in a second terminal",
         commands=("python scripts/launch_triton_server.py",),
         scripts=("scripts/launch_triton_server.py",), chapter="3-python-backend.md", background=True),
    Step("5", "Generate client-side",
         "this process runs the denoising loop and calls each network over gRPC",
         commands=(f"python scripts/run_client_side_pipeline.py --prompt {PROMPT} --seed 0",),
         scripts=("scripts/run_client_side_pipeline.py",), chapter="3-python-backend.md"),
    Step("6", "Generate with the BLS pipeline",
         "one request; the loop runs inside Triton and calls the networks as BLS sub-requests",
         commands=(f"python scripts/run_bls_pipeline.py --prompt {PROMPT} --seed 0",
                   "python scripts/run_streaming_pipeline.py --prompt \"a small boat\" --num-inference-steps 4"),
         scripts=("scripts/run_bls_pipeline.py", "scripts/run_streaming_pipeline.py"), chapter="3-python-backend.md"),
    Step("7", "Generate with an ensemble, and image to image",
         "one request through a graph of models that Triton runs itself; then image to image from the BLS image",
         commands=(f"python scripts/run_ensemble_pipeline.py --prompt {PROMPT} --seed 0",
                   f"python scripts/run_ensemble_pipeline.py --image outputs/bls.png --strength {IMAGE_TO_IMAGE_STRENGTH} "
                   f"--prompt \"{IMAGE_TO_IMAGE_PROMPT}\" --output outputs/image_to_image.png"),
         scripts=("scripts/run_ensemble_pipeline.py",), chapter="4-ensembles.md"),
    Step("8", "Query one network with tritonclient",
         "one batch of random inputs of the served shapes: the smallest check that a network is served",
         commands=("python scripts/query_model.py unet",),
         scripts=("scripts/query_model.py",), chapter="2-repository.md"),
    Step("9", "Load-test with perf_analyzer",
         "Triton's own load generator (`make tools` installs it) on the UNet at batch 2, then on the BLS pipeline "
         "with its networks' times",
         commands=("python scripts/run_perf_analyzer.py unet --batch 2 --concurrency 1:4:3 --admin-key KEY",
                   "python scripts/run_perf_analyzer.py --concurrency 1:4:3 --admin-key KEY"),
         scripts=("scripts/run_perf_analyzer.py",), chapter="6-statistics.md", shown=11),
)

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PRODUCTION = (
    Step("P1", "Build the two images",
         "the export image (FROM the NGC PyTorch image: export and trtexec) and the serving image (FROM the NGC "
         "Triton image, with this project's packages)",
         commands=("make images",), scripts=("scripts/build_docker_images.py",)),
    Step("P2", "Export in FP16 on the GPU",
         "the four networks inside the export image, each checked against torch by ONNX Runtime",
         commands=("for network in text_encoder unet vae_encoder vae_decoder; do\n"
                   "  docker run --rm --gpus=all --env HF_TOKEN --user $(id -u):$(id -g) -v $PWD:/workspace "
                   "-w /workspace \\\n"
                   f"    {EXPORT_IMAGE} \\\n"
                   f"    python optim/convert_${{network}}_to_onnx.py --model {SD15} --device cuda --precision FP16\n"
                   "done",),
         chapter="5-tensorrt.md"),
    Step("P3", "Write the TensorRT repository",
         "configs for tensorrt_plan checked against the FP16 graphs, in a folder of its own; --print-commands shows "
         "P4's trtexec commands without a GPU",
         commands=(f"python scripts/move_onnx_models_to_triton.py --model {SD15} --backend tensorrt "
                   "--repository triton/production",
                   "python scripts/build_tensorrt_engines.py --repository triton/production --print-commands"),
         scripts=("scripts/move_onnx_models_to_triton.py",), chapter="5-tensorrt.md"),
    Step("P4", "Build the engines", "one trtexec build per network, in the export image",
         commands=("make engines",), scripts=("scripts/build_tensorrt_engines.py",), chapter="5-tensorrt.md"),
    Step("P5", "Serve the engines",
         "checks each engine against this GPU and TensorRT, then runs the serving image with docker run",
         commands=("python scripts/launch_triton_server.py --docker --repository triton/production",),
         scripts=("scripts/launch_triton_server.py",), chapter="5-tensorrt.md", background=True),
    Step("P6", "Generate", "the same clients as on the CPU; the client-side one reads the checkpoint's tokenizer "
                           "and configs, not its weights",
         commands=("python scripts/query_model.py unet",
                   f"python scripts/run_bls_pipeline.py --prompt {PROMPT}",
                   f"python scripts/run_ensemble_pipeline.py --prompt {PROMPT}",
                   f"python scripts/run_client_side_pipeline.py --model {SD15} --prompt {PROMPT}"),
         chapter="5-tensorrt.md"),
)

STEPS = WALKTHROUGH + PRODUCTION


def step(number: str) -> Step:
    for candidate in STEPS:
        if candidate.number == number:
            return candidate
    raise KeyError(f"no step {number!r} in utils/walkthrough.py")


def heading(number: str, detail: str = "") -> str:
    """A step as a script's progress names it: its number and title, and what it works on."""
    return f"{number}. {step(number).title}" + (f": {detail}" if detail else "")


def steps_of(script: str | Path) -> list[Step]:
    """The steps a script (its path, or its ``__file__``) runs; none for a tool outside the steps."""
    path = Path(script)
    name = str(path.resolve().relative_to(PROJECT_ROOT)) if path.is_absolute() else str(path)
    return [s for s in STEPS if name in s.scripts]


def describe(script: str | Path, doc: str) -> str:
    """A script's --help description: its step (from this table) and its docstring's first paragraph."""
    summary = " ".join(doc.strip().split("\n\n")[0].split())
    labels = " and ".join(s.label for s in steps_of(script))
    return f"{labels}: {summary}" if labels else summary
