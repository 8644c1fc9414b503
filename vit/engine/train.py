"""The training loop, top to bottom: data, model, optimizer, resume, step, log, checkpoint, stop.

Runs the same way as one process, under torchrun on one node, or on many Slurm nodes; what differs
between pretraining and fine-tuning (model, loss, evaluation) comes from the task (vit/tasks/).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.fsdp import FSDPModule

from vit.config import accumulation_steps, config_changes, resume_conflict, total_steps
from vit.data.loader import DataPosition, build_loader
from vit.engine.checkpoint import (
    Checkpointer,
    allow_classes,
    another_setup,
    newest_loadable,
    read_train_state,
    saved_model_shapes,
    versions,
    versions_text,
)
from vit.engine.distributed import all_reduce_max, all_reduce_sum, barrier, broadcast_object, init_distributed
from vit.engine.metrics import MetricsLogger
from vit.engine.optim import build_optimizer, clip_grad_norm_, learning_rate, set_lr
from vit.engine.parallel import precompute_float8_scales_after_each_step, resolve_precision, shard_model
from vit.errors import CheckpointError, DataError
from vit.journal import Journal
from vit.run_dir import checkpoints_dir, evaluation_file, write_evaluation
from vit.stop import StopRequest
from vit.tasks import build_task
from vit.tasks.classification import classification_loss

# A step with a non-finite loss or gradient norm is skipped; this many in a row (as seen at a log or
# save step) end the run.
MAX_SKIPPED_IN_A_ROW = 10
PROCESS_START = time.time()  # close enough to the interpreter's start: this module is imported first


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, device: torch.device,
               loss_fn=None, grad_clip: float | None = 1.0, sync_once: bool = True):
    """One optimizer step over this rank's micro-batches; returns (sum of sample losses, grad norm).
    A step whose grad norm is not finite changes nothing (`optimizer.found_inf` is 1).
    `loss_fn(model, images, targets)` is the task's mean loss over a micro-batch (default: softmax
    cross-entropy of a classifier).

    With several micro-batches (`sync_once`), an FSDP2 model accumulates full gradients locally and
    reduce-scatters once, after the last backward, and its parameters stay gathered in between: one
    all-gather and one reduce-scatter per unit and step instead of one per micro-batch. The cost is
    a full fp32 gradient per rank while accumulating (2.5 GB for ViT-H).
    """
    loss_fn = loss_fn or (lambda m, x, y: classification_loss(m(x), y))
    loss_sum = torch.zeros((), device=device)
    defer = sync_once and len(micro_batches) > 1 and isinstance(model, FSDPModule)
    for i, (images, targets) in enumerate(micro_batches):
        if defer:
            last = i == len(micro_batches) - 1
            model.set_requires_gradient_sync(last)
            model.set_reshard_after_backward(last)
        images = images.to(device, non_blocking=True)
        if isinstance(targets, torch.Tensor):
            targets = targets.to(device, non_blocking=True)
        loss = loss_fn(model, images, targets)
        # FSDP averages gradients over ranks, so summing loss/accumulation gives the global-batch mean.
        (loss / len(micro_batches)).backward()
        loss_sum += loss.detach() * images.shape[0]
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip)
    # A non-finite norm (one overflowing micro-batch) would write NaN into every weight, and a save due
    # at this step would keep them: fused AdamW skips the update on the device, as under GradScaler,
    # without a host sync. The norm is global, so every rank skips the same step.
    optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def evaluate(task, model, val_source, world, run_dir: Path, step: int, journal: Journal,
             logger: MetricsLogger) -> None:
    """Score the whole val split (collective) and record it: eval/step-N.json, metrics, journal."""
    started = time.time()
    model.eval()
    metrics = task.evaluate(model, val_source, world)
    model.train()
    if world.is_main:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        write_evaluation(run_dir, step, metrics)
        logger.show({"step": step, **scalars})
        journal.write("evaluation", step, eval_s=time.time() - started, **scalars)


@dataclass
class TrainState:
    """Where the run is, beyond the weights: what a checkpoint's train_state.json restores. The caller
    of `train` holds it, so that a crash is reported at the step it happened."""
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    bad_samples: int = 0  # unreadable samples skipped so far, all ranks
    skipped_in_a_row: int = 0  # steps in a row whose update was skipped (non-finite loss or gradient)
    training: bool = False  # in the loop: a failure before it has no step of its own

    @property
    def reported_step(self) -> int | None:
        return self.step if self.training else None

    def restore(self, saved: dict) -> None:
        self.step, self.position, self.bad_samples = saved["step"], DataPosition(**saved["data"]), saved["bad_samples"]
        self.skipped_in_a_row = saved.get("skipped_in_a_row", 0)

    def to_saved(self, cfg: DictConfig, source, total: int, world_size: int) -> dict:
        return {"data": {"epoch": self.position.epoch, "offset": self.position.offset}, "num_samples": len(source),
                "bad_samples": self.bad_samples, "skipped_in_a_row": self.skipped_in_a_row,
                "total_steps": total, "world_size": world_size, "versions": versions(),
                "config": OmegaConf.to_container(cfg, resolve=True), "classes": source.classes}


def load_splits(cfg: DictConfig, task, world, run_dir: Path):
    """The train split and the val split (None without evaluation), with the same classes."""
    # The first start indexes the dataset: one process per node walks it, the others reuse its cache.
    if world.local_rank != 0:
        barrier()
    source = task.source("train", str(run_dir))
    val_source = task.source("val", str(run_dir)) if cfg.train.eval_every else None
    if world.local_rank == 0:
        barrier()
    if val_source is not None and val_source.classes != source.classes:  # a label means one class in both
        raise DataError(f"data.root: the val split has {len(val_source.classes)} classes, the train split "
                        f"{len(source.classes)} (or in another order); give both splits the same categories")
    return source, val_source


def build_model_and_optimizer(cfg: DictConfig, task, world, precision: str, num_classes: int):
    """The sharded model and its AdamW, initialised identically on every rank and world size."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    with world.device:
        model = task.build_model(num_classes)
    shard_model(model, world, precision, compile_blocks=cfg.model.compile, blocks=task.blocks(model),
                bf16_root=task.bf16_root, unit_blocks=cfg.fsdp.unit_blocks,
                reshard_after_forward=cfg.fsdp.reshard_after_forward, float8=cfg.train.float8)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps,
                                lr_scale=task.lr_scale(model), decay_all=cfg.optim.decay_all)
    if cfg.train.float8:
        precompute_float8_scales_after_each_step(model, optimizer)
    # The same init on every rank needed the same seed; from here on each rank draws its own
    # (drop-path masks), or every rank would drop the same blocks for its own images.
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, world.rank]).generate_state(1)[0]))
    return model, optimizer


def resume(cfg: DictConfig, ckpt: Checkpointer, model, optimizer, task, source, state: TrainState, total: int,
           journal: Journal, world) -> None:
    """Restore the newest loadable checkpoint into `state`, or, on a fresh start of a fine-tune, the
    pretrained weights; say what changed since the checkpoint was written."""
    def incompatible(saved: dict) -> str | None:
        if why := resume_conflict(saved["config"], cfg):
            return why
        if saved["classes"] != source.classes:
            return f"classes: {len(saved['classes'])} there, {len(source.classes)} now, or in another order"
        return None

    allow_classes(cfg.checkpoint.allowed_classes)
    saved = ckpt.load_latest(model, optimizer, incompatible)
    say = print if world.is_main else (lambda *a, **k: None)
    if not saved:
        if cfg.pretrained:  # a fine-tune's fresh start; a resumed run continues from its own weights
            loaded = task.load_pretrained(model)
            journal.write("pretrained", state.step, path=str(cfg.pretrained), loaded=loaded)
            say(f"fresh start from pretrained weights {loaded}", flush=True)
        return
    state.restore(saved)
    changed = config_changes(saved["config"], cfg)  # the optimizer already took them (load_latest)
    journal.write("resume", state.step, checkpoint=saved["path"], saved_world_size=saved["world_size"],
                  world_size=world.world_size, changed=changed)
    say(f"resumed from {saved['path']} (step {state.step}, epoch {state.position.epoch}, "
        f"saved on {saved['world_size']} ranks, now {world.world_size})", flush=True)
    if changed:
        say("resumed with " + ", ".join(f"{k} {then} -> {now}" for k, (then, now) in changed.items()), flush=True)
    saved_samples = saved.get("num_samples", len(source))
    if saved_samples != len(source):
        # Not an error: a few files removed or added must not stop a 3-week run. But each epoch's
        # order is a permutation of the count, so this epoch cannot continue exactly.
        journal.write("data_changed", state.step, saved_samples=saved_samples, num_samples=len(source),
                      saved_total_steps=saved["total_steps"], total_steps=total)
        say(f"warning: data.root holds {len(source)} training samples, {saved_samples} when step {state.step} "
            f"was saved: the rest of epoch {state.position.epoch} follows the new order (some samples of it "
            f"repeat, some are skipped), and the run now has {total} steps (was {saved['total_steps']})", flush=True)


def check_resumable(run_dir: str | os.PathLike, cfg: DictConfig | None = None) -> str:
    """What a start of this run would resume from, checked on a login node before anything is queued:
    the newest loadable checkpoint (`newest_loadable`), the config's conflicts with it (`cfg`, else its
    own), and its model shapes against the model built now. Raises CheckpointError or ConfigError;
    nothing is changed on disk."""
    path = newest_loadable(run_dir)
    if path is None:
        return f"{run_dir} has no checkpoint: the run starts from step 0"
    saved = read_train_state(path)
    cfg = cfg if cfg is not None else OmegaConf.create(saved["config"])
    if why := resume_conflict(saved["config"], cfg):
        raise another_setup(run_dir, why)
    with torch.device("meta"):
        model = build_task(cfg).build_model(len(saved["classes"]))
    then, now = saved_model_shapes(path), {k: tuple(v.shape) for k, v in model.state_dict().items()}
    misfit = sorted(set(then) ^ set(now)) or [k for k in then if then[k] != now[k]]
    if misfit:
        raise CheckpointError(f"checkpoint {path} does not fit the model built now ({len(misfit)} tensors differ, "
                              f"e.g. {misfit[0]}: {then.get(misfit[0], ())} saved, {now.get(misfit[0], ())} now); "
                              "resume with the code and settings that wrote it, or give this run a new run_dir")
    written = saved.get("versions") or {"vit": saved.get("version", "?")}
    return f"{path} resumes (step {saved['step']}, written with {versions_text(written)})"


class LogWindow:
    """The steps since the last log: their losses, skipped updates and unreadable samples, kept on
    the device (no host sync) until `close` all-reduces them at a log or save step."""

    def __init__(self, device: torch.device, skipped_in_a_row: int):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        # Saved with every checkpoint (every save follows a log), or a diverged run that checkpoints
        # between skipped steps would look like progress to the crash-loop rule after every requeue.
        self.skipped_in_a_row = torch.full((), float(skipped_in_a_row), device=device)
        self.steps, self.bad, self.example_bad = 0, 0, ""

    def add(self, step_loss: torch.Tensor, found_inf: torch.Tensor, micro_batches: list) -> None:
        # A skipped step (its loss is often non-finite too) stays out of the mean: it changed nothing.
        self.loss_sum += torch.where(found_inf.bool(), 0.0, step_loss)
        self.skipped += found_inf
        self.skipped_in_a_row = (self.skipped_in_a_row + 1) * found_inf
        self.steps += 1
        self.bad += sum(b[2] for b in micro_batches)
        self.example_bad = self.example_bad or next((b[3] for b in micro_batches if b[3]), "")

    def close(self, global_batch: int) -> dict:
        """All ranks' totals (collective); the window starts again."""
        totals = all_reduce_sum(torch.stack([self.loss_sum, torch.tensor(float(self.bad), device=self.device)]))
        skipped, in_a_row = (int(x) for x in torch.stack([self.skipped, self.skipped_in_a_row]).tolist())
        trained = self.steps - skipped
        result = {"loss": totals[0].item() / (global_batch * trained) if trained else math.nan, "trained": trained,
                  "skipped": skipped, "in_a_row": in_a_row, "bad": int(totals[1].item()),
                  "example_bad": self.example_bad}
        self.loss_sum.zero_()
        self.skipped.zero_()
        self.steps, self.bad = 0, 0
        return result


def health_failure(window: dict, state: TrainState, cfg: DictConfig) -> Exception | None:
    """Why the run must stop here: diverged, a non-finite loss that was applied, or too many
    unreadable samples. The counts are all-reduced, so every rank decides the same."""
    step, seen = state.step, state.step * cfg.train.global_batch
    if window["in_a_row"] >= MAX_SKIPPED_IN_A_ROW:
        return FloatingPointError(f"the loss or gradient norm was not finite for the last {window['in_a_row']} steps "
                                  f"(their updates were skipped) at step {step}; lower optim.lr or check the data")
    if window["trained"] and not math.isfinite(window["loss"]):
        return FloatingPointError(f"the loss was not finite in the {window['trained']} applied steps up to step "
                                  f"{step}, though their gradient norms were; check the task's loss and the data")
    if state.bad_samples > cfg.data.max_bad_fraction * seen:
        return DataError(f"data.max_bad_fraction: {state.bad_samples} of {seen} samples were unreadable (limit "
                         f"{cfg.data.max_bad_fraction:g}), e.g. {window['example_bad'] or 'see other ranks'}; "
                         "repair the dataset or raise data.max_bad_fraction")
    return None


def evaluation_due(step: int, eval_every: int, total: int) -> bool:
    return step % eval_every == 0 or step >= total


def evaluation_owed(val_source, run_dir: Path, step: int, eval_every: int, total: int) -> bool:
    """A stop skips the evaluation due at its step (it must not delay the save's exit), so a start
    owes it when its result is missing. Collective: every rank calls it."""
    return (val_source is not None and step > 0 and evaluation_due(step, eval_every, total)
            and not broadcast_object(evaluation_file(run_dir, step).exists()))


def already_complete(task, model, val_source, world, run_dir: Path, step: int, total: int, journal: Journal,
                     owed_eval: bool) -> dict:
    """A start after the last step: only an evaluation that a stop skipped is left to do."""
    if owed_eval:
        logger = MetricsLogger(journal, world.is_main, total, step, 0.0, world.world_size, world.device,
                               progress=False)
        evaluate(task, model, val_source, world, run_dir, step, journal, logger)
        logger.close()
    elif world.is_main:
        print(f"run {run_dir} is already complete ({step}/{total} steps); nothing to do", flush=True)
    journal.write("exit", step, state="completed", total_steps=total)  # or status would see a killed start
    return {"state": "completed", "step": step, "total_steps": total}


def train(cfg: DictConfig, state: TrainState | None = None) -> dict:
    """Train to the end or to a stop request; returns how it ended. `state` follows the run."""
    state = TrainState() if state is None else state
    world = init_distributed(cfg.device)
    device, main = world.device, world.is_main
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(cfg.train.precision, device)
    task = build_task(cfg)
    source, val_source = load_splits(cfg, task, world, run_dir)
    steps = total_steps(cfg, len(source))
    global_batch, micro_batch = cfg.train.global_batch, cfg.train.micro_batch
    accum = accumulation_steps(global_batch, micro_batch, world.world_size)
    model, optimizer = build_model_and_optimizer(cfg, task, world, precision, len(source.classes))

    journal = Journal(run_dir, enabled=main)
    c = cfg.checkpoint
    ckpt = Checkpointer(checkpoints_dir(run_dir), world.rank, keep=c.keep, keep_every=c.keep_every,
                        every_steps=c.every_steps, every_minutes=c.every_minutes, async_save=c.async_save,
                        journal=journal)
    resume(cfg, ckpt, model, optimizer, task, source, state, steps, journal, world)
    owed_eval = evaluation_owed(val_source, run_dir, state.step, cfg.train.eval_every, steps)
    if state.step >= steps:
        return already_complete(task, model, val_source, world, run_dir, state.step, steps, journal, owed_eval)
    flops_per_image = task.flops_per_image(len(source.classes))
    journal.write("train_start", state.step, total_steps=steps, world_size=world.world_size, device=str(device),
                  global_batch=global_batch, flops_per_image=flops_per_image, startup_s=time.time() - PROCESS_START)
    if main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        print(f"training {cfg.model.name} on {world.world_size} x {device.type} ({precision}): steps {state.step}->"
              f"{steps}, global batch {global_batch} = {micro_batch} x {world.world_size} ranks x {accum} accumulation",
              flush=True)

    stop = StopRequest().install()  # before the loader: a TERM while its workers start is a stop request
    batches = iter(build_loader(source, global_batch=global_batch, micro_batch=micro_batch, rank=world.rank,
                                world_size=world.world_size, seed=cfg.seed, start=state.position,
                                num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda"))
    logger = MetricsLogger(journal, main, steps, state.step, flops_per_image, world.world_size, device,
                           progress=cfg.train.progress)
    if owed_eval:
        with logger.paused():
            evaluate(task, model, val_source, world, run_dir, state.step, journal, logger)

    model.train()
    state.training, start_step, started, stop_kind = True, state.step, time.time(), None
    window = LogWindow(device, state.skipped_in_a_row)
    while state.step < steps:
        lr = learning_rate(state.step, cfg.optim, steps)
        set_lr(optimizer, lr)
        micro_batches = [next(batches) for _ in range(accum)]
        step_loss, grad_norm = train_step(model, optimizer, [(b[0], b[1]) for b in micro_batches], device,
                                          task.loss, cfg.train.grad_clip)
        window.add(step_loss, optimizer.found_inf, micro_batches)
        state.step += 1
        state.position.advance(len(source), global_batch)
        logger.step(global_batch)

        if cfg.train.stop_after_steps and state.step - start_step >= cfg.train.stop_after_steps:
            stop.request("step_limit")
        # One tiny collective per step makes every rank take the same decisions at the same step.
        stop_code, time_due, saving = all_reduce_max(
            [StopRequest.code(stop.kind), int(ckpt.time_due()), int(not ckpt.pending_done())])
        stop_kind = StopRequest.kind_of(stop_code)
        save_due = ckpt.step_due(state.step) or time_due or stop_kind or state.step == steps
        # Every save logs too, so the bad-sample count it stores covers all the steps it holds.
        if state.step % cfg.train.log_every == 0 or save_due:
            closed = window.close(global_batch)
            state.bad_samples += closed["bad"]
            state.skipped_in_a_row = closed["in_a_row"]
            logger.log(state.step, loss=closed["loss"], lr=lr, grad_norm=grad_norm.item(), epoch=state.position.epoch,
                       bad_samples=state.bad_samples, skipped_steps=closed["skipped"])
            if (failure := health_failure(closed, state, cfg)) is not None:
                # Every rank fails here at this step, so an async save of an earlier step still in
                # flight can be committed: without it the fixed run would redo it.
                ckpt.finish()
                raise failure
        if stop_kind:
            journal.write("stop_signal", state.step, kind=stop_kind)
        if save_due:
            with logger.paused():
                ckpt.save(state.step, model, optimizer, state.to_saved(cfg, source, steps, world.world_size))
            if stop_kind and main:
                print(f"stop requested ({stop_kind}): checkpoint at step {state.step} saved in "
                      f"{ckpt.last_save_seconds or 0:.1f}s", flush=True)
        elif ckpt.pending is not None and not saving:
            ckpt.finish()
        if val_source is not None and not stop_kind and evaluation_due(state.step, cfg.train.eval_every, steps):
            with logger.paused():
                evaluate(task, model, val_source, world, run_dir, state.step, journal, logger)
        if stop_kind:
            break
    ckpt.finish()
    logger.close()
    summary = {"state": "completed" if state.step >= steps else "stopped", "step": state.step, "total_steps": steps,
               "stop": stop_kind, "loss": logger.last.get("loss"), "elapsed_s": time.time() - started}
    if main:
        print("summary: " + json.dumps(summary), flush=True)
    journal.write("exit", state.step, **{k: v for k, v in summary.items() if k != "step"})
    return summary
