"""Run the real entry points as subprocesses on tiny configs and read what they wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny ViT on 32-px synthetic images: a step takes milliseconds, a run is mostly process start-up.
TINY = [
    "experiment=smoke", "data.img_size=32", "data.num_samples=256", "train.global_batch=16",
    "train.micro_batch=8", "train.log_every=1", "optim.warmup_steps=2", "checkpoint.every_steps=4",
    "train.progress=false",
]


def run_job(run_dir: Path, *overrides: str, nproc: int = 1, env: dict | None = None, timeout: float = 300,
            check: bool = True, script: str = "jobs/pretrain.py", tiny: bool = True) -> subprocess.CompletedProcess:
    args = [f"run_dir={run_dir}", *(TINY if tiny else []), *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(ROOT / script), *args]
    else:
        cmd = [sys.executable, str(ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends, and a repeated step keeps its latest value."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:  # evaluation records carry val_top1/val_top5 instead
            out[record["step"]] = record["loss"]
    return out
