#!/bin/sh
# Runs a command, shows its output, and passes when it exits 0 and its output matches an
# extended regular expression (ctest's PASS_REGULAR_EXPRESSION would ignore the exit status).
# Usage: expect_output.sh REGEX COMMAND [ARGS...]
regex=$1
shift
out=$("$@" 2>&1)
rc=$?
printf '%s\n' "$out"
if [ "$rc" -ne 0 ]; then
  echo "expect_output.sh: '$*' exited with status $rc" >&2
  exit 1
fi
if ! printf '%s\n' "$out" | grep -Eq "$regex"; then
  echo "expect_output.sh: the output of '$*' has no line matching '$regex'" >&2
  exit 1
fi
