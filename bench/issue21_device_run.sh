#!/usr/bin/env bash
# Issue 21 on one GPU, in one device call (the device returns few files, so every log goes into
# $OUT/logs.tgz, written after each step): build mpu_tests and mpu_resnet, the [cuda],
# [cuda_graph] and [nccl] tests, fp32 channels_last runs under CUDA_LAUNCH_BLOCKING (the
# "misaligned address" of 2026-12-07), and 10-epoch time-to-accuracy runs of both systems.
# Usage on the GPU machine, .device carried (../shared/device/README.md): bash bench/issue21_device_run.sh $OUT
OUT=${1:?usage: bench/issue21_device_run.sh OUT_DIR}
T_START=$(date +%s)
L=/tmp/logs; rm -rf $L; mkdir -p $L
snap() { tar -C /tmp -czf $OUT/logs.tgz.part logs && mv $OUT/logs.tgz.part $OUT/logs.tgz; }
trap 'snap; echo "total $(( $(date +%s) - T_START )) s"' EXIT
set -o pipefail
source .device/setup.sh > $L/setup.log 2>&1; cat $L/setup.log
t0=$(date +%s)
{ cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DMPU_BUILD_TESTS=ON > /dev/null && cmake --build build-gpu --target mpu_tests mpu_resnet 2>&1 | grep -E "warning|error|FAILED" ; } > $L/build.log 2>&1
echo "build in $(( $(date +%s) - t0 )) s: $(grep -c warning $L/build.log) warning lines"; grep -E "error|FAILED" $L/build.log | head
[ -x build-gpu/examples/resnet/mpu_resnet ] || exit 1
t0=$(date +%s)
timeout 60 build-gpu/tests/mpu_tests "[cuda],[cuda_graph],[nccl]" > $L/tests_cuda.log 2>&1
echo "tests rc=$? in $(( $(date +%s) - t0 )) s"
grep -E "FAILED|failed|^/.*:[0-9]+: " $L/tests_cuda.log | head -40
tail -4 $L/tests_cuda.log
snap
R=build-gpu/examples/resnet/mpu_resnet
short=(--epochs 1 --batch-size 256 --lr 0.1 --train-size 2048 --snapshot-every 0)
for v in "fp32 --channels-last" "fp32 --channels-last --no-flat-step"; do
  name=$(echo $v | tr ' -' '__')
  CUDA_LAUNCH_BLOCKING=1 timeout 30 $R --precision $v "${short[@]}" --out /tmp/d_$name > $L/diag_$name.log 2>&1
  echo "diag $v rc=$?: $(grep -m3 -E 'error|what\(\)|accuracy' $L/diag_$name.log | cut -c1-300 | xargs)"
done
snap
left() { [ $(( $(date +%s) - T_START )) -lt ${1} ]; }
# Time to accuracy: the captured step, no cuDNN benchmark, label smoothing 0.1, 10 epochs.
run_mpu() { # name, args
  local name=$1; shift
  $R --precision bf16_mixed --channels-last --epochs 10 --batch-size 512 --lr 0.4 --label-smoothing 0.1 --snapshot-every 0 "$@" --out $L/$name > $L/$name.log 2>&1
  echo "$name rc=$?: $(grep -E '^ *[0-9]+ +[0-9]+ ' $L/$name.log | awk '{printf "%s:%s@%s ", $1, $6, $8}')"; grep "final" $L/$name.log
}
left 190 && run_mpu mpu_graph_e10 --cuda-graph && snap
left 205 && python3 bench/torch_fmnist_reference.py --precision bf16_autocast --channels-last --epochs 10 --batch-size 512 --lr 0.4 --label-smoothing 0.1 --json $L/ref_e10.json > $L/ref_e10.log 2>&1 && echo "ref e10: $(grep -E '^epoch' $L/ref_e10.log | awk '{printf "%s:%s@%s ", $2, $10, $3}')"
snap; left 220 && run_mpu mpu_eager_e10
true
