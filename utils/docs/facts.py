"""Facts of the code as the documentation states them: tables, commands, caps, a few words."""

from __future__ import annotations

from typing import Callable

from utils import specs
from utils.docker import SERVE_IMAGE
from utils.engines import trtexec_command
from utils.layout import DEFAULT_REPOSITORY, PRODUCTION_REPOSITORY, PROJECT_ROOT
from utils.models import SD15_SCHEDULER, SD15_SCHEDULER_CLASS, preset_dims
from utils.request import (DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_STRENGTH, GUIDANCE_SCALE_RANGE,
                           MAX_PROMPT_BYTES, SCHEDULERS, GenerationRequest, InvalidRequest, check_request,
                           max_inference_steps)

SD15 = preset_dims("sd15-random")  # SD1.5's architecture, so its sizes
TINY = preset_dims("tiny")


# The image's sizes, as the README writes them: h = H / 8 (the latents), w = W / 8.
SPATIAL_SYMBOLS = {"latent_height": "h", "latent_width": "w", "image_height": "H", "image_width": "W"}


def _shape(network: specs.NetworkSpec, tensor: specs.TensorSpec) -> str:
    batch = "2B" if network.cfg_doubled else "B"
    sizes = [SPATIAL_SYMBOLS.get(d, str(r)) for d, r in zip(tensor.dims, SD15.resolve(tensor.dims))]
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


def request_table() -> str:
    """Every input of the pipelines: text to image takes all but ``image`` and ``strength``, image
    to image all but ``height`` and ``width`` (its image's size is the output's)."""
    max_prompts = specs.MAX_PROMPTS
    low, high = GUIDANCE_SCALE_RANGE
    sizes = specs.ImageSizes.default(SD15)
    size_range = f"a multiple of {sizes.step} in [{sizes.min}, {sizes.max}] (SD1.5's default; --image-sizes)"
    allowed = {
        specs.PROMPT.name: ("required", f"1 to {max_prompts} prompts (N), each up to {MAX_PROMPT_BYTES} UTF-8 bytes"),
        specs.NEGATIVE_PROMPT.name: ("none", "one per prompt, or one for all"),
        specs.INIT_IMAGE.name: ("image to image: required", f"uint8 RGB, height and width each {size_range}; one "
                                                            f"per prompt or one for all"),
        specs.STRENGTH.name: (f"{DEFAULT_STRENGTH}", "image to image: in (0, 1]; keeps int(steps x strength) of the "
                                                     "steps"),
        specs.SCHEDULER.name: (f"the checkpoint's (SD1.5: {SD15_SCHEDULER_CLASS})", ", ".join(f"`{name}`" for name in SCHEDULERS)),
        specs.NUM_IMAGES_PER_PROMPT.name: ("1", f"at least 1, with N x num_images_per_prompt <= {max_prompts}"),
        specs.HEIGHT.name: (f"the checkpoint's ({SD15.image_height})", f"text to image: {size_range}"),
        specs.WIDTH.name: (f"the checkpoint's ({SD15.image_width})", f"text to image: {size_range}"),
        specs.GUIDANCE_SCALE.name: (f"{DEFAULT_GUIDANCE_SCALE}", f"a finite number in [{low:g}, {high:g}]; 1 or less: "
                                                                 f"no guidance (half the UNet rows)"),
        specs.NUM_INFERENCE_STEPS.name: (f"{DEFAULT_NUM_INFERENCE_STEPS}",
                                         f"[1, {max_inference_steps(SD15_SCHEDULER)}] (SD1.5's scheduler)"),
        specs.SEED.name: ("random", "[0, 2^63-1]; the same seed gives the same image"),
    }
    shapes = {specs.NEGATIVE_PROMPT.name: "[N] or [1]", specs.INIT_IMAGE.name: "[N, H, W, 3] or [1, H, W, 3]"}
    rows = ["| input | type | shape | default | allowed |", "| --- | --- | --- | --- | --- |"]
    for tensor in specs.REQUEST_INPUTS:
        shape = shapes.get(tensor.name, "[N]" if tensor.dims == (-1,) else "[1]")
        default, values = allowed[tensor.name]
        rows.append(f"| `{tensor.name}` | {tensor.dtype} | {shape} | {default} | {values} |")
    (output,) = specs.TEXT_TO_IMAGE.outputs
    rows.append(f"| output `{output.name}` | {output.dtype} | [N x num_images_per_prompt, H, W, 3] | | |")
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
    from utils.docker import serve_command
    from utils.server.access import AccessPolicy

    access = AccessPolicy(admin_key="<key>")
    command = serve_command(PROJECT_ROOT / DEFAULT_REPOSITORY, access=access)
    words = [word.replace(str(PROJECT_ROOT), "$PWD") for word in command]
    image = words.index(SERVE_IMAGE)
    lines = [" ".join(words[:image]), " ".join(words[image:image + 3])] + [
        " ".join(words[i:i + 1]) for i in range(image + 3, len(words))]
    return "```bash\npython scripts/launch_triton_server.py --docker\n# = " + " \\\n#     ".join(lines) + "\n```"


def _graph_lines(spec: specs.EnsembleSpec, depth: int = 1) -> list[str]:
    lines = []
    for step in spec.steps:
        inner = specs.ENSEMBLES.get(step.model)
        if inner is not None:
            kind = "ensemble"
        elif step.model in specs.NETWORKS:
            kind = "network"
        else:
            networks = specs.PIPELINES[step.model].networks
            kind = "python" + (f", calls {', '.join(n.name for n in networks)} by BLS" if networks else "")
        reads = ", ".join(tensor for _, tensor in step.inputs)
        makes = ", ".join(tensor for _, tensor in step.outputs)
        lines.append(f"{'  ' * depth}{step.model:<{24 - 2 * depth}} {reads} -> {makes}   ({kind})")
        if inner is not None:
            lines += _graph_lines(inner, depth + 1)
    return lines


def ensemble_graphs() -> str:
    """The two top-level ensembles, step by step, with the tensors that flow between the steps."""
    blocks = []
    for spec in (specs.ENSEMBLE_TEXT_TO_IMAGE, specs.ENSEMBLE_IMAGE_TO_IMAGE):
        inputs = ", ".join(t.name for t in spec.inputs)
        blocks.append("\n".join([f"{spec.name}: {inputs} -> {', '.join(t.name for t in spec.outputs)}",
                                  *_graph_lines(spec)]))
    return "```\n" + "\n\n".join(blocks) + "\n```"


def ensemble_config() -> str:
    """The generated config of the smallest ensemble, whole: what an ensemble is, in Triton's words."""
    from utils import configs

    text = configs.to_pbtxt(configs.ensemble_config(specs.ENCODE_PROMPT))
    return "```protobuf\n" + text.split("\n", 1)[1].rstrip() + "\n```"


def profile_words() -> str:
    text, vae = specs.TEXT_ENCODER.profile, specs.VAE_DECODER.profile
    return f"{text.min}-{text.max} rows for the text encoder and the UNet, {vae.min}-{vae.max} for the VAE"


def caps_words() -> str:
    steps = max_inference_steps(SD15_SCHEDULER)
    return (f"{specs.TEXT_TO_IMAGE.max_prompts()} prompts per request (the VAE decoder's batch profile), "
            f"{MAX_PROMPT_BYTES} UTF-8 bytes per prompt, {steps} steps")


def batch_error() -> str:
    return f"`inference request batch-size must be <= {specs.UNET.profile.max} for '{specs.UNET.name}'`"


def tiny_sizes() -> str:
    return (f"{TINY.text_length} tokens, {TINY.text_hidden} features, {TINY.latent_height}x{TINY.latent_width} "
            f"latents, {TINY.image_height}x{TINY.image_width} images")


# The README's request examples, for the tiny default (its sizes: 48-96 pixels a side). A test
# runs each of them against the local server, as written here.
PYTHON_EXAMPLE = """\
from pipelines.bls import BlsPipeline

pipeline = BlsPipeline("127.0.0.1:8001")
images = pipeline("a watercolor fox", scheduler="EulerAncestralDiscreteScheduler", num_images_per_prompt=2,
                  height=48, width=80, num_inference_steps=20, seed=0)
print(images.shape, images.dtype)  # (2, 48, 80, 3) uint8"""
HTTP_EXAMPLE = {"inputs": [
    {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a watercolor fox"]},
    {"name": "scheduler", "shape": [1], "datatype": "BYTES", "data": ["DPMSolverMultistepScheduler"]},
    {"name": "num_images_per_prompt", "shape": [1], "datatype": "INT32", "data": [2]},
    {"name": "width", "shape": [1], "datatype": "INT32", "data": [80]},
    {"name": "num_inference_steps", "shape": [1], "datatype": "INT32", "data": [20]},
    {"name": "seed", "shape": [1], "datatype": "INT64", "data": [0]}]}
HTTP_EXAMPLE_URL = "127.0.0.1:8000/v2/models/pipeline_text_to_image/infer"
STREAM_COMMAND = ("python scripts/run_streaming_pipeline.py --prompt \"a small boat\" --num-inference-steps 4 "
                  "--scheduler DDIMScheduler")
STREAM_OUTPUT = """\
denoising on the server: 100%|██████████| 4/4 [00:00<00:00, 65.05step/s]
saved 3 previews in outputs/previews (8x8 each)
saved outputs/stream.png (64x64, 4 steps)"""


def python_example() -> str:
    return f"```python\n{PYTHON_EXAMPLE}\n```"


def http_example() -> str:
    import json

    lines = ",\n  ".join(json.dumps(tensor) for tensor in HTTP_EXAMPLE["inputs"])
    return f"```bash\ncurl -s -X POST {HTTP_EXAMPLE_URL} -d '{{\"inputs\": [\n  {lines}]}}'\n```"


def stream_example() -> str:
    return f"```bash\n{STREAM_COMMAND}\n```\n\n```\n{STREAM_OUTPUT}\n```"


def metrics_table() -> str:
    from utils import metrics

    rows = ["| metric | kind | labels | what it counts |", "| --- | --- | --- | --- |"]
    for metric in metrics.METRICS:
        buckets = f" Buckets (s): {', '.join(f'{b:g}' for b in metric.buckets)}." if metric.buckets else ""
        rows.append(f"| `{metric.name}` | {metric.kind} | {', '.join(metric.labels)} | {metric.description}{buckets} |")
    return "\n".join(rows)


def dashboard_panels() -> str:
    from utils import dashboard

    return "\n".join(f"- **{panel.title}**" + (f": {panel.description}" if panel.description else "")
                     for panel in dashboard.PANELS)


def cancellation_interval() -> str:
    """How often at most the served loop asks Triton whether its request was cancelled."""
    from utils.timing import CANCELLATION_CHECK_SECONDS

    return f"{1000 * CANCELLATION_CHECK_SECONDS:g} ms"


FACTS: dict[str, Callable[[], str]] = {
    "tensors": tensor_table, "request": request_table, "invalid-steps": invalid_steps_error,
    "unet-trtexec": unet_trtexec, "profiles": profile_words, "caps": caps_words, "batch-error": batch_error,
    "tiny-sizes": tiny_sizes, "docker-serve": docker_serve, "ensemble-graphs": ensemble_graphs,
    "ensemble-config": ensemble_config, "python-example": python_example, "http-example": http_example,
    "stream-example": stream_example, "metrics": metrics_table, "dashboard-panels": dashboard_panels,
    "cancellation-interval": cancellation_interval,
}
