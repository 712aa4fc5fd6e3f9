#!/usr/bin/env bash
# The production path rehearsed on the GPU host without Docker or TensorRT:
#   P2  export the SD1.5-sized random model (sd15-random) in FP16 on CUDA, each graph checked
#       against torch by ONNX Runtime;
#   P3  write the TensorRT repository from those graphs (configs checked against the FP16 graphs)
#       and print the trtexec command of each engine (trtexec itself is not here);
#   P6  serve the BLS and client-side pipelines over networks that answer in GPU memory, as
#       TensorRT's backend does (the torch runtime), with the BLS loop on the CPU, then on the
#       GPU; every image within 35 dB PSNR of diffusers FP16 for the same seed, or it fails.
# STAGE=export or STAGE=serve runs one half (each fits in 10 minutes). Logs and JSON under $OUT.
# On a host without network, first: python scripts/gpu_host/pack_wheels.py, and copy .whl/ along.
case "${1-}" in  # --help prints the comment above, and does nothing else
  -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
esac
set -euo pipefail
OUT=${OUT:-outputs/rehearsal}
WORK=${WORK:-outputs/rehearsal-work}  # models, ONNX files, repositories
STAGE=${STAGE:-all}
mkdir -p "$OUT" "$WORK"
source scripts/gpu_host/setup.sh  # wheels, this project, the pipeline model's environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
MODEL=(--model sd15-random --models-dir "$WORK/models")

if [ "$STAGE" != serve ]; then
  echo "==> P2: export in FP16 on CUDA"
  for network in text_encoder unet vae_encoder vae_decoder; do
    python3 optim/convert_${network}_to_onnx.py "${MODEL[@]}" \
      --onnx-dir "$WORK/onnx" --device cuda --precision FP16 2>&1 | grep -v "Warning\|warn(" | tee -a "$OUT/export.log"
  done
  ls -l "$WORK/onnx/sd15-random" | tee -a "$OUT/export.log"
  echo "==> P3: the TensorRT repository"
  python3 scripts/move_onnx_models_to_triton.py "${MODEL[@]}" --onnx-dir "$WORK/onnx" --backend tensorrt \
    --repository "$WORK/production" | tail -2 | tee "$OUT/repository.log"
  grep -A3 'name: "timestep"' "$WORK/production/unet/config.pbtxt" | tee -a "$OUT/repository.log"
  python3 scripts/build_tensorrt_engines.py --repository "$WORK/production" --print-commands | tee "$OUT/trtexec.txt"
fi

if [ "$STAGE" != export ]; then
  for loop in cpu gpu; do
    echo "==> P6: the pipelines over networks that answer in GPU memory, BLS loop on the $loop"
    python3 scripts/benchmark_pipelines.py "${MODEL[@]}" --device cuda --precision FP16 --runtime torch \
      --repository "$WORK/triton-loop-$loop" --pipeline-loop $loop "${ENVIRONMENT[@]}" \
      --pipelines diffusers triton-client-side triton-bls --warmup 1 --runs 3 --min-psnr 35 \
      --output-dir "$OUT/loop-$loop" > "$OUT/serve-loop-$loop.log" 2>&1 || { tail -40 "$OUT/serve-loop-$loop.log"; exit 1; }
    grep -v "it/s]" "$OUT/serve-loop-$loop.log" | tail -12
  done
fi
