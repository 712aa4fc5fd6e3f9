"""A failed start explained from the server's log: the cause named, with its fix."""

from __future__ import annotations

import re
from pathlib import Path

# (pattern in the log, what it means and how to fix it)
KNOWN_CAUSES = (
    (r"undefined symbol|libpython\S* cannot open",
     "the Python backend stub loaded the wrong libpython: run it through this launcher, which puts this "
     "interpreter's LIBDIR first on LD_LIBRARY_PATH"),
    (r"already in use|Address already in use",
     "a port is already in use: pass other --http-port/--grpc-port/--metrics-port, or none"),
    (r"ModuleNotFoundError|No module named",
     "a model could not import a package: install the project into this environment (`make venv`) and start "
     "the server from it"),
)


def log_tail(log_file: Path | None, lines: int = 30) -> str:
    if log_file is None or not Path(log_file).exists():
        return ""
    return "\n".join(Path(log_file).read_text(errors="replace").splitlines()[-lines:])


def explain_failure(log_file: Path | None, what: str) -> str:
    """``what`` happened: why, from the log, and its last lines."""
    log = Path(log_file).read_text(errors="replace") if log_file and Path(log_file).exists() else ""
    hints = [f"model '{model}' failed to load: {reason.strip()}"
             for model, reason in re.findall(r"failed to load '([^']+)' version \d+: (.+)", log)]
    hints += [hint for pattern, hint in KNOWN_CAUSES if re.search(pattern, log)]
    hint = "; ".join(hints) if hints else "see the log"
    return f"{what}: {hint}.\nLog: {log_file}\n--- last lines ---\n{log_tail(log_file)}"
