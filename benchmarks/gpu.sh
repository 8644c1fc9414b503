#!/usr/bin/env bash
# Every GPU benchmark in one prepared run for a single H100/H200, within about 8 minutes.
#
#   pip install -e .  &&  bash benchmarks/gpu.sh          # from the repo root; results under $OUT
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

# run NAME BUDGET_S CMD...: at most BUDGET_S (and never past the total), log to $OUT/NAME.log.
run() {
  local name=$1 budget=$2; shift 2
  local limit=$(( budget < $(left) ? budget : $(left) ))
  if (( limit < 30 )); then echo "== $name: skipped, $(left)s left of ${TOTAL}s" | tee -a "$OUT/summary.txt"; return; fi
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
if ! "$PY" -c 'import vit.train' 2>&1 | tee -a "$OUT/env.txt"; then
  echo "vit.train does not import: run 'pip install -e .' first" | tee -a "$OUT/env.txt"
fi

# DRY=1: the same flow with tiny models on any machine, to check this script.
DRY_ARGS=(); [[ -n "${DRY:-}" ]] && DRY_ARGS=(--tiny)
STEP=(benchmarks/train_step.py --model vit_huge_patch14 "${NO_TIMM[@]}" "${DRY_ARGS[@]}")
run step_rows 170 "$PY" "${STEP[@]}" --rows base,fsdp-per-block,ac,sdpa --batch 64 --warmup 2 --steps 3 --rounds 4 \
  --time-budget 130 --out "$OUT/step_rows.md"
run step_sweep 150 "$PY" "${STEP[@]}" --rows sweep --batches 32,64,96,128,192,256 --warmup 1 --steps 2 --rounds 3 \
  --time-budget 110 --out "$OUT/step_sweep.md"
run step_compile 170 "$PY" "${STEP[@]}" --rows compile --batch 64 --warmup 2 --steps 3 --rounds 4 \
  --out "$OUT/step_compile.md"
# The state in host memory (the disk's part alone), then in GPU memory as the loop saves it (adds
# the device-to-host copies, and async save's staging into pinned memory).
run checkpoint 140 "$PY" benchmarks/checkpoint.py --model vit_huge_patch14 --dir "${CKPT_DIR:-/tmp}" \
  --out "$OUT/checkpoint.md" "${DRY_ARGS[@]}"
if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  run checkpoint_cuda 150 "$PY" benchmarks/checkpoint.py --device cuda --model vit_huge_patch14 --no-dd \
    --dir "${CKPT_DIR:-/tmp}" --out "$OUT/checkpoint_cuda.md" "${DRY_ARGS[@]}"
fi

echo "done in $((SECONDS - T0))s; results in $OUT" | tee -a "$OUT/summary.txt"
