"""Run status and goodput from the journal (vit.cluster.status, jobs/status.py) and the planner (vit.cluster.plan, jobs/plan.py).

The synthetic journals are written through vit.journal.Journal with a fake clock and Slurm's
environment, and every expected number below is worked out by hand from the event times.
"""
import json
import math
import shutil
import subprocess
import sys
from datetime import datetime
from types import SimpleNamespace

import pytest
from helpers import ROOT, recipe, run_job

import vit.journal
from vit.cluster.status import CATEGORIES, RESTART_STYLES, plot, summarize
from vit.journal import Journal, read_journal

T0 = 1_700_000_000.0
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def journal(monkeypatch, tmp_path):
    """write(t, job, restart, event, step, **fields): one event at T0 + t seconds from Slurm job `job`."""
    clock = SimpleNamespace(t=T0)

    class FakeDatetime:
        @staticmethod
        def now(tz=None):
            return datetime.fromtimestamp(clock.t, tz)

    monkeypatch.setattr(vit.journal, "time", SimpleNamespace(time=lambda: clock.t))
    monkeypatch.setattr(vit.journal, "datetime", FakeDatetime)
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)

    def write(t, job, restart_count, event, step=None, /, **fields):  # fields may set job_id, restart...
        clock.t = T0 + t
        if job is not None:
            monkeypatch.setenv("SLURM_JOB_ID", str(job))
            monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart_count))
            monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
        Journal(tmp_path).write(event, step, **fields)

    write.run_dir = tmp_path
    return write


def metrics(step, images_per_s=64.0):
    return dict(loss=5.0 - step / 10, lr=1e-3, grad_norm=1.0, images_per_s=images_per_s, mfu=0.4, epoch=0,
                bad_samples=0)


TRAIN = dict(total_steps=40, world_size=8, device="cuda", global_batch=64, flops_per_image=1e9)


def write_time_limit_run(w):
    """2 nodes x 4 GPUs, 10 s/step. Job 100 stops at the time limit at step 25 and resumes there."""
    w(0, None, None, "submit", job_id="100", restart=None, nodes=None, num_nodes=2, procs_per_node=4,
      time_limit_min=60)
    w(100, 100, 0, "job_start", procs_per_node=4, num_nodes=2)
    w(160, 100, 0, "train_start", 0, startup_s=30.0, **TRAIN)
    w(280, 100, 0, "metrics", 10, **metrics(10))   # 120 s for 10 steps: 20 s of warm-up
    w(380, 100, 0, "metrics", 20, **metrics(20))
    w(380, 100, 0, "checkpoint_begin", 20, path="step-20", async_save=False)
    w(400, 100, 0, "checkpoint_commit", 20, path="step-20", seconds=20.0, bytes=1000)
    w(450, 100, 0, "metrics", 25, **metrics(25))   # 70 s - 20 s stall = 50 s for 5 steps
    w(450, 100, 0, "stop_signal", 25, kind="usr2")
    w(450, 100, 0, "checkpoint_begin", 25, path="step-25", async_save=False)
    w(470, 100, 0, "checkpoint_commit", 25, path="step-25", seconds=20.0, bytes=1000)
    w(475, 100, 0, "exit", 25, state="stopped", total_steps=40, stop="usr2", elapsed_s=315.0)
    w(480, 100, 0, "requeue", 25, cause="time_limit", reason="stopped (time_limit) at step 25", stop_seconds=30.0)
    w(600, 100, 1, "job_start", procs_per_node=4, num_nodes=2)
    w(640, 100, 1, "resume", 25, checkpoint="step-25", saved_world_size=8, world_size=8)
    w(650, 100, 1, "train_start", 25, startup_s=20.0, **TRAIN)
    w(710, 100, 1, "metrics", 30, **metrics(30))   # 60 s for 5 steps: 10 s of warm-up
    w(760, 100, 1, "metrics", 35, **metrics(35, 32.0))
    w(810, 100, 1, "metrics", 40, **metrics(40, 32.0))
    w(810, 100, 1, "checkpoint_begin", 40, path="step-40", async_save=False)
    w(830, 100, 1, "checkpoint_commit", 40, path="step-40", seconds=20.0, bytes=1000)
    w(833, 100, 1, "evaluation", 40, val_top1=0.5, val_top5=0.9)
    w(835, 100, 1, "exit", 40, state="completed", total_steps=40, stop=None, elapsed_s=185.0)
    w(840, 100, 1, "agent_exit", 40, state="completed", reason="training completed")


def write_hard_kill_run(w):
    """1 GPU, 10 s/step. Job 200 is killed at step 30 (last checkpoint 10) and resumes from step 10."""
    one = {**TRAIN, "world_size": 1}
    w(0, 200, 0, "job_start", procs_per_node=1, num_nodes=1)
    w(10, 200, 0, "train_start", 0, startup_s=8.0, **one)
    w(110, 200, 0, "metrics", 10, **metrics(10))
    w(110, 200, 0, "checkpoint_begin", 10, path="step-10", async_save=False)
    w(120, 200, 0, "checkpoint_commit", 10, path="step-10", seconds=10.0, bytes=1000)
    w(220, 200, 0, "metrics", 20, **metrics(20))
    w(320, 200, 0, "metrics", 30, **metrics(30))  # SIGKILL: nothing more from restart 0
    w(400, 200, 1, "job_start", procs_per_node=1, num_nodes=1)
    w(420, 200, 1, "resume", 10, checkpoint="step-10", saved_world_size=1, world_size=1)
    w(430, 200, 1, "train_start", 10, startup_s=15.0, **one)
    for i, step in enumerate((20, 30, 40)):
        w(530 + 100 * i, 200, 1, "metrics", step, **metrics(step))
    w(730, 200, 1, "checkpoint_begin", 40, path="step-40", async_save=False)
    w(740, 200, 1, "checkpoint_commit", 40, path="step-40", seconds=10.0, bytes=1000)
    w(745, 200, 1, "exit", 40, state="completed", total_steps=40, stop=None, elapsed_s=315.0)
    w(750, 200, 1, "agent_exit", 40, state="completed", reason="training completed")


def check_breakdown(s, allocated_gpu_s, **gpu_s):
    assert s["allocated_gpu_s"] == pytest.approx(allocated_gpu_s)
    for k in CATEGORIES:
        assert s["breakdown_gpu_s"][k] == pytest.approx(gpu_s.get(k, 0.0), abs=1e-6), k
        assert s["breakdown"][k] == pytest.approx(gpu_s.get(k, 0.0) / allocated_gpu_s, abs=1e-9), k
    assert sum(s["breakdown"].values()) == pytest.approx(1.0)


def test_time_limit_requeue_and_resume(journal):
    write_time_limit_run(journal)
    s = summarize(journal.run_dir, slurm=False)
    assert (s["step"], s["total_steps"], s["epoch"], s["loss"]) == (40, 40, 0, 1.0)
    assert s["restarts"] == 1 and s["restart_causes"] == {"time_limit": 1} and s["crashes"] == 0
    assert s["run_state"] == "completed" and s["job_id"] == "100" and s["eta_s"] == 0.0
    # Recent rate: the resumed allocation's logs after its first window (32 img/s each).
    assert s["images_per_s"] == pytest.approx(32.0) and s["mfu"] == pytest.approx(0.4)
    # Restart 0, 100 -> 480 s: startup 60 + 20 warm-up, steps 100 + 100 + 50, saves 20 + 20, other 10.
    # Restart 1, 600 -> 840 s: startup 50 + 10 warm-up, steps 3 x 50, save 20, evaluation 3, other 7.
    gpus = 8
    check_breakdown(s, (380 + 240) * gpus, training=(250 + 150) * gpus, startup=(80 + 60) * gpus,
                    checkpoint=(40 + 20) * gpus, evaluation=3 * gpus, other=(10 + 7) * gpus)
    assert 0 < s["goodput"] < 1 and s["goodput"] == pytest.approx(400 / 620)
    assert s["queue_wait_s"] == pytest.approx(100 + 120) and s["waiting_s"] is None  # submit->start, requeue->start
    assert [(a["restart"], a["gpus"], a["start_step"], a["end_step"]) for a in s["allocations"]] == [
        (0, 8, 0, 25), (1, 8, 25, 40)]


def test_hard_kill_loses_the_steps_after_the_last_checkpoint(journal):
    write_hard_kill_run(journal)
    s = summarize(journal.run_dir, slurm=False)
    assert s["restarts"] == 1 and s["restart_causes"] == {"hard_kill": 1}
    # Restart 0, 0 -> 320 s: steps 1-10 kept (100 s), 11-30 recomputed (200 s), startup 10, save 10.
    # Restart 1, 400 -> 750 s: startup 30, steps 11-40 (300 s), save 10, other 10.
    check_breakdown(s, 320 + 350, training=400, lost=200, startup=40, checkpoint=20, other=10)
    assert s["goodput"] == pytest.approx(400 / 670)
    assert s["queue_wait_s"] == pytest.approx(400 - 320)  # the kill went unjournaled: last event -> restart


def test_local_crash_loses_the_tail_up_to_the_crash(journal):
    """No Slurm: two local processes, the first crashes at step 22 having saved step 10."""
    one = {**TRAIN, "world_size": 1, "total_steps": 30}
    journal(10, None, None, "train_start", 0, startup_s=5.0, **one)  # the process started at 5
    journal(110, None, None, "metrics", 10, **metrics(10))
    journal(110, None, None, "checkpoint_begin", 10, path="step-10", async_save=False)
    journal(120, None, None, "checkpoint_commit", 10, path="step-10", seconds=10.0, bytes=1000)
    journal(220, None, None, "metrics", 20, **metrics(20))
    journal(250, None, None, "crash", 22, error="RuntimeError: boom", where="x.py:1")
    journal(300, None, None, "resume", 10, checkpoint="step-10", saved_world_size=1, world_size=1)
    journal(305, None, None, "train_start", 10, startup_s=10.0, **one)  # started at 295
    journal(405, None, None, "metrics", 20, **metrics(20))
    journal(505, None, None, "metrics", 30, **metrics(30))
    journal(506, None, None, "exit", 30, state="completed", total_steps=30, stop=None, elapsed_s=201.0)
    s = summarize(journal.run_dir, slurm=False)
    assert s["restarts"] == 1 and s["restart_causes"] == {"failure": 1} and s["crashes"] == 1
    assert s["job_id"] is None and s["queue_wait_s"] == 0
    # First: 5 -> 250 s, startup 5, steps 1-10 kept 100, 11-20 lost 100 + 30 s to the crash, save 10.
    # Second: 295 -> 506 s, startup 10, steps 11-30 kept 200, other 1.
    check_breakdown(s, 245 + 211, training=300, lost=130, startup=15, checkpoint=10, other=1)


def test_an_evaluation_between_logs_books_only_its_own_time(journal):
    """No Slurm, 1 GPU, 10 s/step, a log every 10 steps and a 20 s evaluation after step 15."""
    one = {**TRAIN, "world_size": 1, "total_steps": 30}
    journal(10, None, None, "train_start", 0, startup_s=10.0, **one)  # the process started at 0
    journal(110, None, None, "metrics", 10, **metrics(10))
    journal(180, None, None, "evaluation", 15, eval_s=20.0, val_top1=0.5, val_top5=0.9)  # steps 11-15 before it
    journal(230, None, None, "metrics", 20, **metrics(20))  # 120 s - 20 s evaluation = 100 s for 10 steps
    journal(330, None, None, "metrics", 30, **metrics(30))
    journal(330, None, None, "checkpoint_begin", 30, path="step-30", async_save=False)
    journal(340, None, None, "checkpoint_commit", 30, path="step-30", seconds=10.0, bytes=1000)
    journal(341, None, None, "exit", 30, state="completed", total_steps=30, stop=None, elapsed_s=331.0)
    s = summarize(journal.run_dir, slurm=False)
    check_breakdown(s, 341, training=300, startup=10, checkpoint=10, evaluation=20, other=1)


def test_the_final_evaluation_during_an_async_save_is_booked_once(journal):
    """1 GPU, 10 s/step. The last save is async: staged in 5 s, it runs on during the 20 s final evaluation
    and is waited for 10 s more before the exit."""
    one = {**TRAIN, "world_size": 1, "total_steps": 20}
    journal(0, 300, 0, "job_start", procs_per_node=1, num_nodes=1)
    journal(10, 300, 0, "train_start", 0, startup_s=8.0, **one)
    journal(110, 300, 0, "metrics", 10, **metrics(10))
    journal(210, 300, 0, "metrics", 20, **metrics(20))
    journal(210, 300, 0, "checkpoint_begin", 20, path="step-20", async_save=True)
    journal(235, 300, 0, "evaluation", 20, eval_s=20.0, val_top1=0.5, val_top5=0.9)
    journal(245, 300, 0, "checkpoint_commit", 20, path="step-20", seconds=35.0, bytes=1000)
    journal(246, 300, 0, "exit", 20, state="completed", total_steps=20, stop=None, elapsed_s=236.0)
    journal(250, 300, 0, "agent_exit", 20, state="completed", reason="training completed")
    s = summarize(journal.run_dir, slurm=False)
    # 0 -> 250 s: startup 10, steps 200, save 5 before and 10 after the evaluation, evaluation 20, other 5.
    check_breakdown(s, 250, training=200, startup=10, checkpoint=15, evaluation=20, other=5)


def test_a_rerun_of_a_completed_run_is_no_restart(journal):
    """Job 100 completed; job 101, the same command again, resumes at the end and exits at once."""
    write_time_limit_run(journal)
    journal(900, None, None, "submit", job_id="101", restart=None, nodes=None, num_nodes=2, procs_per_node=4,
            time_limit_min=60)
    journal(960, 101, 0, "job_start", procs_per_node=4, num_nodes=2)
    journal(990, 101, 0, "resume", 40, checkpoint="step-40", saved_world_size=8, world_size=8)
    journal(991, 101, 0, "exit", 40, state="completed", total_steps=40)
    journal(995, 101, 0, "agent_exit", 40, state="completed", reason="training completed")
    s = summarize(journal.run_dir, slurm=False)
    assert s["run_state"] == "completed" and s["job_id"] == "101"
    assert s["restarts"] == 1 and s["restart_causes"] == {"time_limit": 1}
    assert [a["ending"] for a in s["allocations"]] == ["stopped", "completed", "completed"]
    # As in test_time_limit_requeue_and_resume, plus the rerun's 35 s of start-up and 60 s in the queue.
    gpus = 8
    check_breakdown(s, (380 + 240 + 35) * gpus, training=400 * gpus, startup=(140 + 35) * gpus,
                    checkpoint=60 * gpus, evaluation=3 * gpus, other=17 * gpus)
    assert s["queue_wait_s"] == pytest.approx(220 + 60)


def test_an_event_after_a_torn_line_starts_a_line_of_its_own(journal):
    """A kill mid-write leaves a line without its newline; the next event must not be glued onto it."""
    journal(0, 100, 0, "job_start")
    path = journal.run_dir / vit.journal.JOURNAL
    with open(path, "a") as f:
        f.write('{"event": "metrics", "st')
    journal(5, 100, 0, "agent_exit")
    events = vit.journal.read_journal(journal.run_dir)
    assert [e["event"] for e in events] == ["job_start", "agent_exit"]
    assert path.read_text().count("\n") == 3


def restart_lines(fig):
    return [line for ax in fig.axes for line in ax.get_lines() if str(line.get_gid()).startswith("restart:")]


def test_plot_marks_restarts_by_cause(journal, tmp_path):
    write_time_limit_run(journal)
    out = tmp_path / "status.png"
    fig = plot(journal.run_dir, out)
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000
    assert len(fig.axes) == 3 and [ax.get_ylabel() for ax in fig.axes] == ["loss", "learning rate", "images/s"]
    lines = restart_lines(fig)
    assert len(lines) == 3  # one requeue, on each panel
    for line in lines:
        assert list(line.get_xdata()) == [25, 25] and line.get_gid() == "restart:time_limit"
        assert (line.get_color(), line.get_linestyle()) == RESTART_STYLES["time_limit"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["time limit"]
    assert len(set(RESTART_STYLES.values())) == len(RESTART_STYLES)  # every cause looks different
    loss = fig.axes[0].get_lines()[0]
    assert list(loss.get_xdata()) == [10, 20, 25, 30, 35, 40]


def test_plot_marks_a_hard_kill_where_it_happened(journal, tmp_path):
    write_hard_kill_run(journal)
    fig = plot(journal.run_dir, tmp_path / "kill.png")
    marks = {(tuple(line.get_xdata()), line.get_gid()) for line in restart_lines(fig)}
    assert marks == {((30, 30), "restart:hard_kill")}


# --- a real local run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("status") / "run"
    run_job(run_dir, "train.steps=8")
    return run_dir


def test_status_of_a_real_local_run(real_run):
    s = summarize(real_run)
    assert (s["step"], s["total_steps"], s["run_state"], s["restarts"]) == (8, 8, "completed", 0)
    assert 0 < s["goodput"] <= 1 and sum(s["breakdown"].values()) == pytest.approx(1.0)
    assert s["breakdown"]["lost"] == 0 and s["breakdown"]["startup"] > 0
    assert s["job_state"] is None and s["queue_wait_s"] == 0 and s["images_per_s"] > 0 and s["eta_s"] == 0
    evals = [e for e in read_journal(real_run) if e["event"] == "evaluation"]
    assert evals and all(e["eval_s"] > 0 for e in evals)


def test_rerunning_a_completed_local_run_ends_cleanly(real_run, tmp_path):
    again = tmp_path / "run"
    shutil.copytree(real_run, again)
    assert "already complete" in run_job(again, "train.steps=8").stdout
    s = summarize(again)
    assert (s["run_state"], s["restarts"], s["restart_causes"]) == ("completed", 0, {})
    assert [a["ending"] for a in s["allocations"]] == ["completed", "completed"]


def test_status_cli_json_plot_and_tensorboard(real_run, tmp_path):
    png = tmp_path / "run.png"
    proc = subprocess.run([sys.executable, "jobs/status.py", str(real_run), "--json", "--plot", str(png),
                           "--tensorboard"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["step"] == 8 and s["total_steps"] == 8 and 0 < s["goodput"] <= 1
    assert set(s) >= {"epoch", "loss", "images_per_s", "mfu", "job_state", "restarts", "restart_causes", "eta_s",
                      "goodput", "breakdown", "queue_wait_s"}
    assert png.read_bytes().startswith(PNG)
    assert list((real_run / "tensorboard").glob("events.out.tfevents.*"))  # the dev extra installs tensorboard
    text = subprocess.run([sys.executable, "jobs/status.py", "-m", str(real_run.parent)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "8/8 (100.0%)" in text.stdout and "goodput" in text.stdout, text.stderr


# --- the planner -------------------------------------------------------------------------------------



def vit_h14_by_hand():
    """ViT-H/14 at 224 px with the 21,841-class head: (parameters, tensors, training FLOPs per image)."""
    d, mlp, depth, tokens, classes = 1280, 5120, 32, 16 * 16 + 1, 21841
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    params = (3 * 14 * 14 * d + d) + d + tokens * d + depth * block + 2 * d + (d * classes + classes)
    tensors = 4 + 12 * depth + 2 + 2
    per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d  # qkv + proj, mlp, QK^T and AV
    macs = 256 * (3 * 14 * 14) * d + depth * per_block + d * classes
    return params, tensors, 6 * macs  # backward = 2 x forward; 2 FLOPs per MAC


def test_plan_of_the_seed_recipe_on_sg_h100():
    from vit.cluster.plan import plan

    p = plan(recipe("cluster=sg_h100", "planner.mfu=0.5", "planner.peak_tflops=1000", "planner.fs_gbps=1",
                     "planner.mtbi_hours=1"))
    params, tensors, flops = vit_h14_by_hand()
    assert params == 658_743_121 and flops == 1_003_930_713_600  # ~632M without the 21K head
    # Each epoch is its full global batches of what stays after 2 images per class are held out for validation.
    steps = 90 * ((14_197_122 - 2 * 21_841) // 2048)
    assert steps == 621_900 and p["total_steps"] == steps and p["gpus"] == 32
    assert p["params"] == params and p["flops_per_image"] == flops
    assert p["total_flops"] == steps * 2048 * flops
    train_s = steps * 2048 * flops / (32 * 1000e12 * 0.5)
    assert p["train_s"] == pytest.approx(train_s) and train_s == pytest.approx(79_916, abs=1)  # 22.2 h
    assert (p["time_limit_min"], p["allocations"], p["requeues"]) == (2880, 1, 0)
    assert p["checkpoint_bytes"] == 12 * params + 4 * tensors == 7_904_919_020
    assert p["save_s"] == pytest.approx(7.904919020)
    interval = math.sqrt(2 * 7.904919020 * 3600)  # Young/Daly: ~238.6 s
    step_s = 2048 * flops / (32 * 1000e12 * 0.5)
    assert p["checkpoint_interval_s"] == pytest.approx(interval)
    assert p["checkpoint_interval_steps"] == round(interval / step_s) == 1857


def test_plan_defaults_time_limits_and_local():
    from vit.cluster.plan import plan, settings

    assert settings(recipe()) == {"mfu": 0.40, "peak_tflops": 989.0, "fs_gbps": 5.0, "mtbi_hours": 24.0}
    p = plan(recipe("cluster=sg_h100", "cluster.time_min=600"))  # 10-hour limit, default MFU 40%
    train_s = 621_900 * 2048 * 1_003_930_713_600 / (32 * 989e12 * 0.40)
    assert p["allocations"] == math.ceil(train_s / 36_000) == 3 and p["requeues"] == 2
    local = plan(recipe())
    assert (local["gpus"], local["time_limit_min"], local["requeues"]) == (1, None, 0)


def test_plan_cli_prints_and_creates_nothing(tmp_path):
    proc = subprocess.run([sys.executable, ROOT / "jobs" / "plan.py", "cluster=sg_h100", f"run_dir={tmp_path / 'never'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "621,900" in proc.stdout and "Young/Daly" in proc.stdout and "7.90 GB" in proc.stdout
    # A sweep is planned point by point, here: the Slurm launcher that cluster=sg_h100 selects never runs.
    sweep = subprocess.run([sys.executable, ROOT / "jobs" / "plan.py", "-m", "cluster=sg_h100",
                            "train.global_batch=1024,2048", f"run_dir={tmp_path / 'never'}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert sweep.returncode == 0, sweep.stderr
    assert "1,243,890 x global batch 1,024" in sweep.stdout and "621,900 x global batch 2,048" in sweep.stdout
    assert sweep.stdout.count("# cluster=sg_h100 train.global_batch=") == 2, sweep.stdout
    assert list(tmp_path.iterdir()) == []  # no run dir, no Hydra output dir, no submitit folder
