#!/usr/bin/env bash
# ResNet-50 training throughput, torch-mpu against PyTorch DDP, in one go on one machine:
#   bench/run_resnet_bench.sh [OUT_DIR] [GPU_COUNT ...]
# OUT_DIR (default bench-out/resnet50) receives mpu.json (bench_resnet50, every strategy),
# ddp.json (bench/ddp_reference.py), env.json (cards, date, versions), the logs, and
# resnet50_section.md; then bench/resnet_report.py rewrites the ResNet-50 section of
# docs/benchmarks.md (and draws docs/img/resnet50_throughput.png where gnuplot exists; elsewhere
# `bench/resnet_report.py --from OUT_DIR` draws it later from the same files).
# GPU counts default to 1 2 4, capped at the GPUs present (nvidia-smi -L).
#
# Environment: BUILD (build directory, default build-gpu; bench_resnet50 must be built there),
# PRECISIONS (torch-mpu's precision policies; default
# fp32,bf16_autocast,bf16_mixed,fp16_autocast,fp16_mixed; the older bf16 and fp16, the whole
# model in that dtype, also pass), DDP_PRECISIONS (default: PRECISIONS with bf16_mixed ->
# bf16_autocast and fp16_mixed -> fp16_autocast, each once: the DDP rows the torch-mpu rows are
# compared with), STRATEGIES (master,replicated,sharded), BATCH (64), WARMUP (10), ITERS (30),
# WIRE_DTYPE (fp32; "param" sends gradients in the parameter dtype, as DDP does), BENCH_ARGS and
# DDP_ARGS (more options of bench_resnet50 and ddp_reference.py), SKIP_DDP=1 / SKIP_MPU=1 to run
# one side only, ROUNDS (1): with ROUNDS=k > 1 the two sides are interleaved, k times over (for
# each GPU count: torch-mpu's rows, then DDP's), each invocation's JSON kept in OUT_DIR/parts,
# and every row of the report is the median of its k rounds, so that drift of the machine over
# the run hits both sides alike.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
out=${1:-bench-out/resnet50}
shift || true
build=${BUILD:-build-gpu}
precisions=${PRECISIONS:-fp32,bf16_autocast,bf16_mixed,fp16_autocast,fp16_mixed}
# DDP has no fp32 master copy of reduced-precision parameters: its side of a *_mixed policy is
# autocast in the same dtype (bench/resnet_report.py pairs them the same way).
if [ -n "${DDP_PRECISIONS:-}" ]; then
  ddp_precisions=$DDP_PRECISIONS
else
  ddp_precisions=
  for p in ${precisions//,/ }; do
    case $p in
      bf16_mixed) p=bf16_autocast ;;
      fp16_mixed) p=fp16_autocast ;;
    esac
    case ",$ddp_precisions," in
      *",$p,"*) ;;
      *) ddp_precisions=${ddp_precisions:+$ddp_precisions,}$p ;;
    esac
  done
fi
strategies=${STRATEGIES:-master,replicated,sharded}
batch=${BATCH:-64}
warmup=${WARMUP:-10}
iters=${ITERS:-30}
wire=${WIRE_DTYPE:-fp32}
mkdir -p "$out"

source bench/gpu_counts.sh
gpu_counts run_resnet_bench.sh "1 2 4" "$@"
gpus=$(IFS=,; echo "${counts[*]}")
echo "run_resnet_bench.sh: GPU counts $gpus; precisions $precisions (DDP: $ddp_precisions); strategies $strategies; batch $batch; $warmup + $iters iterations -> $out"

# The machine, the date and the versions, for the report.
python3 - "$out/env.json" <<'EOF'
import datetime, json, subprocess, sys
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:
        return ""
env = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "gpus": [l for l in sh("nvidia-smi -L").splitlines() if l.startswith("GPU")],
    "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1"),
    "git_commit": sh("git rev-parse --short HEAD"),
    "git_dirty": bool(sh("git status --porcelain --untracked-files=no")),
    "gxx": sh("g++ -dumpfullversion"),
    "nvcc": sh("nvcc --version | sed -n 's/.*release \\([0-9.]*\\).*/\\1/p'"),
}
try:
    import torch, torchvision
    env.update(torch=torch.__version__, torchvision=torchvision.__version__, cuda=torch.version.cuda,
               nccl=".".join(str(v) for v in torch.cuda.nccl.version()))
except Exception as e:
    env["python_torch_error"] = str(e)
with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=2)
print("run_resnet_bench.sh: " + "; ".join(env["gpus"]))
EOF

rounds=${ROUNDS:-1}
status=0
bench="$build/bench/bench_resnet50"
read -ra extra <<< "${BENCH_ARGS:-}"
read -ra ddp_extra <<< "${DDP_ARGS:-}"
if [ "${SKIP_MPU:-0}" != 1 ] && [ ! -x "$bench" ]; then
  echo "run_resnet_bench.sh: $bench is missing; build it first (cmake --build $build --target bench_resnet50)" >&2
  exit 1
fi
if [ "$rounds" -gt 1 ]; then
  mkdir -p "$out/parts"
  # Nothing of an earlier run may pass for this one's: its parts, merged JSON and logs.
  rm -f "$out/parts"/*.json "$out/mpu.json" "$out/ddp.json" "$out/mpu.log" "$out/ddp.log"
  for ((r = 1; r <= rounds; r++)); do
    for n in "${counts[@]}"; do
      echo "run_resnet_bench.sh: round $r of $rounds, $n GPU(s)"
      if [ "${SKIP_MPU:-0}" != 1 ]; then
        "$bench" --gpus "$n" --precision "$precisions" --strategy "$strategies" --batch-size "$batch" \
          --warmup "$warmup" --iters "$iters" --wire-dtype "$wire" "${extra[@]}" \
          --json "$out/parts/mpu_r${r}_n${n}.json" 2>&1 | tee -a "$out/mpu.log" || status=1
      fi
      if [ "${SKIP_DDP:-0}" != 1 ]; then
        python3 bench/ddp_reference.py --gpus "$n" --precision "$ddp_precisions" --batch-size "$batch" \
          --warmup "$warmup" --iters "$iters" "${ddp_extra[@]}" \
          --json "$out/parts/ddp_r${r}_n${n}.json" 2>&1 | tee -a "$out/ddp.log" || status=1
      fi
    done
  done
  python3 bench/resnet_report.py --from "$out" || status=1
  exit $status
fi
rm -rf "$out/parts"  # parts of an earlier interleaved run would replace this run's JSON
if [ "${SKIP_MPU:-0}" != 1 ]; then
  "$bench" --gpus "$gpus" --precision "$precisions" --strategy "$strategies" --batch-size "$batch" \
    --warmup "$warmup" --iters "$iters" --wire-dtype "$wire" "${extra[@]}" --json "$out/mpu.json" \
    2>&1 | tee "$out/mpu.log" || status=1
fi
if [ "${SKIP_DDP:-0}" != 1 ]; then
  python3 bench/ddp_reference.py --gpus "$gpus" --precision "$ddp_precisions" --batch-size "$batch" \
    --warmup "$warmup" --iters "$iters" "${ddp_extra[@]}" --json "$out/ddp.json" 2>&1 | tee "$out/ddp.log" || status=1
fi
python3 bench/resnet_report.py --from "$out" || status=1
exit $status
