"""Launch, stop, requeue and resume on a real two-node Slurm cluster (dev/minicluster.sh).

Every job here is submitted exactly as a user would: `python jobs/pretrain.py -m cluster=minicluster`.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, losses, plant_refused_class
from slurm_cluster import dump_logs, job_state, requeue_causes, sbatch, wait_for_step, wait_job

from vit.cluster.status import summarize
from vit.journal import read_journal

TINY_SLURM = ["cluster=minicluster", "experiment=smoke", "data.img_size=32", "data.num_samples=512",
              "train.log_every=1", "train.progress=false", "checkpoint.every_steps=10"]


def submit(env, run_dir: Path, *overrides: str, base: list[str] = TINY_SLURM) -> int:
    proc = subprocess.run([sys.executable, "jobs/pretrain.py", "-m", *base, f"run_dir={run_dir}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match and f"run dir : {run_dir}" in proc.stdout, proc.stdout
    return int(match.group(1))


def logs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "slurm").glob("*_log.*"))


def log_text(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in logs(run_dir))


def finish(env, job: int, run_dir: Path, timeout: float = 420) -> dict:
    """Wait for the job to end for good (releasing requeue holds) and check it completed."""
    state = wait_job(job, env, timeout=timeout, log_files=logs(run_dir))
    assert state["JobState"] == "COMPLETED", f"{state}\n{dump_logs(env, logs(run_dir))}"
    return state


@pytest.fixture(scope="module")
def reference(slurm_env, tmp_path_factory):
    """An uninterrupted two-node run of 60 steps: the multi-node test and the baseline of the others."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    job = submit(slurm_env, run_dir, "train.steps=60")
    state = finish(slurm_env, job, run_dir)
    return run_dir, state


def test_two_node_job_trains_to_the_end_like_a_local_run(reference, tmp_path):
    run_dir, state = reference
    assert state["NumNodes"] == "2" and state["Restarts"] == "0"
    text = log_text(run_dir)
    assert "--nnodes=2" in text and "2 ranks x 1 accumulation" in text
    assert "not requeueing: training completed" in text
    slurm_losses = losses(run_dir)
    assert max(slurm_losses) == 60
    local = tmp_path / "local"  # the same run in one process: 32 x 1 rank x 2 accumulation = 64
    proc = subprocess.run([sys.executable, "jobs/pretrain.py", *TINY_SLURM[1:], "train.steps=60", f"run_dir={local}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 ranks x 2 accumulation" in proc.stdout, proc.stderr[-3000:]
    local_losses = losses(local)
    assert list(local_losses) == list(slurm_losses)
    # Not bitwise: 2 ranks and 1 rank x 2 accumulation sum gradients in different orders, and 60
    # steps amplify that last-bit difference (1.1e-4 relative by step 55 with fused AdamW). A real
    # mismatch (another batch, a wrong average) moves the loss by percents.
    for step in slurm_losses:
        assert slurm_losses[step] == pytest.approx(local_losses[step], rel=1e-3, abs=1e-5), step


def test_usr2_checkpoints_requeues_and_resumes_bitwise(slurm_env, reference, tmp_path):
    """The run's experiment comes from a config dir of its own, edited while the job runs: the
    requeued job must run the config composed at submission, not the edited one."""
    experiments = tmp_path / "conf" / "experiment"
    experiments.mkdir(parents=True)
    smoke = (ROOT / "conf" / "experiment" / "smoke.yaml").read_text()
    (experiments / "frozen.yaml").write_text(smoke)
    run_dir = tmp_path / "signal"
    job = submit(slurm_env, run_dir, "train.steps=60", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                 base=[o if o != "experiment=smoke" else "experiment=frozen" for o in TINY_SLURM])
    wait_for_step(run_dir, 15, slurm_env, job, log_files=logs(run_dir))
    assert "lr: 1.0e-3" in smoke
    (experiments / "frozen.yaml").write_text(smoke.replace("lr: 1.0e-3", "lr: 5.0e-3"))
    subprocess.run(["scancel", "--signal=USR2", str(job)], env=slurm_env, check=True, timeout=60)
    state = finish(slurm_env, job, run_dir)
    assert state["Restarts"] == "1", state
    text = log_text(run_dir)
    stopped = re.findall(r"stop requested \(usr2\): checkpoint at step (\d+)", text)
    assert len(stopped) == 1, text[-3000:]
    saved = int(stopped[0])
    assert f"resumed from {run_dir}/checkpoints/step-{saved}" in text
    assert text.count("asking the workers to checkpoint and stop") == 2  # the agent of each node
    assert re.search(r"workers exited 0 [\d.]+s after the stop signal", text)
    assert requeue_causes(run_dir) == ["preemption"]  # a signal far from the time limit
    assert losses(run_dir) == losses(reference[0])  # bitwise, every step
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 1e-3  # written by the resume
    status = summarize(run_dir, slurm=False)  # the journal tells the same story
    assert status["restarts"] == 1 and status["restart_causes"] == {"preemption": 1}, status
    assert status["step"] == status["total_steps"] == 60 and 0 < status["goodput"] < 1, status


def _starting_submitit_tasks(run_dir: Path) -> list[int]:
    """Node tasks as submitit runs them: `python -u -m submitit.core._submit <run_dir>/slurm`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if argv[1:4] == ["-u", "-m", "submitit.core._submit"] and argv[4:5] == [str(run_dir / "slurm")]:
            pids.append(int(proc.name))
    return pids


def test_usr2_while_a_task_is_still_starting_is_held_not_fatal(slurm_env, tmp_path):
    """A preemption can come at any moment, also in the seconds a submitit task spends importing and
    unpickling before the node agent's handler exists; USR2's default action would kill the task and
    fail the job. It is held instead, and acted on as soon as the agent runs."""
    run_dir = tmp_path / "early"
    job = submit(slurm_env, run_dir, "train.steps=30")
    deadline, pids, first_seen = time.monotonic() + 300, [], None
    # Poll fast: the window is the task's first second or two. Both nodes' tasks, if they start
    # together: the agent of node 0 is the one that tells a preemption from a time limit.
    while len(pids) < 2 and (first_seen is None or time.monotonic() - first_seen < 3):
        assert time.monotonic() < deadline, f"no submitit task started\n{dump_logs(slurm_env, logs(run_dir))}"
        pids = _starting_submitit_tasks(run_dir)
        first_seen = first_seen or (time.monotonic() if pids else None)
        time.sleep(0.01)
    for pid in pids:  # straight to the task, as Slurm's --signal does, but at a moment of our choosing
        os.kill(pid, signal.SIGUSR2)
    state = finish(slurm_env, job, run_dir)
    text = log_text(run_dir)
    assert state["Restarts"] == "1", f"{state}\n{text[-3000:]}"
    assert "received SIGUSR2 (preemption)" in text and "restart 0:" in text
    assert requeue_causes(run_dir) == ["preemption"]
    assert max(losses(run_dir)) == 30


def test_real_time_limit_is_saved_requeued_and_resumed(slurm_env, tmp_path):
    run_dir = tmp_path / "timelimit"
    # A 2-minute limit with USR2 30 s before it: Slurm itself signals the job well before the end.
    # slurmctld sends the warning once lead + its 30 s check period covers the time left, so a
    # 1-minute limit could be signalled at start, before any handler exists (not a case that a
    # multi-hour limit meets). The run is far longer than an allocation on any runner; once the
    # requeued job has resumed and trains on, it is cancelled.
    job = submit(slurm_env, run_dir, "train.steps=100000", "cluster.time_min=2", "cluster.signal_lead_s=30",
                 "checkpoint.every_steps=100")
    deadline = time.monotonic() + 300
    while not requeue_causes(run_dir) and time.monotonic() < deadline:
        time.sleep(1)
    assert requeue_causes(run_dir) == ["time_limit"], dump_logs(slurm_env, logs(run_dir))
    stopped = next(e["step"] for e in read_journal(run_dir) if e["event"] == "requeue")
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=20"], env=slurm_env, check=True, timeout=60)
    while int(job_state(job, slurm_env).get("Restarts", 0)) < 1 and time.monotonic() < deadline:
        time.sleep(1)
    wait_job(job, slurm_env, states={"RUNNING"}, timeout=300, log_files=logs(run_dir))  # released from the hold
    wait_for_step(run_dir, stopped + 5, slurm_env, job, log_files=logs(run_dir))
    subprocess.run(["scancel", str(job)], env=slurm_env, check=True, timeout=60)
    wait_job(job, slurm_env, timeout=300, release_held=False, log_files=logs(run_dir))
    text = log_text(run_dir)
    assert "received SIGUSR2 (time_limit)" in text and "stop requested (usr2)" in text
    assert f"resumed from {run_dir}/checkpoints/step-{stopped} (step {stopped}," in text, text[-3000:]
    assert requeue_causes(run_dir) == ["time_limit"]  # the cancel is no requeue


def test_preemption_by_a_higher_priority_partition(slurm_env, tmp_path):
    run_dir = tmp_path / "preempt"
    job = submit(slurm_env, run_dir, "train.steps=120")
    wait_for_step(run_dir, 10, slurm_env, job, log_files=logs(run_dir))
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-N2", "--exclusive", "-o", str(tmp_path / "urgent.out"),
                             "--wrap", "srun sleep 2"], env=slurm_env, capture_output=True, text=True, timeout=60)
    assert urgent.returncode == 0, urgent.stderr
    urgent_state = wait_job(int(urgent.stdout.strip().split(";")[0]), slurm_env, timeout=300)
    assert urgent_state["JobState"] == "COMPLETED", urgent_state
    state = finish(slurm_env, job, run_dir)
    assert int(state["Restarts"]) >= 1
    assert requeue_causes(run_dir)[0] == "preemption"
    assert max(losses(run_dir)) == 120


def test_crash_loop_stops_requeueing(slurm_env, tmp_path):
    run_dir = tmp_path / "crash"
    # A learning rate this large diverges at the same step every time: a real, repeatable failure.
    # From step 2 every update is skipped (non-finite loss); the 10th in a row, at step 11, ends the
    # run, and the checkpoint of step 10 (9 skipped in a row) resumes into the same end.
    job = submit(slurm_env, run_dir, "train.steps=40", "optim.lr=1e30", "optim.warmup_steps=1")
    state = wait_job(job, slurm_env, timeout=420, log_files=logs(run_dir))
    assert state["JobState"] == "FAILED", state
    assert state["Restarts"] == "2", state  # 3 identical failures: the first two are requeued
    assert requeue_causes(run_dir) == ["failure", "failure"]
    text = log_text(run_dir)
    assert re.search(r"not requeueing: crash loop: 3 failures in a row since the checkpoint of step 10 "
                     r"\(last at step 11: FloatingPointError: the loss or gradient norm was not finite for the "
                     r"last 10 steps", text), text[-3000:]


def test_a_requeued_job_whose_checkpoint_is_refused_stops_and_is_not_resubmitted(slurm_env, tmp_path):
    """Between a requeue and its restart the checkpoints become unloadable by the installed versions
    (here a class the safe loader does not know, planted in their metadata): the restart stops with
    the refusal as its reason in status and journal, is not requeued, and changes no checkpoint. A
    new submission of the same run is then rejected on the login node, in one line."""
    run_dir = tmp_path / "refused"
    job = submit(slurm_env, run_dir, "train.steps=400")
    wait_for_step(run_dir, 12, slurm_env, job, log_files=logs(run_dir))
    subprocess.run(["scancel", "--signal=USR2", str(job)], env=slurm_env, check=True, timeout=60)
    state = wait_job(job, slurm_env, states={"PENDING", "FAILED", "COMPLETED", "CANCELLED"}, timeout=300,
                     release_held=False, log_files=logs(run_dir))
    assert state["JobState"] == "PENDING", f"{state}\n{dump_logs(slurm_env, logs(run_dir))}"
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        plant_refused_class(checkpoint, "metadata")
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    state = wait_job(job, slurm_env, timeout=420, log_files=logs(run_dir))
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1", f"{state}\n{dump_logs(slurm_env, logs(run_dir))}"
    assert requeue_causes(run_dir) == ["preemption"]
    refused = (f"checkpoint {max(checkpoints, key=lambda p: int(p.name[5:]))} is refused by the safe loader: "
               ".metadata holds fractions.Fraction (written with torch ")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["user_error"] and status["error"].startswith(refused), status
    [agent_exit] = [e for e in read_journal(run_dir) if e["event"] == "agent_exit" and e.get("restart") == 1]
    assert "is refused by the safe loader" in agent_exit["reason"], agent_exit
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == before

    proc = subprocess.run([sys.executable, "jobs/pretrain.py", "-m", *TINY_SLURM, f"run_dir={run_dir}",
                           "train.steps=400"], cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "submitted job" not in proc.stdout, proc.stdout + proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: {refused}") and error.endswith("allowed_classes=[fractions.Fraction]"), error


def test_hard_kill_resumes_from_the_last_valid_checkpoint(slurm_env, reference, tmp_path):
    run_dir = tmp_path / "kill"
    job = submit(slurm_env, run_dir, "train.steps=60")
    wait_for_step(run_dir, 25, slurm_env, job, log_files=logs(run_dir))
    # SIGKILL the worker on the second node: no handler runs, no checkpoint is written.
    pids = subprocess.run(["pgrep", "-f", f"vit.cluster.worker {run_dir}/slurm/config-{job}.yaml"], capture_output=True,
                          text=True).stdout.split()
    workers = [int(p) for p in pids if _node_of(int(p)) == "1" and _is_worker(int(p))]
    assert workers, f"no worker found among {pids}"
    os.kill(workers[0], signal.SIGKILL)
    pid = workers[0]
    # The agent on node 1 waits for node 0's decision instead of ending the step (--kill-on-bad-exit)
    # under it: node 0 requeues the job as a failure.
    state = wait_job(job, slurm_env, states={"PENDING", "FAILED", "COMPLETED", "CANCELLED"}, timeout=300,
                     release_held=False, log_files=logs(run_dir))
    assert state["JobState"] == "PENDING", f"{state}\n{dump_logs(slurm_env, logs(run_dir))}"
    finish(slurm_env, job, run_dir)
    assert requeue_causes(run_dir) == ["failure"]
    text = log_text(run_dir)
    resumed = re.findall(rf"resumed from {run_dir}/checkpoints/step-(\d+)", text)
    assert len(resumed) == 1 and int(resumed[0]) % 10 == 0 and 20 <= int(resumed[0]) < 60, text[-3000:]
    assert re.search(rf"torchrun: vit.cluster.worker failed on \S+: rank \d \(local rank 0, pid {pid}\), killed by SIGKILL", text), text[-3000:]
    assert losses(run_dir) == losses(reference[0])


def _node_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"SLURM_NODEID="):
            return item.split(b"=", 1)[1].decode()
    return None


def _is_worker(pid: int) -> bool:
    """`python -u -m vit.cluster.worker CONFIG`; not torchrun (`-m vit.cluster.torchrun ... -m vit.cluster.worker CONFIG`)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"-m" in args and args[args.index(b"-m") + 1:][:1] == [b"vit.cluster.worker"]


@pytest.mark.parametrize("overrides, key", [
    (["model.name=vit_tiny_patch16,vit_bogus"], "model.name"),  # one bad point stops the whole sweep
    (["name='smoke;touch /tmp/pwned'"], "name"),  # quoted, as Hydra's grammar requires
    (["train.micro_batch=24"], "train.micro_batch"),
    (["data=imagenet21k", "data.root=/no/such/dataset"], "data.root"),
    (["train.global_batch=15"], "train.global_batch"),  # 2 ranks: no micro-batch can fix this split
    (["cluster.nodes=0"], "cluster.nodes"),
    (["cluster.time_min=0"], "cluster.time_min"),
    (["cluster.signal_lead_s=3000"], "cluster.signal_lead_s"),
    (["hydra.launcher.name='smoke\ntouch /tmp/pwned\n#'"], "hydra.launcher.name"),  # a newline ends #SBATCH
    (["+tag=a/b,a_b"], "run_dir"),  # two points, one directory
])
def test_bad_submissions_are_rejected_before_anything_is_queued(slurm_env, tmp_path, overrides, key):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_env, capture_output=True, text=True).stdout
    proc = subprocess.run([sys.executable, "jobs/pretrain.py", "-m", *TINY_SLURM, f"run_dir={tmp_path}", *overrides],
                          cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {key}:"), proc.stderr
    assert "submitted job" not in proc.stdout and not (tmp_path / "slurm").exists()
    after = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_env, capture_output=True, text=True).stdout
    assert after == before


def test_a_sweep_submits_one_job_per_point_and_returns_at_once(slurm_env, tmp_path):
    """Submitted from inside another job's rank: none of that job's environment reaches the new jobs
    (its RANK would make their tasks train without a node agent; its memory setting clashes with srun's)."""
    inside_a_job = {**slurm_env, "SLURM_JOB_ID": "4242", "SLURM_MEM_PER_CPU": "100", "SLURM_RESTART_COUNT": "7",
                    "SUBMITIT_EXECUTOR": "slurm", "RANK": "3", "WORLD_SIZE": "9", "MASTER_ADDR": "10.255.255.1",
                    "MASTER_PORT": "1"}
    proc = subprocess.run([sys.executable, "jobs/pretrain.py", "-m", *TINY_SLURM, f"run_dir={tmp_path}",
                           "train.steps=3", "optim.warmup_steps=1", "optim.lr=1e-3,2e-3",
                           "+hydra.launcher.additional_parameters.nice=0"],  # 0 is a value, not "leave it out"
                          cwd=ROOT, env=inside_a_job, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    jobs = [int(j) for j in re.findall(r"submitted job (\d+)", proc.stdout)]
    assert len(jobs) == 2, proc.stdout
    # returned while the jobs were still queued or running, each with its own run directory
    assert all(job_state(j, slurm_env)["JobState"] in {"PENDING", "RUNNING", "CONFIGURING"} for j in jobs)
    for job, lr in zip(jobs, ["0.001", "0.002"]):
        run_dir = tmp_path / f"optim.lr-{lr}"
        assert f"run dir : {run_dir}" in proc.stdout
        finish(slurm_env, job, run_dir)
        assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
        assert "#SBATCH --nice=0" in (run_dir / "slurm" / f"{job}_submission.sh").read_text()
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == float(lr)
        starts = [e for e in read_journal(run_dir) if e["event"] == "job_start"]
        assert [(e["job_id"], e["restart"]) for e in starts] == [(str(job), 0)], starts


@pytest.mark.parametrize("usr2_first,limit", [(False, False), (True, False), (True, True)],
                         ids=["scancel", "usr2-then-scancel", "time-limit-usr2-then-scancel"])
def test_scancel_saves_and_is_not_requeued(slurm_env, tmp_path, usr2_first, limit):
    """Also when the cancel comes while a stop is under way: Slurm requeues even a cancelled job
    when asked, so the agent must not ask. With a 3-minute limit and a 150 s lead, the USR2 counts
    as the time limit's warning, and the SIGTERM, minutes before the limit, is still the cancel."""
    run_dir = tmp_path / "cancel"
    job = submit(slurm_env, run_dir, "train.steps=300", *(["cluster.signal_lead_s=150"] if limit else []))
    wait_for_step(run_dir, 5, slurm_env, job, log_files=logs(run_dir))
    if limit:  # only now: with 3 minutes from the start, Slurm's own warning could come before step 5
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=3"], env=slurm_env, check=True, timeout=60)
    if not usr2_first:  # the same command again while the job trains: rejected, nothing queued
        again = subprocess.run([sys.executable, "jobs/pretrain.py", "-m", *TINY_SLURM, f"run_dir={run_dir}",
                                "train.steps=300"], cwd=ROOT, env=slurm_env, capture_output=True, text=True,
                               timeout=180)
        assert again.returncode == 2 and again.stderr.strip().splitlines() == [
            f"error: run_dir: {run_dir} is in use by job {job} (RUNNING); wait for it to end or scancel {job} "
            "(a run resubmitted later resumes from its checkpoints), or choose another run_dir"], again.stderr
        assert "submitted job" not in again.stdout
        # A plain batch job's agent on the same run directory (a second `sbatch` of a script) ends at start.
        second_log = tmp_path / "second.out"
        second = sbatch(["-N1", "-c1", "--mem=500M", "-o", str(second_log), "--wrap",
                         f"{sys.executable} -m vit.cluster.agent --run-dir {run_dir} -- jobs/pretrain.py"], slurm_env, cwd=ROOT)
        state = wait_job(second, slurm_env, states={"FAILED", "COMPLETED", "CANCELLED"}, timeout=180,
                         release_held=False)
        text = second_log.read_text()
        assert state["JobState"] == "FAILED" and f"not training: job {job} (RUNNING) trains in {run_dir}" in text, text
        assert job_state(job, slurm_env)["JobState"] == "RUNNING"
    if usr2_first:
        subprocess.run(["scancel", "--signal=USR2", str(job)], env=slurm_env, check=True, timeout=60)
        deadline = time.monotonic() + 60  # the TERM must come second, while the stop is under way
        while f"[vit.cluster.agent job {job} node 0] received SIGUSR2" not in log_text(run_dir):
            assert time.monotonic() < deadline, dump_logs(slurm_env, logs(run_dir))
            time.sleep(0.02)
    subprocess.run(["scancel", str(job)], env=slurm_env, check=True, timeout=60)
    state = wait_job(job, slurm_env, states={"CANCELLED", "COMPLETED", "FAILED"}, timeout=180, release_held=False,
                     log_files=logs(run_dir))
    time.sleep(3)  # a requeue, if any, would show now
    state = job_state(job, slurm_env)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", state
    text = log_text(run_dir)
    if usr2_first:
        assert "not requeueing: SIGTERM after the stop signal" in text, text[-3000:]
        assert ("(time_limit)" if limit else "(preemption)") in text, text[-3000:]
    else:
        assert "stop requested (term)" in text and "not requeueing: stopped by SIGTERM" in text, text[-3000:]
    assert requeue_causes(run_dir) == []
