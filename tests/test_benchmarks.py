"""The benchmark scripts run end to end in their `--tiny` mode and print their tables.

Smoke tests only: no timing is asserted (this machine's speed is not the code's property).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: float = 120) -> str:
    # CPU everywhere, and a group of one even when the tests themselves run under torchrun.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_train_step_tiny(tmp_path):
    out = run("train_step.py", "--rows", "base,fsdp-per-block,no-fsdp", "--out", str(tmp_path / "step.md"))
    assert "command: `python " in out and "train_step.py --tiny --rows base,fsdp-per-block,no-fsdp --out" in out
    assert ("| model | row | impl | batch | step ms | best ms | img/s | TFLOP/s | MFU | peak mem GB | ours/timm img/s "
            "| ours/timm eager |") in out
    assert "| vit_tiny_patch16 | base | ours | 2 |" in out and "| vit_tiny_patch16 | base | timm | 2 |" in out
    assert "ratio ours/timm (img/s) vit_tiny_patch16 base batch 2:" in out
    assert "| vit_tiny_patch16 | fsdp-per-block | ours | 2 |" in out and "| vit_tiny_patch16 | no-fsdp | ours | 2 |" in out
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"ours", "timm"} and all(r["status"] == "ok" for r in rows)
    assert all("ratio" in r for r in rows if r["impl"] == "ours") and len(rows) == 6
    assert "| vit_tiny_patch16 | base | ours |" in (tmp_path / "step.md").read_text()


def test_gpu_script_dry_run_prints_the_speed_options_table(tmp_path):
    """`DRY=1 bash benchmarks/gpu.sh` on CPU: every row of the GPU table runs on a tiny model (float8
    emulated, compiled with aot_eager), and the script ends with that one table."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DRY="1", BATCHES="32", OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="", TOTAL_SECONDS="300")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=330)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = r.stdout[r.stdout.rindex("train_step benchmark"):]
    assert "--rows base,compile,compile-sac,compile-float8 --batch 32" in table
    rows = json.loads((tmp_path / "speed_options.json").read_text())["rows"]
    assert [(r["row"], r["impl"]) for r in rows] == [("base", "ours"), ("base", "timm"), ("compile", "ours"),
                                                     ("compile", "timm"), ("compile-sac", "ours"),
                                                     ("compile-float8", "ours")]
    assert all(r["status"] == "ok" for r in rows), rows
    ours = [r for r in rows if r["impl"] == "ours"]
    assert all(r["vs_timm_eager"] > 0 for r in ours) and all("ratio" in r for r in ours[:2])
    for r in rows:
        assert f"| vit_tiny_patch16 | {r['row']} | {r['impl']} | 2 |" in table


def test_fsdp_host_time_tiny():
    out = run("fsdp_host_time.py")
    assert "| blocks per unit | reshard after forward | step ms | vs FSDP2 defaults |" in out
    assert "| 1 | yes |" in out and out.count("| no |") == 4 and "| 1.00 |" in out
    assert "| once per micro-batch |" in out and "| once per step |" in out


def test_checkpoint_tiny(tmp_path):
    work = tmp_path / "disk"
    work.mkdir()
    out = run("checkpoint.py", "--dir", str(work), "--out", str(tmp_path / "ckpt.md"))
    for text in ("disk sequential write", "disk sequential read", "Checkpointer.save", "Checkpointer.load_latest",
                 "of the disk's write speed", "async save: loop blocked"):
        assert text in out
    res = json.loads((tmp_path / "ckpt.json").read_text())
    assert res["save_gbs"] > 0 and res["load_gbs"] > 0 and res["async_blocked_fraction"] > 0
    assert list(work.iterdir()) == []  # everything it wrote is gone
