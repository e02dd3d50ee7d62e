#!/bin/sh
# Runs one shard of a fedlora sweep. Kubernetes Indexed Jobs and Slurm job arrays both call it;
# the shard index comes from whichever of them started it.
#
#   SWEEP_CONFIG   sweep file (TOML)                        required
#   SWEEP_OUT      shared output root (a volume every shard and the merge step mount)  required
#   SHARD_COUNT    number of shards (the Job's completions, the array's size)          required
#   JOB_COMPLETION_INDEX (Kubernetes) | SLURM_ARRAY_TASK_ID (Slurm) | SHARD_INDEX: this shard
#   FEDLORA        the fedlora binary (default: fedlora on PATH)
#   SWEEP_THREADS  threads training clients (default: all cores the scheduler gave us)
#
# Re-running a shard resumes it: finished points are not run again.
set -eu
: "${SWEEP_CONFIG:?set SWEEP_CONFIG to the sweep file}"
: "${SWEEP_OUT:?set SWEEP_OUT to the shared output directory}"
: "${SHARD_COUNT:?set SHARD_COUNT to the number of shards}"
index="${JOB_COMPLETION_INDEX:-${SLURM_ARRAY_TASK_ID:-${SHARD_INDEX:-}}}"
: "${index:?no shard index: JOB_COMPLETION_INDEX, SLURM_ARRAY_TASK_ID or SHARD_INDEX}"
fedlora="${FEDLORA:-fedlora}"
set -- simulate --config "$SWEEP_CONFIG" --out "$SWEEP_OUT/shard-$index" --shard "$index/$SHARD_COUNT"
if [ -n "${SWEEP_THREADS:-${SLURM_CPUS_PER_TASK:-}}" ]; then
    set -- "$@" --threads "${SWEEP_THREADS:-$SLURM_CPUS_PER_TASK}"
fi
exec "$fedlora" "$@"
