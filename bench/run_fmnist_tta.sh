#!/usr/bin/env bash
# Time to accuracy on Fashion-MNIST, torch-mpu's example (mpu_resnet) against the PyTorch
# reference (bench/torch_fmnist_reference.py), in one go on one machine:
#   bench/run_fmnist_tta.sh [OUT_DIR] [GPU_COUNT ...]
# For each GPU count (default 1, capped at the GPUs present): mpu_resnet once per precision of
# MPU_PRECISIONS, then the reference once per precision of REF_PRECISIONS (torchrun with DDP for
# more than one GPU), with the same model, epochs, batch, learning rate, schedule and seed.
# Each writes its per-epoch test accuracy and training seconds (evaluation left out, data upload
# in; mpu_resnet writes no snapshots, as the reference writes none); bench/tta_report.py turns them into OUT_DIR/tta.md and OUT_DIR/tta.png.
#
# Environment: BUILD (build-gpu), EPOCHS (15), BATCH (512 per GPU), LR (0.4, for the total
# batch), WARMUP_EPOCHS (1), ARCH (resnet18), SEED (0), MPU_PRECISIONS (bf16_mixed,bf16_autocast),
# REF_PRECISIONS (bf16_autocast), MPU_ARGS / REF_ARGS (more flags of each, e.g.
# --channels-last), SKIP_REF=1 / SKIP_MPU=1.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
out=${1:-bench-out/fmnist_tta}
shift || true
build=${BUILD:-build-gpu}
epochs=${EPOCHS:-15}
batch=${BATCH:-512}
lr=${LR:-0.4}
warmup=${WARMUP_EPOCHS:-1}
arch=${ARCH:-resnet18}
seed=${SEED:-0}
mpu_precisions=${MPU_PRECISIONS:-bf16_mixed,bf16_autocast}
ref_precisions=${REF_PRECISIONS:-bf16_autocast}
read -ra mpu_extra <<< "${MPU_ARGS:-}"
read -ra ref_extra <<< "${REF_ARGS:-}"
mkdir -p "$out"
source bench/gpu_counts.sh
gpu_counts run_fmnist_tta.sh 1 "$@"
status=0
common=(--epochs "$epochs" --batch-size "$batch" --lr "$lr" --warmup-epochs "$warmup" --arch "$arch" --seed "$seed")
nvidia-smi -L > "$out/gpus.txt"
for n in "${counts[@]}"; do
  if [ "${SKIP_MPU:-0}" != 1 ]; then
    for p in ${mpu_precisions//,/ }; do
      dir="$out/mpu_${p}_n${n}"
      rm -rf "$dir"
      echo "run_fmnist_tta.sh: torch-mpu, $n GPU(s), $p"
      "$build/examples/resnet/mpu_resnet" --devices "$n" --precision "$p" "${common[@]}" --snapshot-every 0 \
        "${mpu_extra[@]}" --out "$dir" > "$out/mpu_${p}_n${n}.log" 2>&1 || status=1
      tail -3 "$out/mpu_${p}_n${n}.log"
    done
  fi
  if [ "${SKIP_REF:-0}" != 1 ]; then
    for p in ${ref_precisions//,/ }; do
      echo "run_fmnist_tta.sh: PyTorch reference, $n GPU(s), $p"
      launcher=(python3)
      [ "$n" -gt 1 ] && launcher=(torchrun --standalone --nproc-per-node "$n")
      "${launcher[@]}" bench/torch_fmnist_reference.py --precision "$p" "${common[@]}" \
        "${ref_extra[@]}" --json "$out/ref_${p}_n${n}.json" > "$out/ref_${p}_n${n}.log" 2>&1 || status=1
      tail -3 "$out/ref_${p}_n${n}.log"
    done
  fi
done
python3 bench/tta_report.py --from "$out" || status=1
exit $status
