"""The run journal: `<run_dir>/journal.jsonl`, an append-only record of what happened to a run.

Writers take turns and never overlap: the submitting process (`submit`), then per allocation the
node-0 agent (`job_start`), rank 0 of the workers (`resume`, `metrics`, `checkpoint_begin`,
`checkpoint_commit`, `stop_signal`, `evaluation`, `exit`, `crash`), and the node-0 agent again
once the workers have exited (`requeue`, `agent_exit`). Lines are appended and never rewritten,
so the file survives requeues and hard kills. A torn last line (a kill mid-write, a short write on
a network filesystem) is skipped by readers, and the next writer starts a new line after it
rather than gluing its event onto it.

Every event carries the UTC time, the Slurm job ID, the restart count, the node list and the step.
"""
from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from vit.run_dir import JOURNAL, read_jsonl


class Journal:
    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(run_dir) / JOURNAL
        self.enabled = enabled

    def write(self, event: str, step: int | None = None, **fields) -> None:
        if not self.enabled:
            return
        record = {
            "event": event,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "unix": time.time(),
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "nodes": os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()),
            "step": step,
            **fields,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def read_journal(run_dir: str | os.PathLike) -> list[dict]:
    return read_jsonl(Path(run_dir) / JOURNAL)

