"""Fine-tuning on the two-node Slurm cluster: the plain sbatch scripts submitted exactly as written
(only sbatch options, i.e. the cluster's shape, and the documented environment variables change),
and the same job through the Hydra launcher."""
import functools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import make_ade20k, make_coco
from helpers import ROOT, recipe, run_job
from slurm_cluster import dump_logs, requeue_causes, sbatch, wait_for_step, wait_job
from test_finetune import TINY_ADE, TINY_COCO

from vit.engine.checkpoint import export_safetensors

# What a user of the minicluster changes: 2 CPU-only nodes of 2 cores, a short time limit.
MINICLUSTER = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G", "--time=15", "--partition=debug"]


def test_node_agent_starts_without_importing_torch():
    """Until the node agent's handler is installed, a USR2 kills it: `python -m vit.cluster.agent` must start
    in milliseconds, which rules out importing torch (a second or more)."""
    probe = "import sys, vit.cluster.agent; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("task", ["coco", "ade20k"])
def test_sbatch_script_allocates_what_the_cluster_config_says(task):
    """The plain scripts' #SBATCH lines and `cluster=sg_h100` describe the same allocation: one copy
    may not be edited without the other."""
    cluster = recipe(f"task={task}", "cluster=sg_h100", config="finetune").cluster
    text = (ROOT / "sbatch" / f"finetune_{task}.sh").read_text()
    options = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", text, re.M))
    hours, minutes, seconds = (int(x) for x in options["time"].split(":"))
    assert {"nodes": int(options["nodes"]), "gpus_per_node": int(options["gpus-per-node"]),
            "cpus_per_task": int(options["cpus-per-task"]), "time_min": hours * 60 + minutes + seconds // 60,
            "signal_lead_s": int(options["signal"].split("@")[1])} == {
        "nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "cpus_per_task": cluster.cpus_per_task,
        "time_min": cluster.time_min, "signal_lead_s": cluster.signal_lead_s}
    from vit.cluster.agent import SIGNAL_LEAD_S  # the node agent's default, which the scripts leave to it
    assert SIGNAL_LEAD_S == cluster.signal_lead_s


def job_logs(run_dir):
    return sorted((run_dir / "slurm").glob("job-*.out"))


def test_a_crash_loop_is_failures_without_a_new_checkpoint():
    """The requeue policy alone. Equal failures often differ in their text (a peer's port) or have
    none (rank 0 killed): what counts is whether a checkpoint was made in between."""
    from vit.cluster.agent import requeue_decision

    failed = {"state": "failed", "step": 13, "error": "Connection closed by peer [127.0.0.1]:31458"}
    earlier = [{"cause": "failure", "step": 13, "checkpoint": 10, "error": f"Connection closed by peer [...]:{p}"}
               for p in (20811, 27045)]
    requeue, reason = requeue_decision(failed, "failure", earlier, 40, 3, checkpoint=10)
    assert not requeue and reason.startswith("crash loop: 3 failures in a row since the checkpoint of step 10"), reason
    assert requeue_decision(failed, "failure", earlier, 40, 3, checkpoint=20)[0]  # progress: requeue
    stop = {"cause": "time_limit", "step": 12, "checkpoint": 10}
    assert requeue_decision(failed, "failure", [earlier[0], stop, earlier[1]], 40, 3, checkpoint=10)[0]
    assert requeue_decision(failed, "failure", earlier[:1], 40, 3, checkpoint=10)[0]  # only the second
    killed = {"state": "failed", "error": "workers exited with code 1 (killed or crashed)"}
    assert not requeue_decision(killed, "failure", [{"cause": "failure", "checkpoint": None}] * 2, 40, 3, None)[0]
    assert not requeue_decision(failed, "failure", [], 40, 1, checkpoint=10)[0]  # a limit of 1: never requeue one


def test_a_torn_requeue_log_line_is_left_out(tmp_path):
    from vit.cluster.agent import read_log
    from vit.run_dir import REQUEUE_LOG

    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / REQUEUE_LOG).write_text('{"cause": "time_limit", "step": 5}\n\n{"cause": "fail')
    assert read_log(tmp_path) == [{"cause": "time_limit", "step": 5}]


def test_the_agent_outlives_failing_slurm_commands(slurm_env, tmp_path, monkeypatch, capsys):
    """The real squeue and scontrol, asked about a job the controller does not know. The time left
    falls back to the end time Slurm puts in the job's environment; a failed requeue is retried, then
    reported in one line and taken back out of the requeue log (the requeue limits count that log)."""
    from vit.cluster.agent import NodeAgent
    from vit.cluster.slurm import time_left_s
    from vit.run_dir import REQUEUE_LOG

    unknown = "987654321"
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 600))
    assert 590 < time_left_s(unknown) <= 600
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    assert time_left_s(unknown) is None

    monkeypatch.setenv("SLURM_JOB_ID", unknown)
    (tmp_path / "slurm").mkdir()
    (tmp_path / "status.json").write_text(json.dumps({"state": "stopped", "stop": "usr2", "step": 7}))
    agent = NodeAgent(["true"], str(tmp_path), 1, max_requeues=5, crash_loop_limit=3, signal_lead_s=60)
    agent.stop_cause = "preemption"
    agent._requeue = functools.partial(NodeAgent._requeue, agent, wait_s=0.01)
    assert agent.decide(0) == 1
    out = capsys.readouterr().out
    assert [f"attempt {i} of 4" in out for i in (1, 2, 3, 4)] == [True] * 4, out
    assert f"not requeueing: scontrol requeue {unknown} failed (" in out and "requeue the job by hand" in out, out
    assert (tmp_path / "slurm" / REQUEUE_LOG).read_text() == ""
    assert json.loads((tmp_path / "journal.jsonl").read_text().splitlines()[-1])["event"] == "agent_exit"


@pytest.mark.parametrize("task", ["coco", "ade20k"])
def test_sbatch_script_is_signalled_requeued_and_resumed_to_the_end(slurm_env, tmp_path, task):
    pretrain = tmp_path / "pretrain"
    run_job(pretrain, "train.steps=4")
    if task == "coco":  # both forms of pretrained weights: an export here, the DCP run dir for ADE20K
        data, tiny = make_coco(tmp_path / "coco", n_train=32, n_val=8), TINY_COCO
        weights = export_safetensors(pretrain, tmp_path / "vit.safetensors")
    else:
        data, tiny = make_ade20k(tmp_path / "ade", n_train=16, n_val=4), TINY_ADE
        weights = pretrain
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny if not o.startswith("task=")] + [
        "train.micro_batch=4", "train.steps=40", "train.eval_every=40", "train.log_every=1", "checkpoint.every_steps=10"]
    # Relative paths, as users write them: to the directory sbatch runs in, not to the repository.
    env = {**slurm_env, "RUN_DIR": "run", "DATA_ROOT": str(data.relative_to(tmp_path)),
           "PRETRAINED": str(Path(weights).relative_to(tmp_path)),
           "VIT_OVERRIDES": " ".join(overrides), "PYTHON": sys.executable, "SIGNAL_LEAD_S": "60"}
    job = sbatch([*MINICLUSTER, str(ROOT / "sbatch" / f"finetune_{task}.sh")], env, cwd=tmp_path)
    wait_for_step(run_dir, 3, slurm_env, job, timeout=300, log_files=[tmp_path / f"vit-{task}-{job}.out"])
    subprocess.run(["scancel", "--signal=USR2", str(job)], env=slurm_env, check=True, timeout=60)
    state = wait_job(job, slurm_env, timeout=600, log_files=job_logs(run_dir))
    text = "\n".join(p.read_text(errors="replace") for p in job_logs(run_dir))
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", f"{state}\n{dump_logs(slurm_env, job_logs(run_dir))}"
    assert "--nnodes=2" in text and "2 ranks x" in text
    stopped = re.findall(r"stop requested \(usr2\): checkpoint at step (\d+)", text)
    assert len(stopped) == 1 and 3 <= int(stopped[0]) < 40, text[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-{stopped[0]}" in text
    assert requeue_causes(run_dir) == ["preemption"]
    assert "not requeueing: training completed" in text
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 40
    evaluation = json.loads((run_dir / "eval" / "latest.json").read_text())
    assert evaluation["step"] == 40 and ("AP" in evaluation if task == "coco" else "mIoU" in evaluation)
    # the job's own output went to the run directory, each restart appended
    assert len(re.findall(rf"== .* job {job} restart \d", (run_dir / "slurm" / f"job-{job}.out").read_text())) == 2


def test_finetune_is_submitted_by_the_hydra_launcher_too(slurm_env, tmp_path):
    data = make_ade20k(tmp_path / "ade", n_train=16, n_val=4)
    run_dir = tmp_path / "hydra"
    proc = subprocess.run([sys.executable, "jobs/finetune.py", "-m", "cluster=minicluster", *TINY_ADE,
                           "cluster.nodes=2", f"data.root={data}", f"run_dir={run_dir}", "train.micro_batch=4",
                           "train.steps=6", "train.eval_every=6", "optim.warmup_steps=2"],
                          cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = int(re.search(r"submitted job (\d+)", proc.stdout).group(1))
    logs = sorted((run_dir / "slurm").glob("*_log.*"))
    state = wait_job(job, slurm_env, timeout=420, log_files=logs)
    assert state["JobState"] == "COMPLETED", f"{state}\n{dump_logs(slurm_env, logs)}"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert json.loads((run_dir / "eval" / "latest.json").read_text())["step"] == 6


def failed_ade20k_job(slurm_env, tmp_path, run_dir: Path, extra: list[str], separator: str = " ") -> str:
    """Submit sbatch/finetune_ade20k.sh with bad settings; it must fail at once, not requeued. Its log."""
    data = make_ade20k(tmp_path / "ade", n_train=16, n_val=4)
    overrides = [o for o in TINY_ADE if not o.startswith("task=")] + extra
    env = {**slurm_env, "RUN_DIR": str(run_dir), "DATA_ROOT": str(data), "VIT_OVERRIDES": separator.join(overrides),
           "PYTHON": sys.executable}
    job = sbatch([*MINICLUSTER, str(ROOT / "sbatch" / "finetune_ade20k.sh")], env, cwd=tmp_path)
    state = wait_job(job, slurm_env, timeout=300, log_files=[tmp_path / f"vit-ade20k-{job}.out"])
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", f"{state}\n{dump_logs(slurm_env, job_logs(run_dir))}"
    return "\n".join(p.read_text(errors="replace") for p in job_logs(run_dir))


def test_sbatch_user_error_fails_at_job_start_in_one_line_and_is_not_requeued(slurm_env, tmp_path):
    """Plain sbatch runs nothing of ours before Slurm starts the script, so a bad override is caught
    when the job starts: one line naming the key, no requeue, nothing written to checkpoints/."""
    run_dir = tmp_path / "bad"
    text = failed_ade20k_job(slurm_env, tmp_path, run_dir, ["train.micro_batch=3", "train.steps=4"])
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors and all(e.startswith("error: train.micro_batch: 3 per rank x 2 ranks does not divide") for e in errors), text
    assert "not requeueing: configuration or data error, fix it and resubmit: train.micro_batch" in text, text
    # torchrun adds one line per node, not a traceback that buries the error
    assert "Traceback" not in text and len(re.findall(r"torchrun: jobs/finetune.py failed on \S+: rank \d "
                                                      r"\(local rank 0, pid \d+\), exit code 2\n", text)) == 2, text
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "slurm" / "requeues.jsonl").exists()


def test_sbatch_override_typo_fails_once_at_job_start_and_is_not_requeued(slurm_env, tmp_path):
    """An override that does not compose leaves no status behind on the ranks: caught before srun,
    the job ends at once instead of failing on every node and being requeued as a crash. A run
    directory with a quote and a comma reaches Hydra quoted; overrides may span lines."""
    run_dir = tmp_path / "it's,odd"
    text = failed_ade20k_job(slurm_env, tmp_path, run_dir, ["train.stepz=4"], separator="\n")
    assert "Could not override 'train.stepz'" in text and "is not requeued" in text, text
    assert not list((run_dir / "slurm").glob("job-*-node*.out")) and not (run_dir / "status.json").exists()
