"""What every gRPC client of the project shares: the connection, the inputs, the retries.

A call is retried while the failure is one that waiting can fix, with exponential backoff.
Retryable: UNAVAILABLE (server restarting, connection refused, a sub-model of the BLS pipeline
down), a Python-backend stub reported unhealthy (the launcher's supervisor restarts the server)
and a model with no available version (a server shutting down unloads its models while it still
answers). Never retried: bad requests, cancellations, internal errors, time-outs.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from utils import specs
from utils.errors import UsageError, UserError
from utils.layout import network_of
from utils.walkthrough import step

T = TypeVar("T")
DEFAULT_RETRY_FOR = 60.0  # seconds: covers a supervised restart (detection + ~10 s start)
DEFAULT_URL = "127.0.0.1:8001"
SERVER_STEP = step("4")  # the walkthrough's: start Triton
START_COMMAND = SERVER_STEP.commands[0]


class ServerUnavailable(UserError, ConnectionError):
    """No Triton server answers at the address."""


def check_server(client: grpcclient.InferenceServerClient, url: str, timeout: float = 5.0) -> None:
    """Say within seconds, with the command that starts one, that no server answers at ``url``
    (the retries below are for a server that restarts, not for one that was never started)."""
    try:
        if client.is_server_live(client_timeout=timeout):
            return
    except InferenceServerException:
        pass
    raise ServerUnavailable(f"no Triton server answers at {url}: start one with `{START_COMMAND}` "
                            f"({SERVER_STEP.label.lower()} of the walkthrough) in another terminal, or pass --url with the address of a running one.")


def served_config(client: grpcclient.InferenceServerClient, url: str, model: str) -> dict:
    """A served model's config in Triton's JSON form, once a server is known to answer at ``url``;
    where it does not serve ``model``, an error naming the per-GPU copies it may serve instead."""
    check_server(client, url)
    try:
        return client.get_model_config(model, as_json=True)["config"]
    except InferenceServerException as error:
        hint = (f"; on several GPUs each network is served per GPU: name its copy, e.g. {network_of(model)}_gpu0"
                if network_of(model) in specs.NETWORKS else "")
        raise UsageError(f"the server at {url} does not serve {model!r} ({error.message()}){hint}.") from None


def connect(url: str) -> grpcclient.InferenceServerClient:
    """A gRPC client that reconnects quickly after a server restart.

    gRPC's defaults would back off for up to 2 minutes after a refused connection, and share
    that state between all channels of the process (the global subchannel pool), so even a new
    client would keep failing long after the server is back.
    """
    return grpcclient.InferenceServerClient(url, channel_args=[
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.use_local_subchannel_pool", 1),
    ])


def infer_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """Triton inputs carrying these arrays, each in the dtype it already has."""
    inputs = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        infer_input = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def is_retryable(error: Exception) -> bool:
    if not isinstance(error, InferenceServerException):
        return False
    message = error.message() or ""
    if "has no available versions" in message:  # a server shutting down unloads its models
        return True
    if "restricted" in message or "unknown model" in message:  # a missing key or model: final
        return False
    return error.status() == "StatusCode.UNAVAILABLE" or "is not healthy" in message


def call_with_retries(call: Callable[[], T], retry_for: float = DEFAULT_RETRY_FOR,
                      first_wait: float = 0.25, max_wait: float = 4.0) -> T:
    deadline = time.monotonic() + retry_for
    wait = first_wait
    while True:
        try:
            return call()
        except InferenceServerException as error:
            if not is_retryable(error) or time.monotonic() + wait > deadline:
                raise
            time.sleep(wait)
            wait = min(2 * wait, max_wait)
