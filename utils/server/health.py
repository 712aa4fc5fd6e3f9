"""Is the server really serving? A canary inference, and a supervisor that restarts it.

Readiness is not enough on tritonserver 2.51: a Python-backend stub that died is never
restarted, while /v2/health/ready keeps answering 200 and every request to that model fails.
The canary sends one real request to every network and a one-step request to every pipeline (the
BLS models and the ensembles, whose Python steps have stubs of their own); the supervisor runs it
periodically and restarts the server when it finds what Triton cannot recover.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import triton_to_np_dtype

from utils import layout, specs
from utils.controlnet import listed_controlnets
from utils.deployment import served_network_names
from utils.errors import UsageError
from utils.grpc_client import connect, infer_inputs
from utils.mask import box_mask
from utils.request import GenerationRequest, request_to_arrays
from utils.sdxl_ensembles import ENSEMBLE_TEXT_TO_IMAGE_REFINED
from utils.walkthrough import step

# The models a user calls: the BLS pipelines (the streaming one over a gRPC stream) and the ensembles.
TOP_LEVEL = (*specs.BLS_PIPELINES, specs.ENSEMBLE_TEXT_TO_IMAGE, specs.ENSEMBLE_IMAGE_TO_IMAGE, specs.ENSEMBLE_INPAINT,
             specs.ENSEMBLE_CONTROLNET, ENSEMBLE_TEXT_TO_IMAGE_REFINED)


class CanaryFailed(RuntimeError):
    pass


def served_shapes(config: dict) -> dict[str, list[int]]:
    """The shape of each input of a served model's config, without the batch dim; where the config
    leaves a size open (-1), the size of its warm-up request: the checkpoint's own. ``config`` is
    Triton's JSON form (``get_model_config(..., as_json=True)["config"]``)."""
    warmups = config.get("model_warmup") or [{}]
    samples = {name: [int(d) for d in sample["dims"]] for name, sample in warmups[0].get("inputs", {}).items()}
    shapes = {}
    for tensor in config["input"]:
        dims = [int(d) for d in tensor["dims"]]
        if any(d < 0 for d in dims):
            if tensor["name"] not in samples:
                raise UsageError(f"{config['name']}: input {tensor['name']!r} has open dims {dims} and no warm-up to "
                                 f"take its size from: a config this project did not write; write the repository "
                                 f"again with `{step('3').commands[0]}` (`--backend tensorrt` for TensorRT), which adds the "
                                 f"warm-up.")
            dims = samples[tensor["name"]]
        shapes[tensor["name"]] = dims
    return shapes


def probe_inputs(config: dict, batch: int, seed: int = 0) -> list[grpcclient.InferInput]:
    """Random inputs of the shapes (``served_shapes``) and dtypes a served model's config declares."""
    rng = np.random.default_rng(seed)
    dtypes = {tensor["name"]: triton_to_np_dtype(tensor["data_type"].removeprefix("TYPE_"))
              for tensor in config["input"]}
    arrays = {}
    for name, shape in served_shapes(config).items():
        dtype, shape = dtypes[name], [batch, *shape]
        if np.issubdtype(dtype, np.integer):  # 0 or 1: in range for token ids, an attention mask, layers skipped
            arrays[name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            arrays[name] = rng.standard_normal(shape).astype(dtype)
    return infer_inputs(arrays)


def served_networks(repository: Path) -> list[str]:
    """Every name a repository serves a network under (one per network, or one per GPU copy)."""
    names = served_network_names(repository, specs.TEXT_TO_IMAGE.name)
    return [name for copies in names.values() for name in copies]


def served_pipelines(repository: Path) -> list[specs.PipelineSpec | specs.EnsembleSpec]:
    """The pipelines a repository serves to clients: its BLS models and top-level ensembles."""
    return [spec for spec in TOP_LEVEL if layout.config_file(repository, spec.name).exists()]


def canary(url: str, timeout: float = 30.0, networks: list[str] | None = None,
           pipelines: list | None = None) -> None:
    """One request to each served network (batch 1; default: the specs' names) and a one-step
    generation through each pipeline (default: the text-to-image BLS model); raise CanaryFailed.
    A pipeline that takes an image gets one of a size the VAE encoder serves, with a mask where it
    needs one (the inpainting ensemble; every image model of an inpainting checkpoint's UNet)."""
    client = connect(url)
    try:
        image, channels = None, {}
        for name in networks or list(specs.NETWORKS):
            config = client.get_model_config(name, as_json=True, client_timeout=timeout)["config"]
            client.infer(name, probe_inputs(config, 1), client_timeout=timeout)
            channels[layout.network_of(name)] = int(config["input"][0]["dims"][0])  # the UNet's and decoder's sample
            if layout.network_of(name) == specs.VAE_ENCODER.name:  # its warm-up's image: a size it serves
                _, height, width = map(int, config["model_warmup"][0]["inputs"][specs.VAE_ENCODER.inputs[0].name]["dims"])
                image = np.full((1, height, width, 3), 128, np.uint8)
        inpainting_unet = channels.get(specs.UNET.name, 0) != channels.get(specs.VAE_DECODER.name, 0)
        for spec in pipelines or [specs.TEXT_TO_IMAGE]:
            takes_image = any(t.name == specs.INIT_IMAGE.name for t in spec.inputs)
            needs_mask = spec is specs.ENSEMBLE_INPAINT or (inpainting_unet and takes_image)
            control = {}
            if spec is specs.ENSEMBLE_CONTROLNET:  # a grey control image, for the first ControlNet served
                config = client.get_model_config(specs.CONTROLLED_UNET.name, as_json=True, client_timeout=timeout)
                names = listed_controlnets(config["config"])
                control = dict(controlnet=names[:1], control_image=np.full((1, *image.shape[1:]), 128, np.uint8))
            refined = dict(high_noise_frac=0.5) if spec is ENSEMBLE_TEXT_TO_IMAGE_REFINED else {}  # base, refiner
            request = GenerationRequest(prompt="canary", num_inference_steps=1, seed=0,
                                        image=image if takes_image else None, strength=1.0,
                                        mask_image=box_mask(*image.shape[1:3]) if needs_mask else None, **control,
                                        **refined)
            arrays = request_to_arrays(request, spec)
            if spec.decoupled:  # a stream (never an ensemble): no previews, its final answer
                stream_once(client, spec.name, arrays | {specs.PREVIEW_EVERY.name: np.array([0], np.int32)}, timeout)
            else:
                client.infer(spec.name, infer_inputs(arrays), client_timeout=timeout)
    except Exception as error:
        raise CanaryFailed(f"{type(error).__name__}: {error}") from error
    finally:
        client.close()


def stream_once(client, model: str, arrays: dict[str, np.ndarray], timeout: float) -> None:
    """One request over a gRPC stream, until its final answer; raises its error, or TimeoutError."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(model, infer_inputs(arrays))
        deadline = time.monotonic() + timeout
        while True:
            try:
                result, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{model}: no final answer on its stream in {timeout:.0f} s") from None
            if error is not None:
                raise error
            if bool(result.as_numpy(specs.FINAL.name)[0]):
                return
    finally:
        client.stop_stream()


# What Triton 2.51 never recovers from by itself: waiting for another canary only lengthens the
# outage (and a stalled stub that resumes can abort the server: restarting first avoids it).
BEYOND_RECOVERY = ("is not healthy",)


CANARY_INTERVAL_SECONDS = 10.0  # between canaries: a dead stub is found within this
FAILURES_BEFORE_RESTART = 2  # canaries in a row that fail for a reason waiting might fix


def default_memory_limit(baseline: int) -> int:
    """What a server may grow to before it is restarted: twice what it held when the supervisor
    started, and 1 GiB more. The Python backend's shared memory grows with the largest request a
    stub has seen and never shrinks (a refused 100 MB prompt leaves ~300 MB behind for good)."""
    return 2 * baseline + 2**30


class Supervisor:
    """Restarts ``server`` when its process dies, when a canary finds a stub that is not healthy,
    when ``failures`` canaries in a row fail for another reason, or when the server and its stubs
    hold more memory than ``memory_limit`` bytes (None: ``default_memory_limit``; 0: no limit)."""

    def __init__(self, server, interval: float = CANARY_INTERVAL_SECONDS, failures: int = FAILURES_BEFORE_RESTART,
                 check: Callable[[str], None] | None = None, log: Callable[[str], None] = print,
                 memory_limit: int | None = None):
        if check is None:  # the names this server's repository serves its networks and pipelines under
            check = functools.partial(canary, networks=served_networks(server.model_repository),
                                      pipelines=served_pipelines(server.model_repository))
        self.server, self.interval, self.failures, self.check, self.log = server, interval, failures, check, log
        self.memory_limit = default_memory_limit(server.memory()) if memory_limit is None else memory_limit
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> str:
        """"serving", "failed" (this time), or "beyond recovery" (a dead server or stub)."""
        if self.server.process is None or self.server.process.poll() is not None:
            self.log("supervisor: tritonserver is not running")
            return "beyond recovery"
        try:
            self.check(self.server.grpc_url)
        except CanaryFailed as error:
            self.log(f"supervisor: canary failed: {error}")
            return "beyond recovery" if any(s in str(error) for s in BEYOND_RECOVERY) else "failed"
        held = self.server.memory()
        if self.memory_limit and held > self.memory_limit:
            self.log(f"supervisor: tritonserver holds {held / 2**20:.0f} MiB, over its limit of "
                     f"{self.memory_limit / 2**20:.0f} MiB")
            return "beyond recovery"
        return "serving"

    def watch(self) -> None:
        """Check every interval and restart the server when it fails; until stopped."""
        consecutive = 0
        while not self._stop.wait(self.interval):
            state = self.check_once()
            consecutive = 0 if state == "serving" else consecutive + 1
            if consecutive >= self.failures or state == "beyond recovery":
                self.log(f"supervisor: restarting tritonserver (restart {self.restarts + 1})")
                self.restarts += 1
                consecutive = 0
                try:
                    # A server with a dead stub waits its whole exit timeout for it: don't.
                    self.server.restart(stop_timeout=5)
                    self.log("supervisor: tritonserver is serving again")
                except Exception as error:  # TritonServerError: try again at the next interval
                    self.log(f"supervisor: restart failed: {error}")

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self.watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

