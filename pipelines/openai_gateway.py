"""An OpenAI-compatible images API in front of Triton: any tool that speaks OpenAI's API (its SDKs,
LiteLLM, chat front ends) can generate and edit images with the served pipelines.

A gateway, not a second server: it owns the translation (pipelines/openai_images.py), the API key,
the limits and its own metrics, and sends each request to the BLS pipelines over Triton's async
gRPC client (``pipeline_text_to_image``, ``pipeline_image_to_image`` for edits; their streaming
twins where the client asks for partial images). Every refusal it can make itself (a missing or
wrong key, a body too large, a size not served, n over the limit, a file that is not an image) is
answered before anything reaches Triton; Triton's own refusals come back in OpenAI's format.

    POST /v1/images/generations   JSON: prompt, n, size, response_format, quality, stream, partial_images
    POST /v1/images/edits         form: image, mask, prompt, n, size, ...
    GET  /v1/models               the one model served
    GET  /health/live, /health/ready, /metrics (Prometheus; no key, as Triton's own metrics port)
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import tritonclient.grpc as grpcclient
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
import tritonclient.grpc.aio as aio_grpc
from tritonclient.utils import InferenceServerException

from pipelines.openai_images import (IMAGE, MASK, Generation, OpenAIError, Served, decode_image, edit_inputs,
                                     generation, images_response, stream_event)
from utils import specs
from utils.errors import UsageError
from utils.gateway import API_KEY_ENV, MAX_BODY_BYTES
from utils.grpc_client import infer_inputs
from utils.request import request_to_arrays

TIMEOUT_SECONDS = 600.0  # a request's longest wait for Triton


def create_app(triton_url: str, api_key: str, served: Served):
    """The gateway's FastAPI application, calling the Triton server at ``triton_url`` (gRPC)."""
    app = FastAPI(title="Stable Diffusion on Triton: OpenAI-compatible images API")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    registry = _measured(app)
    _answer_errors(app)
    triton = TritonImages(triton_url)

    def authorized(request: Request) -> None:
        check_key(request.headers.get("authorization"), api_key)

    @app.post("/v1/images/generations", dependencies=[Depends(authorized)])
    async def generations(request: Request):
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise OpenAIError(400, "The request body is not valid JSON: send a JSON object.") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "The request body is not a JSON object.")
        return await answer(generation(body, served))

    @app.post("/v1/images/edits", dependencies=[Depends(authorized)])
    async def edits(request: Request):
        form = await request.form(max_files=2, max_fields=64, max_part_size=MAX_BODY_BYTES)
        fields = {key.removesuffix("[]"): value for key, value in form.multi_items()}
        if not hasattr(fields.get(IMAGE), "read"):
            raise OpenAIError(400, f"{IMAGE} is required: send the picture to edit as a file.", param=IMAGE)
        image = decode_image(await fields[IMAGE].read(), IMAGE)
        mask = decode_image(await fields[MASK].read(), MASK) if hasattr(fields.get(MASK), "read") else None
        rgb, mask_image = edit_inputs(image, mask)
        texts = {key: value for key, value in fields.items() if isinstance(value, str)}
        return await answer(generation(texts, served, rgb, mask_image))

    async def answer(made: Generation):
        if made.stream:
            return StreamingResponse(sse(triton.stream(made)), media_type="text/event-stream")
        images, truncated = await triton.generate(made)
        return JSONResponse(images_response(images, made.size, truncated))

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": served.model, "object": "model", "created": 0,
                                            "owned_by": "sd-triton"}]}

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/health/ready")
    async def ready():
        if not await triton.ready():
            raise OpenAIError(503, f"the Triton server at {triton_url} is not ready", kind="server_error")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _measured(app: FastAPI) -> CollectorRegistry:
    """Count and time the /v1 requests, by endpoint (and status), for Prometheus."""
    registry = CollectorRegistry()
    answered = Counter("sd_gateway_requests", "Requests answered, by endpoint and HTTP status",
                       ["endpoint", "status"], registry=registry)
    latency = Histogram("sd_gateway_request_seconds", "Time to answer a request, by endpoint", ["endpoint"],
                        registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    @app.middleware("http")
    async def measured(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            answered.labels(request.url.path, str(response.status_code)).inc()
            latency.labels(request.url.path).observe(time.perf_counter() - start)
        return response

    return registry


def _answer_errors(app: FastAPI) -> None:
    """Every refusal in OpenAI's format."""

    @app.exception_handler(OpenAIError)
    async def refused(request: Request, error: OpenAIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError):
        return JSONResponse(OpenAIError(400, "The request body is not valid JSON: send a JSON object.").body(),
                            status_code=400)


def serve_in_thread(triton_url: str, api_key: str, served: Served, host: str = "127.0.0.1") -> str:
    """The gateway in a thread of this process, on a free port; returns its base URL (…/v1) once it
    answers. For the benchmark, which measures it as a client of OpenAI's API would call it."""
    import threading
    import urllib.request

    import uvicorn

    from utils.server.process import free_port

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(create_app(triton_url, api_key, served), host=host, port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, name="openai-gateway", daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not start on {host}:{port} in 30 s")
        time.sleep(0.05)
    with urllib.request.urlopen(f"http://{host}:{port}/health/live", timeout=10):
        pass
    return f"http://{host}:{port}/v1"


def served_by(repository: Path, model: str) -> Served:
    """What a repository serves, as the gateway needs it: the image sizes it was written for, and
    the checkpoint's own size (its config files, in the pipeline model's folder)."""
    from utils.deployment import served_sizes
    from utils.layout import PIPELINE_FILES, config_file
    from utils.walkthrough import step

    checkpoint = repository / specs.TEXT_TO_IMAGE.name / "1" / PIPELINE_FILES
    if not (config_file(repository, specs.TEXT_TO_IMAGE.name).exists() and (checkpoint / "model_index.json").exists()):
        raise UsageError(f"--repository {repository} has no {specs.TEXT_TO_IMAGE.name} model with its checkpoint's "
                         f"files: pass the repository the server serves, written by `{step('3').commands[0]}`.")
    dims = specs.ModelDims.from_pretrained(checkpoint)
    sizes = served_sizes(repository, specs.TEXT_TO_IMAGE.name, dims)
    return Served(model, sizes, (dims.image_height, dims.image_width))


def check_key(header: str | None, api_key: str) -> None:
    """OpenAI's answers: 401 without a key, and with a wrong one."""
    if not header or not header.lower().startswith("bearer "):
        raise OpenAIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                               "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    if not secrets.compare_digest(header[len("bearer "):].strip().encode(), api_key.encode()):
        raise OpenAIError(401, "Incorrect API key provided: use the key the gateway printed when it started (or "
                               f"the one in {API_KEY_ENV}).", code="invalid_api_key")


class TritonImages:
    """The BLS pipelines, called over Triton's async gRPC client."""

    def __init__(self, url: str):
        self.url = url
        self._client = None

    @property
    def client(self) -> aio_grpc.InferenceServerClient:
        if self._client is None:  # made in the server's event loop, on first use
            self._client = aio_grpc.InferenceServerClient(self.url)
        return self._client

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready() and
                        await self.client.is_model_ready(specs.TEXT_TO_IMAGE.name))
        except InferenceServerException:
            return False

    async def generate(self, made: Generation) -> tuple[np.ndarray, list[str]]:
        spec = specs.TEXT_TO_IMAGE if made.request.image is None else specs.IMAGE_TO_IMAGE
        outputs = [grpcclient.InferRequestedOutput(t.name) for t in (specs.IMAGES, specs.TRUNCATED_TEXT)]
        try:
            result = await self.client.infer(spec.name, infer_inputs(request_to_arrays(made.request, spec)),
                                             outputs=outputs, client_timeout=TIMEOUT_SECONDS)
        except InferenceServerException as error:
            raise triton_error(error) from None
        truncated = [text.decode() for text in result.as_numpy(specs.TRUNCATED_TEXT.name)]
        return result.as_numpy(specs.IMAGES.name), truncated

    async def stream(self, made: Generation) -> AsyncIterator[dict]:
        """OpenAI's events: up to ``partial_images`` previews of the first image, then each image."""
        request = made.request
        spec = specs.TEXT_TO_IMAGE_STREAM if request.image is None else specs.IMAGE_TO_IMAGE_STREAM
        steps = request.num_inference_steps if request.image is None else int(
            request.num_inference_steps * (request.strength or 1.0))
        every = max(1, steps // (made.partial_images + 1)) if made.partial_images else 0
        arrays = request_to_arrays(request, spec) | {specs.PREVIEW_EVERY.name: np.array([every], np.int32)}
        outputs = [grpcclient.InferRequestedOutput(t.name) for t in spec.outputs]

        async def requests():
            yield dict(model_name=spec.name, inputs=infer_inputs(arrays), outputs=outputs)

        responses = self.client.stream_infer(requests(), stream_timeout=TIMEOUT_SECONDS)
        sent = 0
        try:
            async for result, error in responses:
                if error is not None:
                    raise triton_error(error)
                images = result.as_numpy(specs.IMAGES.name)
                if bool(result.as_numpy(specs.FINAL.name)[0]):
                    for image in images:
                        yield stream_event("completed", image, made.size)
                    return
                if sent < made.partial_images:
                    yield stream_event("partial_image", images[0], made.size, index=sent)
                    sent += 1
        finally:
            responses.cancel()  # a client that left stops the loop on the server


def triton_error(error: InferenceServerException) -> OpenAIError:
    """Triton's refusal as OpenAI's: a bad request stays a 400, an unavailable server a 503."""
    status = str(error.status() or "")
    if "INVALID_ARG" in status:
        return OpenAIError.invalid(error.message())
    if "UNAVAILABLE" in status:
        return OpenAIError(503, f"the image server is unavailable: {error.message()}", kind="server_error")
    return OpenAIError(500, f"the image server failed: {error.message()}", kind="server_error")


async def sse(events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """Server-sent events, as OpenAI streams them; a failure on the way as an error event."""
    try:
        async for event in events:
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
    except OpenAIError as error:
        yield f"event: error\ndata: {json.dumps(error.body())}\n\n".encode()


class BodyLimit:
    """An ASGI middleware: a body over ``limit`` bytes is refused with 413, by its declared length
    before any of it is read, or as soon as what arrives passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge()
            return message

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(OpenAIError(413, f"The request body is larger than {self.limit} bytes: send smaller "
                                           f"images.").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
