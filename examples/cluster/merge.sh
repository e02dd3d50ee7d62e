#!/bin/sh
# Joins every shard under $SWEEP_OUT into $SWEEP_OUT/merged (CSVs, plots, report.md). Run it once
# all shards have finished: the Kubernetes merge Job, or the Slurm job that depends on the array.
# It refuses shards of another sweep and reports points that no shard finished.
#
#   SWEEP_OUT    shared output root                    required
#   SHARD_COUNT  number of shards (all must be there)  required
#   FEDLORA      the fedlora binary (default: fedlora on PATH)
set -eu
: "${SWEEP_OUT:?set SWEEP_OUT to the shared output directory}"
: "${SHARD_COUNT:?set SHARD_COUNT to the number of shards}"
fedlora="${FEDLORA:-fedlora}"
set --
i=0
while [ "$i" -lt "$SHARD_COUNT" ]; do
    [ -d "$SWEEP_OUT/shard-$i" ] || { echo "shard $i missing under $SWEEP_OUT" >&2; exit 1; }
    set -- "$@" "$SWEEP_OUT/shard-$i"
    i=$((i + 1))
done
exec "$fedlora" simulate merge --out "$SWEEP_OUT/merged" "$@"
