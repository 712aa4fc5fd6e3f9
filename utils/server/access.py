"""Which of the server's APIs are open to whom.

Inference, health and metadata stay open. The APIs that can change the server's state, reach
another process's memory or reveal what it serves (model repository, shared memory, logging,
trace, statistics) are always restricted to holders of an admin key, a random one per start:
registering a Python stub's own shared-memory region as an output buffer, for one, corrupts the
stub's messages and takes the server down, and nothing in this tutorial needs a client to
register shared memory.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from utils.errors import UsageError

MODEL_CONTROL_MODES = ("none", "explicit")
ADMIN_APIS = "model-repository,shared-memory,logging,trace,statistics"
ADMIN_HEADER = "admin-key"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # Triton's gRPC frontend reads restricted headers with it


@dataclass
class AccessPolicy:
    # "none": the repository is fixed at start (the safe default). "explicit": models can be
    # loaded and unloaded through the API, which is then restricted to holders of admin_key.
    model_control: str = "none"
    admin_key: str | None = None

    def __post_init__(self):
        if self.model_control not in MODEL_CONTROL_MODES:
            raise UsageError(f"model_control={self.model_control!r}: use one of {MODEL_CONTROL_MODES} (--model-control).")
        if self.admin_key is None:
            # Hex: a key that starts with "-" (as token_urlsafe's can) reads as an option where it is
            # passed to a script (--admin-key -Xy...), and the user copies it from the launcher.
            self.admin_key = secrets.token_hex(24)

    def arguments(self) -> list[str]:
        """tritonserver's flags for this policy."""
        rule = f"{ADMIN_APIS}:{ADMIN_HEADER}={self.admin_key}"
        arguments = [f"--model-control-mode={self.model_control}", f"--grpc-restricted-protocol={rule}",
                     f"--http-restricted-api={rule}"]
        if self.model_control == "explicit":
            arguments.append("--load-model=*")
        return arguments

    def headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers that open the restricted APIs."""
        prefix = GRPC_HEADER_PREFIX if protocol == "grpc" else ""
        return {prefix + ADMIN_HEADER: self.admin_key}
