#!/usr/bin/env bash
# Every GPU benchmark in one prepared run for a single H100/H200, within about 8 minutes.
#
#   bash benchmarks/gpu.sh          # from the repo root; results under $OUT (DRY=1: tiny, any machine)
#
# The lent H200's image has torch, timm, numpy, PIL and yaml but not omegaconf, and no package index:
# carry the git-ignored wheel folder along (device tool: carry [".whl"], holding omegaconf 2.3.0 and
# antlr4-python3-runtime 4.9.3); they are installed into a temp dir below when omegaconf is missing.
#
# Order is by value per second: the A/B step rows at sg_h100's micro-batch 64 (base, with the
# recipe's `fsdp` wrapping; FSDP2's per-block defaults, which it replaces; activation checkpointing;
# SDPA backends), the micro-batch sweep with and without AC, the torch.compile row (slow to warm up: it
# gets its own budget), then the checkpoint benchmarks if time is left. On an H200 the same parts
# (rows at 32, without fsdp-per-block) took 281 s; checkpoint_cuda should take about 2 minutes.
# Each part runs under `timeout` and its own --time-budget (rows not started in time are listed as
# skipped, so a part still prints its table), and a failing part does not stop the others.
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
if ! "$PY" -c 'import omegaconf' 2>/dev/null && compgen -G '.whl/*.whl' > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/vit-deps .whl/*.whl 2>&1 | tail -2 | tee -a "$OUT/env.txt"
  export PYTHONPATH=/tmp/vit-deps${PYTHONPATH:+:$PYTHONPATH}
fi
if ! PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} "$PY" -c 'import vit.train' 2>&1 | tee -a "$OUT/env.txt"; then
  echo "vit.train does not import: carry .whl (omegaconf) or 'pip install -e .'" | tee -a "$OUT/env.txt"
fi

# DRY=1: the same flow with tiny models on any machine, to check this script.
DRY_ARGS=(); [[ -n "${DRY:-}" ]] && DRY_ARGS=(--tiny)
STEP=(benchmarks/train_step.py --model vit_huge_patch14 "${NO_TIMM[@]}" "${DRY_ARGS[@]}")
run step_rows 170 "$PY" "${STEP[@]}" --rows base,fsdp-per-block,ac,sdpa --batch 64 --warmup 2 --steps 3 --rounds 4 \
  --time-budget 130 --out "$OUT/step_rows.md"
run step_sweep 150 "$PY" "${STEP[@]}" --rows sweep --batches 64,128,192,256 --warmup 1 --steps 2 --rounds 3 \
  --time-budget 110 --out "$OUT/step_sweep.md"
run step_compile 170 "$PY" "${STEP[@]}" --rows compile --batch 64 --warmup 2 --steps 3 --rounds 4 \
  --time-budget 120 --out "$OUT/step_compile.md"
# The state in host memory (the disk's part alone), then in GPU memory as the loop saves it (adds
# the device-to-host copies, and async save's staging into pinned memory). The host-memory part
# needs no GPU and is measured on CPU machines; here only the GPU part runs, if time is left.
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  MIN_S=100 run checkpoint_cuda 150 "$PY" benchmarks/checkpoint.py --device cuda --model vit_huge_patch14 --no-dd \
    --dir "${CKPT_DIR:-/tmp}" --out "$OUT/checkpoint_cuda.md" "${DRY_ARGS[@]}"
fi

echo "done in $((SECONDS - T0))s; results in $OUT" | tee -a "$OUT/summary.txt"
