"""Start and stop a real Triton Inference Server with no Docker: the one in ``nvidia-pytriton``.

- ``install``: a runnable server from the wheel (the Python-backend stub for this Python, the
  libraries it must load first, the environment it finds packages in);
- ``access``: which APIs the server opens to whom (the admin key);
- ``diagnosis``: a failed start explained from the server's log;
- ``process``: the process itself: ports, start, readiness, stop, restart, leftovers;
- ``health``: the canary inference and the supervisor that restarts a server that fails it;
- ``docker``: the same repository served by the project's serving image (`docker run`).
"""

from utils.errors import TritonServerError
from utils.server.install import server_environment, shared_libpython
from utils.server.process import (TritonServer, free_port, port_in_use, process_group, resident_bytes,
                                  shm_regions, stop_on_sigterm)

__all__ = ["TritonServer", "TritonServerError", "free_port", "port_in_use", "process_group", "server_environment",
           "resident_bytes", "shared_libpython", "shm_regions", "stop_on_sigterm"]
