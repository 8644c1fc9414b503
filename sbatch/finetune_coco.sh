#!/bin/bash
# COCO detection fine-tuning (ViTDet-style, conf/task/coco.yaml), requeued across time limits and
# preemptions until it completes. Settings: see sbatch/common.sh. For example:
#   COCO_ROOT=/data/coco PRETRAINED=runs/vit_h14_in21k sbatch -p gpu -A myacct sbatch/finetune_coco.sh
# Site options (partition, account, QoS, constraint) go on the sbatch command line; so do other
# node counts or limits, e.g. --nodes=8 --time=24:00:00 (keep --signal's lead = SIGNAL_LEAD_S).
#SBATCH --job-name=vit-coco
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR2@300
#SBATCH --open-mode=append
#SBATCH --output=vit-coco-%j.out
set -euo pipefail
# Slurm runs a spooled copy of this script: find the repository from the path that was submitted.
submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\(.*[^ ]\) *$/\1/p')
export VIT_HOME="${VIT_HOME:-$(cd "$(dirname "$submitted")/.." && pwd)}"
source "$VIT_HOME/sbatch/common.sh"
vit_finetune coco
