#!/bin/sh
# Submits the sweep array and its merge (which runs only if every shard succeeded).
#   SWEEP_CONFIG=simulations/configs/privacy_utility.toml SWEEP_OUT=/shared/sweep \
#     examples/cluster/submit-slurm.sh [shards]
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
SHARD_COUNT="${1:-4}"
export SWEEP_CONFIG SWEEP_OUT SHARD_COUNT CLUSTER_DIR="$here"
array=$(sbatch --parsable --export=ALL --array="0-$((SHARD_COUNT - 1))" "$here/sweep.sbatch")
sbatch --export=ALL --dependency="afterok:$array" "$here/merge.sbatch"
