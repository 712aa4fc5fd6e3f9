"""Which failures the clients wait out and retry, and which they report at once; how often the
served loop asks Triton whether its request was cancelled."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from utils.grpc_client import is_retryable


@pytest.mark.parametrize("message, status, retried", [
    ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", True),  # a server restarting
    ("Request for unknown model: 'pipeline_text_to_image' has no available versions", "StatusCode.NOT_FOUND",
     True),  # a server shutting down unloads its models
    ("model 'unet' failed: Stub process 'unet_0_0' is not healthy.", "StatusCode.INTERNAL", True),
    ("Request for unknown model: 'unet_gpu0' is not found", "StatusCode.UNAVAILABLE", False),  # never coming
    ("This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'", "StatusCode.UNAVAILABLE",
     False),
    ("num_inference_steps=0 is not allowed: use an integer in [1, 999].", "StatusCode.INVALID_ARGUMENT", False),
    ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", False),
])
def test_retry_rules(message, status, retried):
    assert is_retryable(InferenceServerException(message, status=status)) is retried
    assert not is_retryable(ValueError(message))


@pytest.mark.slow
def test_two_threads_can_make_their_first_pipeline_at_once(tiny_model):
    """In a fresh interpreter (transformers' lazy imports not yet done), two threads load the
    pipeline's components at the same moment: both succeed."""
    import subprocess
    import sys

    code = f"""
import threading, utils
from pipelines.components import PipelineComponents
errors, start = [], threading.Barrier(2)
def load():
    start.wait()
    try:
        PipelineComponents.from_pretrained({str(tiny_model)!r})
    except Exception as error:
        errors.append(repr(error))
threads = [threading.Thread(target=load) for _ in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
print(errors)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_served_loop_asks_about_cancellation_at_most_every_interval():
    """Triton's is_cancelled() is a round trip to the server process: asked before the first step,
    then only once the interval has passed (a cancelled request still stops within it)."""
    import time

    from utils.timing import at_most_every

    asked = []
    is_cancelled = at_most_every(0.2, lambda: asked.append(time.monotonic()) or len(asked) == 2)
    assert [is_cancelled() for _ in range(50)] == [False] * 50 and len(asked) == 1  # the first call asks
    time.sleep(0.25)
    assert is_cancelled() and len(asked) == 2  # the interval passed: asked, and the answer passed on
    assert not is_cancelled() and len(asked) == 2
