#!/usr/bin/env bash
# The speed options of ViT-H/14 against timm, in one prepared run of at most 8 minutes on a single
# H100/H200, printing one table (issue 24): at micro-batch 32, 64 and the recipe's, ours eager,
# compiled, compiled + selective activation checkpointing and compiled + float8, against timm eager
# and timm compiled; MFU, images/s, peak memory, ours/timm.
#
#   bash benchmarks/gpu.sh          # from the repo root; results under $OUT
#   DRY=1 bash benchmarks/gpu.sh    # the same flow with a tiny model on any machine (CPU: float8
#                                   # emulated, compile backend aot_eager), to check this script
#
# The lent H200's image has torch, timm, numpy, PIL and yaml but not omegaconf or torchao, and no
# package index: carry the git-ignored wheel folder along (device tool: carry [".whl"], holding
# omegaconf 2.3.0, antlr4-python3-runtime 4.9.3 and torchao, e.g. `pip download torchao==0.18.0
# --no-deps -d .whl`); they are installed into a temp dir below when either is missing.
#
# Rows run micro-batch by micro-batch, the recipe's first; compilation (tens of seconds per row on
# a GPU) is most of the time. The table part runs under `timeout` and its own --time-budget (rows
# not started in time are listed as skipped, so it still prints its table); the checkpoint
# benchmark follows only if time is left. BATCHES=32,64 overrides the micro-batches.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL=${TOTAL_SECONDS:-480}  # the whole script's budget
T0=$SECONDS
left() { echo $((TOTAL - (SECONDS - T0))); }

# [MIN_S=S] run NAME BUDGET_S CMD...: at most BUDGET_S (and never past the total), log to
# $OUT/NAME.log; skipped when less than MIN_S (default 30) is left.
run() {
  local name=$1 budget=$2; shift 2
  local limit=$(( budget < $(left) ? budget : $(left) ))
  if (( limit < ${MIN_S:-30} )); then echo "== $name: skipped, $(left)s left of ${TOTAL}s" | tee -a "$OUT/summary.txt"; return; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  timeout -k 15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - T0))s" | tee -a "$OUT/summary.txt"
}

{
  date -Is
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
  git rev-parse --short HEAD 2>/dev/null && git status --short | head -20
} 2>&1 | tee "$OUT/env.txt"

NO_TIMM=()
if ! "$PY" -c 'import timm' 2>/dev/null; then
  echo "timm is not importable; trying pip (the machine may have no internet)" | tee -a "$OUT/env.txt"
  if ! timeout 90 "$PY" -m pip install --retries 0 --timeout 10 timm 2>&1 | tail -2 | tee -a "$OUT/env.txt" \
     || ! "$PY" -c 'import timm' 2>/dev/null; then
    echo "no timm: the timm baseline rows are skipped, ours still runs" | tee -a "$OUT/env.txt"
    NO_TIMM=(--no-timm)
  fi
fi
"$PY" -c 'import timm; print("timm", timm.__version__)' 2>&1 | tee -a "$OUT/env.txt"
if ! "$PY" -c 'import omegaconf, torchao' 2>/dev/null && compgen -G '.whl/*.whl' > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/vit-deps .whl/*.whl 2>&1 | tail -2 | tee -a "$OUT/env.txt"
  export PYTHONPATH=/tmp/vit-deps${PYTHONPATH:+:$PYTHONPATH}
fi
if ! PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} "$PY" -c 'import vit.engine.train' 2>&1 | tee -a "$OUT/env.txt"; then
  echo "vit.engine.train does not import: carry .whl (omegaconf) or 'pip install -e .'" | tee -a "$OUT/env.txt"
fi

# DRY=1: the same flow with tiny models on any machine, to check this script.
DRY_ARGS=(); [[ -n "${DRY:-}" ]] && DRY_ARGS=(--tiny)
# No code generation in a dry run: what it checks is the flow (and guards), not the kernels.
COMPILE_ARGS=(); [[ -n "${DRY:-}" ]] && COMPILE_ARGS=(--compile-backend aot_eager)
RECIPE_BATCH=$("$PY" -c 'import yaml; print(yaml.safe_load(open("conf/pretrain.yaml"))["train"]["micro_batch"])')
BATCHES=${BATCHES:-$RECIPE_BATCH,32,64}
STEP=(benchmarks/train_step.py --model vit_huge_patch14 "${NO_TIMM[@]}" "${DRY_ARGS[@]}" "${COMPILE_ARGS[@]}")
run speed_options 400 "$PY" "${STEP[@]}" --rows base,compile,compile-sac,compile-float8 --batch "$BATCHES" \
  --warmup 2 --steps 3 --rounds 3 --time-budget 330 --out "$OUT/speed_options.md"
# The state in host memory (the disk's part alone), then in GPU memory as the loop saves it (adds
# the device-to-host copies, and async save's staging into pinned memory). The host-memory part
# needs no GPU and is measured on CPU machines; here only the GPU part runs, if time is left.
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  MIN_S=100 run checkpoint_cuda 150 "$PY" benchmarks/checkpoint.py --device cuda --model vit_huge_patch14 --no-dd \
    --dir "${CKPT_DIR:-/tmp}" --out "$OUT/checkpoint_cuda.md" "${DRY_ARGS[@]}"
fi

echo "done in $((SECONDS - T0))s; results in $OUT" | tee -a "$OUT/summary.txt"
echo
cat "$OUT/speed_options.md" 2>/dev/null || echo "no table: see $OUT/speed_options.log"
