"""The Triton side of every Python model that is not a network: the BLS pipelines and the
ensembles' Python steps.

Each ``triton/models/<name>/1/model.py`` is a few lines: a subclass of ``PipelineModel`` that names
its spec (utils/specs.py) and says, in ``compute``, which steps of the shared loop
(pipelines/stable_diffusion.py) it runs. Everything else is here, once, in the order a reader meets
it: how a network is called by BLS (``call_by_bls``, the one place that checks ``has_error()``);
what a model does at load (``PipelineModel.initialize``); how it answers a request: reading its
tensors, packing the response, and turning each failure into a per-request error that says what
went wrong: INVALID_ARG for a bad request, CANCELLED, UNAVAILABLE when a called model fails,
INTERNAL for an image that is not a picture or a bug (its traceback goes to the server log, not the
client). The metrics plumbing is pipelines/python_model_metrics.py.

Where it runs comes from ``1/serving.json`` (utils/deployment.py's ``Serving``): the loop's
tensors on the CPU or on the GPU, and, on several GPUs, the networks of this instance's GPU
(``unet_gpu1``...). With ``--pipeline-loop with-unet`` a model that runs the loop holds a UNet of
its own: one instance runs each request in a thread of its own (answered through the request's
response sender, so that ``execute`` returns at once and the next requests start) and their steps
meet in one batch (utils/python_backend/step_batching.py) instead of one Triton call per step.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from pipelines.previews import preview, preview_every
from pipelines.python_model_metrics import PipelineMetrics
from pipelines.components import PipelineComponents
from pipelines.stable_diffusion import CallNetwork, Cancelled, InvalidImage, StableDiffusion
from utils import specs
from utils.deployment import Serving
from utils.lora import ServedAdapters
from utils.lora_in_place import InPlaceLoader
from utils.families import FAMILIES, is_unet
from utils.sdxl_ensembles import REFINER_STEPS, step_spec
from utils.layout import CHECKPOINT_DIR, ONNX_VERSION, PIPELINE_FILES, REFINER_FILES, SERVING_FILE
from utils.networks import TORCH_DTYPES, torch_dtype
from utils.python_backend.cuda_graphs import runnable_network
from utils.python_backend.step_batching import STEPS_QUEUED, StepBatcher, static_batches
from utils.request import REQUEST_FIELDS, InvalidRequest, request_from_arrays
from utils.timing import CANCELLATION_CHECK_SECONDS, PhaseTimes, at_most_every, profiling

STUB_EXIT_SECONDS = 10  # after finalize, the most a stub may take to exit (it takes about 1 s)

_TORCH_TYPES = {**TORCH_DTYPES, "BOOL": torch.bool}  # the outputs' dtypes
IN_PROCESS_UNET_PHASE = f"unet (in process, batched; on a GPU, waits for its step {STEPS_QUEUED} back)"


class SubModelError(RuntimeError):
    """A model called by BLS answered an error."""


def call_by_bls(model_name: str, network: specs.NetworkSpec, memory: "pb_utils.PreferredMemory",
                times: PhaseTimes, *inputs: torch.Tensor, parameters: dict | None = None) -> tuple[torch.Tensor, ...]:
    """One BLS sub-request: the only place that calls another model, so errors are checked once.
    Tensors go both ways by DLPack, without a copy where the memory allows it. ``parameters``: the
    request's (a UNet that applies LoRA adapters in place reads them there)."""
    with times.phase("inputs to Triton tensors"):
        request = pb_utils.InferenceRequest(
            model_name=model_name, requested_output_names=network.output_names,
            inputs=[
                pb_utils.Tensor.from_dlpack(spec.name, spec.to_wire(tensor).contiguous())
                for spec, tensor in zip(network.inputs, inputs)
            ],
            preferred_memory=memory,
            **({"parameters": parameters} if parameters else {}),
        )
    with times.phase(f"{network.name} sub-requests"):
        response = request.exec()
    if response.has_error():
        raise SubModelError(f"model '{model_name}' failed: {response.error().message()}")
    with times.phase("outputs to torch"):
        return tuple(
            torch.from_dlpack(pb_utils.get_output_tensor_by_name(response, name).to_dlpack())
            for name in network.output_names
        )


def preferred_memory(device: torch.device) -> "pb_utils.PreferredMemory":
    """Ask for sub-request outputs where the loop keeps its tensors. Without it they stay where the
    called model produced them: GPU memory for TensorRT and ONNX Runtime on a GPU."""
    if device.type == "cuda":
        return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device.index or 0)
    return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)


class PipelineModel:
    """A Python model of the pipeline: ``compute`` gets the request's options as a
    GenerationRequest and its other tensors (text embeddings, latents, ...) as torch tensors, and
    returns its outputs in the spec's order."""

    spec: specs.PipelineSpec
    # Inputs its config marks optional (an ensemble's first step has to) but it needs.
    required: tuple[specs.TensorSpec, ...] = ()

    # At load.

    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        serving = Serving.from_json((version_dir / SERVING_FILE).read_text())
        self.spec = step_spec(self.spec, serving.family)  # an SDXL repository's steps carry its tensors
        components = PipelineComponents.from_pretrained(version_dir / PIPELINE_FILES)
        # This instance's GPU, where the networks it calls live.
        gpu = int(args["model_instance_device_id"]) if args["model_instance_kind"] == "GPU" else None
        device = self._loop_device(serving, gpu)
        self.profile = profiling()
        self._request = threading.local()  # the current request's timings and sender, per thread
        self._request.times = PhaseTimes()
        self.metrics = PipelineMetrics(args["model_name"], {t.name for t in self.spec.inputs} | REQUEST_FIELDS)
        self.unet, self.threads = None, None
        self.adapters = ServedAdapters(serving.adapters, in_place=serving.adapters_in_place)
        if serving.unet_in_process is not None:
            self.unet = self._in_process_unet(Path(args["model_repository"]).parent, serving, gpu)
            # Each request's thread makes this model's GPU its current device (the default is GPU 0).
            on_gpu = {"initializer": torch.cuda.set_device, "initargs": (device,)} if device.type == "cuda" else {}
            self.threads = ThreadPoolExecutor(serving.unet_in_process.loops_in_flight,
                                              thread_name_prefix=f"{args['model_name']} request", **on_gpu)
        self.pipeline = StableDiffusion(components, self._network_call(serving, gpu, device),
                                        dtype=TORCH_DTYPES[serving.precision], device=device, sizes=serving.image_sizes,
                                        loop_scope=self.unet.loop if self.unet is not None else contextlib.nullcontext,
                                        adapters=self.adapters, controlnets=serving.controlnets,
                                        refiner=PipelineComponents.where(version_dir / PIPELINE_FILES / REFINER_FILES))
        if self.spec in REFINER_STEPS:  # base then refiner's own steps (served with it) run the refiner's loop
            self.pipeline = self.pipeline.refiner
        self.logger = pb_utils.Logger
        self.prepare()

    def _loop_device(self, serving: Serving, gpu: int | None) -> torch.device:
        """Where this model keeps the loop's tensors (a model that calls no network: the CPU)."""
        if serving.device == "cuda" and serving.loop_device == "cuda" and self.spec.networks:
            device = torch.device("cuda", gpu or 0)
            torch.cuda.set_device(device)
            return device
        if serving.unet_in_process is None:  # the loop's small tensors on the CPU, this process off the GPU
            torch.set_num_threads(1)  # one request per instance; latents of 16k values need no threads
        return torch.device("cpu")

    def _network_call(self, serving: Serving, gpu: int | None, device: torch.device) -> CallNetwork:
        """How the loop calls a network here: by BLS (a LoRA adapter's UNet by its served name), or
        the UNet in this process where it has one; each UNet call is one denoising step, counted in
        the metrics."""
        memory = preferred_memory(device)

        def call(network: specs.NetworkSpec, *inputs: torch.Tensor, adapters=()) -> tuple:
            start = time.perf_counter()
            if network.name == specs.UNET.name and self.unet is not None:  # (SDXL's too) adapters applied in place
                with self.times.phase(IN_PROCESS_UNET_PHASE):
                    outputs = (self.unet(*inputs, adapters=adapters),)
            else:
                adapter, parameters = self.adapters.route(adapters, network.name)
                name = serving.placement.model_name(network.name, gpu, adapter)
                outputs = call_by_bls(name, network, memory, self.times, *inputs, parameters=parameters)
            if is_unet(network) or network is specs.CONTROLLED_UNET:  # a denoising step (with ControlNet, SDXL's)
                seconds = time.perf_counter() - start
                with self.times.phase("metrics"):  # queued: made by the metrics thread
                    self.metrics.steps.increment(1)
                    self.metrics.unet_seconds.observe(seconds)
            return outputs

        return call

    def _in_process_unet(self, repository: Path, serving: Serving, gpu: int | None) -> StepBatcher:
        """The served UNet's weights loaded into this process, as the torch runtime runs them, behind
        a StepBatcher that the loops of this model's requests in flight share."""
        unet, precision, spec = serving.unet_in_process, serving.precision, FAMILIES[serving.family].unet  # SDXL's too
        device = torch.device("cuda", gpu or 0) if serving.device == "cuda" else torch.device("cpu")
        checkpoint = repository / unet.model / str(ONNX_VERSION) / CHECKPOINT_DIR
        batches = static_batches(unet.loops_in_flight)
        lora = InPlaceLoader(checkpoint.parent, serving.adapters)  # the served UNet's adapters, in place here too
        network = runnable_network(spec, checkpoint, precision, device, compile_module=unet.compile,
                                   static_batches=batches, log=pb_utils.Logger.log_info, prepare=lora)
        return StepBatcher(network, max(batches), device,
                           [torch_dtype(t, TORCH_DTYPES[precision]) for t in spec.inputs], lora=lora.adapters)

    @property
    def times(self) -> PhaseTimes:
        """The current request's phase times (each request runs in one thread)."""
        return self._request.times

    def prepare(self) -> None:
        """What to do once at load, before the first request (each instance is a process)."""

    def finalize(self) -> None:
        """At unload: the request threads, the UNet's worker and the metrics thread end, and every
        tensor they and this model held is freed now, while the stub still runs. A tensor a BLS call
        returned hands its memory back to Triton through the stub when freed; freed later, in the
        interpreter's exit (a reference cycle: the loop's network call is a closure over this model),
        it found the stub gone, and on a GPU the stub hung until Triton's exit timeout (30 s)."""
        if self.threads is not None:  # the requests it holds still get their answers
            self.threads.shutdown(wait=True)
            self.unet.close(wait=True)  # (threads: the UNet in this process, which they share)
        self.metrics.writer.close(wait=True)
        self.pipeline = self.unet = self.threads = None  # the cycle broken
        self._request = threading.local()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the freed memory's last kernels, done
        self.logger.log_info(f"{self.spec.name}: finalized, its tensors freed")
        # Seen on a GPU after traffic: finalize done, the stubs of the models that had served it
        # still did not exit (their main thread waiting outside Python) until Triton's exit
        # timeout (30 s). A watchdog outside the interpreter (a C thread) prints every thread's
        # stack to the log and ends the stub should it still be there after STUB_EXIT_SECONDS:
        # nothing of this model is left to lose by then (measured: the stop took 12 s, not 30).
        try:
            faulthandler.dump_traceback_later(STUB_EXIT_SECONDS, exit=True)
        except (RuntimeError, ValueError) as error:  # a stub without a standard error to write to
            self.logger.log_warn(f"{self.spec.name}: no exit watchdog ({error})")

    def compute(self, request, tensors: dict[str, torch.Tensor], is_cancelled) -> tuple:
        raise NotImplementedError

    # Per request.

    def execute(self, requests):
        if self.threads is not None:  # each request in a thread, answered through its response sender
            for request in requests:
                self.threads.submit(self._answer_in_thread, request)
            return None
        if self.spec.decoupled:  # each request answered through its own response sender
            for request in requests:
                self._stream(request)
            return None
        return [self._answer(request) for request in requests]

    def send(self, outputs: tuple) -> None:
        """A streaming model's partial response (in the spec's output order), sent at once."""
        self._request.sender.send(self._response(outputs))

    def _answer(self, request):
        try:
            response = self._response(self._compute(request))
        except Exception as error:
            response = self._failure(error)
        self._settle_metrics()
        return response

    def _answer_in_thread(self, request) -> None:
        """One request, in a thread of its own: the one final response of a non-decoupled model
        goes through the sender as well, which the Python backend allows."""
        try:
            with self.unet.request():  # its first step is waited for from now (step_batching.py)
                if self.spec.decoupled:
                    self._stream(request)
                else:
                    request.get_response_sender().send(self._answer(request),
                                                       flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # nothing else would see it: an executor keeps a thread's exception to itself
            self.logger.log_error(f"{self.spec.name}: unexpected error\n{traceback.format_exc()}")
            try:  # the client still gets its one final answer rather than waiting for ever
                request.get_response_sender().send(
                    _error(f"{self.spec.name}: internal error", pb_utils.TritonError.INTERNAL),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:  # already answered, or the client has gone
                pass

    def _stream(self, request) -> None:
        """Decoupled: ``compute`` sends what it has with ``send`` and returns the final response."""
        sender = self._request.sender = request.get_response_sender()
        try:
            response = self._response(self._compute(request))
        except Exception as error:
            response = self._failure(error)
        self._settle_metrics()
        try:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as error:  # the stream was closed: nobody is left to tell
            self.logger.log_info(f"{self.spec.name}: final response not sent ({error})")
        finally:
            # A sender left in a pooled thread would keep the request's response factory, and with
            # it the model, alive: Triton waits for that at unload.
            self._request.sender = None

    def _compute(self, request) -> tuple:
        arrays, tensors = {}, {}
        for tensor in self.spec.inputs:
            value = pb_utils.get_input_tensor_by_name(request, tensor.name)
            if value is None and tensor.name in {t.name for t in self.required}:
                raise InvalidRequest(f"{tensor.name} is required: send a {tensor.dtype} tensor of shape "
                                     f"{list(tensor.dims)}.")
            if tensor.name in REQUEST_FIELDS:
                arrays[tensor.name] = None if value is None else value.as_numpy()
            elif value is not None:
                tensors[tensor.name] = torch.from_dlpack(value.to_dlpack())
        self._request.times, start = PhaseTimes(), time.perf_counter()
        self._request.requested = set(request.requested_output_names())
        self._request.parameters = json.loads(request.parameters() or "{}")  # (the ensembles' first step reads them)

        def is_cancelled() -> bool:
            with self.times.phase("cancellation checks"):
                return request.is_cancelled()

        generation = request_from_arrays(arrays, self.spec)
        outputs = self.compute(generation, tensors, at_most_every(CANCELLATION_CHECK_SECONDS, is_cancelled))
        if self.profile:
            split = self.times.summary(time.perf_counter() - start, rest="loop and scheduler")
            if self.unet is not None and self.unet.batches:
                split += (f"; UNet in process so far: {self.unet.batches} calls, {self.unet.rows} rows "
                          f"({self.unet.rows / self.unet.batches:.1f} per call)")
                split += f", {self.unet.compute_report()}"
            self.logger.log_info(f"{self.spec.name}: {split}")
        made = next((len(outputs[self.spec.outputs.index(t)]) for t in (specs.IMAGES, specs.LATENTS)
                     if t in self.spec.outputs), 0)  # the images made here, or their latents (denoise)
        if specs.IMAGES in self.spec.outputs:  # the final images (a stream's previews go through send)
            self.metrics.images.increment(made)
        self.metrics.adapter_images(generation.lora, made)  # where the loop ran: with its adapters
        return outputs

    def _settle_metrics(self) -> None:
        """Before a request's final answer, succeeded or not: the in-process UNet's compute so far
        counted, and every update queued so far made (a client that reads the metrics after its
        answer sees its request counted)."""
        if self.unet is not None:
            self.metrics.unet_in_process(self.unet.compute())
        self.metrics.writer.flush()

    def requested_outputs(self) -> set[str]:
        """The outputs the current request asked for (an ensemble asks for those it wires)."""
        return self._request.requested

    def _response(self, outputs: tuple) -> "pb_utils.InferenceResponse":
        """Every output asked for as a torch tensor by DLPack (plain numbers too, at the spec's
        dtype): the 24.10 stub mangles tensors built from numpy 2 arrays
        (docs/tutorial/3-python-backend.md). Texts, which DLPack cannot carry, as numpy's objects:
        the pipeline models run with numpy 1."""
        requested = getattr(self._request, "requested", None) or {spec.name for spec in self.spec.outputs}
        return pb_utils.InferenceResponse(output_tensors=[
            _output_tensor(spec, output) for spec, output in zip(self.spec.outputs, outputs) if spec.name in requested])

    def _failure(self, error: Exception) -> "pb_utils.InferenceResponse":
        """A failed request's answer: the error's kind as Triton's status, a message for the user."""
        if isinstance(error, InvalidRequest):
            self.metrics.rejected(error)
            return _error(str(error), pb_utils.TritonError.INVALID_ARG)
        if isinstance(error, Cancelled):
            return _error(str(error), pb_utils.TritonError.CANCELLED)
        if isinstance(error, SubModelError):
            return _error(str(error), pb_utils.TritonError.UNAVAILABLE)
        if isinstance(error, InvalidImage):
            self.metrics.invalid_image(error)
            return _error(f"{self.spec.name}: {error}", pb_utils.TritonError.INTERNAL)
        # A bug: log it in full, answer without internals.
        self.logger.log_error(f"{self.spec.name}: unexpected error\n{traceback.format_exc()}")
        return _error(f"{self.spec.name}: internal error ({type(error).__name__})", pb_utils.TritonError.INTERNAL)


class BlsPipelineModel(PipelineModel):
    """A BLS pipeline: the whole loop on one request, its networks called as sub-requests; warmed
    up at load so that the first request does not pay for lazy initialization."""

    def prepare(self) -> None:
        self.pipeline.warm_up()

    def compute(self, request, tensors: dict[str, torch.Tensor], is_cancelled) -> tuple:
        generated = self.pipeline.generate(request, is_cancelled=is_cancelled)
        return generated.images, generated.truncated


class StreamingPipelineModel(BlsPipelineModel):
    """A BLS pipeline with live progress (a decoupled model): a response every ``preview_every``
    steps with the steps done, of how many, and a preview of each image made from the latents
    without the VAE decoder (pipelines/previews.py); then the decoded images, flagged final. A
    client that closes its stream cancels the request: the loop stops at its next step, and
    ``_failure`` turns that into a CANCELLED answer nobody waits for."""

    def compute(self, request, tensors: dict[str, torch.Tensor], is_cancelled) -> tuple:
        every = preview_every(tensors.get(specs.PREVIEW_EVERY.name))
        progress = {"done": 0, "total": 0}

        def on_step(done, total, latents):
            progress.update(done=done, total=total)
            if every and done % every == 0 and done < total:  # the last step's picture is the final image
                self.send((done, total, preview(latents, self.pipeline.family.name), False))

        generated = self.pipeline.generate(request, is_cancelled=is_cancelled, on_step=on_step)
        return progress["done"], progress["total"], generated.images, True, generated.truncated


def _output_tensor(spec: specs.TensorSpec, output) -> "pb_utils.Tensor":
    if spec.dtype == "BYTES":
        return pb_utils.Tensor(spec.name, np.array([str(text).encode() for text in output], dtype=np.object_))
    if isinstance(output, np.ndarray):  # an array passed on (an image): its own dtype
        output = torch.from_numpy(np.ascontiguousarray(output))
    dtype = None if isinstance(output, torch.Tensor) else _TORCH_TYPES[spec.dtype]
    return pb_utils.Tensor.from_dlpack(spec.name, torch.atleast_1d(torch.as_tensor(output, dtype=dtype)).contiguous())


def _error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
