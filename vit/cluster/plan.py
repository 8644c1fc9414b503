"""The planner: what a config will cost before anything is trained or submitted.

From the composed config alone: total steps and FLOPs, the time to train at an assumed MFU, the
time-limit requeues that implies, the checkpoint size and save time, and the checkpoint interval
that minimises the expected loss to interruptions (Young/Daly: sqrt(2 x save time x MTBI), to first
order the overhead save/interval + interval/(2 MTBI) is then smallest).

Assumptions are read from the `planner:` config block, with these defaults:
  planner.mfu 0.40           model FLOPs utilisation (put a measured one here: `jobs/status.py` shows it)
  planner.peak_tflops 989    dense bf16 peak per GPU (H100/H200 SXM)
  planner.fs_gbps 5          aggregate write bandwidth of the checkpoint filesystem, GB/s (1e9 bytes)
  planner.mtbi_hours 24      mean time between interruptions (failures, preemptions) of the whole job
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from vit.cluster.status import format_duration
from vit.config import total_steps
from vit.data.sources import expected_train_samples
from vit.tasks import build_task

ASSUMPTIONS = ("mfu", "peak_tflops", "fs_gbps", "mtbi_hours")  # the `planner:` block of conf/pretrain.yaml
ADAMW_BYTES_PER_PARAM = 12  # fp32 master weight + exp_avg + exp_avg_sq
STEP_BYTES = 4              # AdamW keeps one fp32 `step` scalar per parameter tensor


def settings(cfg: DictConfig) -> dict:
    return {k: float(cfg.planner[k]) for k in ASSUMPTIONS}


def count_params(task, num_classes: int) -> tuple[int, int]:
    """(parameters, parameter tensors) of the task's model, built on the meta device: exact, no memory."""
    with torch.device("meta"):
        params = list(task.build_model(num_classes).parameters())
    return sum(p.numel() for p in params), len(params)


def overhead(interval_s: float, save_s: float, mtbi_s: float) -> float:
    """Expected share of time spent saving plus recomputing after interruptions (first order)."""
    return save_s / interval_s + interval_s / (2 * mtbi_s)


def plan(cfg: DictConfig) -> dict:
    s = settings(cfg)
    name, classes, task = cfg.model.name, int(cfg.data.num_classes), build_task(cfg)
    gpus = int(cfg.cluster.nodes) * int(cfg.cluster.procs_per_node)
    steps = total_steps(cfg, expected_train_samples(cfg.data))
    batch = int(cfg.train.global_batch)
    flops_per_image = task.flops_per_image(classes)
    head_flops = task.head_flops_per_image(classes)
    total_flops = steps * batch * flops_per_image
    images_per_s = gpus * s["peak_tflops"] * 1e12 * s["mfu"] / flops_per_image
    train_s = total_flops / (gpus * s["peak_tflops"] * 1e12 * s["mfu"])
    step_s = batch / images_per_s

    # A local run has no time limit; on Slurm every limit reached costs one requeue.
    slurm = cfg.cluster.launcher == "slurm"
    time_min = cfg.cluster.time_min if slurm else None
    allocations = math.ceil(train_s / (time_min * 60)) if time_min else 1

    params, tensors = count_params(task, classes)
    ckpt_bytes = ADAMW_BYTES_PER_PARAM * params + STEP_BYTES * tensors
    save_s = ckpt_bytes / (s["fs_gbps"] * 1e9)
    mtbi_s = s["mtbi_hours"] * 3600
    interval_s = math.sqrt(2 * save_s * mtbi_s)
    every = cfg.checkpoint.every_steps
    return {
        "model": name, "params": params, "gpus": gpus, "global_batch": batch,
        "total_steps": steps, "images": steps * batch, "flops_per_image": flops_per_image, "total_flops": total_flops,
        "head_flops_per_image": head_flops, "head_share": head_flops / flops_per_image,
        **s,
        "images_per_s": images_per_s, "step_s": step_s, "train_s": train_s, "gpu_hours": train_s * gpus / 3600,
        "time_limit_min": time_min, "allocations": allocations, "requeues": allocations - 1,
        "max_requeues": cfg.cluster.max_requeues if slurm else None,
        "expected_interruptions": train_s / mtbi_s,
        "checkpoint_bytes": ckpt_bytes, "save_s": save_s,
        "checkpoint_interval_s": interval_s, "checkpoint_interval_steps": max(1, round(interval_s / step_s)),
        "overhead_at_interval": overhead(interval_s, save_s, mtbi_s),
        "configured_every_steps": every,
        "overhead_at_configured": overhead(every * step_s, save_s, mtbi_s) if every else None,
    }


def format_plan(p: dict) -> str:
    lines = [
        f"model        {p['model']}: {p['params'] / 1e6:,.1f}M parameters, {p['flops_per_image'] / 1e9:,.1f} GFLOPs "
        f"per training image",
        *([f"  heads      {p['head_flops_per_image'] / 1e9:,.1f} GFLOPs of them ({p['head_share']:.1%}) after the trunk: "
           "pyramid and heads"] if p["head_flops_per_image"] else []),
        f"steps        {p['total_steps']:,} x global batch {p['global_batch']:,} = {p['images']:,} images",
        f"compute      {p['total_flops']:.3e} FLOPs",
        f"time         {format_duration(p['train_s'])} on {p['gpus']} GPU(s) at MFU {p['mfu']:.0%} of {p['peak_tflops']:g} "
        f"TFLOP/s ({p['images_per_s']:,.0f} img/s, {p['step_s']:.2f} s/step, {p['gpu_hours']:,.0f} GPU-h)",
    ]
    if p["time_limit_min"]:
        n = p["allocations"]
        lines.append(f"requeues     {p['requeues']} at the {p['time_limit_min']:g}-min time limit "
                     f"({n} allocation{'s' if n != 1 else ''}, without start-up and save time)")
        if p["max_requeues"] is not None and p["requeues"] > p["max_requeues"]:
            lines.append(f"  WARNING: more than cluster.max_requeues={p['max_requeues']}; raise it or "
                         "cluster.expected_run_hours")
    else:
        lines.append("requeues     none (no time limit)")
    lines += [
        f"interrupts   {p['expected_interruptions']:.1f} expected at one per {p['mtbi_hours']:g} h (planner.mtbi_hours)",
        f"checkpoint   {p['checkpoint_bytes'] / 1e9:,.2f} GB (fp32 weights + AdamW moments), "
        f"saved in {p['save_s']:.1f} s at {p['fs_gbps']:g} GB/s",
        f"interval     every {format_duration(p['checkpoint_interval_s'])} = {p['checkpoint_interval_steps']:,} steps "
        f"minimises expected lost work (Young/Daly; overhead {p['overhead_at_interval']:.2%})",
    ]
    if p["configured_every_steps"]:
        lines.append(f"  configured checkpoint.every_steps={p['configured_every_steps']:,}: "
                     f"overhead {p['overhead_at_configured']:.2%}")
    return "\n".join(lines)
