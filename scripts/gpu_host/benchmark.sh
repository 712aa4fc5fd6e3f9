#!/usr/bin/env bash
# The GPU benchmark in one run, on a GPU host (an H100 here): the SD1.5 architecture
# with random weights (sd15-random), 512x512, 50 PNDM steps, guidance 7.5, FP16, the portable
# backend's torch runtime with the UNet compiled; diffusers eager and compiled, client-side and
# BLS, concurrency 1/4/8, and the fidelity check (PSNR >= 35 dB vs diffusers, no constant image:
# the script fails otherwise), and how long the server took to start and to restart with its
# compile cache. Writes the JSON, the chart and the logs under $OUT.
# On a host without network, first: python scripts/gpu_host/pack_wheels.py, and copy .whl/ along.
case "${1-}" in  # --help prints the comment above, and does nothing else
  -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
esac
set -euo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
source scripts/gpu_host/setup.sh  # wheels, this project, the pipeline model's environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
COMPILE=()  # TORCH_COMPILE= (empty) serves the eager networks, still in CUDA graphs
if [ -n "${TORCH_COMPILE-unet}" ]; then COMPILE=(--torch-compile ${TORCH_COMPILE-unet}); fi
INSTANCES=()  # PIPELINE_INSTANCES=16: BLS instances (with-unet: loops in flight per model)
if [ -n "${PIPELINE_INSTANCES-}" ]; then INSTANCES=(--pipeline-instances "$PIPELINE_INSTANCES"); fi
# A repository of its own: the GPU placement's pipeline config differs from the committed one.
status=0
python3 scripts/benchmark_pipelines.py --model sd15-random --device cuda --precision FP16 --runtime torch \
  --repository outputs/triton-gpu --gpus "${GPUS:-0}" --pipeline-loop "${PIPELINE_LOOP:-cpu}" "${ENVIRONMENT[@]}" "${COMPILE[@]}" \
  "${INSTANCES[@]}" \
  --min-psnr 35 --time-restart \
  --pipelines ${PIPELINES:-diffusers diffusers-compiled triton-client-side triton-bls} \
  --warmup "${WARMUP:-3}" --runs "${RUNS:-10}" --concurrency ${CONCURRENCY:-1 4 8} --requests "${REQUESTS:-24}" \
  --output-dir "$OUT" > "$OUT/benchmark.log" 2>&1 || status=$?
grep -v "it/s]" "$OUT/benchmark.log" | tail -40
cp /tmp/tritonserver-*.log "$OUT/" 2>/dev/null || true
exit $status
