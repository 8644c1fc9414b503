"""Checkpoints: exact resume, elastic resume, optimizer state, damaged and killed saves, retention,
disk full, export to timm, async save.

Most tests run the real entry point (`jobs/pretrain.py`, under torchrun for 2 ranks) on the TINY
config of `helpers` and compare the per-step losses in the run journal with one uninterrupted run.
Same world size on CPU in fp32 must be bitwise equal (`==` on the floats); a change of world size
changes the order of floating-point sums, so it is compared with a relative tolerance.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, checkpoint_cli, losses, plant_refused_class, run_job

from vit.engine.checkpoint import COMPLETE, Checkpointer, problem_with, valid_checkpoints

STEPS = "train.steps=20"  # 256 samples / global batch 16 = 16 steps an epoch: 20 crosses an epoch boundary


# --- helpers ----------------------------------------------------------------------------------------

def assert_bitwise(got: dict, want: dict, steps) -> None:
    steps = list(steps)
    missing = [s for s in steps if s not in got]
    assert not missing, f"steps {missing} were not logged; logged: {sorted(got)}"
    diff = {s: (got[s], want[s]) for s in steps if got[s] != want[s]}
    assert not diff, f"losses differ from the uninterrupted run at steps (got, want): {diff}"


def assert_close_losses(got: dict, want: dict, steps, rel: float = 1e-5) -> None:
    steps = list(steps)
    missing = [s for s in steps if s not in got]
    assert not missing, f"steps {missing} were not logged; logged: {sorted(got)}"
    diff = {s: (got[s], want[s]) for s in steps if got[s] != pytest.approx(want[s], rel=rel)}
    assert not diff, f"losses differ by more than rel {rel} at steps (got, want): {diff}"


def steps_on_disk(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def valid_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in valid_checkpoints(Path(run_dir) / "checkpoints", warn=False))


def copy_run(src: Path, dst: Path, upto_step: int) -> Path:
    """A copy of a run as if it had stopped after `upto_step`: later checkpoints and metrics removed."""
    shutil.copytree(src, dst)
    for path in (dst / "checkpoints").iterdir():
        if path.is_dir() and int(path.name[5:]) > upto_step:
            shutil.rmtree(path)
    (dst / "checkpoints" / "latest").write_text(f"step-{upto_step}\n")
    lines = (dst / "journal.jsonl").read_text().splitlines()
    (dst / "journal.jsonl").write_text("".join(line + "\n" for line in lines
                                               if (json.loads(line)["step"] or 0) <= upto_step))
    return dst


def job_command(run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    args = [f"run_dir={run_dir}", *TINY, *overrides]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                str(ROOT / "jobs/pretrain.py"), *args]
    return [sys.executable, str(ROOT / "jobs/pretrain.py"), *args]


def wait_for(condition, proc: subprocess.Popen, timeout: float, what: str, logs=None) -> None:
    """Poll `condition` until it holds; fail if the job exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
            text = logs() if logs else f"{(out or '')[-3000:]}\n{(err or '')[-3000:]}"
            raise AssertionError(f"the job exited {proc.returncode} or timed out before {what}\n{text}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def env_of(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def fake_checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    """A small but real DCP checkpoint directory (what `problem_with` checks), without training."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    path = root / f"step-{step}"
    dcp.save({"model": {"w": torch.arange(4096.0) + step}}, storage_writer=FileSystemWriter(str(path)),
             no_dist=True)
    (path / "train_state.json").write_text(json.dumps({"step": step}))
    if complete:
        (path / COMPLETE).write_text("0\n")
    return path


def tree(run_dir: Path) -> dict:
    """Every file under a run's checkpoints with its size and mtime: what must not change."""
    return {p.relative_to(run_dir): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}


def errors_of(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


# --- the uninterrupted reference --------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, 20 steps, checkpoints at 12, 16 and 20 kept (the other tests copy them)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_job(run_dir, STEPS, "checkpoint.keep=3")
    assert sorted(losses(run_dir)) == list(range(1, 21))
    assert valid_steps(run_dir) == [12, 16, 20]
    return run_dir


# --- unit tests of the Checkpointer -----------------------------------------------------------------

def test_checkpoint_before_the_first_step_writes_nothing(tmp_path):
    from vit.models.vit import build_model

    model = build_model("vit_tiny_patch16", num_classes=3, img_size=32)
    optimizer = torch.optim.AdamW(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(tmp_path / "checkpoints", 0, every_steps=1)
    ckpt.save(0, model, optimizer, {"world_size": 1})
    assert not (tmp_path / "checkpoints").exists(), list(tmp_path.rglob("*"))
    assert ckpt.load_latest(model, optimizer) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a fresh start: untouched


def test_retention_keeps_the_newest_valid_checkpoints_and_newer_saves_in_flight(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 7):
        fake_checkpoint(root, step)
    # the save just committed (step 6) went bad afterwards: one of its shards is truncated
    shard = next((root / "step-6").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert "truncated" in problem_with(root / "step-6")
    fake_checkpoint(root, 7, complete=False)  # another save still being written
    ckpt = Checkpointer(root, 0, keep=2, keep_every=3)
    ckpt._apply_retention(root / "step-6")
    names = sorted(p.name.split(".")[0] for p in root.iterdir() if p.is_dir())
    # kept: the 2 newest valid (5, 4), the permanent one (3), the in-flight one (7), and the damaged
    # newest (6), set aside
    assert names == ["step-3", "step-4", "step-5", "step-6", "step-7"] and not (root / "step-6").exists()
    assert [p.name for p in valid_checkpoints(root, warn=False)] == ["step-5", "step-4", "step-3"]

    # keep=1 is raised to 2: even then the newest valid one survives a damaged newest save
    ckpt = Checkpointer(root, 0, keep=1)
    ckpt._apply_retention(root / "step-6")
    assert [p.name for p in valid_checkpoints(root, warn=False)] == ["step-5", "step-4"]
    assert len(list(root.glob("step-6.damaged-*"))) == 1 and (root / "step-7").is_dir()


class RunsCommand:
    """Pickles as a call of os.system: what a planted checkpoint would do to an unsafe loader."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return os.system, (f"touch {self.mark}",)


def planted_metadata(mark: Path) -> bytes:
    """A `.metadata` that names os.system through a DCP module (pickle resolves dotted names)."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()
    return (b"\x80\x04" + text("torch.distributed.checkpoint.filesystem") + text("os.system") + b"\x93"
            + text(f"touch {mark}") + b"\x85R.")


def two_saves(tmp_path, plant_in_optimizer: object = None):
    """A Linear and its AdamW saved at steps 1 and 2 (one process, no process group); the second
    save may carry `plant_in_optimizer` as its lr (DCP stores it as a pickled byte item)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(tmp_path / "checkpoints", 0)
    saved = []
    for step in (1, 2):
        model(torch.randn(2, 8)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        lr = optimizer.param_groups[0]["lr"]
        if step == 2 and plant_in_optimizer is not None:
            optimizer.param_groups[0]["lr"] = plant_in_optimizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
            ckpt.save(step, model, optimizer, {"world_size": 1})
        optimizer.param_groups[0]["lr"] = lr
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
    return ckpt, saved


@pytest.mark.parametrize("damage", ["zeroed shards", "empty rng file"])
def test_a_checkpoint_that_fails_to_load_is_set_aside_and_the_previous_one_loads(tmp_path, damage):
    """Damage the size check cannot see: the loader warns, renames the checkpoint aside (kept as it
    was, with the reason) and loads the previous one."""
    ckpt, saved = two_saves(tmp_path)
    step_2 = tmp_path / "checkpoints/step-2"
    if damage == "zeroed shards":
        for shard in step_2.glob("*.distcp"):
            shard.write_bytes(bytes(shard.stat().st_size))
    else:
        (step_2 / "rng/rank-0.json").write_text("")
    assert problem_with(step_2) is None  # invisible to the size check
    files = {f.relative_to(step_2): f.read_bytes() for f in step_2.rglob("*") if f.is_file()}

    fresh = torch.nn.Linear(8, 4)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-2: failed to load"):
        state = ckpt.load_latest(fresh, torch.optim.AdamW(fresh.parameters()))
    assert state is not None and state["step"] == 1 and state["path"].endswith("step-1")
    assert all(torch.equal(v, saved[0][k]) for k, v in fresh.state_dict().items())
    [aside] = (tmp_path / "checkpoints").glob("step-2.damaged-*")
    assert not step_2.exists()
    assert {f: (aside / f).read_bytes() for f in files} == files
    assert json.loads((aside / "SET_ASIDE.json").read_text())["reason"].startswith("failed to load (")


@pytest.mark.parametrize("where", ["optimizer state", "metadata"])
def test_a_pickled_call_in_a_checkpoint_is_refused_never_run_and_never_skipped(tmp_path, where):
    """A planted payload is a refused class: the load stops with CheckpointRefusedError naming the
    key and the class, runs nothing, falls back to nothing and leaves every directory in place."""
    from vit.errors import CheckpointRefusedError

    mark = tmp_path / "payload-ran"
    ckpt, _ = two_saves(tmp_path, RunsCommand(mark) if where == "optimizer state" else None)
    step_2 = tmp_path / "checkpoints/step-2"
    if where == "metadata":
        (step_2 / ".metadata").write_bytes(planted_metadata(mark))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    fresh = torch.nn.Linear(8, 4)
    with pytest.raises(CheckpointRefusedError) as refused:
        ckpt.load_latest(fresh, torch.optim.AdamW(fresh.parameters()))
    assert not mark.exists(), "a pickled call in the checkpoint ran"
    key = (".metadata holds torch.distributed.checkpoint.filesystem.os.system" if where == "metadata"
           else "optim.param_groups.0.lr holds posix.system")
    assert str(refused.value).startswith(f"checkpoint {step_2} is refused by the safe loader: {key} (written with ")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_a_save_that_fails_for_another_reason_than_a_full_disk_is_not_a_user_error(tmp_path):
    """A read-only checkpoint directory (a real I/O error): one clear error of the kind the Slurm
    agent requeues (a full disk, by contrast, is the user's to fix), and the earlier checkpoint kept."""
    from vit.errors import USER_ERRORS, CheckpointError, CheckpointSaveError

    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("this test needs root (to mount a tmpfs read-only) and must not be skipped in CI")
        pytest.skip("needs root to mount a tmpfs")
    root = tmp_path / "checkpoints"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)], check=True)
    try:
        model = torch.nn.Linear(8, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        ckpt = Checkpointer(root, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
            ckpt.save(1, model, optimizer, {"world_size": 1})
            subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
            with pytest.raises(CheckpointSaveError) as failed:
                ckpt.save(2, model, optimizer, {"world_size": 1})
        assert str(failed.value) == (f"saving {root}/step-2 failed ([Errno 30] Read-only file system: "
                                     f"'{root}/step-2'); the previous checkpoint {root}/step-1 is kept")
        assert not isinstance(failed.value, USER_ERRORS) and issubclass(CheckpointError, USER_ERRORS)
        assert [p.name for p in valid_checkpoints(root, warn=False)] == ["step-1"]
    finally:
        subprocess.run(["umount", str(root)], check=False)


@pytest.mark.parametrize("shard", range(4))
def test_a_save_whose_shard_file_cannot_be_written_is_abandoned_whichever_thread_writes_it(tmp_path, monkeypatch,
                                                                                            shard):
    """DCP writes a checkpoint's 4 shard files from 4 threads, and its extra threads only print a
    failure: a save whose own thread succeeded committed a .metadata without their shards. One shard
    file is made unwritable (a directory stands where it goes): whichever thread meets it, the save
    fails in one line, leaves no COMPLETE, and the previous checkpoint stays the valid one."""
    import vit.engine.checkpoint
    from vit.errors import CheckpointSaveError

    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    real = vit.engine.checkpoint._write_atomic

    def and_block_a_shard(path, text):
        real(path, text)
        if path.name == "train_state.json" and path.parent.name == "step-2":  # written just before DCP's shards
            (path.parent / f"__0_{shard}.distcp").mkdir()

    monkeypatch.setattr(vit.engine.checkpoint, "_write_atomic", and_block_a_shard)
    ckpt = Checkpointer(root, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        ckpt.save(1, model, optimizer, {"world_size": 1})
        with pytest.raises(CheckpointSaveError) as failed:
            ckpt.save(2, model, optimizer, {"world_size": 1})
    assert str(failed.value).startswith(f"saving {root}/step-2 failed (") and "Is a directory" in str(failed.value)
    assert str(failed.value).endswith(f"the previous checkpoint {root}/step-1 is kept")
    assert [p.name for p in valid_checkpoints(root, warn=False)] == ["step-1"]
    assert not (root / "step-2").exists() and (root / "latest").read_text().strip() == "step-1"
    assert not [t for t in threading.enumerate() if t.name.endswith("(_write_files_from_queue)")]


def test_retention_checks_each_checkpoint_once(tmp_path, monkeypatch):
    import vit.engine.checkpoint
    checked = []
    real = vit.engine.checkpoint.problem_with
    monkeypatch.setattr(vit.engine.checkpoint, "problem_with", lambda p: checked.append(p.name) or real(p))
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, 0, keep=2, keep_every=2)
    for step in range(1, 6):
        ckpt._apply_retention(fake_checkpoint(root, step))
    assert sorted(checked) == [f"step-{s}" for s in range(1, 6)]
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4", "step-5"]


def test_a_restart_checks_checkpoints_newest_first_until_one_loads(tmp_path, monkeypatch):
    """Each check reads the whole .metadata (~1 s for ViT-H on 32 ranks) while the other ranks wait:
    a restart reads only as many as it needs, and the commit after it none again."""
    import vit.engine.checkpoint
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    ckpt = Checkpointer(tmp_path / "checkpoints", 0, keep=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        for step in (1, 2, 3):
            ckpt.save(step, model, optimizer, {"world_size": 1})
        (tmp_path / "checkpoints/step-3/COMPLETE").unlink()  # killed before its commit
        checked = []
        real = vit.engine.checkpoint.problem_with
        monkeypatch.setattr(vit.engine.checkpoint, "problem_with", lambda p: checked.append(p.name) or real(p))
        restarted = Checkpointer(tmp_path / "checkpoints", 0, keep=3)
        assert restarted.load_latest(model, optimizer)["step"] == 2
        assert checked == ["step-3", "step-2"]
        restarted.save(3, model, optimizer, {"world_size": 1})
    assert checked == ["step-3", "step-2", "step-3", "step-1"]  # retention: the new one and the unchecked one


def test_retention_sets_damaged_checkpoints_aside_and_deletes_nothing_while_one_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    (root / "step-4" / ".metadata").unlink()  # damaged: counts for nothing, set aside, never deleted
    ckpt = Checkpointer(root, 0, keep=2)
    ckpt._apply_retention(fake_checkpoint(root, 8))
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("step-4.damaged-")) == ["step-6", "step-8"]
    assert len(list(root.glob("step-4.damaged-*"))) == 1

    plant_refused_class(root / "step-6", "metadata")  # as a later start with other versions sees it
    ckpt = Checkpointer(root, 0, keep=2)
    with pytest.warns(UserWarning, match="retention deletes nothing while a checkpoint is refused"):
        ckpt._apply_retention(fake_checkpoint(root, 10))
    ckpt._apply_retention(fake_checkpoint(root, 12))
    assert sorted(p.name for p in root.glob("step-?*") if "damaged" not in p.name) == [
        "step-10", "step-12", "step-6", "step-8"]


def test_a_save_never_overwrites_a_committed_checkpoint(tmp_path):
    ckpt, _ = two_saves(tmp_path)
    committed = tmp_path / "checkpoints/step-2"
    files = {f.relative_to(committed): f.read_bytes() for f in committed.rglob("*") if f.is_file()}
    model = torch.nn.Linear(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt.save(2, model, torch.optim.AdamW(model.parameters()), {"world_size": 1})
    [aside] = (tmp_path / "checkpoints").glob("step-2.damaged-*")
    assert {f: (aside / f).read_bytes() for f in files} == files
    assert problem_with(committed) is None


def test_checkpoints_of_another_setup_are_an_error_and_stay(tmp_path):
    """A changed class count or model in the same run_dir would fail to load every checkpoint; the
    run must not take that for damage, start afresh and overwrite them."""
    run_dir = tmp_path / "run"
    run_job(run_dir, "train.steps=4")
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    for override, key in (("data.num_classes=5", "classes"), ("model=vit_small_patch16", "model.name"),
                          ("train.global_batch=32", "train.global_batch")):
        proc = run_job(run_dir, "train.steps=8", override, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        [error] = errors_of(proc)
        assert error.startswith(f"error: {run_dir} holds checkpoints of another setup ({key}: "), error
        assert error.endswith("resume with the same settings, or give this one a new run_dir"), error
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == before


def _adamw_round_trip(rank: int, root: Path) -> None:
    """On each rank: train 2 steps, save, restore into a fresh model and optimizer, compare exactly."""
    from torch.distributed.tensor import DTensor

    from vit.engine.distributed import close, init_distributed
    from vit.engine.optim import build_optimizer
    from vit.engine.parallel import shard_model
    from vit.engine.train import train_step
    from vit.models.vit import build_model

    world = init_distributed("cpu")
    cpu = torch.device("cpu")

    def fresh(seed):
        torch.manual_seed(seed)
        model = build_model("vit_tiny_patch16", num_classes=5, img_size=32)
        shard_model(model, world, "fp32")
        return model, build_optimizer(model, 1e-3, 0.05)

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    g = torch.Generator().manual_seed(1 + rank)
    batch = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    model, optimizer = fresh(0)
    for _ in range(2):
        train_step(model, optimizer, batch, cpu)
    Checkpointer(root, rank).save(2, model, optimizer, {"world_size": world.world_size})

    model2, optimizer2 = fresh(1)  # different weights, no optimizer state yet
    assert not torch.equal(full(model2.pos_embed), full(model.pos_embed))
    assert not optimizer2.state
    state = Checkpointer(root, rank).load_latest(model2, optimizer2)
    assert state["step"] == 2 and state["path"].endswith("step-2") and state["world_size"] == world.world_size

    params, params2 = list(model.parameters()), list(model2.parameters())
    assert len(params) == len(params2) > 0
    for p, p2 in zip(params, params2):
        assert torch.equal(full(p), full(p2))
        s, s2 = optimizer.state[p], optimizer2.state[p2]
        assert set(s) == set(s2) == {"step", "exp_avg", "exp_avg_sq"}, (set(s), set(s2))
        assert float(full(s["step"])) == float(full(s2["step"])) == 2.0
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = full(s[key]), full(s2[key])
            assert a.abs().sum() > 0 and torch.equal(a, b), key
    for group, group2 in zip(optimizer.param_groups, optimizer2.param_groups):
        assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in group2.items() if k != "params"}
    # and both continue identically
    train_step(model, optimizer, batch, cpu)
    train_step(model2, optimizer2, batch, cpu)
    for p, p2 in zip(params, params2):
        assert torch.equal(full(p), full(p2))
    if rank == 0:
        (root / "ok").write_text("ok")
    close()
    # Leave at once: torch/gloo sometimes abort in interpreter shutdown after destroy_process_group
    # ("terminate called without an active exception", ~1 in 10 runs, with or without checkpoints),
    # which would fail this test for a reason that is not the checkpoint's.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("world_size", [2])
def test_adamw_moments_and_step_counts_survive_a_round_trip(tmp_path, world_size):
    from dist_workers import spawn
    spawn(_adamw_round_trip, world_size, tmp_path)
    assert (tmp_path / "ok").exists()


# --- stop and resume on the same world size: bitwise -------------------------------------------------

def test_resume_after_an_evaluation_is_bitwise_and_skipped_evaluations_are_made_up(tmp_path):
    """Drop path draws from the global RNG, which the checkpoint saves before an evaluation: the
    evaluation must not move it, or the uninterrupted run and a resumed one diverge. A stop skips
    the evaluation due at its step, the final one included; the next start makes it up."""
    common = ["train.steps=6", "train.eval_every=2", "checkpoint.every_steps=2", "model.drop_path_rate=0.2"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    run_job(straight, *common)
    run_job(run, *common, "train.stop_after_steps=2")
    assert not (run / "eval/step-2.json").exists()
    run_job(run, *common, "train.stop_after_steps=4")  # resumes at step 2, stops at the last step
    assert_bitwise(losses(run), losses(straight), range(1, 7))
    assert not (run / "eval/step-6.json").exists()
    third = run_job(run, *common)
    assert "nothing to do" not in third.stdout
    for step in (2, 4, 6):
        assert json.loads((run / f"eval/step-{step}.json").read_text()) == json.loads(
            (straight / f"eval/step-{step}.json").read_text()), step
    assert "nothing to do" in run_job(run, *common).stdout


def test_stop_and_resume_is_bitwise_at_several_stop_points(tmp_path, reference):
    ref, run = losses(reference), tmp_path / "run"
    # 1. a stop at a step that is also a scheduled save (every_steps=4)
    first = run_job(run, STEPS, "train.stop_after_steps=4")
    assert "stop requested (step_limit): checkpoint at step 4" in first.stdout
    assert steps_on_disk(run) == valid_steps(run) == [4]
    assert_bitwise(losses(run), ref, range(1, 5))
    # 2. with dataloader workers, across the epoch boundary (step 16), stopping mid-epoch between two
    #    scheduled saves (16 and 20): step 17 is 1 step into epoch 1
    second = run_job(run, STEPS, "train.stop_after_steps=13", "data.num_workers=2")
    assert f"resumed from {run}/checkpoints/step-4 (step 4, epoch 0" in second.stdout
    assert "stop requested (step_limit): checkpoint at step 17" in second.stdout
    state = json.loads((run / "checkpoints/step-17/train_state.json").read_text())
    assert state["step"] == 17 and state["data"] == {"epoch": 1, "offset": 16}
    assert steps_on_disk(run) == valid_steps(run) == [16, 17]
    assert_bitwise(losses(run), ref, range(1, 18))
    # 3. to the end, from the mid-epoch checkpoint, without workers
    last = run_job(run, STEPS)
    assert f"resumed from {run}/checkpoints/step-17 (step 17, epoch 1" in last.stdout
    assert '"state": "completed"' in last.stdout
    assert_bitwise(losses(run), ref, range(1, 21))


def test_interrupt_during_accumulation_saves_at_a_step_boundary_and_resumes_bitwise(tmp_path):
    accumulate = "train.micro_batch=4"  # global batch 16 on 1 process: 4 micro-batches per step
    steps = "train.steps=40"  # room for the signal to land while the run still trains
    ref_dir, run = tmp_path / "reference", tmp_path / "run"
    assert "1 ranks x 4 accumulation" in run_job(ref_dir, steps, accumulate).stdout
    ref = losses(ref_dir)

    proc = subprocess.Popen(job_command(run, steps, accumulate), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(losses(run)) >= 2, proc, 240, "2 logged steps")
        proc.send_signal(signal.SIGINT)  # almost surely lands inside a step's forward/backward passes
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    match = re.search(r"stop requested \(interrupt\): checkpoint at step (\d+) saved", out)
    assert match, out[-3000:]
    stopped = int(match.group(1))
    assert 2 <= stopped < 40
    logged = losses(run)
    assert max(logged) == stopped  # the step in progress was finished, and no further one started
    state = json.loads((run / f"checkpoints/step-{stopped}/train_state.json").read_text())
    assert state["step"] == stopped and state["data"] == {"epoch": 0, "offset": 16 * stopped}
    assert problem_with(run / f"checkpoints/step-{stopped}") is None

    again = run_job(run, steps, accumulate)
    assert f"resumed from {run}/checkpoints/step-{stopped} (step {stopped}," in again.stdout
    assert_bitwise(losses(run), ref, range(1, 41))


# --- elastic resume: a different world size ----------------------------------------------------------

def test_elastic_resume_from_2_ranks_on_1(tmp_path, reference):
    run = tmp_path / "run"
    first = run_job(run, STEPS, "train.stop_after_steps=6", nproc=2)
    assert "2 ranks x 1 accumulation" in first.stdout and "checkpoint at step 6" in first.stdout
    second = run_job(run, STEPS)
    assert f"resumed from {run}/checkpoints/step-6 (step 6, epoch 0, saved on 2 ranks, now 1)" in second.stdout
    assert "1 ranks x 2 accumulation" in second.stdout
    assert_close_losses(losses(run), losses(reference), range(1, 21))


def test_elastic_resume_from_1_rank_on_2(tmp_path, reference):
    run = copy_run(reference, tmp_path / "run", upto_step=12)  # a 1-process run stopped at step 12
    resumed = run_job(run, STEPS, nproc=2)
    assert f"resumed from {run}/checkpoints/step-12 (step 12, epoch 0, saved on 1 ranks, now 2)" in resumed.stdout
    assert "2 ranks x 1 accumulation" in resumed.stdout
    assert_close_losses(losses(run), losses(reference), range(13, 21))


# --- a rank killed in the middle of a save -----------------------------------------------------------

def test_kill_9_of_a_rank_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, reference):
    run, step = tmp_path / "run", 8
    hooks = os.pathsep.join([str(ROOT / "tests/hooks"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": hooks, "VIT_TEST_SLOW_SAVE_AT_STEP": str(step),
           "VIT_TEST_SLOW_SAVE_RANKS": "1", "VIT_TEST_SLOW_SAVE_SECONDS": "120"}
    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen(job_command(run, STEPS, nproc=2), cwd=ROOT, env=env, stdout=out, stderr=err,
                                start_new_session=True)  # its own process group, to clean up the workers too
    saving = run / f"checkpoints/step-{step}"
    try:
        # the hook holds rank 1 inside the save of step 8, before its shards (rank 0 goes on with its own)
        wait_for(lambda: "slow-save hook] rank 1" in err_file.read_text(), proc, 240, f"the save of step {step}",
                 logs=lambda: out_file.read_text()[-2000:] + err_file.read_text()[-4000:])
        assert saving.is_dir() and not (saving / COMPLETE).exists()
        ranks = {int(env_of(pid).get("RANK", -1)): pid for pid in children(proc.pid)}
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        try:  # whatever is left of the job (torchrun, the surviving rank)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode != 0, out_file.read_text()[-2000:]
    assert not (saving / COMPLETE).exists() and valid_steps(run) == [4]
    killed = losses(run)
    assert max(killed) == step

    resumed = run_job(run, STEPS, nproc=2)
    assert f"skipping checkpoint {saving}: incomplete (no COMPLETE marker)" in resumed.stderr
    assert f"resumed from {run}/checkpoints/step-4 (step 4," in resumed.stdout
    final = losses(run)
    assert_bitwise(final, killed, range(1, step + 1))  # the redone steps 5..8 are bitwise the same
    assert_close_losses(final, losses(reference), range(1, 21))
    assert steps_on_disk(run) == valid_steps(run) == [16, 20]  # the broken step-8 was redone, then retired


# --- damaged checkpoints -----------------------------------------------------------------------------

def test_damaged_checkpoints_are_skipped_set_aside_and_kept(tmp_path, reference, capsys):
    """A truncated shard (step-20) and a missing .metadata (step-16): the run warns, sets both aside,
    resumes bitwise from step-12, and its new step-16 and step-20 never overwrite them."""
    run = copy_run(reference, tmp_path / "run", upto_step=20)
    shard = sorted((run / "checkpoints/step-20").glob("*.distcp"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    (run / "checkpoints/step-16/.metadata").unlink()
    damaged = {p: (run / "checkpoints" / p).read_bytes() for p in ("step-20/" + shard.name, "step-16/train_state.json")}

    assert checkpoint_cli(["ls", str(run)]) == 0
    listing = {int(line.split()[0]): line for line in capsys.readouterr().out.splitlines()[1:]}
    assert listing[20].endswith(f"shard {shard.name} is truncated ({shard.stat().st_size} of "
                                f"{shard.stat().st_size + 1000} bytes)"), listing[20]
    assert "unreadable metadata (FileNotFoundError" in listing[16], listing[16]
    assert listing[12].endswith("valid") and "torch " in listing[12], listing[12]

    # the run's "latest" still names step-20; it must not be trusted
    resumed = run_job(run, STEPS)
    assert f"skipping checkpoint {run}/checkpoints/step-20: shard {shard.name} is truncated (" in resumed.stderr
    assert f"skipping checkpoint {run}/checkpoints/step-16: unreadable metadata" in resumed.stderr
    assert f"resumed from {run}/checkpoints/step-12 (step 12," in resumed.stdout
    assert_bitwise(losses(run), losses(reference), range(13, 21))
    for name, data in damaged.items():
        step, file = name.split("/")
        [aside] = (run / "checkpoints").glob(f"{step}.damaged-*")
        assert (aside / file).read_bytes() == data
    assert checkpoint_cli(["ls", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["status"].split(":")[0]) for r in rows] == [
        (20, "valid"), (16, "valid"), (20, "set aside"), (16, "set aside")]
    assert "is truncated" in rows[2]["status"] and "unreadable metadata" in rows[3]["status"]


def test_a_run_whose_checkpoints_are_all_damaged_stops_instead_of_starting_from_step_0(tmp_path, reference):
    run = copy_run(reference, tmp_path / "run", upto_step=20)
    for step in (12, 16, 20):
        sorted((run / f"checkpoints/step-{step}").glob("*.distcp"))[0].unlink()
    for attempt in (1, 2):  # and again, now that they are set aside: still no fresh start
        proc = run_job(run, STEPS, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        [error] = errors_of(proc)
        assert re.fullmatch(f"error: no checkpoint of {run} loads, and it never starts again from step 0 on its own; "
                            f"set aside in {run}/checkpoints: "
                            + "; ".join(rf"step-{s}\.damaged-[0-9TZ]+ \(shard __0_0\.distcp is missing\)"
                                        for s in (20, 16, 12))
                            + "; inspect them, then remove them to start afresh \\(or restore one that loads\\)",
                            error), error
        assert max(losses(run)) == 20 and "training " not in proc.stdout
    assert sorted(p.name.split(".")[0] for p in (run / "checkpoints").glob("step-*")) == [
        "step-12", "step-16", "step-20"]
    assert checkpoint_cli(["check", str(run)]) == 2


@pytest.mark.parametrize("where,scope", [("metadata", "newest"), ("metadata", "all"),
                                         ("byte item", "newest"), ("byte item", "all")])
def test_a_refused_checkpoint_stops_the_run_and_nothing_falls_back_or_is_deleted(tmp_path, reference, capsys,
                                                                                 where, scope):
    """An upgrade brings a class the safe loader does not know: the run stops with exit 2 in one line
    naming the checkpoint, the key, the class and the versions; it never falls back to an older
    checkpoint or to step 0, and no file changes. Allow-listing the class resumes it."""
    run = copy_run(reference, tmp_path / "run", upto_step=20)
    for step in (12, 16, 20) if scope == "all" else (20,):
        key = plant_refused_class(run / f"checkpoints/step-{step}", where)
    before = tree(run)
    proc = run_job(run, "train.steps=24", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [error] = errors_of(proc)
    assert error.startswith(f"error: checkpoint {run}/checkpoints/step-20 is refused by the safe loader: {key} holds "
                            "fractions.Fraction (written with torch "), error
    assert error.endswith("allow it with checkpoint.allowed_classes=[fractions.Fraction]"), error
    assert "resumed from" not in proc.stdout and "training " not in proc.stdout and max(losses(run)) == 20
    assert tree(run) == before
    status = json.loads((run / "status.json").read_text())
    assert status["user_error"] and status["error"] == error[len("error: "):]

    assert checkpoint_cli(["check", str(run)]) == 2
    assert capsys.readouterr().err.strip() == error
    assert checkpoint_cli(["ls", str(run)]) == 0
    assert "refused: checkpoint" in capsys.readouterr().out
    if where == "byte item" and scope == "newest":
        resumed = run_job(run, "train.steps=24", "checkpoint.allowed_classes=[fractions.Fraction]")
        assert f"resumed from {run}/checkpoints/step-20 (step 20," in resumed.stdout


def test_the_config_is_the_truth_on_resume(tmp_path, reference):
    """Changed optimizer hyper-parameters apply to the resumed run (the checkpoint's param groups
    would override them), per-parameter state still comes from the checkpoint, and the change is
    printed and journaled."""
    from vit.engine.checkpoint import byte_items

    run = copy_run(reference, tmp_path / "run", upto_step=16)
    saved = json.loads((run / "checkpoints/step-16/train_state.json").read_text())["config"]["optim"]
    resumed = run_job(run, STEPS, "checkpoint.keep=3", "optim.weight_decay=0.1", "optim.betas=[0.8,0.99]",
                      "optim.eps=1e-6")
    changes = [line for line in resumed.stdout.splitlines() if line.startswith("resumed with ")]
    assert changes == [f"resumed with optim.betas {saved['betas']} -> [0.8, 0.99], optim.eps {saved['eps']} -> "
                       f"1e-06, optim.weight_decay {saved['weight_decay']} -> 0.1"], resumed.stdout
    assert losses(run)[17] == losses(reference)[17]  # step 17's loss: the weights of step 16, exactly
    groups: dict[str, dict] = {}
    for key, value in byte_items(run / "checkpoints/step-20").items():
        _, _, group, name = key.split(".", 3)
        groups.setdefault(group, {})[name] = value
    assert sorted(g["weight_decay"] for g in groups.values()) == [0.0, 0.1]
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in groups.values()), groups
    journal = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()]
    [resume] = [e for e in journal if e["event"] == "resume"]
    assert resume["changed"]["optim.weight_decay"] == [saved["weight_decay"], 0.1]


# --- retention in a run ------------------------------------------------------------------------------

def test_retention_keeps_the_last_k_and_every_p_th(tmp_path, reference):
    run = tmp_path / "run"
    run_job(run, STEPS, "train.stop_after_steps=10", "checkpoint.every_steps=1", "checkpoint.keep=2",
            "checkpoint.keep_every=4")
    assert steps_on_disk(run) == [4, 8, 9, 10]
    assert valid_steps(run) == [4, 8, 9, 10]
    assert (run / "checkpoints/latest").read_text().strip() == "step-10"
    assert_bitwise(losses(run), losses(reference), range(1, 11))  # saving every step changes nothing


# --- disk full ---------------------------------------------------------------------------------------

def test_disk_full_during_a_save_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, reference):
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the disk-full test needs root (to mount a small tmpfs) and must not be skipped in CI")
        pytest.skip("needs root to mount a small tmpfs")
    checkpoint_bytes = sum(f.stat().st_size for f in (reference / "checkpoints/step-20").rglob("*") if f.is_file())
    size_kib = int(checkpoint_bytes * 1.5) // 1024  # room for one checkpoint, not for two
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)], check=True)
    try:
        run = mount / "run"
        proc = run_job(run, STEPS, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        expected = (f"error: saving {run}/checkpoints/step-8 failed (disk full: No space left on device); "
                    f"the previous checkpoint {run}/checkpoints/step-4 is kept")
        assert lines[-1] == expected, proc.stderr[-3000:]
        assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr[-3000:]
        # no crash of our code (DCP's writer threads may print their own ENOSPC tracebacks before it)
        assert "Error executing job" not in proc.stderr and f'File "{ROOT}' not in proc.stderr, proc.stderr[-3000:]
        assert steps_on_disk(run) == [4] and valid_steps(run) == [4]
        assert (run / "checkpoints/latest").read_text().strip() == "step-4"
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "failed" and status.get("user_error") is True
        assert_bitwise(losses(run), losses(reference), range(1, 9))
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_run_directory_names_no_module_of_this_project(reference):
    """What makes a run directory survive a move of the code (the layout of issue 23, or any later
    one): its checkpoints pickle classes of torch and the standard library only, and everything else
    is JSON and YAML of plain values. A name like `vit.engine.checkpoint` in it would break resume."""
    import pickletools

    from vit.engine.checkpoint import byte_items

    ours = ("vit.", "jobs.", "hydra_plugins.")
    for checkpoint in sorted((reference / "checkpoints").glob("step-*")):
        with open(checkpoint / ".metadata", "rb") as f:
            strings = [arg for op, arg, _ in pickletools.genops(f) if isinstance(arg, str)]
        globals_ = [s for s in strings if s.startswith(("torch", "builtins", "collections", "vit", "jobs", "hydra"))]
        assert globals_ and not [s for s in globals_ if s.startswith(ours) or s in ("vit", "jobs")], globals_
        assert byte_items(checkpoint)  # every byte item loads with weights_only (no class of ours could)
    texts = [f for f in reference.rglob("*") if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml")]
    assert len(texts) > 5
    for f in texts:
        assert not any(m in f.read_text() for m in ours), f


# --- export ------------------------------------------------------------------------------------------

def test_export_loads_into_timm_strictly_with_the_same_outputs(tmp_path, reference):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vit.models.vit import build_model

    out = tmp_path / "export" / "model.safetensors"
    proc = subprocess.run([sys.executable, "jobs/checkpoint.py", "export", str(reference), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["step"] == "20"  # the newest valid checkpoint
    state = load_file(str(out))
    assert state["head.weight"].abs().sum() > 0  # trained (the head starts at zero)

    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    theirs.load_state_dict(state, strict=True)
    ours = build_model("vit_tiny_patch16", num_classes=10, img_size=32)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = theirs.eval()(x), ours.eval()(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert a.std(0).abs().sum() > 0  # not a constant function


# --- async save --------------------------------------------------------------------------------------

def test_async_save_gives_the_same_losses_and_valid_checkpoints(tmp_path, reference):
    run, ref = tmp_path / "run", losses(reference)
    first = run_job(run, STEPS, "checkpoint.async_save=true", "train.stop_after_steps=10")
    assert "checkpoint at step 10" in first.stdout
    assert steps_on_disk(run) == valid_steps(run) == [8, 10]
    assert_bitwise(losses(run), ref, range(1, 11))
    # step 8 was saved in the background while training went on: resume from it to prove it holds step 8's state
    shutil.rmtree(run / "checkpoints/step-10")
    second = run_job(run, STEPS, "checkpoint.async_save=true")
    assert f"resumed from {run}/checkpoints/step-8 (step 8," in second.stdout
    assert steps_on_disk(run) == valid_steps(run) == [16, 20]
    assert (run / "checkpoints/latest").read_text().strip() == "step-20"
    assert_bitwise(losses(run), ref, range(1, 21))
