#!/bin/bash
# Train with dstrain on a PBS (PBS Pro / OpenPBS / Torque) job, through DeepSpeed's launcher.
#
#   qsub -v SLOTS=4 scripts/pbs_job.sh      # trains with the arguments of the `set --` below
#   bash scripts/pbs_job.sh TRAIN ARGS...   # inside an interactive job (qsub -I): your own
# qsub has no portable way to pass arguments to a script: edit the `set --` line for a batch job.
#
# Run it from the dstrain checkout, on a file system every node sees: DeepSpeed's pdsh
# launcher runs this node's interpreter path in this directory on every node, and
# train.py's rank 0 writes the token cache into the output directory for all ranks.
# Nodes are reached with pdsh over passwordless ssh; check every node first with
#   dstrain doctor --hostfile HOSTFILE
#
# `dstrain hostfile --from-pbs` turns $PBS_NODEFILE (one line per slot) into one
# `HOST slots=N` line per node; SLOTS overrides the counts with the GPUs per node (the node
# file repeats a host per MPI process or CPU). `dstrain launch` checks hostfile, DeepSpeed
# config and batch arithmetic for the real world size, then runs `deepspeed`.
# DRY_RUN=1 prints the deepspeed command instead of running it.
#
#PBS -N dstrain
#PBS -l select=2:ncpus=32:ngpus=4:mpiprocs=4
#PBS -l walltime=04:00:00
#PBS -j oe

set -euo pipefail

cd "${PBS_O_WORKDIR:-.}"
if [ -f .venv/bin/activate ]; then
    source .venv/bin/activate
fi

JOB_ID=${PBS_JOBID:-0}
JOB_ID=${JOB_ID%%.*}  # 1234.server -> 1234
if [ "$#" -eq 0 ]; then
    set -- --deepspeed_config ds_configs/zero2_bf16.json --model genslm_25M \
        --output-dir "runs/dstrain-${JOB_ID}"
fi

HOSTFILE="hostfile.${JOB_ID}"
SLOT_ARGS=()
if [ -n "${SLOTS:-}" ]; then
    SLOT_ARGS=(--slots "$SLOTS")
fi
dstrain hostfile --from-pbs "${SLOT_ARGS[@]}" -o "$HOSTFILE"

MASTER_ADDR=$(awk '!/^#/ && NF { print $1; exit }' "$HOSTFILE")
JOB_NUMBER=$(printf '%s' "$JOB_ID" | tr -cd '0-9')
MASTER_PORT=$((20000 + 10#${JOB_NUMBER:-0} % 20000))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
DRY=()
if [ "${DRY_RUN:-0}" = 1 ]; then
    DRY=(--dry-run)
fi

dstrain launch --hostfile "$HOSTFILE" --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" "${DRY[@]}" -- "$@"
