"""Running the server beyond one request: the Grafana dashboard built from code (``dashboard``), a
local Prometheus for its tests (``prometheus``), Triton's perf_analyzer (``perf_analyzer``), and the
tools pip does not install (``tools``: `make tools`)."""
