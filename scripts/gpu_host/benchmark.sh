#!/usr/bin/env bash
# The GPU benchmark in one run, on the GPU host: the SD1.5 architecture with random weights
# (sd15-random), 512x512, 50 PNDM steps, guidance 7.5, FP16, the portable backend's torch runtime
# with the UNet and the VAE decoder compiled, the loop in the UNet's process (--pipeline-loop
# with-unet, 16 loops in flight per model); diffusers eager, compiled and with its own speed
# recipe (diffusers-fast, and its 16 images in one call: the bound for 16 clients), client-side,
# BLS and ensemble at 1, 16 and 32 concurrent clients, the fidelity check (PSNR >= 35 dB vs
# diffusers, no constant image: the script fails otherwise), and how long the server took to
# start and to restart 3 times with its compile cache. Writes the JSON, the chart and the logs
# under $OUT. Each setting can be changed by its variable below, e.g.
#   PIPELINE_LOOP=cpu CONCURRENCY="1 4 8" bash scripts/gpu_host/benchmark.sh
# LORA="a b" serves random LoRA adapters of those names (built with peft) and has the requests ask
# for them in turn, diffusers switching them with set_adapters; few-step sampling, e.g.
#   LORA=lcm SCHEDULER=LCMScheduler STEPS=4 GUIDANCE=1 bash scripts/gpu_host/benchmark.sh
# TASK=inpaint repaints the middle of one picture (the default picture, its middle masked), with
# SD1.5's plain UNet or, with MODEL=sd15-random-inpaint, an inpainting checkpoint's 9-channel one:
#   MODEL=sd15-random-inpaint TASK=inpaint bash scripts/gpu_host/benchmark.sh
# TASK=controlnet guides text to image with that picture's Canny edges and a random ControlNet of
# SD1.5's architecture (canny=tiny), served beside the UNet and compiled as it is:
#   TASK=controlnet bash scripts/gpu_host/benchmark.sh
# On a host without network, first: python scripts/gpu_host/pack_wheels.py, and copy .whl/ along.
case "${1-}" in  # --help prints the comment above, and does nothing else
  -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
esac
set -euo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
source scripts/gpu_host/setup.sh  # wheels, this project, the pipeline model's environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
CONTROL=()
if [ "${TASK-}" = controlnet ]; then CONTROL=(--controlnet canny=tiny); fi
DEFAULT_COMPILE="unet vae_decoder${CONTROL:+ controlnet controlled_unet}"
TORCH_COMPILE=${TORCH_COMPILE-$DEFAULT_COMPILE}  # empty: the eager networks, still in CUDA graphs
COMPILE=()
if [ -n "$TORCH_COMPILE" ]; then COMPILE=(--torch-compile $TORCH_COMPILE); fi
PIPELINE_INSTANCES=${PIPELINE_INSTANCES-16}  # BLS instances; with-unet: loops in flight per model (empty: the default)
INSTANCES=()
if [ -n "$PIPELINE_INSTANCES" ]; then INSTANCES=(--pipeline-instances "$PIPELINE_INSTANCES"); fi
ADAPTERS=()  # --lora NAME=tiny for each, then the requests' turn
for name in ${LORA-}; do ADAPTERS+=(--lora "$name=tiny"); done
if [ -n "${LORA-}" ]; then ADAPTERS+=(--alternate-lora $LORA); fi
SAMPLING=(--num-inference-steps "${STEPS:-50}")
if [ -n "${GUIDANCE-}" ]; then SAMPLING+=(--guidance-scale "$GUIDANCE"); fi  # none: the model family's
if [ -n "${SCHEDULER-}" ]; then SAMPLING+=(--scheduler "$SCHEDULER"); fi
# A repository of its own: the GPU placement's pipeline config differs from the committed one.
status=0
python3 scripts/benchmark_pipelines.py --model "${MODEL:-sd15-random}" --task "${TASK:-text-to-image}" --device cuda --precision FP16 --runtime torch \
  --repository outputs/triton-gpu --gpus "${GPUS:-0}" --pipeline-loop "${PIPELINE_LOOP:-with-unet}" "${ENVIRONMENT[@]}" "${COMPILE[@]}" \
  "${INSTANCES[@]}" "${ADAPTERS[@]}" "${CONTROL[@]}" "${SAMPLING[@]}" \
  --min-psnr 35 --time-restart "${RESTARTS:-3}" --log-verbose-stops \
  --pipelines ${PIPELINES:-diffusers diffusers-compiled diffusers-fast triton-client-side triton-bls triton-ensemble} \
  --warmup "${WARMUP:-3}" --runs "${RUNS:-10}" --concurrency ${CONCURRENCY:-1 16 32} --requests "${REQUESTS:-64}" \
  --static-batch ${STATIC_BATCH:-16} \
  --output-dir "$OUT" > "$OUT/benchmark.log" 2>&1 || status=$?
grep -v "it/s]" "$OUT/benchmark.log" | tail -40
cp /tmp/tritonserver-*.log "$OUT/" 2>/dev/null || true
exit $status
