"""The run directory: every path under it, and its small records. Free of torch (the node agent reads it).

    <run_dir>/
      status.json            how the last training process ended (rank 0; any rank for a user error)
      journal.jsonl          append-only record of what happened to the run (vit/journal.py), the
                             training metrics of every logged step and every evaluation included
      checkpoints/step-N/    sharded checkpoints (vit/engine/checkpoint.py); checkpoints/latest names the newest
      eval/step-N.json       evaluations; eval/latest.json is the newest
      slurm/                 job logs, the composed config of each job, requeues.jsonl (the agent's decisions)

A run directory written by an older version of the toolkit has the same layout and resumes as is.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

STATUS = "status.json"
JOURNAL = "journal.jsonl"
REQUEUE_LOG = "requeues.jsonl"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def eval_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "eval"


def evaluation_file(run_dir: str | os.PathLike, step: int) -> Path:
    return eval_dir(run_dir) / f"step-{step}.json"


def slurm_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "slurm"


def requeue_log(run_dir: str | os.PathLike) -> Path:
    return slurm_dir(run_dir) / REQUEUE_LOG


def step_of(path: str | os.PathLike) -> int | None:
    """N for a `step-N` name, else None."""
    name = Path(path).name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def latest_checkpoint_step(run_dir: str | os.PathLike) -> int | None:
    """The step named by `checkpoints/latest` (rewritten after every commit)."""
    try:
        return step_of((checkpoints_dir(run_dir) / "latest").read_text().strip())
    except OSError:
        return None


def write_status(run_dir: str | os.PathLike, **status) -> None:
    """How the last training process ended (read by the requeue decision), replaced atomically."""
    path = Path(run_dir) / STATUS
    tmp = path.with_name(f"{STATUS}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"time": time.time(), **status}))
        os.replace(tmp, path)
    except OSError as e:  # e.g. the disk that just filled up: the error being reported matters more
        tmp.unlink(missing_ok=True)
        print(f"warning: could not write {path}: {e}", file=sys.stderr, flush=True)


def read_status(run_dir: str | os.PathLike) -> dict:
    """{} when absent: the rank died before writing it."""
    try:
        return json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def read_jsonl(path: Path) -> list[dict]:
    """The records of an append-only JSON-lines file; a line torn by a kill mid-write is left out."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_evaluation(run_dir: str | os.PathLike, step: int, metrics: dict) -> Path:
    """`<run_dir>/eval/step-N.json` and `eval/latest.json`: the full result, per-class values included."""
    out, path = eval_dir(run_dir), evaluation_file(run_dir, step)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"step": step, **metrics}, indent=1)
    path.write_text(text)
    (out / "latest.json.tmp").write_text(text)
    (out / "latest.json.tmp").replace(out / "latest.json")
    return path


# Keys conf/ gained after runs were saved without them, with the value the code then used (the
# recipe's own values live in conf/ only). A checkpoint's saved config is read with them filled in,
# so an older run is checked, resumed and exported as it trained. By task; None: every task.
ADDED_SINCE_SAVED = {
    None: {"data.interpolation": "bilinear"},
    "ade20k": {"task.window_size": 0, "task.use_rel_pos": False},  # global attention in every block
}


def complete_saved_config(config: dict) -> dict:
    """`config` (a checkpoint's) with the keys of ADDED_SINCE_SAVED it lacks."""
    task = (config.get("task") or {}).get("name")
    for key, value in {**ADDED_SINCE_SAVED[None], **ADDED_SINCE_SAVED.get(task, {})}.items():
        *parents, leaf = key.split(".")
        tree = config
        for part in parents:
            tree = tree.setdefault(part, {})
        tree.setdefault(leaf, value)
    return config
