"""Every Slurm command the toolkit runs (squeue, scontrol), each in one place, and what it reads from
them: a job's state and time left, the live jobs of a run directory, the first node's address.
Free of torch: the node agent imports it. The jobs themselves are submitted by submitit (the Hydra
launcher) or by the user's sbatch.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

from vit.journal import read_journal


def squeue(job_ids: list[str], fields: str, timeout: float = 60) -> list[list[str]] | None:
    """squeue's rows (`fields` is its -o format) for the jobs it still knows; None when it does not
    answer. All IDs unknown (long gone) is an error with nothing on stdout: no rows."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", fields], capture_output=True,
                             text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.split() for line in out.stdout.splitlines() if line.strip()]


def scontrol_show(kind: str, name: str, timeout: float = 60) -> dict[str, str]:
    """`scontrol show -o KIND NAME` as key=value fields; {} when it does not answer."""
    try:
        out = subprocess.run(["scontrol", "show", "-o", kind, name], capture_output=True, text=True,
                             timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def job_state(job_id: str | None, timeout: float = 10.0) -> str | None:
    """squeue while the job is known to the controller, scontrol after; None without Slurm."""
    if not job_id or not shutil.which("squeue"):
        return None
    rows = squeue([str(job_id)], "%T", timeout)
    if rows:
        return rows[0][0]
    return scontrol_show("job", str(job_id), timeout).get("JobState")


def scontrol_requeue(job_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=120)


def first_node_address() -> str:
    """Address of the first host in SLURM_JOB_NODELIST: the c10d rendezvous runs there."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    host = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True, timeout=60).stdout.split()[0]
    # A node's name need not resolve (several slurmd on one host, or site naming): ask Slurm.
    return scontrol_show("node", host).get("NodeAddr", host)


# squeue also lists a job for a few minutes after it ended (MinJobAge); any other state may still train.
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY"}
WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT", "RESV_DEL_HOLD"}


def jobs_of_run(run_dir: str | os.PathLike) -> dict[str, str]:
    """The Slurm jobs submitted for or started in this run directory that have not ended: ID -> state.
    Empty when squeue does not answer (the check it serves must not block a submission)."""
    ids = {e["job_id"] for e in read_journal(run_dir) if e["event"] in ("submit", "job_start") and e.get("job_id")}
    if not ids:
        return {}
    jobs = dict(row for row in squeue(sorted(ids), "%i %T") or [] if len(row) == 2)
    return {job: state for job, state in jobs.items() if state not in ENDED}


def time_left_s(job_id: str) -> float | None:
    """Seconds to the job's time limit: squeue's answer, else the end time Slurm put in the job's
    environment; None if neither is known (a slow or failing squeue must not cost the decision)."""
    rows = squeue([job_id], "%L")
    text = rows[0][0] if rows else ""
    if text in ("UNLIMITED", "NOT_SET", "INVALID"):
        return None
    if not text:
        end = os.environ.get("SLURM_JOB_END_TIME", "")
        return float(end) - time.time() if end.isdigit() and int(end) > 0 else None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def submitit_python() -> str:
    """The interpreter command for submitit's task on each node: it blocks USR2 and execs the real
    interpreter. Until `NodeAgent.run` installs its handler, the task spends seconds importing and
    unpickling, and USR2's default action would kill it: a preemption then failed the job instead
    of requeueing it. Blocked, the signal stays pending (masks survive exec) until the agent unblocks it.
    """
    boot = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2}); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(boot)}"
