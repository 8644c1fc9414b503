"""Helpers for tests that run real jobs on the local Slurm minicluster.

The cluster comes from ``dev/minicluster.sh`` (two nodes on this machine,
partitions ``debug`` (default, preemptible, GraceTime=60) and ``urgent``).
Typical use in a test::

    env = ensure_cluster()
    job = sbatch(["-N2", "--wrap", "srun hostname"], env, cwd=tmp_path)
    state = wait_job(job, env)
    assert state["JobState"] == "COMPLETED", dump_logs(env)

Facts about Slurm 22.05 these helpers account for:

* A requeued job waits PENDING with ``Reason=BeginTime`` for about 2 minutes
  (the credential lifetime). ``wait_job`` releases it with
  ``scontrol update JobId=N StartTime=now`` so tests do not sit idle, but only a
  few seconds after the requeue: a relaunch within the second of the requeue is
  killed as "non-startable batch job: Job credential revoked" and ends FAILED.
* There is no slurmdbd, so ``sacct`` does not work; job state comes from
  ``scontrol show job``, which keeps finished jobs for MinJobAge=3600 s.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

DEFAULT_DIR = "/tmp/vit-minicluster"
REPO_ROOT = Path(__file__).resolve().parents[1]
MINICLUSTER = REPO_ROOT / "dev" / "minicluster.sh"

TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
)

# Same prefixes submitit's helpers.clean_env drops: a test started from inside a
# Slurm job must not hand that job's identity to the jobs it submits.
_JOB_ENV_PREFIXES = ("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SALLOC_", "SUBMITIT_")
_DISTRIB_NAMES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class SlurmCommandError(RuntimeError):
    """A Slurm client command failed or timed out."""


def _run(cmd: Sequence[str], env: Mapping[str, str], timeout: float = 30, cwd=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            list(cmd), env=dict(env), cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise SlurmCommandError(f"{' '.join(cmd)!s} timed out after {timeout}s") from exc
    except FileNotFoundError as exc:
        raise SlurmCommandError(f"{cmd[0]} not found; is Slurm installed? (dev/minicluster.sh up installs it)") from exc


def slurm(cmd: Sequence[str], env: Mapping[str, str], timeout: float = 30, cwd=None) -> str:
    """Runs a Slurm client command and returns its stdout; raises SlurmCommandError on failure."""
    proc = _run(cmd, env, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise SlurmCommandError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc.stdout


def clean_env(conf: str | os.PathLike) -> dict[str, str]:
    """os.environ without Slurm job variables, with SLURM_CONF pointing at ``conf``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_JOB_ENV_PREFIXES) and k not in _DISTRIB_NAMES
    }
    env["SLURM_CONF"] = str(conf)
    # The daemons and some clients live in sbin, missing from many PATHs.
    path = env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    env["PATH"] = os.pathsep.join(path + [p for p in ("/usr/sbin", "/sbin") if p not in path])
    return env


def ensure_cluster(dir: str | os.PathLike = DEFAULT_DIR, timeout: float = 600) -> dict[str, str]:
    """Makes sure the minicluster at ``dir`` answers, starting it if needed; returns the env to use.

    ``timeout`` covers a first start that has to apt-get install Slurm.
    """
    conf = Path(dir) / "slurm.conf"
    env = clean_env(conf)
    if not (conf.is_file() and _cluster_answers(env)):
        try:
            proc = subprocess.run(
                ["bash", str(MINICLUSTER), "up", str(dir)],
                env=env,
                check=False,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmCommandError(f"{MINICLUSTER} up {dir} timed out after {timeout}s") from exc
        if proc.returncode != 0:
            raise SlurmCommandError(
                f"{MINICLUSTER} up {dir} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-20000:]}"
            )
    wait_nodes_idle(env)
    return env


def _cluster_answers(env: Mapping[str, str]) -> bool:
    # `scontrol ping` fails at once when slurmctld is gone; sinfo would retry for ~10 s.
    ping = _run(["scontrol", "ping"], env, timeout=15)
    if ping.returncode != 0 or "is UP" not in ping.stdout:
        return False
    try:
        states = node_states(env)
    except SlurmCommandError:
        return False
    # "*" marks a node whose slurmd does not respond; `up` restarts it.
    return bool(states) and not any(s.endswith("*") for s in states.values())


def node_states(env: Mapping[str, str]) -> dict[str, str]:
    """Node name -> long state as sinfo prints it (e.g. 'idle', 'down*', 'drained')."""
    out = slurm(["sinfo", "-h", "-N", "-o", "%N %T"], env, timeout=15)
    return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


def wait_nodes_idle(env: Mapping[str, str], timeout: float = 120) -> dict[str, str]:
    """Waits until every node is idle; resumes drained/down nodes on the way.

    A node gets drained e.g. when a test's job ignores SIGTERM past KillWait
    ("Kill task failed"), which would otherwise break every later test.
    """
    deadline = time.monotonic() + timeout
    last_resume = float("-inf")
    states: dict[str, str] = {}
    while True:
        try:
            states = node_states(env)
        except SlurmCommandError:
            states = {}
        if states and all(s == "idle" for s in states.values()):
            return states
        stuck = [n for n, s in states.items() if not s.endswith("*") and s.startswith(("down", "drain", "fail"))]
        if stuck and time.monotonic() - last_resume > 5:
            last_resume = time.monotonic()
            for node in stuck:
                _run(["scontrol", "update", f"nodename={node}", "state=resume"], env)
        if time.monotonic() > deadline:
            raise AssertionError(f"nodes not idle after {timeout}s: {states}\n{dump_logs(env)}")
        time.sleep(1)


def sbatch(args: Sequence[str], env: Mapping[str, str], cwd=None) -> int:
    """Submits with ``sbatch --parsable ARGS`` and returns the job id."""
    out = slurm(["sbatch", "--parsable", *args], env, timeout=60, cwd=cwd)
    # --parsable prints "id" or "id;cluster".
    first = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        return int(first.split(";")[0])
    except ValueError:
        raise SlurmCommandError(f"unexpected sbatch output: {out!r}") from None


# Keys in `scontrol show job -o` look like "JobState=", "Socks/Node=", "ReqB:S:C:T=".
_KEY_SPLIT = re.compile(r"\s+(?=[A-Za-z][\w/:]*=)")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parses one ``scontrol show ... -o`` line into key -> value (values may contain spaces)."""
    record: dict[str, str] = {}
    for token in _KEY_SPLIT.split(line.strip()):
        key, sep, value = token.partition("=")
        if sep:
            record[key] = value
    return record


def job_state(job_id: int, env: Mapping[str, str]) -> dict[str, str]:
    """``scontrol show job -o ID`` as a dict: JobState, Reason, Restarts (alias RestartCount), ExitCode, BatchHost, ..."""
    out = slurm(["scontrol", "show", "job", "-o", str(job_id)], env, timeout=30)
    for line in out.splitlines():
        record = parse_scontrol_record(line)
        if record.get("JobId") == str(job_id):
            # scontrol calls it "Restarts"; the job itself sees SLURM_RESTART_COUNT.
            if "Restarts" in record:
                record.setdefault("RestartCount", record["Restarts"])
            return record
    raise SlurmCommandError(f"no record for job {job_id} in: {out!r}")


def release_if_held(job_id: int, state: Mapping[str, str], env: Mapping[str, str]) -> bool:
    """Starts a requeued job now instead of after Slurm's ~2 min BeginTime hold."""
    if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
        _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env)
        return True
    return False


def wait_job(
    job_id: int,
    env: Mapping[str, str],
    states: Iterable[str] = TERMINAL_STATES,
    timeout: float = 600,
    release_held: bool = True,
    log_files: Iterable[str | os.PathLike] = (),
    poll: float = 1.0,
) -> dict[str, str]:
    """Polls until the job's JobState is in ``states`` and returns its state dict.

    While the job is held after a requeue (PENDING, Reason=BeginTime) it is
    released at once if ``release_held``. On timeout raises AssertionError with
    the last state, the daemon logs and ``log_files``.
    """
    wanted = set(states)
    deadline = time.monotonic() + timeout
    last_release = float("-inf")
    held_since: float | None = None
    state: dict[str, str] = {}
    while True:
        state = job_state(job_id, env)
        if state.get("JobState") in wanted:
            return state
        held = state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime"
        held_since = (held_since or time.monotonic()) if held else None
        # Not at once: slurmctld revokes the job's credential at the requeue, at one-second
        # resolution, and kills a relaunch within that second ("Job credential revoked").
        if (release_held and held and time.monotonic() - held_since > 3 and time.monotonic() - last_release > 2
                and release_if_held(job_id, state, env)):
            last_release = time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} not in {sorted(wanted)} after {timeout}s; last state: "
                f"{_short(state)}\n{dump_logs(env, log_files)}"
            )
        time.sleep(poll)


def _short(state: Mapping[str, str]) -> str:
    keys = ("JobState", "Reason", "Restarts", "ExitCode", "NodeList", "BatchHost", "StartTime", "EndTime")
    return ", ".join(f"{k}={state[k]}" for k in keys if k in state)


def _tail(path: str | os.PathLike, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"<cannot read: {exc}>\n"


def _conf_value(conf: Path, key: str) -> str | None:
    try:
        text = conf.read_text()
    except OSError:
        return None
    m = re.search(rf"^\s*{key}\s*=\s*(\S+)", text, re.MULTILINE | re.IGNORECASE)
    return m.group(1) if m else None


def dump_logs(env: Mapping[str, str], extra_files: Iterable[str | os.PathLike] = (), lines: int = 200) -> str:
    """Cluster snapshot, tails of the daemon logs and of ``extra_files``, for assertion messages."""
    parts: list[str] = []
    for cmd in (["sinfo", "-N", "-l"], ["squeue", "-l"]):
        try:
            proc = _run(cmd, env, timeout=15)
            parts.append(f"===== {' '.join(cmd)} =====\n{proc.stdout}{proc.stderr}")
        except SlurmCommandError as exc:
            parts.append(f"===== {' '.join(cmd)} =====\n{exc}\n")
    conf = Path(env.get("SLURM_CONF", Path(DEFAULT_DIR) / "slurm.conf"))
    logs: list[str] = []
    ctld = _conf_value(conf, "SlurmctldLogFile")
    if ctld:
        logs.append(ctld)
    slurmd = _conf_value(conf, "SlurmdLogFile")
    if slurmd:
        logs.extend(sorted(glob.glob(slurmd.replace("%n", "*").replace("%h", "*"))))
    for path in [*logs, *map(str, extra_files)]:
        parts.append(f"===== {path} (last {lines} lines) =====\n{_tail(path, lines)}")
    return "\n".join(parts)


def wait_for_step(run_dir: Path, step: int, env, job: int, timeout: float = 180, log_files=None) -> None:
    """Until the job has logged `step` to the run journal."""
    from helpers import losses

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(losses(run_dir), default=0) >= step:
            return
        if job_state(job, env).get("JobState") in TERMINAL_STATES:
            break
        time.sleep(0.5)
    raise AssertionError(f"job {job} never reached step {step}\n{dump_logs(env, log_files or [])}")


def requeue_causes(run_dir: Path) -> list[str]:
    """The cause of each requeue the node agent made, oldest first."""
    path = run_dir / "slurm" / "requeues.jsonl"
    return [json.loads(line)["cause"] for line in path.read_text().splitlines()] if path.exists() else []
