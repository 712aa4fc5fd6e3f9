#!/usr/bin/env bash
# The GPU benchmark in one run, for the lent H100 (../shared/DEVICE.md): the SD1.5 architecture
# with random weights (sd15-random), 512x512, 50 PNDM steps, guidance 7.5, FP16, the portable
# backend's torch runtime with the UNet compiled; diffusers eager and compiled, client-side and
# BLS, concurrency 1/4/8, and the fidelity check (PSNR >= 35 dB vs diffusers, no constant image:
# the script fails otherwise). Writes the JSON, the chart and the logs under $OUT.
# Wheels first: python scripts/pack_device_wheels.py, then carry .whl.
set -euo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
# The device machine has no network: the wheels come along (scripts/pack_device_wheels.py).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile $(ls .whl/*.whl | grep -v /numpy-)
fi
# This project's packages, for the benchmark and for the Triton stubs (which find packages
# through the python3 on PATH, not PYTHONPATH).
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null \
  || echo "$PWD" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/sd_triton_tutorial.pth"
# The pipeline model runs in an environment of its own with numpy 1.x: the 24.10 Python-backend
# stub is built against numpy 1 and mangles string inputs (the prompt) under the machine's numpy 2
# (utils/environments.py). The networks keep the machine's environment.
ENVIRONMENT=()
if ls .whl/numpy-1*.whl >/dev/null 2>&1; then
  SITE=$(python3 -c "from utils.environments import create; print(create('/tmp/pipeline-env'))")
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/numpy-1*.whl
  ENVIRONMENT=(--pipeline-environment /tmp/pipeline-env)
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
COMPILE=()  # TORCH_COMPILE= (empty) serves the eager networks, still in CUDA graphs
if [ -n "${TORCH_COMPILE-unet}" ]; then COMPILE=(--torch-compile ${TORCH_COMPILE-unet}); fi
# A repository of its own: the GPU placement's pipeline config differs from the committed one.
status=0
python3 scripts/benchmark_pipelines.py --model sd15-random --device cuda --precision FP16 --runtime torch \
  --repository outputs/triton-gpu --gpus "${GPUS:-0}" --pipeline-loop "${PIPELINE_LOOP:-cpu}" "${ENVIRONMENT[@]}" "${COMPILE[@]}" --min-psnr 35 \
  --pipelines ${PIPELINES:-diffusers diffusers-compiled triton-client-side triton-bls} \
  --warmup "${WARMUP:-3}" --runs "${RUNS:-10}" --concurrency ${CONCURRENCY:-1 4 8} --requests "${REQUESTS:-24}" \
  --output-dir "$OUT" > "$OUT/benchmark.log" 2>&1 || status=$?
grep -v "it/s]" "$OUT/benchmark.log" | tail -40
cp /tmp/tritonserver-*.log "$OUT/" 2>/dev/null || true
exit $status
