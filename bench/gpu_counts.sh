# Sourced by the GPU benchmark scripts: gpu_counts NAME DEFAULT [COUNT ...] sets the array
# `counts` to the GPU counts asked for (each argument may be a comma list; none: DEFAULT), capped
# at the GPUs nvidia-smi lists, and exits with a message when there is no GPU or no count left.
gpu_counts() {
  local name=$1 default=$2 n m present
  shift 2
  present=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ "${present:-0}" -eq 0 ]; then
    echo "$name: no GPU (nvidia-smi -L lists none); this benchmark needs GPUs" >&2
    exit 1
  fi
  counts=()
  for n in "${@:-$default}"; do
    for m in ${n//,/ }; do
      if [ "$m" -le "$present" ]; then counts+=("$m"); else echo "$name: skipping $m GPUs ($present present)"; fi
    done
  done
  if [ ${#counts[@]} -eq 0 ]; then
    echo "$name: no GPU count left to run" >&2
    exit 1
  fi
}
