"""A real Prometheus on 127.0.0.1 that scrapes Triton's metrics port, for the monitoring tests
and the dashboard's picture: the same queries a Grafana on a cluster would send.

Prometheus comes from ``make tools`` (utils/operations/tools.py). It keeps its data in a temporary folder,
scrapes every second, and evaluates the recording rules it is given as often.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.layout import PROJECT_ROOT
from utils.server import free_port
from utils.operations.tools import tool

LOCALHOST = "127.0.0.1"
# The recording rules the Helm chart installs (its PrometheusRule embeds this file).
RECORDING_RULES = PROJECT_ROOT / "deploy" / "helm" / "sd-triton" / "files" / "recording-rules.yml"


class PrometheusError(UserError, RuntimeError):
    pass


@dataclass
class LocalPrometheus:
    targets: list[str]  # host:port of /metrics endpoints (a Triton server's metrics_url)
    rule_files: list[Path] = field(default_factory=list)
    interval: str = "1s"  # scrape and rule evaluation
    port: int | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> LocalPrometheus:
        self.port = self.port or free_port()
        self._directory = tempfile.TemporaryDirectory(prefix="prometheus-")
        directory = Path(self._directory.name)
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(Path(path).resolve()) for path in self.rule_files],
            "scrape_configs": [{"job_name": "triton", "static_configs": [{"targets": self.targets}]}],
        }
        (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [str(tool("prometheus")), f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address={LOCALHOST}:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with code {self.process.returncode}: "
                                      f"{(directory / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise PrometheusError(f"prometheus was not ready within {timeout:.0f} s (log: {directory / 'prometheus.log'})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None
        self.log.close()
        self._directory.cleanup()

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def api(self, path: str, **parameters) -> dict:
        query = urllib.parse.urlencode(parameters)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read())
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {parameters}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expression: str) -> list[dict]:
        """An instant query's series: [{"metric": {...}, "value": [time, "value"]}, ...]."""
        return self.api("query", query=expression)["result"]

    def query_range(self, expression: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expression, start=start, end=end, step=step)["result"]

    def targets_up(self) -> bool:
        return all(target["health"] == "up" for target in self.api("targets")["activeTargets"])
