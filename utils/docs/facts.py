"""Facts of the code as the documentation states them: tables, commands, caps, a few words."""

from __future__ import annotations

import functools
from typing import Callable

from utils import specs
from utils.docker import SERVE_IMAGE
from utils.gateway import API_KEY_ENV, DEFAULT_PORT
from utils.docs.request_facts import family_defaults, request_table
from utils.repository.engines import trtexec_command
from utils.layout import DEFAULT_REPOSITORY, PRODUCTION_REPOSITORY, PROJECT_ROOT
from utils.models import SD15_SCHEDULER, SD15_SCHEDULER_CLASS, preset_dims
from utils.request import (DEFAULT_NUM_INFERENCE_STEPS,
                           MAX_PROMPT_BYTES,
                           GenerationRequest, InvalidRequest, check_request, max_inference_steps)

SD15 = preset_dims("sd15-random")  # SD1.5's architecture, so its sizes
TINY = preset_dims("tiny")


# The sizes that follow the request, as the README writes them: h = H / 8 (the latents), w = W / 8,
# L the prompt's length in tokens (77 per chunk).
DYNAMIC_SYMBOLS = {"latent_height": "h", "latent_width": "w", "image_height": "H", "image_width": "W",
                   "prompt_length": "L"}


def _shape(network: specs.NetworkSpec, tensor: specs.TensorSpec) -> str:
    batch = "2B" if network.cfg_doubled else "B"
    sizes = [DYNAMIC_SYMBOLS.get(d, str(r)) for d, r in zip(tensor.dims, SD15.resolve(tensor.dims))]
    return "[" + ", ".join([batch, *sizes]) + "]"


def _tensor(network: specs.NetworkSpec, tensor: specs.TensorSpec) -> str:
    dtype = "" if tensor.dtype == specs.ACTIVATION else f" {tensor.dtype}"
    return f"`{tensor.name}`{dtype} {_shape(network, tensor)}"


def tensor_table() -> str:
    rows = ["| network | inputs | outputs | batch profile, rows (min / opt / max) | prompts per call |",
            "| --- | --- | --- | --- | --- |"]
    for network in specs.NETWORKS.values():
        profile = network.profile
        rows.append(f"| {network.name} | {', '.join(_tensor(network, t) for t in network.inputs)} "
                    f"| {', '.join(_tensor(network, t) for t in network.outputs)} "
                    f"| {profile.min} / {profile.opt} / {profile.max} | up to {network.max_prompts()} |")
    return "\n".join(rows)


def invalid_steps_error() -> str:
    """The error a request with 0 steps gets, as the shared checks word it."""
    try:
        check_request(GenerationRequest(prompt="a cat", num_inference_steps=0),
                      max_prompts=specs.TEXT_TO_IMAGE.max_prompts(), max_steps=max_inference_steps(SD15_SCHEDULER))
    except InvalidRequest as error:
        return '```\n{"error":"' + str(error) + '"}\n```'
    raise AssertionError("a request with 0 steps passed the checks")


def unet_trtexec() -> str:
    command = trtexec_command(specs.UNET, SD15, PRODUCTION_REPOSITORY)
    lines = ["$ " + " ".join(command[:3])] + ["    " + argument for argument in command[3:-2]]
    return "```\n" + " \\\n".join(lines) + " \\\n    " + " ".join(command[-2:]) + "\n```"


def docker_serve() -> str:
    """The launcher's --docker command, with a placeholder for the key it makes at each start."""
    from utils.server.docker import serve_command
    from utils.server.access import AccessPolicy

    access = AccessPolicy(admin_key="<key>")
    command = serve_command(PROJECT_ROOT / DEFAULT_REPOSITORY, access=access)
    words = [word.replace(str(PROJECT_ROOT), "$PWD") for word in command]
    image = words.index(SERVE_IMAGE)
    lines = [" ".join(words[:image]), " ".join(words[image:image + 3])] + [
        " ".join(words[i:i + 1]) for i in range(image + 3, len(words))]
    return "```bash\npython scripts/launch_triton_server.py --docker\n# = " + " \\\n#     ".join(lines) + "\n```"


def ensemble_config() -> str:
    """The generated config of the smallest ensemble, whole: what an ensemble is, in Triton's words."""
    from utils.repository import configs

    text = configs.to_pbtxt(configs.ensemble_config(specs.ENCODE_PROMPT))
    return "```protobuf\n" + text.split("\n", 1)[1].rstrip() + "\n```"


def profile_words() -> str:
    """Each network's batch profile, networks with the same range named together."""
    ranges: dict[str, list[str]] = {}
    for network in specs.NETWORKS.values():
        ranges.setdefault(f"{network.profile.min}-{network.profile.max}", []).append(network.name)
    return ", ".join(f"{rows} rows for {' and '.join(names)}" for rows, names in ranges.items())


def caps_words() -> str:
    steps = max_inference_steps(SD15_SCHEDULER)
    smallest = [network.name for network in specs.NETWORKS.values() if network.max_prompts() == specs.MAX_PROMPTS]
    return (f"{specs.MAX_PROMPTS} prompts per request (the smallest batch profile: {' and '.join(smallest)}), "
            f"{MAX_PROMPT_BYTES} UTF-8 bytes per prompt, {steps} steps")


def batch_error() -> str:
    return f"`inference request batch-size must be <= {specs.UNET.profile.max} for '{specs.UNET.name}'`"


def tiny_sizes() -> str:
    return (f"{TINY.text_length} tokens, {TINY.text_hidden} features, {TINY.latent_height}x{TINY.latent_width} "
            f"latents, {TINY.image_height}x{TINY.image_width} images")


# The documents' request examples, for the tiny default (its sizes: 48-96 pixels a side). A test
# runs each of them against the local server, as written here.
PYTHON_EXAMPLE = """\
from pipelines.bls import BlsPipeline

pipeline = BlsPipeline("127.0.0.1:8001")
images = pipeline("a watercolor fox", scheduler="EulerAncestralDiscreteScheduler", num_images_per_prompt=2,
                  height=48, width=80, num_inference_steps=20, seed=0)
print(images.shape, images.dtype)  # (2, 48, 80, 3) uint8"""
# Inpainting (docs/inpainting.md): a picture, then its middle repainted.
INPAINT_EXAMPLE = """\
from pipelines.bls import BlsPipeline
from utils.mask import box_mask

pipeline = BlsPipeline("127.0.0.1:8001")
photo = pipeline("a photo of an astronaut riding a horse on mars", num_inference_steps=20, seed=0)
mask = box_mask(*photo.shape[1:3])  # white, repainted: the middle half of the picture
repainted = pipeline("a full moon", image=photo, mask_image=mask, num_inference_steps=20, seed=0)
print(repainted.shape, repainted.dtype)  # (1, 64, 64, 3) uint8"""
# The same request with tritonclient alone, as a reader would write it without this project.
PLAIN_CLIENT_EXAMPLE = """\
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient("127.0.0.1:8001")
inputs = []
for name, value in [("prompt", np.array([b"a watercolor fox"], dtype=object)),
                    ("num_inference_steps", np.array([20], dtype=np.int32)),
                    ("seed", np.array([0], dtype=np.int64))]:
    tensor = grpcclient.InferInput(name, list(value.shape), "BYTES" if value.dtype == object else
                                   {np.int32: "INT32", np.int64: "INT64"}[value.dtype.type])
    tensor.set_data_from_numpy(value)
    inputs.append(tensor)
result = client.infer("pipeline_text_to_image", inputs)
images = result.as_numpy("images")
print(images.shape, images.dtype)  # (1, 64, 64, 3) uint8"""
HTTP_EXAMPLE = {"inputs": [
    {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a watercolor fox"]},
    {"name": "scheduler", "shape": [1], "datatype": "BYTES", "data": ["DPMSolverMultistepScheduler"]},
    {"name": "num_images_per_prompt", "shape": [1], "datatype": "INT32", "data": [2]},
    {"name": "width", "shape": [1], "datatype": "INT32", "data": [80]},
    {"name": "num_inference_steps", "shape": [1], "datatype": "INT32", "data": [20]},
    {"name": "seed", "shape": [1], "datatype": "INT64", "data": [0]}]}
HTTP_EXAMPLE_URL = "127.0.0.1:8000/v2/models/pipeline_text_to_image/infer"


def python_example() -> str:
    return f"```python\n{PYTHON_EXAMPLE}\n```"


def inpaint_example() -> str:
    return f"```python\n{INPAINT_EXAMPLE}\n```"


def plain_client_example() -> str:
    return f"```python\n{PLAIN_CLIENT_EXAMPLE}\n```"


def http_example() -> str:
    import json

    lines = ",\n  ".join(json.dumps(tensor) for tensor in HTTP_EXAMPLE["inputs"])
    return f"```bash\ncurl -s -X POST {HTTP_EXAMPLE_URL} -d '{{\"inputs\": [\n  {lines}]}}'\n```"


def metrics_table() -> str:
    from utils import metrics

    rows = ["| metric | kind | labels | what it counts |", "| --- | --- | --- | --- |"]
    for metric in metrics.METRICS:
        buckets = f" Buckets (s): {', '.join(f'{b:g}' for b in metric.buckets)}." if metric.buckets else ""
        rows.append(f"| `{metric.name}` | {metric.kind} | {', '.join(metric.labels)} | {metric.description}{buckets} |")
    return "\n".join(rows)


def dashboard_panels() -> str:
    from utils.operations import dashboard

    return "\n".join(f"- **{panel.title}**" + (f": {panel.description}" if panel.description else "")
                     for panel in dashboard.PANELS)


def cancellation_interval() -> str:
    """How often at most the served loop asks Triton whether its request was cancelled."""
    from utils.timing import CANCELLATION_CHECK_SECONDS

    return f"{1000 * CANCELLATION_CHECK_SECONDS:g} ms"


def scheduler_timesteps(scheduler: str = SD15_SCHEDULER_CLASS,
                        steps: int = DEFAULT_NUM_INFERENCE_STEPS) -> list[int]:
    """The timesteps a scheduler of SD1.5's configuration runs for ``steps`` steps: one UNet call
    each in the shared loop (PNDM repeats its second timestep: 51 calls for 50 steps)."""
    import diffusers

    instance = getattr(diffusers, scheduler).from_config(SD15_SCHEDULER)
    instance.set_timesteps(steps)
    return [int(t) for t in instance.timesteps]


def unet_calls(steps: int = DEFAULT_NUM_INFERENCE_STEPS) -> int:
    """UNet calls of one text-to-image generation with SD1.5's scheduler."""
    return len(scheduler_timesteps(SD15_SCHEDULER_CLASS, steps))


def network_calls(steps: int = DEFAULT_NUM_INFERENCE_STEPS) -> int:
    """Network calls of one text-to-image generation: the text encoder, the UNet's, the decoder."""
    return 1 + unet_calls(steps) + 1


def ngc_release() -> str:
    from utils.docker import NGC_RELEASE, TENSORRT_VERSION, TRITON_VERSION

    return f"{NGC_RELEASE}: Triton {TRITON_VERSION} with TensorRT {TENSORRT_VERSION}, the release the pip-installed server comes from"


def triton_release() -> str:
    from utils.docker import NGC_RELEASE, TRITON_VERSION

    return f"{TRITON_VERSION} (the NGC {NGC_RELEASE} release)"


def production_commands() -> str:
    """The production path's commands, each marked with its step (utils/walkthrough.py)."""
    from utils.walkthrough import PRODUCTION

    lines = []
    for step in PRODUCTION:
        for index, command in enumerate(step.commands):
            first, *rest = command.split("\n")
            mark = f"  # {step.number}" if index == 0 else ""
            lines += [first + mark, *rest]
    return "```bash\n" + "\n".join(lines) + "\n```"


def production_steps() -> str:
    from utils.walkthrough import PRODUCTION

    rows = ["| step | what happens |", "| --- | --- |"]
    rows += [f"| {step.number} | {step.title}: {step.does} |" for step in PRODUCTION]
    return "\n".join(rows)


@functools.cache
def _sd15_unet_parameters() -> int:
    import torch
    from diffusers import UNet2DConditionModel

    from utils.models import PRESETS

    with torch.device("meta"):  # the architecture without its weights
        unet = UNet2DConditionModel(**PRESETS["sd15-random"]["unet"])
    return sum(parameter.numel() for parameter in unet.parameters())


def sd15_unet_size(precision: str) -> str:
    """SD1.5's UNet weights at a precision, in GB."""
    bytes_per_value = {"FP32": 4, "FP16": 2}[precision]
    return f"{_sd15_unet_parameters() * bytes_per_value / 1e9:.1f} GB"


def image_sizes() -> str:
    sizes = specs.ImageSizes.default(SD15)
    return (f"{sizes.describe()} pixels a side by default for SD1.5, whose own size is "
            f"{SD15.image_height}x{SD15.image_width}")


def docker_pins() -> str:
    """The NGC images' pins that differ from requirements.txt's."""
    def pins(path: str) -> dict[str, str]:
        lines = (PROJECT_ROOT / path).read_text().splitlines()
        return dict(line.split("#")[0].strip().split("==") for line in lines if "==" in line.split("#")[0])

    ours, images = pins("requirements.txt"), pins("docker/requirements.txt")
    older = [name for name in ("transformers", "diffusers", "onnxruntime", "torch") if name in images]
    return ", ".join(f"{name} {images[name]} against {ours[name]}" for name in older if name in ours)


def _chart(name: str) -> dict:
    import yaml

    return yaml.safe_load((PROJECT_ROOT / "deploy" / "helm" / "sd-triton" / name).read_text())


def chart_scaling() -> str:
    """How the chart's autoscaler moves, in words, from its default values."""
    scaling = _chart("values.yaml")["autoscaling"]
    up, down = scaling["scaleUp"], scaling["scaleDown"]
    return (f"when the pods' average exceeds `autoscaling.targetQueueComputeRatio` "
            f"({scaling['targetQueueComputeRatio']}), at most {up['pods']} pods every {up['periodSeconds']} s, and "
            f"gives back {down['pods']} every {down['periodSeconds']} s once the ratio has stayed low for "
            f"{down['stabilizationWindowSeconds']} s")


def kube_versions() -> str:
    """The Kubernetes versions the chart admits (Chart.yaml's kubeVersion), as a range."""
    import re

    bounds = dict((op, (int(major), int(minor))) for op, major, minor in
                  re.findall(r"(>=|<)\s*v?(\d+)\.(\d+)", _chart("Chart.yaml")["kubeVersion"]))
    low, high = bounds[">="], bounds["<"]
    return f"{low[0]}.{low[1]} to {high[0]}.{high[1] - 1}"


def canary_interval() -> str:
    from utils.server.health import CANARY_INTERVAL_SECONDS

    return f"{CANARY_INTERVAL_SECONDS:g} s"


def failures_before_restart() -> str:
    from utils.server.health import FAILURES_BEFORE_RESTART

    return str(FAILURES_BEFORE_RESTART)


def retry_for() -> str:
    from utils.grpc_client import DEFAULT_RETRY_FOR

    return f"{DEFAULT_RETRY_FOR:g} s"


# The OpenAI-compatible gateway's examples (scripts/launch_openai_gateway.py), run as written by
# tests/test_openai_gateway.py: curl with the key in SD_TRITON_API_KEY, and the openai SDK.
OPENAI_CURL_EXAMPLE = f"""curl -s 127.0.0.1:{DEFAULT_PORT}/v1/images/generations -H "Authorization: Bearer ${API_KEY_ENV}" \\
  -H "Content-Type: application/json" -d '{{"prompt": "a watercolor fox", "n": 2, "seed": 0}}' \\
  | python -c "import base64, json, sys
for i, image in enumerate(json.load(sys.stdin)['data']):
    open(f'fox-{{i}}.png', 'wb').write(base64.b64decode(image['b64_json']))"
"""
OPENAI_SDK_EXAMPLE = f"""from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:{DEFAULT_PORT}/v1", api_key="KEY")  # the key the gateway printed
response = client.images.generate(prompt="a watercolor fox", n=2, response_format="b64_json",
                                  extra_body={{"seed": 0, "negative_prompt": "blurry", "clip_skip": 1}})
print(len(response.data))  # 2"""


FACTS: dict[str, Callable[..., str]] = {
    "tensors": tensor_table, "request": request_table, "family-defaults": family_defaults, "invalid-steps": invalid_steps_error,
    "unet-trtexec": unet_trtexec, "profiles": profile_words, "caps": caps_words, "batch-error": batch_error,
    "tiny-sizes": tiny_sizes, "docker-serve": docker_serve, "ensemble-config": ensemble_config,
    "python-example": python_example,
    "inpaint-example": inpaint_example,
    "plain-client-example": plain_client_example, "http-example": http_example,
    "metrics": metrics_table, "dashboard-panels": dashboard_panels,
    "cancellation-interval": cancellation_interval,
    "network-calls": lambda: str(network_calls()), "ngc-release": ngc_release, "triton-release": triton_release,
    "production-commands": production_commands, "production-steps": production_steps,
    "sd15-unet-size": sd15_unet_size, "image-sizes": image_sizes, "docker-pins": docker_pins,
    "chart-scaling": chart_scaling, "kube-versions": kube_versions, "canary-interval": canary_interval,
    "failures-before-restart": failures_before_restart, "retry-for": retry_for,
    "openai-curl-example": lambda: f"```bash\n{OPENAI_CURL_EXAMPLE}```",
    "openai-sdk-example": lambda: f"```python\n{OPENAI_SDK_EXAMPLE}\n```",
}
