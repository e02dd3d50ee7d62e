#!/usr/bin/env bash
# Builds the device client (`cargo build --profile device -p fedlora-device`: fat LTO, one
# codegen unit, size-optimised, stripped, panic = abort) and prints its size against the
# 12 MiB goal, and one JSON line with the same numbers (for docs/src/measurements.md).
#
#   scripts/device-size.sh             # build, then print the size (exit 1 over the goal)
#   SKIP_BUILD=1 scripts/device-size.sh
#
# The build takes several minutes on 2 cores (fat LTO); not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

goal=$((12 * 1024 * 1024))
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --profile device -p fedlora-device
fi
bin=target/device/fedlora-device
size=$(stat -c %s "$bin")
awk -v s="$size" -v g="$goal" 'BEGIN {
  printf "fedlora-device: %d bytes (%.2f MiB), goal %d bytes (12 MiB): %s by %d bytes\n",
    s, s / 1048576, g, (s <= g ? "under" : "OVER"), (s <= g ? g - s : s - g)
}'
echo "{\"binary\": \"$bin\", \"bytes\": $size, \"goal_bytes\": $goal, \"rustc\": \"$(rustc --version)\"}"
[ "$size" -le "$goal" ]
