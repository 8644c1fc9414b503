# Shared by sbatch/finetune_*.sh (sourced there, never run alone): settings from the environment,
# output into the run directory, and one node agent per node (vit/cluster/agent.py). The agent starts
# torchrun with the rendezvous on the first node, turns the USR2 of --signal (time limit or
# preemption) into a coordinated checkpoint-and-stop of every rank, and on node 0 requeues the job
# (scontrol requeue). The requeued job runs this script again and resumes from the newest checkpoint.
#
# Settings (environment variables; sbatch passes the submitting shell's environment on):
#   RUN_DIR         run directory                   [runs/<task>]
#   DATA_ROOT       dataset root                    [the data config's default, from $COCO_ROOT / $ADE20K_ROOT]
#   PRETRAINED      pretrained weights: a pretraining run dir, a step-N checkpoint or an exported
#                   .safetensors file               [$VIT_PRETRAINED, else none: train from scratch]
#   (relative paths in these three are to the directory sbatch was run from)
#   VIT_OVERRIDES   extra Hydra overrides, separated by spaces or newlines, e.g. "train.steps=90000 optim.lr=5e-5"
#                   (each word is one argument; nothing is evaluated by the shell). They are composed
#                   once before srun: a typo ends the job there, not requeued.
#   PROCS_PER_NODE  ranks per node                  [the GPUs Slurm gave the node, else 1]
#   MAX_REQUEUES    time-limit requeues allowed     [python -m vit.cluster.agent's default]
#   SIGNAL_LEAD_S   the lead of --signal=USR2@LEAD  [python -m vit.cluster.agent's default, as in the #SBATCH line]
#   PYTHON          interpreter with the project installed [python3]
#   VIT_HOME        the repository                  [the one holding the submitted script]

hydra_quoted() {  # VALUE as a Hydra override's quoted string: no sweep (','), grammar or interpolation
  local v="${1//\'/\\\'}"
  v="${v//\$\{/\\\$\{}"
  printf "'%s'" "$v"
}

from_submit_dir() {  # PATH, made absolute against the directory sbatch ran in (the script cds away)
  [[ "$1" = /* ]] && printf '%s' "$1" || printf '%s' "$SLURM_SUBMIT_DIR/$1"
}

gpus_on_node() {  # SLURM_GPUS_ON_NODE when GPUs are allocated; --gpus-per-node may read "h100:8"
  local n="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}"
  n="${n##*:}"
  [[ "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]] && echo "$n" || echo 1
}

# vit_finetune TASK: fine-tune on TASK (a conf/task config) with the settings above.
vit_finetune() {
  local task="$1"
  set -f  # VIT_OVERRIDES words are arguments, never globs
  local run_dir
  run_dir="$(from_submit_dir "${RUN_DIR:-runs/$task}")"
  local -a args=("task=$task" "run_dir=$(hydra_quoted "$run_dir")")
  [[ -n "${DATA_ROOT:-}" ]] && args+=("data.root=$(hydra_quoted "$(from_submit_dir "$DATA_ROOT")")")
  [[ -n "${PRETRAINED:-}" ]] && args+=("pretrained=$(hydra_quoted "$(from_submit_dir "$PRETRAINED")")")
  local -a extra
  read -r -d '' -a extra <<< "${VIT_OVERRIDES:-}" || true  # every line's words
  args+=(${extra[@]+"${extra[@]}"})  # bash < 4.4 calls an empty array unbound under set -u

  mkdir -p "$run_dir/slurm"
  echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): output continues in $run_dir/slurm/"
  exec >>"$run_dir/slurm/job-$SLURM_JOB_ID.out" 2>&1
  echo "== $(date -Is) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: $task ${args[*]}"
  cd "$VIT_HOME"
  # A typo in the overrides, or checkpoints that would not resume with the installed versions and
  # these settings, fail here, once, in the log, instead of on every rank after torchrun started.
  local composed="$run_dir/slurm/config-check-$SLURM_JOB_ID.yaml"
  if ! "${PYTHON:-python3}" jobs/finetune.py "${args[@]}" --cfg job --resolve >"$composed"; then
    echo "error: the settings above do not make a valid config; the job ends here and is not requeued"
    exit 1
  fi
  if ! "${PYTHON:-python3}" jobs/checkpoint.py check "$run_dir" --config "$composed"; then
    echo "error: the run cannot resume (above); the job ends here and is not requeued"
    exit 1
  fi
  local -a agent=(--run-dir "$run_dir" --procs-per-node "${PROCS_PER_NODE:-$(gpus_on_node)}")
  [[ -n "${MAX_REQUEUES:-}" ]] && agent+=(--max-requeues "$MAX_REQUEUES")
  [[ -n "${SIGNAL_LEAD_S:-}" ]] && agent+=(--signal-lead-s "$SIGNAL_LEAD_S")
  # One agent per node; without B: in --signal, Slurm sends USR2 to each of them.
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 --open-mode=append \
    --output="$run_dir/slurm/job-$SLURM_JOB_ID-node%n.out" \
    "${PYTHON:-python3}" -m vit.cluster.agent "${agent[@]}" -- jobs/finetune.py "${args[@]}"
}
