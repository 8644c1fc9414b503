"""What runs on each Slurm node: torchrun for the workers, the stop signal path, and the requeue decision.

One task per node runs a `NodeAgent`: started by submitit for the Hydra launcher, or by `srun` in the
plain sbatch scripts as `python -m vit.cluster.agent --run-dir DIR -- SCRIPT [ARGS]`. The signal path:

  Slurm --signal=USR2@lead (time limit; preemption with preempt_send_user_signal)
    -> this agent (and maybe other processes of the step), which forwards USR2 to every process under torchrun
    -> torchrun itself ignores USR2 (its elastic agent would die of it; it handles only TERM/INT/HUP/QUIT)
    -> each worker's handler sets a flag; the ranks all-reduce it at the next step boundary,
       all save the same step, and exit 0
    -> the agent on node 0 reads <run_dir>/status.json and requeues the job (`scontrol requeue`),
       unless the run completed, hit its requeue limit, or keeps failing without a new checkpoint.

torchrun runs as a child process rather than in-process (`elastic_launch`), so that it can be
shielded from USR2 and so that a crash of the workers never takes the agent's decision with it. It
runs as `python -m vit.cluster.torchrun`, which reports a failed worker in one line.
A submitit task starts with USR2 blocked (`submitit_python`) until the agent's handler is in place.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from vit.cluster.slurm import WAITING, first_node_address, jobs_of_run, scontrol_requeue, time_left_s
from vit.journal import Journal
from vit.run_dir import STATUS, latest_checkpoint_step, read_jsonl, read_status, requeue_log, slurm_dir

# The node agent's defaults for the plain sbatch scripts; the Hydra launcher passes cluster.* instead.
MAX_REQUEUES = 40  # a 3-week run in 48 h allocations needs 11; the rest is room for slow or lost steps
SIGNAL_LEAD_S = 300  # as in the scripts' `#SBATCH --signal=USR2@300` (tests/test_sbatch.py checks it)

# --- rendezvous ---------------------------------------------------------------------------------

def rendezvous_port(job_id: str) -> int:
    """Stable across requeues (the job ID is kept) and unlikely to collide between jobs on a node."""
    return 20000 + int("".join(c for c in job_id if c.isdigit()) or 0) % 20000


def torchrun_command(worker: list[str], procs_per_node: int) -> list[str]:
    job_id = os.environ["SLURM_JOB_ID"]
    return [
        sys.executable, "-m", "vit.cluster.torchrun",
        f"--nnodes={os.environ.get('SLURM_JOB_NUM_NODES', '1')}",
        f"--nproc-per-node={procs_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={first_node_address()}:{rendezvous_port(job_id)}",
        f"--rdzv-id={job_id}", "--max-restarts=0",
        *worker,
    ]


def descendants(pid: int) -> list[int]:
    """All processes below `pid`, from /proc (Slurm nodes are Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # exited meanwhile
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


# --- requeue policy -----------------------------------------------------------------------------

# Slurm enforces limits and sends signals on a ~30 s tick: its time-limit USR2 comes up to this much
# early (or late), and its time-limit SIGTERM never earlier than this before the limit.
LIMIT_SLACK_S = 60


def classify_stop(kind: str | None, seconds_left: float | None, signal_lead_s: float) -> str:
    """time_limit: the USR2 warning came within the lead time of the limit; otherwise a preemption.
    SIGTERM is never a warning: it is scancel, or Slurm ending the job."""
    if kind in ("step_limit", "term"):
        return kind
    if seconds_left is not None and seconds_left <= signal_lead_s + LIMIT_SLACK_S:
        return "time_limit"
    return "preemption" if kind == "usr2" else (kind or "unknown")


def read_log(run_dir: Path) -> list[dict]:
    """The requeue log's records; a line torn by a kill mid-write is left out rather than making every
    later requeue decision fail."""
    return read_jsonl(requeue_log(run_dir))


def requeue_decision(status: dict, cause: str | None, history: list[dict], max_requeues: int,
                     crash_loop_limit: int, checkpoint: int | None = None) -> tuple[bool, str]:
    """Whether to requeue after the workers ended, and why (the reason is logged and shown to the user).

    A crash loop is `crash_loop_limit` failures in a row with no new checkpoint in between
    (`checkpoint` is the newest one's step now; failures record theirs). Progress is judged by
    checkpoints, not by the error text, which often differs between equal failures (a peer's port
    in a connection error) or is unknown (a rank killed before it could write its status).
    """
    state = status.get("state")
    if state == "completed":
        return False, "training completed"
    if state == "stopped" and cause == "term":
        # SIGTERM without the USR2 warning: scancel, or Slurm ending the job, which requeues preempted
        # jobs itself. At a time limit USR2 always comes first (--signal), so nothing is lost here.
        return False, (f"stopped by SIGTERM at step {status.get('step')} (scancel or Slurm ending the job); "
                       "the same submission resumes from its checkpoint")
    if status.get("user_error"):
        return False, f"configuration or data error, fix it and resubmit: {status.get('error')}"
    if state == "stopped":
        timeouts = sum(1 for h in history if h.get("cause") == "time_limit")
        if cause == "time_limit" and timeouts >= max_requeues:
            return False, f"reached cluster.max_requeues={max_requeues} time-limit requeues; raise it and resubmit"
        return True, f"stopped ({cause}) at step {status.get('step')}"
    recent = history[len(history) - crash_loop_limit + 1:] if crash_loop_limit > 1 else []
    if len(recent) == crash_loop_limit - 1 and all(
            h.get("cause") == "failure" and h.get("checkpoint", "unknown") == checkpoint for h in recent):
        since = f"the checkpoint of step {checkpoint}" if checkpoint is not None else "the start, with no checkpoint yet"
        return False, (f"crash loop: {crash_loop_limit} failures in a row since {since} (last at step "
                       f"{status.get('step')}: {status.get('error')}); not requeueing "
                       f"(cluster.crash_loop_limit={crash_loop_limit})")
    return True, f"failed at step {status.get('step')} ({status.get('error')})"


# --- the node agent -----------------------------------------------------------------------------

class NodeAgent:
    def __init__(self, worker: list[str], run_dir: str, procs_per_node: int, max_requeues: int,
                 crash_loop_limit: int, signal_lead_s: float):
        self.worker, self.run_dir, self.procs_per_node = worker, Path(run_dir), procs_per_node
        self.max_requeues, self.crash_loop_limit, self.signal_lead_s = max_requeues, crash_loop_limit, signal_lead_s
        self.job_id = os.environ["SLURM_JOB_ID"]
        self.node_id = int(os.environ.get("SLURM_NODEID", 0))
        self.stop_kind: str | None = None
        self.stop_cause: str | None = None
        self.stop_time: float | None = None
        self.term_after_usr2: float | None = None  # when a SIGTERM followed the USR2 (monotonic)
        self.limit_at: float | None = None  # when the time limit falls (monotonic), once known
        self.proc: subprocess.Popen | None = None
        self.last_forward = 0.0
        self.journal = Journal(run_dir)

    def log(self, message: str) -> None:
        print(f"[vit.cluster.agent job {self.job_id} node {self.node_id}] {message}", flush=True)

    def _on_signal(self, signum, frame) -> None:
        # Only flags here; forwarding, the squeue call and logging happen in the wait loop.
        if self.stop_kind is None:
            self.stop_kind, self.stop_time = ("usr2" if signum == signal.SIGUSR2 else "term"), time.monotonic()
        elif signum == signal.SIGTERM and self.stop_kind == "usr2":
            self.term_after_usr2 = time.monotonic()

    def _note_stop(self) -> None:
        if self.node_id == 0:  # classified once, while the job still runs: squeue knows its time left
            seconds_left = time_left_s(self.job_id)
            self.stop_cause = classify_stop(self.stop_kind, seconds_left, self.signal_lead_s)
            if seconds_left is not None:
                self.limit_at = time.monotonic() + seconds_left
        self.log(f"received SIG{'USR2' if self.stop_kind == 'usr2' else 'TERM'} ({self.stop_cause or self.stop_kind}); "
                 "asking the workers to checkpoint and stop")

    def _forward(self) -> None:
        """USR2 to torchrun's whole tree: its workers run in sessions of their own, so a process-group
        signal would miss them, and Slurm's --signal may reach only this task."""
        self.last_forward = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            for pid in [self.proc.pid, *descendants(self.proc.pid)]:
                try:
                    os.kill(pid, signal.SIGUSR2)  # workers turn USR2 into a coordinated stop
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})  # one held since start arrives now
        slurm_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        if self.node_id == 0:
            # Another job training here (e.g. a second sbatch of the same script): leave the run to it,
            # its status and checkpoints untouched. One still waiting in the queue will find this one.
            other = {j: s for j, s in jobs_of_run(self.run_dir).items() if j != self.job_id and s not in WAITING}
            if other:
                job_id, state = min(other.items())
                self.log(f"not training: job {job_id} ({state}) trains in {self.run_dir}; this job ends here")
                return 1
            (self.run_dir / STATUS).unlink(missing_ok=True)  # a stale status must not steer the decision
        cmd = torchrun_command(self.worker, self.procs_per_node)
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        self.log(f"restart {restart}: {shlex.join(cmd)}")
        if self.node_id == 0:
            self.journal.write("job_start", None, procs_per_node=self.procs_per_node,
                               num_nodes=int(os.environ.get("SLURM_JOB_NUM_NODES", 1)))

        def shield():  # torchrun's elastic agent would die of USR2; the workers install their own handler
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)

        self.proc = subprocess.Popen(cmd, preexec_fn=shield, start_new_session=True)
        noted = False
        while (code := self.proc.poll()) is None:
            time.sleep(0.5)
            if self.stop_kind is not None and not noted:
                noted = True
                self._forward()
                self._note_stop()
            # Workers that were still starting when the signal came ignored it (they inherit the
            # shield until their handler is installed): repeat it until they have all stopped.
            elif self.stop_kind is not None and time.monotonic() - self.last_forward >= 5:
                self._forward()
        if self.stop_time is not None:
            if not noted:
                self._note_stop()
            self.log(f"workers exited {code} {self._stop_seconds():.1f}s after the stop signal")
        if self.node_id != 0:
            ended_well = code == 0 or self._status().get("state") in ("completed", "stopped")
            if not ended_well:
                self._leave_the_decision_to_node_0()
            return 0 if ended_well else 1
        return self.decide(code)

    def _leave_the_decision_to_node_0(self, wait_s: float = 120) -> None:
        """This node's workers failed. Exiting non-zero now would make srun (--kill-on-bad-exit) end
        the step on node 0 too, before its agent has decided to requeue: so wait until rank 0 has
        reported the failure (its peers' collectives fail once these workers are gone) and the
        agent there had time to decide, which ends this job if it requeues it."""
        deadline = time.monotonic() + wait_s
        while not (self.run_dir / STATUS).exists() and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(min(30.0, max(0.0, deadline - time.monotonic())))

    def _requeue(self, attempts: int = 4, wait_s: float = 5) -> str | None:
        """`scontrol requeue`, retried for 35 s: a busy or restarting slurmctld must not end a 3-week
        run, and the job must still be running (within its time limit) when it is requeued.
        Returns None on success, else the last error."""
        error = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(wait_s * 2 ** (attempt - 1))
            try:
                out = scontrol_requeue(self.job_id)
            except (OSError, subprocess.SubprocessError) as e:
                error = str(e)
                continue
            if out.returncode == 0:
                return None
            error = (out.stderr or out.stdout).strip() or f"exit status {out.returncode}"
            self.log(f"scontrol requeue failed (attempt {attempt + 1} of {attempts}): {error}")
        return error

    def _status(self) -> dict:
        return read_status(self.run_dir)

    def _stop_seconds(self) -> float | None:
        return None if self.stop_time is None else time.monotonic() - self.stop_time

    def _term_was_not_the_time_limit(self) -> bool:
        """A SIGTERM during the stop is scancel (Slurm requeues even a cancelled job on request) or
        the end of a preemption's grace time (Slurm requeues the job itself): unless it is the time
        limit's own, which comes at the limit and ends the run if the job is not requeued."""
        if self.term_after_usr2 is None:
            return False
        if self.stop_cause == "preemption":
            return True
        return self.stop_cause == "time_limit" and self.limit_at is not None \
            and self.term_after_usr2 < self.limit_at - LIMIT_SLACK_S

    def decide(self, code: int) -> int:
        status = self._status()
        if code != 0:
            self.log(f"workers exited with code {code}")
        # "completed" and "stopped" are written only after a checkpoint is committed on every rank, so
        # they stand even if a process then died on its way out (torchrun exits 1 on SIGTERM).
        if status.get("state") not in ("completed", "stopped"):
            status = {**status, "state": "failed", "error": status.get("error")
                      or f"workers exited with code {code} (killed or crashed)"}
        cause = self.stop_cause or classify_stop(status.get("stop"), None, self.signal_lead_s)
        cause = cause if status.get("state") == "stopped" else "failure"
        checkpoint = latest_checkpoint_step(self.run_dir)
        requeue, reason = requeue_decision(status, cause, read_log(self.run_dir), self.max_requeues,
                                           self.crash_loop_limit, checkpoint)
        if requeue and self._term_was_not_the_time_limit():
            requeue, reason = False, (f"SIGTERM after the stop signal at step {status.get('step')} (scancel, or "
                                      "Slurm ending a preempted job, which it requeues itself)")
        if requeue:
            self.log(f"requeueing: {reason}")
            # Logged first: once requeued, Slurm ends this job's processes, and the log is what the
            # limits and the crash-loop check count. Taken back if the requeue fails.
            log = requeue_log(self.run_dir)
            before = log.stat().st_size if log.exists() else 0
            with open(log, "a") as f:
                f.write(json.dumps({"time": time.time(), "job_id": self.job_id, "restart": int(
                    os.environ.get("SLURM_RESTART_COUNT", 0)), "cause": cause, "step": status.get("step"),
                    "checkpoint": checkpoint, "error": status.get("error")}) + "\n")
            error = self._requeue()
            if error is None:
                self.journal.write("requeue", status.get("step"), cause=cause, reason=reason,
                                   stop_seconds=self._stop_seconds())
                return 0
            os.truncate(log, before)
            reason = f"scontrol requeue {self.job_id} failed ({error}); requeue the job by hand"
        self.log(f"not requeueing: {reason}")
        self.journal.write("agent_exit", status.get("step"), state=status.get("state"), reason=reason)
        return 0 if status.get("state") == "completed" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vit.cluster.agent", description="Run one node of a Slurm job: torchrun over SCRIPT with the "
        "rendezvous from the Slurm environment, the stop-signal path, and the requeue decision (node 0).")
    parser.add_argument("--run-dir", required=True, help="the run directory SCRIPT writes (status.json, checkpoints)")
    parser.add_argument("--procs-per-node", type=int, default=1, help="ranks on this node (one per GPU)")
    # The defaults of the plain sbatch scripts (sbatch/common.sh passes these only when they are set).
    parser.add_argument("--max-requeues", type=int, default=MAX_REQUEUES, help="time-limit requeues before giving up")
    parser.add_argument("--crash-loop-limit", type=int, default=3,
                        help="failures in a row without a new checkpoint before requeueing stops")
    parser.add_argument("--signal-lead-s", type=float, default=SIGNAL_LEAD_S, help="the lead of sbatch --signal=USR2@LEAD")
    parser.add_argument("worker", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...], run by torchrun on every rank")
    args = parser.parse_args(argv)
    worker = args.worker[1:] if args.worker[:1] == ["--"] else args.worker
    if not worker or "SLURM_JOB_ID" not in os.environ:
        parser.error("needs -- SCRIPT [ARGS...] and must run inside a Slurm job (srun)")
    return NodeAgent(worker, args.run_dir, args.procs_per_node, args.max_requeues, args.crash_loop_limit,
                     args.signal_lead_s).run()


if __name__ == "__main__":
    sys.exit(main())
