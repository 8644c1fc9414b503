#!/bin/bash
# ADE20K segmentation fine-tuning (UperNet, conf/task/ade20k.yaml), requeued across time limits and
# preemptions until it completes. Settings: see sbatch/common.sh. For example:
#   ADE20K_ROOT=/data/ADEChallengeData2016 PRETRAINED=runs/vit_h14_in21k sbatch -p gpu -A myacct sbatch/finetune_ade20k.sh
# Site options (partition, account, QoS, constraint) go on the sbatch command line; so do other
# node counts or limits, e.g. --time=24:00:00 (keep --signal's lead = SIGNAL_LEAD_S).
#SBATCH --job-name=vit-ade20k
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR2@300
#SBATCH --open-mode=append
#SBATCH --output=vit-ade20k-%j.out
set -euo pipefail
# Slurm runs a spooled copy of this script: find the repository from the path that was submitted.
submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\(.*[^ ]\) *$/\1/p')
export VIT_HOME="${VIT_HOME:-$(cd "$(dirname "$submitted")/.." && pwd)}"
source "$VIT_HOME/sbatch/common.sh"
vit_finetune ade20k
