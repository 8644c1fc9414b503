"""The training core: schedule, weight-decay groups, FSDP2 clipping and equivalence, bad input, smoke run."""
import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import CLASSES, make_imagefolder
from helpers import ROOT, journaled, losses, run_job

from vit.config import accumulation_steps
from vit.engine.optim import param_groups, warmup_cosine
from vit.errors import ConfigError
from vit.journal import read_journal
from vit.models.vit import build_model


def test_lr_schedule_warmup_then_cosine_to_zero():
    base, warmup, total = 1e-3, 100, 1000
    assert warmup_cosine(0, base, warmup, total) == pytest.approx(base / warmup)
    assert warmup_cosine(warmup - 1, base, warmup, total) == pytest.approx(base)
    assert warmup_cosine(warmup, base, warmup, total) == pytest.approx(base)
    mid = warmup + (total - 1 - warmup) // 2
    assert warmup_cosine(mid, base, warmup, total) == pytest.approx(base / 2, rel=1e-2)
    assert warmup_cosine(total - 1, base, warmup, total) == 0.0
    lrs = [warmup_cosine(s, base, warmup, total) for s in range(total)]
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = build_model("vit_tiny_patch16", num_classes=3, img_size=32)
    names = {}
    for group in param_groups(model, 0.05):
        for name in group["names"]:
            names[name] = group["weight_decay"]
    assert names["blocks.0.attn.qkv.weight"] == 0.05
    assert names["patch_embed.proj.weight"] == 0.05 and names["head.weight"] == 0.05
    for exempt in ["blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.bias", "pos_embed", "cls_token",
                   "head.bias"]:
        assert names[exempt] == 0.0, exempt
    assert len(names) == len(list(model.parameters()))


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_mix_images_and_labels_alike(mixup, cutmix):
    from vit.tasks.classification import classification_loss, mix_batch

    torch.manual_seed(0)
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for _ in range(20):
        mixed, targets = mix_batch(images, labels, 5, mixup, cutmix)
        assert torch.allclose(targets.sum(1), torch.ones(4)) and targets[:, 4].eq(0).all()
        lam = targets[0, 0].item()  # image 0 is mixed with image 3, the batch reversed
        assert targets[0, 3].item() == pytest.approx(1 - lam)
        if cutmix and not torch.allclose(mixed, images * lam + images.flip(0) * (1 - lam), atol=1e-6):
            from_other = (mixed[0] == images[3]).all(0) & (mixed[0] != images[0]).all(0)
            assert from_other.float().mean().item() == pytest.approx(1 - lam)  # the box's share of the area
        else:
            torch.testing.assert_close(mixed, images * lam + images.flip(0) * (1 - lam))
    logits = torch.randn(4, 5)
    soft = classification_loss(logits, targets, "softmax", 0.1)
    expected = -(((targets * 0.9 + 0.1 / 5) * logits.log_softmax(-1)).sum(-1)).mean()
    torch.testing.assert_close(soft, expected)


def test_a_run_with_mixup_and_cutmix_trains(tmp_path):
    run_job(tmp_path / "run", "train.steps=3", "train.mixup=0.8", "train.cutmix=1.0", "train.eval_every=0")
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3] and all(v == v for v in losses(tmp_path / "run").values())


def test_accumulation_is_derived_and_impossible_splits_are_rejected():
    assert accumulation_steps(2048, 32, 32) == 2
    assert accumulation_steps(2048, 64, 32) == 1
    with pytest.raises(ConfigError, match=r"train.micro_batch: 48 per rank x 8 ranks does not divide"):
        accumulation_steps(2048, 48, 8)


def test_clipped_norm_under_fsdp2_equals_unsharded(tmp_path):
    from dist_workers import clip_matches_unsharded, spawn
    spawn(clip_matches_unsharded, 2, tmp_path)
    assert (tmp_path / "ok").exists()


def test_accumulation_gathers_and_reduce_scatters_once_per_step(tmp_path):
    from dist_workers import accumulation_syncs_once, spawn
    spawn(accumulation_syncs_once, 2, tmp_path)
    assert (tmp_path / "ok").exists()


def test_a_step_with_a_non_finite_gradient_is_skipped_on_every_rank(tmp_path):
    from dist_workers import nonfinite_step_is_skipped, spawn
    spawn(nonfinite_step_is_skipped, 2, tmp_path)
    assert (tmp_path / "ok").exists()


def test_a_diverged_run_skips_its_updates_and_stops_after_ten_in_a_row(tmp_path):
    """lr 1e30: the first update makes every later loss and gradient non-finite. Those updates are
    skipped (the checkpoints in between keep finite weights), and the run ends at the tenth. Every
    rank ends at that step, so the async save of step 10, still in flight, is committed first."""
    from vit.engine.checkpoint import consolidated_model
    diverging = ["train.steps=40", "optim.lr=1e30", "checkpoint.every_steps=5", "checkpoint.async_save=true"]
    proc = run_job(tmp_path, *diverging, check=False)
    assert proc.returncode != 0
    assert "not finite for the last 10 steps (their updates were skipped) at step 11" in proc.stderr, proc.stderr[-2000:]
    assert [r["skipped_steps"] for r in journaled(tmp_path, "metrics")] == [0] + [1] * 10
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-10"
    weights, _ = consolidated_model(tmp_path / "checkpoints" / "step-10")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The count in a row is saved with the checkpoint (9 at step 10): the restart ends at step 11 again
    # instead of granting 10 more steps, so a requeued run cannot loop on checkpoints of skipped steps.
    again = run_job(tmp_path, *diverging, check=False)
    assert "resumed from" in again.stdout and "(step 10," in again.stdout, again.stdout
    assert "not finite for the last 10 steps (their updates were skipped) at step 11" in again.stderr, again.stderr[-2000:]


def test_a_gpu_config_on_a_node_without_cuda_fails_instead_of_training_on_the_cpu(tmp_path):
    """A node whose GPUs failed: falling back to CPU and gloo would leave its peers waiting in NCCL."""
    proc = run_job(tmp_path, "device=cuda", "train.steps=4", check=False)
    assert proc.returncode != 0 and "device=cuda, but CUDA is not available on" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_a_slurm_cluster_config_without_m_in_an_allocation_shell_is_refused(tmp_path):
    """An salloc shell has SLURM_JOB_ID too: only a task of our own submission may act as a node agent."""
    proc = subprocess.run([sys.executable, "jobs/pretrain.py", "experiment=smoke", f"run_dir={tmp_path}",
                           "cluster=minicluster", "train.steps=100"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "SLURM_JOB_ID": "4242", "SLURM_NODEID": "0"}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cluster:"), proc.stderr[-2000:]
    assert not (tmp_path / "slurm").exists()


def test_ranks_draw_different_random_numbers_after_the_identical_init(tmp_path):
    """Drop path draws from the global RNG: identical streams would drop the same blocks on every rank."""
    run_job(tmp_path, "train.steps=3", "model.drop_path_rate=0.2", nproc=2)
    states = [json.loads((tmp_path / "checkpoints/step-3/rng" / f"rank-{r}.json").read_text())["torch"]
              for r in (0, 1)]
    assert states[0] != states[1]


def test_two_fsdp_ranks_give_the_same_losses_as_one_process(tmp_path):
    one = run_job(tmp_path / "one", "train.steps=6")
    two = run_job(tmp_path / "two", "train.steps=6", nproc=2)
    assert "2 ranks x 1 accumulation" in two.stdout and "1 ranks x 2 accumulation" in one.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(a) == list(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert a[6] < a[1]  # and it learns


def test_fsdp_units_kept_gathered_change_no_number_and_resume_across_wrappings(tmp_path):
    """The recipe's units of blocks kept gathered from forward to backward compute exactly what
    FSDP2's per-block defaults do, and a run saved under one wrapping resumes under the other."""
    per_block = ["fsdp.unit_blocks=1", "fsdp.reshard_after_forward=true"]
    run_job(tmp_path / "per_block", "train.steps=6", *per_block, nproc=2)
    run_job(tmp_path / "grouped", "train.steps=6", nproc=2)
    assert losses(tmp_path / "per_block") == losses(tmp_path / "grouped")
    run_job(tmp_path / "switched", "train.steps=6", "train.stop_after_steps=4", *per_block, nproc=2)
    resumed = run_job(tmp_path / "switched", "train.steps=6", nproc=2)
    assert "resumed from" in resumed.stdout and "(step 4," in resumed.stdout, resumed.stdout
    assert losses(tmp_path / "switched") == losses(tmp_path / "grouped")


@pytest.mark.parametrize("override, key", [
    ("model.name=vit_gigantic", "model.name"),
    ("fsdp.unit_blocks=0", "fsdp.unit_blocks"),
    ("fsdp.reshard_after_forward=sometimes", "fsdp.reshard_after_forward"),
    ("train.micro_batch=5", "train.micro_batch"),
    ("optim.warmup_steps=500", "optim.warmup_steps"),
    ("optim.lr=-1", "optim.lr"),
    ("data=imagenet21k", "data.root"),
    ("train.log_every=0", "train.log_every"),
    ("train.global_batch=0", "train.global_batch"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.micro_batch=8.0", "train.micro_batch"),
    ("train.steps=-5", "train.steps"),
    ("train.steps=null train.epochs=0", "train.epochs"),
    ("train.global_batch=4096", "train.global_batch"),  # the smoke set has 2048 images
    ("train.label_smoothing=1.5", "train.label_smoothing"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate"),
    ("model.dropout_rate=1.0", "model.dropout_rate"),
    ("train.mixup=-0.2", "train.mixup"),
    ("model.grad_checkpointing=everyother", "model.grad_checkpointing"),
    ("train.float8=true", "train.float8"),  # refused on hardware without float8 (this CPU), as the model is built
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.weight_decay=-0.5", "optim.weight_decay"),
    ("optim.schedule=step +optim.milestones=[0.5,0.8]", "optim.gamma"),
    ("cluster=minicluster", "cluster"),  # a Slurm cluster without -m would train here, on the login node
])
def test_bad_input_fails_early_in_one_line(tmp_path, override, key):
    proc = subprocess.run([sys.executable, "jobs/pretrain.py", "experiment=smoke", f"run_dir={tmp_path}", *override.split(),
                           f"data.root={tmp_path / 'no-such-dataset'}" if key == "data.root"
                           else "train.progress=false" if key in ("train.steps", "train.epochs") else "train.steps=100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_user_error_on_one_rank_only_is_the_runs_status(tmp_path):
    """A dataset mount missing on one node: that rank's error is the run's status (the others die of
    its absence), so a Slurm job stops instead of being requeued as a crash up to the crash-loop limit."""
    make_imagefolder(tmp_path / "data0")
    proc = run_job(tmp_path / "run", "data=imagenet21k", f"data.root={tmp_path}/data${{oc.env:LOCAL_RANK}}",
                   "data.val_per_class=0", "data.num_workers=0", f"data.num_classes={len(CLASSES)}",
                   "data.num_samples=12", "train.global_batch=4", "train.micro_batch=2", "train.steps=2",
                   "optim.warmup_steps=1", nproc=2, check=False)
    assert proc.returncode != 0
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status.get("user_error") is True, status
    assert status["error"].startswith("data.root:") and "(rank 1 on " in status["error"], status
    assert not any(e["event"] == "crash" for e in read_journal(tmp_path / "run"))


HOST_MEMORY_PROBE = """
import resource, torch
from vit.engine.distributed import init_distributed
init_distributed("cpu")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rss_mb = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
for _ in range(8):  # unit-sized buffers, allocated and freed as FSDP2 does every step
    before = faults()
    buffers = [torch.empty(n).fill_(1) for n in (32 * 2**20, 7 * 2**20, 2**20)]
    held = rss_mb()
    del buffers
print(faults() - before, held - rss_mb())
"""


@pytest.mark.parametrize("glibc_env", [{}, {"MALLOC_MMAP_MAX_": "65536"}], ids=["tuned", "explicit-glibc-setting"])
def test_cpu_process_reuses_freed_host_memory(glibc_env):
    """On CPU the loop's process keeps freed memory for reuse: a step's buffers no longer cost page
    faults again on every step (they did: ~1 GB per ViT-B step). A glibc setting in the environment wins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", HOST_MEMORY_PROBE], env={**env, **glibc_env}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    faults, released_mb = int(out[0]), float(out[1])
    if glibc_env:  # glibc's defaults: the 128 MB buffer is a fresh mapping, unmapped when freed
        assert released_mb > 100, out
    else:
        assert faults < 100 and released_mb < 10, out


def test_a_checkpoint_counts_the_unreadable_samples_of_every_step_it_holds(tmp_path):
    """A save between log steps must not leave out the bad samples since the last log: a resumed
    run would forget them, and `data.max_bad_fraction` with them."""
    root = make_imagefolder(tmp_path / "train")
    (root / CLASSES[0] / "unreadable.jpg").write_bytes(b"not an image")
    epoch = len(list(root.rglob("*.*")))  # one step is one epoch: the bad file is met once per step
    run_job(tmp_path / "run", "data=imagenet21k", f"data.root={root}", "data.val_per_class=0", "data.num_workers=0",
            f"data.num_classes={len(CLASSES)}", f"data.num_samples={epoch}", "data.max_bad_fraction=0.5",
            f"train.global_batch={epoch}", f"train.micro_batch={epoch}", "train.steps=4", "train.eval_every=0",
            "train.log_every=100", "checkpoint.every_steps=2")
    stored = [json.loads((tmp_path / "run" / "checkpoints" / f"step-{s}" / "train_state.json").read_text())["bad_samples"]
              for s in (2, 4)]
    assert stored == [2, 4]


def test_a_resume_onto_a_changed_dataset_says_so(tmp_path):
    """Each epoch's order is a permutation of the sample count: a file added while the job waited in
    the queue means the epoch cannot continue exactly, which the run must say, not hide."""
    root = make_imagefolder(tmp_path / "train")
    args = ["data=imagenet21k", f"data.root={root}", "data.val_per_class=0", "data.num_workers=0",
            f"data.num_classes={len(CLASSES)}", "data.num_samples=12", "train.global_batch=4", "train.micro_batch=4",
            "train.eval_every=0", "checkpoint.every_steps=2", "optim.warmup_steps=1"]
    run_job(tmp_path / "run", *args, "train.steps=2")
    same = run_job(tmp_path / "run", *args, "train.steps=3")
    (root / CLASSES[1] / "added.jpg").write_bytes((root / CLASSES[1] / f"{CLASSES[1]}_0.JPEG").read_bytes())
    changed = run_job(tmp_path / "run", *args, "train.steps=5")
    assert "warning: data.root" not in same.stdout
    assert "warning: data.root holds 13 training samples, 12 when step 3 was saved" in changed.stdout, changed.stdout
    events = [json.loads(line) for line in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert [(e["step"], e["saved_samples"], e["num_samples"]) for e in events if e["event"] == "data_changed"] \
        == [(3, 12, 13)]


def test_smoke_command_runs_end_to_end(tmp_path):
    """The README's quick start, exactly (it writes under runs/smoke relative to the cwd)."""
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/pretrain.py"), "experiment=smoke"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "summary:" in proc.stdout and '"state": "completed"' in proc.stdout
    curve = losses(tmp_path / "runs/smoke")
    assert max(curve) == 120 and curve[120] < 0.5 * curve[10]
    evals = journaled(tmp_path / "runs/smoke", "evaluation")
    assert [e["step"] for e in evals] == [60, 120] and evals[-1]["val_top1"] > 0.5  # 10 classes: chance is 0.1
    assert (tmp_path / "runs/smoke/checkpoints/step-120/COMPLETE").exists()
    again = subprocess.run([sys.executable, str(ROOT / "jobs/pretrain.py"), "experiment=smoke"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_throughput_leaves_out_evaluations_and_saves(tmp_path, monkeypatch):
    import torch

    import vit.engine.metrics
    clock = [100.0]
    monkeypatch.setattr(vit.engine.metrics.time, "perf_counter", lambda: clock[0])
    from vit.journal import Journal

    logger = vit.engine.metrics.MetricsLogger(Journal(tmp_path), True, 10, 0, 1e9, 1, torch.device("cpu"),
                                              progress=False)
    logger.step(64)
    clock[0] += 2.0  # training
    with logger.paused():
        clock[0] += 30.0  # an evaluation
    logger.step(64)
    clock[0] += 2.0
    record = logger.log(2, loss=1.0, lr=0.1, grad_norm=1.0)
    logger.close()
    assert record["images_per_s"] == 32.0


def test_a_plain_run_ignores_a_rendezvous_address_left_in_the_shell(tmp_path):
    """A group of one on this machine: a MASTER_ADDR from another job's environment made it fail
    (without MASTER_PORT) or wait for a rendezvous that never comes (with one)."""
    run_job(tmp_path, "train.steps=2", "optim.warmup_steps=1", env={"MASTER_ADDR": "10.255.255.1"}, timeout=120)
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "completed"


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla V100-SXM2-32GB", None)])
def test_mfu_peak_is_the_parts_own(name, peak):
    """The PCIe and NVL H100s are slower than the SXM part: their MFU against 989 TFLOP/s read low."""
    from vit.engine.metrics import peak_flops_of
    assert peak_flops_of(name) == peak


def test_the_journal_has_one_metrics_record_per_logged_step(tmp_path):
    run_job(tmp_path, "train.steps=4", "train.log_every=2")
    records, evals = journaled(tmp_path, "metrics"), journaled(tmp_path, "evaluation")
    assert [r["step"] for r in records] == [2, 4]
    assert [r["step"] for r in evals] == [4] and 0 <= evals[0]["val_top1"] <= evals[0]["val_top5"] <= 1
    assert {"step", "loss", "lr", "grad_norm", "images_per_s", "tflops_per_device", "mfu"} <= set(records[0])
    assert len(repr(records[0]["loss"])) > 10  # full precision, not a rounded display value
