"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save, validate, resume, retain, export.

Layout of `<run_dir>/checkpoints/step-<N>/`:
  *.distcp, .metadata   the model and AdamW state; each rank writes its own shards
  train_state.json      step, data position, bad-sample count, config, version, class map (rank 0)
  rng/rank-<r>.json     each rank's torch/CUDA/numpy/python RNG state
  COMPLETE              written last, atomically (rename), after a barrier: only then is it valid
`checkpoints/latest` names the newest valid checkpoint; the loader does not trust it blindly and
re-checks every candidate, newest first.

What a resume does with each kind of bad checkpoint (the README has the same table):
  incomplete (no COMPLETE: a save was killed)  skipped; its name is reused by the next save
  damaged (a shard missing or short, metadata  skipped, renamed aside to `step-N.damaged-<time>` with
  unreadable, a load that fails)               a SET_ASIDE.json saying why; kept until the user removes it
  refused (a class the safe unpickler does     the run stops (CheckpointRefusedError, not requeued):
  not allow, e.g. after an upgrade)            nothing falls back, starts fresh or is deleted
  none loads, but the run has checkpoints      the run stops: it never starts again from step 0 on its own

No untrusted pickle is ever loaded: JSON for non-tensor state, DCP's byte items (the optimizer's
hyper-parameters) through `torch.load(weights_only=True)` (DCP's own planner would use
`weights_only=False`), and DCP's `.metadata` through an unpickler that admits only the classes a
DCP metadata file is made of. `checkpoint.allowed_classes` admits more, once a user has checked them.
"""
from __future__ import annotations

import errno
import importlib
import io
import json
import os
import pickle
import random
import shutil
import sys
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from vit.engine.distributed import barrier, broadcast_object
from vit.errors import CheckpointError, CheckpointRefusedError, CheckpointSaveError, ConfigError
from vit.run_dir import checkpoints_dir, complete_saved_config, step_of

COMPLETE = "COMPLETE"
TRAIN_STATE = "train_state.json"
SET_ASIDE = "SET_ASIDE.json"


# --- reading DCP metadata without arbitrary pickle -------------------------------------------------

# Exact names only: a module prefix would admit any function of that module, and pickle resolves
# dotted names (`os.system` reached through a DCP module's globals).
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
    ("builtins", "set"), ("builtins", "frozenset"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
}


_USER_ALLOWED: set[tuple[str, str]] = set()


def allow_classes(names) -> None:
    """Admit `module.Class` names (`checkpoint.allowed_classes`) in metadata and byte items: the way
    out of a refusal once the user has checked that the class is harmless."""
    for full in names or ():
        module, _, name = str(full).rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            raise ConfigError("checkpoint.allowed_classes", f"{full!r} names no importable class",
                              "give full names such as fractions.Fraction") from None
        _USER_ALLOWED.add((module, name))
        torch.serialization.add_safe_globals([obj])


class RefusedClass(pickle.UnpicklingError):
    """A safe unpickler met a class it does not allow, in `where` (.metadata or a byte item's key)."""

    def __init__(self, where: str, names: list[str]):
        super().__init__(where, names)
        self.where, self.names = where, names

    def __str__(self) -> str:
        return f"{self.where} holds {', '.join(self.names)}"


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS or (module, name) in _USER_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise RefusedClass(".metadata", [f"{module}.{name}"])


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, with byte items read by the weights-only unpickler."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            value.seek(0)
            try:
                refused = torch.serialization.get_unsafe_globals_in_checkpoint(value)
            except Exception:  # noqa: BLE001 (damaged bytes): then it is damage, not a refusal
                refused = []
            if refused:
                raise RefusedClass(fqn, refused) from None
            raise
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


# --- validity -----------------------------------------------------------------------------------

INCOMPLETE = "incomplete (no COMPLETE marker)"


def read_train_state(path: Path) -> dict:
    state = json.loads((path / TRAIN_STATE).read_text())
    return {**state, "config": complete_saved_config(state["config"])} if "config" in state else state


def checkpoint_dirs(root: Path) -> list[Path]:
    """All `step-N` directories, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of, reverse=True)


def problem_with(path: Path) -> str | None:
    """Why this checkpoint cannot be loaded, or None if it is complete and every shard is there in full.
    A class refused in its metadata raises CheckpointRefusedError: that is no damage to skip."""
    if not (path / COMPLETE).is_file():
        return INCOMPLETE
    try:
        read_train_state(path)
        metadata = SafeReader(str(path)).read_metadata()
    except RefusedClass as e:
        raise refusal(path, e) from None
    except Exception as e:  # noqa: BLE001 (damaged bytes fail in any way the unpickler can)
        return f"unreadable metadata ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in needed.items():
        f = path / rel
        if not f.is_file():
            return f"shard {rel} is missing"
        if f.stat().st_size < size:
            return f"shard {rel} is truncated ({f.stat().st_size} of {size} bytes)"
    return None


def valid_checkpoints(root: Path, warn: bool = True, known: set[Path] = frozenset()) -> list[Path]:
    """The loadable checkpoints, newest first; those in `known` were checked before and are not re-read.
    A refused one is not loadable here (CheckpointRefusedError tells why when it is loaded)."""
    valid = []
    for path in checkpoint_dirs(root):
        try:
            problem = None if path in known else problem_with(path)
        except CheckpointRefusedError as e:
            problem = str(e)
        if problem is None:
            valid.append(path)
        elif warn:
            warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return valid


def set_aside(path: Path, reason: str) -> Path:
    """Rename a damaged checkpoint out of the way (rank 0), so that no save reuses and overwrites its
    name, and note why: the user inspects it, then removes it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.damaged-{stamp}-{n}"), n + 1
    os.rename(path, aside)
    _write_atomic(aside / SET_ASIDE, json.dumps({"reason": reason, "time": time.time(), "was": path.name}))
    return aside


def set_aside_dirs(root: Path) -> list[Path]:
    """The checkpoints `set_aside` renamed, newest step first."""
    found = [p for p in root.glob("step-*.damaged-*") if p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: (-int(p.name[5:].split(".")[0]), p.name))


def why_set_aside(path: Path) -> str:
    try:
        return json.loads((path / SET_ASIDE).read_text())["reason"]
    except (OSError, ValueError, KeyError):
        return "reason not recorded"


def versions() -> dict[str, str]:
    """What wrote a checkpoint: a refusal after an upgrade names the versions to pin."""
    import vit
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
             "vit": vit.__version__}
    for module in ("timm", "omegaconf"):
        try:
            found[module] = importlib.import_module(module).__version__
        except ImportError:
            pass
    return found


def versions_text(found: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in found.items() if k != "python") if found else "unknown versions"


def refusal(path: Path, refused: RefusedClass) -> CheckpointRefusedError:
    """The one line a user needs: which checkpoint, which key and class, which versions, what to do."""
    try:
        state = read_train_state(path)
        written = state.get("versions") or {"vit": state.get("version", "?")}
    except (OSError, ValueError):
        written = None
    names = " ".join(refused.names)
    return CheckpointRefusedError(
        f"checkpoint {path} is refused by the safe loader: {refused} (written with {versions_text(written)}; "
        f"installed: {versions_text(versions())}); pin the versions that wrote it, or, after checking the "
        f"class is harmless, allow it with checkpoint.allowed_classes=[{names.replace(' ', ',')}]")


def _refused_in(e: BaseException) -> RefusedClass | None:
    return next((x for x in _exception_chain(e) if isinstance(x, RefusedClass)), None)


# --- RNG state as JSON ----------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():  # this rank's device only: a resume may see other devices
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- the checkpointer -----------------------------------------------------------------------------

@dataclass
class _Pending:
    step: int
    path: Path
    future: Future
    started: float


class _WriterThreads:
    """DCP's extra writer threads (thread_count > 1) report a failure only by printing it: a save
    whose own thread succeeds would then commit a `.metadata` that lacks their shards, and after a
    failure in the calling thread they are left running, unjoined. Count their failures so that
    such a save is abandoned, and join them before a failed save is reported and removed."""

    SUFFIX = "(_write_files_from_queue)"  # Python names a thread after its target
    errors: list[BaseException] = []
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        previous = threading.excepthook

        def hook(args):
            if args.thread is not None and args.thread.name.endswith(cls.SUFFIX):
                cls.errors.append(args.exc_value)  # reported once, by the save that owns it
            else:
                previous(args)
        threading.excepthook, cls._installed = hook, True

    @classmethod
    def join(cls) -> None:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and thread.name.endswith(cls.SUFFIX):
                thread.join()


class Checkpointer:
    """Saves and restores the model, optimizer and train state of every rank. All methods are collective."""

    def __init__(self, root: str | os.PathLike, rank: int, *, keep: int = 3, keep_every: int | None = None,
                 every_steps: int | None = None, every_minutes: float | None = None, async_save: bool = False,
                 journal=None):
        self.root, self.rank, self.journal = Path(root), rank, journal
        self.keep, self.keep_every = max(keep, 2), keep_every
        self.every_steps, self.every_minutes, self.async_save = every_steps, every_minutes, async_save
        self.last_save_time = time.monotonic()
        self.pending: _Pending | None = None
        self.last_save_seconds: float | None = None
        self.refused: set[Path] = set()  # found by retention: then it deletes nothing
        _WriterThreads.install()
        self._writer_errors_before = 0
        # Checked once: reading ViT-H's .metadata for 32 ranks takes ~1 s, and retention would re-read
        # every kept checkpoint at each commit while the other ranks wait at the barrier.
        self._known_valid: set[Path] = set()
        # Async saves run DCP's collectives on a background thread: give them their own gloo group
        # so they never interleave with the training loop's NCCL collectives.
        self.async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        # On GPU, one writer that keeps its pinned host staging buffers between saves makes an async
        # save block the loop only for the device-to-host copy: 0.2 s instead of 7.6 s for ViT-H's
        # 7.9 GB on an H200 (benchmarks/checkpoint.py). It costs pinned memory the size of the shard.
        self._writer = (FileSystemWriter(str(self.root), thread_count=4, sync_files=True, cache_staged_state_dict=True)
                        if async_save and torch.cuda.is_available() else None)

    # triggers
    def step_due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def time_due(self) -> bool:
        """Local view only: the loop all-reduces it so that every rank saves at the same step."""
        return bool(self.every_minutes) and time.monotonic() - self.last_save_time >= 60 * self.every_minutes

    # save
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict) -> None:
        if step == 0:
            return  # nothing trained yet: a fresh start reproduces this state exactly
        self.finish()
        path = self.root / f"step-{step}"
        started = time.monotonic()
        self._journal("checkpoint_begin", step, path=str(path), async_save=self.async_save)
        self._writer_errors_before = len(_WriterThreads.errors)
        prepare_error = None
        if self.rank == 0:
            try:
                if (path / COMPLETE).exists():  # a resume never overwrites a committed checkpoint
                    set_aside(path, "a committed checkpoint at a step that was saved again")
                elif path.exists():  # left by a save that was killed; never valid, safe to replace
                    shutil.rmtree(path)
                os.makedirs(path / "rng")
            except OSError as e:
                prepare_error = e
        if not _all_ok(prepare_error is None):  # also the barrier before the other ranks write into it
            self._abandon(path, prepare_error or OSError(f"rank 0 could not create {path}"))
        try:
            _write_atomic(path / "rng" / f"rank-{self.rank}.json", json.dumps(rng_state()))
            if self.rank == 0:
                _write_atomic(path / TRAIN_STATE, json.dumps({"step": step, **train_state}))
            model_sd, optim_sd = get_state_dict(model, optimizer)
            writer = self._writer or FileSystemWriter(str(path), thread_count=4, sync_files=True)
            if self.async_save:
                future = dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=writer,
                                        checkpoint_id=str(path), process_group=self.async_group)
                self.pending = _Pending(step, path, future, started)
                return
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            self._abandon(path, e)
        self._commit(step, path, started)

    def pending_done(self) -> bool:
        return self.pending is None or self.pending.future.done()

    def finish(self) -> None:
        """Wait for an in-flight async save and commit it (collective)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as e:
            self._abandon(pending.path, e)
        self._commit(pending.step, pending.path, pending.started)

    def _abandon(self, path: Path, error: BaseException) -> None:
        _WriterThreads.join()
        # DCP hands other ranks' failures over as copies that lose the chained OSError: ask the disk too.
        disk_full = path.exists() and shutil.disk_usage(path).free < (1 << 20)
        barrier()
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        previous = valid_checkpoints(self.root, warn=False)
        keep = f"the previous checkpoint {previous[0]} is kept" if previous else "there is no earlier checkpoint"
        cause = "disk full: No space left on device" if disk_full else _root_cause(error)
        kind = CheckpointError if "No space left" in cause else CheckpointSaveError
        raise kind(f"saving {path} failed ({cause}); {keep}") from error

    def _commit(self, step: int, path: Path, started: float) -> None:
        lost = _WriterThreads.errors[self._writer_errors_before:]
        if not _all_ok(not lost):  # also the barrier: every rank's shards are written and synced
            self._abandon(path, lost[0] if lost else OSError("another rank's writer thread failed"))
        if self.rank == 0:
            _write_atomic(path / COMPLETE, f"{time.time()}\n")
            _write_atomic(self.root / "latest", path.name + "\n")
            self._apply_retention(path)
        barrier()
        self.last_save_time = time.monotonic()
        self.last_save_seconds = time.monotonic() - started
        self._journal("checkpoint_commit", step, path=str(path), seconds=self.last_save_seconds,
                      bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if self.rank == 0 else None)

    def _journal(self, event: str, step: int, **fields) -> None:
        if self.journal is not None and self.rank == 0:
            self.journal.write(event, step, **fields)

    def _apply_retention(self, newest: Path) -> None:
        # Only loadable checkpoints count towards `keep`; a damaged one is set aside, never deleted.
        valid = []
        for path in checkpoint_dirs(self.root):
            try:
                problem = None if path in self._known_valid else problem_with(path)
            except CheckpointRefusedError as e:
                if path not in self.refused:
                    warnings.warn(f"retention deletes nothing while a checkpoint is refused: {e}", stacklevel=2)
                self.refused.add(path)
                continue
            if problem is None:
                valid.append(path)
            elif problem != INCOMPLETE:
                set_aside(path, problem)
        self._known_valid.update(valid)
        if self.refused:  # the user may yet load it with other versions: keep the history it needs
            return
        keep = set(valid[: self.keep]) | {newest}
        if self.keep_every:
            keep |= {p for p in valid if step_of(p) % self.keep_every == 0}
        for path in checkpoint_dirs(self.root):
            # Only older ones: a newer directory could be a save that another run is still writing.
            if path not in keep and step_of(path) < step_of(newest):
                shutil.rmtree(path, ignore_errors=True)

    # load
    def load_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    incompatible=lambda train_state: None) -> dict | None:
        """Restore the newest loadable checkpoint; returns its train state, or None for a run that has
        no checkpoint yet. Damaged ones are set aside on the way (module docstring).

        Only per-parameter state comes from the checkpoint: every param group keeps the
        hyper-parameters it was built with (lr, betas, eps, weight decay, lr scale), so the config
        is the truth on resume. `incompatible(train_state)` says why a checkpoint belongs to another
        setup (a different model or class list), or None: an error, never damage to skip.
        """
        candidates, error = None, None
        if self.rank == 0:
            candidates = [str(p) for p in checkpoint_dirs(self.root)]
            error = next((str(another_setup(self.root.parent, why))
                          for why in (incompatible(state) for state in map(_complete_train_state, candidates)
                                      if state is not None) if why), None)
        candidates, error = broadcast_object((candidates, error))
        if error:
            raise CheckpointError(error)
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        for candidate in candidates:
            path = Path(candidate)
            # Newest first, each checked only when reached: reading ViT-H's metadata for 32 ranks
            # takes ~1 s, and the other ranks wait for it at every restart.
            problem, refused = None, None
            if self.rank == 0:
                try:
                    problem = problem_with(path)
                except CheckpointRefusedError as e:
                    refused = str(e)
            problem, refused = broadcast_object((problem, refused))
            if refused is None and problem is None:
                try:
                    model_sd, optim_sd = get_state_dict(model, optimizer)
                    dcp.load({"model": model_sd, "optim": optim_sd}, storage_reader=SafeReader(str(path)),
                             planner=SafeLoadPlanner())
                    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
                    rng_file = path / "rng" / f"rank-{self.rank}.json"
                    # Absent after a change of world size: this rank keeps its seed.
                    rng = json.loads(rng_file.read_text()) if rng_file.is_file() else None
                except (Exception, CheckpointException) as e:  # a shard that went bad after the check
                    found = _refused_in(e)
                    refused = str(refusal(path, found)) if found else None
                    problem = f"failed to load ({_root_cause(e)})"
                failures = [f for f in _gather((refused, problem)) if f != (None, None)]
                refused = next((r for r, _ in failures if r), None)
                problem = failures[0][1] if failures else None
            if refused:
                raise CheckpointRefusedError(refused)
            if problem:
                if self.rank == 0:
                    warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
                    if problem != INCOMPLETE:
                        set_aside(path, problem)
                continue
            for group, built in zip(optimizer.param_groups, hyper):
                group.update(built)
            if rng is not None:
                set_rng_state(rng)
            self._known_valid.add(path)
            return {"path": str(path), **read_train_state(path)}
        aside = broadcast_object([f"{p.name} ({why_set_aside(p)})" for p in set_aside_dirs(self.root)]
                                 if self.rank == 0 else None)
        if aside:
            raise none_loads(self.root.parent, f"set aside in {self.root}: {'; '.join(aside)}; inspect them, then "
                                               "remove them to start afresh (or restore one that loads)")
        return None


def _complete_train_state(path: str) -> dict | None:
    """The train state of a committed checkpoint; None for one in flight or damaged (`problem_with`
    reports that when load_latest reaches it)."""
    try:
        return read_train_state(Path(path)) if (Path(path) / COMPLETE).is_file() else None
    except (OSError, ValueError):
        return None


def _exception_chain(e: BaseException):
    """e, its causes and contexts, and the per-rank failures DCP wraps into a CheckpointException."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        if isinstance(x, CheckpointException):
            stack += [failure for failure, _ in x.failures.values()]
        stack += [x.__cause__, x.__context__]


def _root_cause(e: BaseException) -> str:
    """One line for the user: "disk full" if ENOSPC is anywhere in the chain, else the innermost message."""
    innermost = e
    for x in _exception_chain(e):
        if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "No space left" in str(x):
            return "disk full: No space left on device"
        innermost = x if str(x).strip() else innermost
    lines = [line.strip() for line in str(innermost).splitlines() if line.strip()]
    # A weights-only failure (another rank's reaches us without its cause) is a page of advice
    # around the one line of substance that follows "WeightsUnpickler error:".
    marked = [i for i, line in enumerate(lines) if "WeightsUnpickler error:" in line]
    if marked:
        rest = lines[marked[0]].split("WeightsUnpickler error:", 1)[1].strip()
        lines = [rest] if rest else lines[marked[0] + 1:marked[0] + 2]
    return lines[-1][:300] if lines else type(e).__name__


def _gather(value) -> list:
    """Every rank's value (an object collective works on gloo and NCCL alike)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def _all_ok(ok: bool) -> bool:
    return all(_gather(ok))


# --- tools: export and ls -------------------------------------------------------------------------

def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """A step-N directory as given, or the newest valid one of a run dir or its checkpoints dir."""
    path = Path(checkpoint)
    if path.name == "checkpoints" or checkpoints_dir(path).is_dir():
        root = path if path.name == "checkpoints" else checkpoints_dir(path)
        valid = valid_checkpoints(root)
        if not valid:
            raise CheckpointError(f"no valid checkpoint in {root}")
        path = valid[0]
    problem = problem_with(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return path


def consolidated_model(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The full (unsharded) model state of a pretraining checkpoint on CPU, and its train state.
    Needs no process group: DCP reads every shard in this process."""
    from vit.models.vit import build_model

    path = resolve_checkpoint(checkpoint)
    state = read_train_state(path)
    cfg = state["config"]
    with torch.device("meta"):
        model = build_model(cfg["model"]["name"], num_classes=len(state["classes"]), img_size=cfg["data"]["img_size"])
    sd = model.to_empty(device="cpu").state_dict()
    dcp.load({"model": sd}, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=True)
    return sd, state


def export_safetensors(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Consolidate the model of a DCP checkpoint into one safetensors file with timm's names."""
    from safetensors.torch import save_file

    sd, state = consolidated_model(checkpoint)
    cfg = state["config"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out),
              metadata={"model": cfg["model"]["name"], "step": str(state["step"]),
                        "num_classes": str(len(state["classes"])), "img_size": str(cfg["data"]["img_size"])})
    return out


def load_pretrained(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Pretrained ViT weights (timm names) from an exported safetensors file or a DCP checkpoint
    (a step-N directory or a run directory); never through pickle."""
    path = Path(path)
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"pretrained: {path} is not a readable safetensors file ({e})") from None
    return consolidated_model(path)[0]


def describe(root: Path) -> list[dict]:
    """Every checkpoint directory with its status, the set-aside ones (and why) last."""
    rows, aside = [], set_aside_dirs(root)
    for path in [*checkpoint_dirs(root), *aside]:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        marker = path / COMPLETE
        try:
            written = read_train_state(path).get("versions")
        except (OSError, ValueError):
            written = None
        if path in aside:
            status = f"set aside: {why_set_aside(path)}"
        else:
            try:
                status = problem_with(path) or "valid"
                if status == "valid":
                    check_byte_items(path)
            except CheckpointRefusedError as e:
                status = f"refused: {e}"
            except CheckpointError as e:
                status = str(e)
        rows.append({"step": int(path.name[5:].split(".")[0]), "path": str(path), "size_bytes": size,
                     "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(marker.stat().st_mtime))
                     if marker.exists() else None, "versions": written, "status": status})
    return rows


def byte_items(path: Path) -> dict:
    """Every non-tensor item of a checkpoint (the optimizer's hyper-parameters, ...) by its key, read
    through the safe unpickler without loading a tensor: a refused class raises RefusedClass."""
    metadata = SafeReader(str(path)).read_metadata()
    keys = {k: None for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to load in a single process"
        dcp.load(keys, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(allow_partial_load=True),
                 no_dist=True)
    return keys


def check_byte_items(path: Path) -> None:
    """Raise CheckpointRefusedError for a refused class in a byte item, CheckpointError if one is unreadable."""
    try:
        byte_items(path)
    except (Exception, CheckpointException) as e:
        found = _refused_in(e)
        if found:
            raise refusal(path, found) from None
        raise CheckpointError(f"checkpoint {path}: its byte items do not load ({_root_cause(e)})") from None


def another_setup(run_dir: str | os.PathLike, why: str) -> CheckpointError:
    return CheckpointError(f"{run_dir} holds checkpoints of another setup ({why}); resume with the same settings, "
                           "or give this one a new run_dir")


def none_loads(run_dir: str | os.PathLike, what_to_do: str) -> CheckpointError:
    return CheckpointError(f"no checkpoint of {run_dir} loads, and it never starts again from step 0 on its own; "
                           + what_to_do)


def newest_loadable(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a start of this run would resume from, checked without a process group: its
    files whole and every byte item through the safe unpickler. None for a run without checkpoints;
    CheckpointError (CheckpointRefusedError for a refusal) when it has some but none loads."""
    root = checkpoints_dir(run_dir)
    for path in checkpoint_dirs(root):
        if problem_with(path) is None:
            check_byte_items(path)
            return path
    if set_aside_dirs(root) or any((p / COMPLETE).exists() for p in checkpoint_dirs(root)):
        raise none_loads(run_dir, f"see python jobs/checkpoint.py ls {run_dir}")
    return None


def saved_model_shapes(path: Path) -> dict[str, tuple]:
    """The model's tensor shapes in a checkpoint, from its metadata alone."""
    tensors = SafeReader(str(path)).read_metadata().state_dict_metadata.items()
    return {k[len("model."):]: tuple(v.size) for k, v in tensors
            if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}


