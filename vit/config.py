"""Config checks that run before anything is trained or submitted, and the values derived from it.

Every user error becomes a `ConfigError` whose message is one line: the config key, what is wrong,
and how to fix it. Entry points print that line and exit non-zero without a traceback.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re

from omegaconf import DictConfig, OmegaConf

from vit.errors import ConfigError
from vit.models.vit import VARIANTS


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batch per rank x world size x accumulation = global batch; the accumulation is derived."""
    if global_batch <= 0 or global_batch % world_size:
        raise ConfigError("train.global_batch", f"{global_batch} is not a positive multiple of the {world_size} ranks "
                          "(cluster.nodes x cluster.procs_per_node)",
                          f"use a multiple of {world_size}, or a node count whose ranks divide {global_batch}")
    per_step = micro_batch * world_size
    if micro_batch <= 0 or global_batch % per_step:
        divisors = [d for d in range(1, global_batch // world_size + 1) if global_batch % (d * world_size) == 0]
        raise ConfigError(
            "train.micro_batch",
            f"{micro_batch} per rank x {world_size} ranks does not divide train.global_batch={global_batch}",
            f"use a micro_batch that divides {global_batch // math.gcd(global_batch, world_size)}"
            + (f", e.g. {max(d for d in divisors if d <= max(micro_batch, 1))}" if divisors else ""),
        )
    return global_batch // per_step


def total_steps(cfg: DictConfig, num_samples: int) -> int:
    if cfg.train.global_batch > num_samples:
        raise ConfigError("train.global_batch", f"{cfg.train.global_batch} is larger than the training set "
                          f"({num_samples} samples)", "lower train.global_batch or check data.root")
    if cfg.train.steps:
        return int(cfg.train.steps)
    # An epoch is its order's full global batches (the loader drops the remainder and reshuffles), so
    # a ceil over the whole run would spill into one more epoch.
    return math.ceil(cfg.train.epochs * (num_samples // cfg.train.global_batch))


def max_requeues(run_hours: float, time_limit_min: float, margin: float = 1.5, spare: int = 5) -> int:
    """Time-limit requeues a run needs (run length / time limit), with margin for slow or lost steps."""
    if time_limit_min <= 0:  # resolved as Hydra builds the launcher; validate_submission names the key
        return 0
    return math.ceil(math.ceil(run_hours * 60 / time_limit_min) * margin) + spare


OmegaConf.register_new_resolver("max_requeues", max_requeues, replace=True)

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def validate_submission(cfg: DictConfig) -> None:
    """What a Slurm submission needs beyond `validate`: a sane allocation, and no value that could
    break out of its line in the generated sbatch script (a newline ends an #SBATCH directive and
    starts a shell command)."""
    cluster = cfg.cluster
    for key in ("nodes", "procs_per_node", "time_min", "crash_loop_limit"):
        if type(cluster[key]) is not int or cluster[key] < 1:
            raise ConfigError(f"cluster.{key}", f"must be a positive integer, got {cluster[key]!r}",
                              f"set cluster.{key} to an integer >= 1")
    if cluster.gpus_per_node and cluster.procs_per_node > cluster.gpus_per_node:
        raise ConfigError("cluster.procs_per_node", f"{cluster.procs_per_node} ranks but {cluster.gpus_per_node} GPUs per node",
                          "use one rank per GPU: cluster.procs_per_node=${.gpus_per_node}")
    if not 0 < cluster.signal_lead_s < 60 * cluster.time_min:
        raise ConfigError("cluster.signal_lead_s", f"{cluster.signal_lead_s} s is not inside the {cluster.time_min}-minute "
                          "time limit", "warn a few minutes before the limit, e.g. cluster.signal_lead_s=300")
    if type(cluster.max_requeues) is not int or cluster.max_requeues < 0:
        raise ConfigError("cluster.max_requeues", f"must be an integer >= 0, got {cluster.max_requeues!r}",
                          "set cluster.max_requeues or cluster.expected_run_hours")
    values = {"run_dir": cfg.run_dir, **{f"hydra.launcher.{k}": v for k, v in
                                         _leaves(OmegaConf.to_container(cfg.hydra.launcher, resolve=True))}}
    for key, value in values.items():
        if isinstance(value, str) and CONTROL_CHARACTERS.search(value):
            raise ConfigError(key, f"{value!r} holds a control character (e.g. a newline)",
                              "remove it: the value goes into the sbatch script")


def _leaves(tree, prefix: str = "", lists: bool = True):
    """(dotted key, value) of every leaf; with `lists=False` a list is one leaf."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict) or (lists and isinstance(v, list)):
            yield from _leaves(v, key + ".", lists)
        else:
            yield key, v


# What a resume cannot change: the checkpoint's tensors have the model's and image size's shapes, and
# its step count and data position are counted in global batches of the data order the seed draws.
RESUME_FIXED = ("model.name", "task.name", "data.img_size", "train.global_batch", "seed")


def _at(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def resume_conflict(saved_config: dict, cfg: DictConfig) -> str | None:
    """Why a run with `cfg` cannot resume a checkpoint written with `saved_config`, or None."""
    now = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUME_FIXED:
        if _at(saved_config, key) != _at(now, key):
            return f"{key}: {_at(saved_config, key)} there, {_at(now, key)} now"
    return None


def config_changes(saved_config: dict, cfg: DictConfig) -> dict[str, list]:
    """Every config value that differs from the checkpoint's run: {key: [then, now]}. The run
    directory is left out: a run moved to another path is the same run."""
    was, now = dict(_leaves(saved_config, lists=False)), dict(_leaves(OmegaConf.to_container(cfg, resolve=True),
                                                                     lists=False))
    return {k: [was.get(k), now.get(k)] for k in sorted(was.keys() | now.keys())
            if was.get(k) != now.get(k) and k != "run_dir"}


def validate(cfg: DictConfig, world_size: int) -> None:
    """Checks that need no data access beyond `check_data`'s cheap look at the dataset root."""
    if cfg.model.name not in VARIANTS:
        raise ConfigError("model.name", f"unknown model {cfg.model.name!r}",
                          f"choose one of {', '.join(VARIANTS)} (e.g. model=vit_huge_patch14)")
    if not SAFE_NAME.match(str(cfg.name)):
        raise ConfigError("name", f"{cfg.name!r} is not a safe job name",
                          "use letters, digits, '.', '_' and '-' only (at most 128 characters)")
    if not cfg.optim.lr > 0:
        raise ConfigError("optim.lr", f"must be positive, got {cfg.optim.lr}", "set optim.lr to e.g. 1e-3")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", "must be >= 0", "set optim.warmup_steps=0 for no warmup")
    if not cfg.optim.weight_decay >= 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {cfg.optim.weight_decay}", "set e.g. 0.05")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {betas}", "set e.g. [0.9,0.999]")
    for key, value in (("train.label_smoothing", cfg.train.label_smoothing),
                       ("model.drop_path_rate", cfg.model.drop_path_rate),
                       ("model.dropout_rate", cfg.model.dropout_rate)):
        if not 0 <= value < 1:
            raise ConfigError(key, f"must be in [0, 1), got {value}", f"set e.g. {key}=0.1")
    for key in ("mixup", "cutmix"):
        if not cfg.train[key] >= 0:
            raise ConfigError(f"train.{key}", f"must be >= 0 (a Beta alpha; 0: off), got {cfg.train[key]}",
                              f"set e.g. train.{key}=0.8")
    if cfg.train.steps is not None and (type(cfg.train.steps) is not int or cfg.train.steps < 1):
        raise ConfigError("train.steps", f"must be a positive integer or null, got {cfg.train.steps!r}",
                          "set train.steps, or null to train for train.epochs")
    if cfg.train.steps is None and not (isinstance(cfg.train.epochs, (int, float)) and cfg.train.epochs > 0):
        raise ConfigError("train.epochs", f"must be positive when train.steps is null, got {cfg.train.epochs!r}",
                          "set train.epochs, or train.steps")
    if cfg.train.grad_clip is not None and cfg.train.grad_clip <= 0:
        raise ConfigError("train.grad_clip", "must be positive or null", "set train.grad_clip=1.0 or null")
    for key in ("log_every", "global_batch", "micro_batch"):
        if type(cfg.train[key]) is not int or cfg.train[key] < 1:
            raise ConfigError(f"train.{key}", f"must be a positive integer, got {cfg.train[key]!r}",
                              f"set train.{key} to an integer >= 1")
    if cfg.train.eval_every is not None and cfg.train.eval_every < 0:
        raise ConfigError("train.eval_every", f"must be >= 0, got {cfg.train.eval_every}", "set 0 for no evaluation")
    if cfg.train.loss not in ("softmax", "sigmoid"):
        raise ConfigError("train.loss", f"unknown loss {cfg.train.loss!r}", "use softmax or sigmoid")
    if cfg.train.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError("train.precision", f"unknown precision {cfg.train.precision!r}", "use auto, bf16 or fp32")
    if type(cfg.fsdp.unit_blocks) is not int or cfg.fsdp.unit_blocks < 1:
        raise ConfigError("fsdp.unit_blocks", f"must be a positive integer, got {cfg.fsdp.unit_blocks!r}",
                          "set fsdp.unit_blocks=1 for one FSDP2 unit per block")
    if not isinstance(cfg.fsdp.reshard_after_forward, bool):
        raise ConfigError("fsdp.reshard_after_forward", f"must be true or false, got {cfg.fsdp.reshard_after_forward!r}",
                          "set fsdp.reshard_after_forward=true (FSDP2's default) or false")
    validate_speed_options(cfg)
    validate_schedule(cfg.optim)
    validate_task(cfg)
    if cfg.checkpoint.keep < 2:
        raise ConfigError("checkpoint.keep", f"{cfg.checkpoint.keep} leaves no fallback",
                          "keep at least 2 checkpoints")
    accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, world_size)

    from vit.data.sources import check_data, expected_train_samples  # DataError: one line naming the key
    found = check_data(cfg.data)
    if os.environ.get("RANK", "0") == "0":
        print(found, flush=True)  # the first log line: what data.root turned out to hold

    steps = total_steps(cfg, expected_train_samples(cfg.data))
    if cfg.optim.warmup_steps >= steps:
        raise ConfigError("optim.warmup_steps", f"{cfg.optim.warmup_steps} is not shorter than the run ({steps} steps)",
                          "lower optim.warmup_steps or raise train.steps/train.epochs")


def validate_speed_options(cfg: DictConfig) -> None:
    """Compilation, activation checkpointing and float8 (whether the hardware has float8 is checked
    where the model is built: vit.engine.parallel.convert_to_float8)."""
    checkpointing, depth = cfg.model.grad_checkpointing, VARIANTS[cfg.model.name].depth
    if not (isinstance(checkpointing, bool) or checkpointing == "selective"
            or (type(checkpointing) is int and 0 <= checkpointing <= depth)):
        raise ConfigError("model.grad_checkpointing", f"must be true, false, selective or a block count "
                          f"0..{depth}, got {checkpointing!r}",
                          "set model.grad_checkpointing=selective (every other block) or true")
    if not isinstance(cfg.model.compile, bool):
        raise ConfigError("model.compile", f"must be true or false, got {cfg.model.compile!r}",
                          "set model.compile=true to compile each block")
    float8 = cfg.train.float8
    if not (isinstance(float8, bool) or float8 == "emulate"):
        raise ConfigError("train.float8", f"must be true, false or emulate, got {float8!r}",
                          "set train.float8=true on an H100/H200, emulate for a CPU dry run, else false")
    if float8 and importlib.util.find_spec("torchao") is None:
        raise ConfigError("train.float8", "needs torchao, which is not installed",
                          "pip install 'torchao==0.18.0', or set train.float8=false")


def validate_schedule(optim) -> None:
    schedule = optim.schedule
    if schedule not in ("cosine", "step", "poly"):
        raise ConfigError("optim.schedule", f"unknown schedule {schedule!r}", "use cosine, step or poly")
    if schedule == "step" and not all(0 < m < 1 for m in optim.get("milestones") or [None]):
        raise ConfigError("optim.milestones", f"{optim.get('milestones')} are not fractions of the run in (0, 1)",
                          "set e.g. optim.milestones=[0.889,0.963]")
    if schedule == "step" and not (optim.get("gamma") or 0) > 0:
        raise ConfigError("optim.gamma", f"must be positive, got {optim.get('gamma')}", "set e.g. optim.gamma=0.1")
    if schedule == "poly" and not (optim.get("power") or 0) > 0:
        raise ConfigError("optim.power", f"must be positive, got {optim.get('power')}", "set optim.power=1.0")


def validate_task(cfg: DictConfig) -> None:
    """The task's name, its input size against the patch size, block indices, pretrained weights."""
    from vit.tasks import TASKS

    task = cfg.task
    name = task.name
    if name not in TASKS:
        raise ConfigError("task.name", f"unknown task {name!r}", f"choose one of {', '.join(TASKS)} (e.g. task=coco)")
    variant = VARIANTS[cfg.model.name]
    patch, key = (task.patch_size, "task.patch_size") if name != "classification" else (variant.patch_size, "model")
    if cfg.data.img_size % patch:
        raise ConfigError("data.img_size", f"{cfg.data.img_size} is not a multiple of the patch size {patch} ({key})",
                          f"use a multiple of {patch}")
    if name == "coco" and importlib.util.find_spec("pycocotools") is None:  # else the first evaluation fails
        raise ConfigError("task", "task=coco scores with pycocotools, which is not installed",
                          "pip install 'pycocotools>=2.0.11'")
    if name == "coco" and cfg.data.img_size % 32:
        raise ConfigError("data.img_size", f"{cfg.data.img_size} is not a multiple of 32, the detector's coarsest "
                          "pyramid stride before p6", "use e.g. 1024")
    for blocks_key in ("global_blocks", "out_blocks"):
        bad = [i for i in task.get(blocks_key) or [] if not -variant.depth <= i < variant.depth]
        if bad:
            raise ConfigError(f"task.{blocks_key}", f"{bad} are outside the {variant.depth} blocks of "
                              f"{cfg.model.name}", f"use indices 0..{variant.depth - 1}, or null for the default")
    pretrained = cfg.pretrained
    if pretrained and name == "classification":
        raise ConfigError("pretrained", "pretraining (task=classification) starts from scratch",
                          "fine-tune with task=coco or task=ade20k, or set pretrained=null")
    if pretrained:
        from pathlib import Path
        if not Path(pretrained).exists():
            raise ConfigError("pretrained", f"{pretrained} does not exist",
                              "point it at a pretraining run dir, a step-N checkpoint or an exported .safetensors")
