"""Run the real entry points as subprocesses on tiny configs and read what they wrote."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# A tiny ViT on 32-px synthetic images: a step takes milliseconds, a run is mostly process start-up.
TINY = [
    "experiment=smoke", "data.img_size=32", "data.num_samples=256", "train.global_batch=16",
    "train.micro_batch=8", "train.log_every=1", "optim.warmup_steps=2", "checkpoint.every_steps=4",
    "train.progress=false",
]


def recipe(*overrides: str, config: str = "pretrain"):
    """The config `python jobs/<config>.py OVERRIDES` composes from conf/."""
    from hydra import compose, initialize_config_dir

    import hydra_plugins.vit_slurm_launcher.vit_slurm_launcher  # noqa: F401  the Slurm launcher's config
    import vit.config  # noqa: F401  the resolvers

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def data_config(name: str, **keys) -> dict:
    """conf's `data=NAME` (as its task resolves it), with `keys` replaced: the recipe's every key."""
    from omegaconf import OmegaConf

    dense = name in ("coco", "ade20k")
    cfg = recipe(f"task={name}" if dense else f"data={name}", config="finetune" if dense else "pretrain")
    return {**OmegaConf.to_container(cfg.data, resolve=True), **keys}


def run_job(run_dir: Path, *overrides: str, nproc: int = 1, env: dict | None = None, timeout: float = 300,
            check: bool = True, script: str = "jobs/pretrain.py", tiny: bool = True) -> subprocess.CompletedProcess:
    args = [f"run_dir={run_dir}", *(TINY if tiny else []), *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(ROOT / script), *args]
    else:
        cmd = [sys.executable, str(ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def checkpoint_cli(argv: list[str]) -> int:
    """`python jobs/checkpoint.py ARGV`, in this process (its output reaches capsys)."""
    import runpy

    return runpy.run_path(str(ROOT / "jobs" / "checkpoint.py"))["main"](argv)


def journaled(run_dir: Path, event: str) -> list[dict]:
    """The run journal's `event` records (metrics, evaluation, ...) in the order they were written."""
    from vit.journal import read_journal

    return [e for e in read_journal(run_dir) if e["event"] == event]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends, and a repeated step keeps its latest value."""
    return {e["step"]: e["loss"] for e in journaled(run_dir, "metrics")}


def plant_refused_class(checkpoint: Path, where: str) -> str:
    """Put a value of a harmless class that the safe loader does not know (fractions.Fraction, as an
    upgrade brings new classes) into a real checkpoint; returns the key that now holds it.

    metadata: the DCP metadata's planner data. byte item: the optimizer's eps, the checkpoint
    rewritten by DCP as one process (these tests' runs have one rank)."""
    import fractions
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from vit.engine.checkpoint import SafeReader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to load in a single process"
        if where == "metadata":
            metadata = SafeReader(str(checkpoint)).read_metadata()
            metadata.planner_data = {"note": fractions.Fraction(1, 3)}
            (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
            return ".metadata"
        dcp_to_torch_save(str(checkpoint), str(checkpoint.with_name("whole.pt")))
        state = torch.load(checkpoint.with_name("whole.pt"), weights_only=False)  # our own test file
        checkpoint.with_name("whole.pt").unlink()
        state["optim"]["param_groups"][0]["eps"] = fractions.Fraction(1, 10 ** 8)
        for f in [*checkpoint.glob("*.distcp"), checkpoint / ".metadata"]:
            f.unlink()
        dcp.save(state, storage_writer=FileSystemWriter(str(checkpoint)), no_dist=True)
    return "optim.param_groups.0.eps"
