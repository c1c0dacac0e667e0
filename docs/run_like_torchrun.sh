#!/bin/sh
# Starts N copies of a program on this node the way `torchrun --nproc-per-node=N --no-python`
# does: each with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
# For CI, where torchrun (a Python package) is not installed. Exits 1 when any copy fails.
# Usage: run_like_torchrun.sh N PORT PROGRAM [ARGS...]
n=$1
port=$2
shift 2
pids=""
i=0
while [ "$i" -lt "$n" ]; do
  RANK=$i WORLD_SIZE=$n LOCAL_RANK=$i LOCAL_WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 \
    MASTER_PORT=$port "$@" &
  pids="$pids $!"
  i=$((i + 1))
done
rc=0
for pid in $pids; do
  wait "$pid" || rc=1
done
exit $rc
