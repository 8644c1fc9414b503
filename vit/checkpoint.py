"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save, validate, resume, retain, export.

Layout of `<run_dir>/checkpoints/step-<N>/`:
  *.distcp, .metadata   the model and AdamW state; each rank writes its own shards
  train_state.json      step, data position, bad-sample count, config, version, class map (rank 0)
  rng/rank-<r>.json     each rank's torch/CUDA/numpy/python RNG state
  COMPLETE              written last, atomically (rename), after a barrier: only then is it valid
`checkpoints/latest` names the newest valid checkpoint; the loader does not trust it blindly and
re-checks every candidate, newest first, skipping incomplete or damaged ones with a warning.

No untrusted pickle is ever loaded: JSON for non-tensor state, DCP's byte items (the optimizer's
hyper-parameters) through `torch.load(weights_only=True)` (DCP's own planner would use
`weights_only=False`), and DCP's `.metadata` through an unpickler that admits only the classes a
DCP metadata file is made of.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import pickle
import random
import shutil
import sys
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
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from vit.distributed import barrier, broadcast_object

COMPLETE = "COMPLETE"
TRAIN_STATE = "train_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot serve, or a full disk: the user must act (not requeued)."""


class CheckpointSaveError(RuntimeError):
    """A save that failed for another reason (an I/O error): the job is requeued, and resumes from
    the previous checkpoint, which is kept."""


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


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


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
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# --- validity -----------------------------------------------------------------------------------

def step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def checkpoint_dirs(root: Path) -> list[Path]:
    """All `step-N` directories, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of, reverse=True)


def problem_with(path: Path) -> str | None:
    """Why this checkpoint cannot be loaded, or None if it is complete and every shard is there in full."""
    if not (path / COMPLETE).is_file():
        return "incomplete (no COMPLETE marker)"
    try:
        json.loads((path / TRAIN_STATE).read_text())
        metadata = SafeReader(str(path)).read_metadata()
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
    """The loadable checkpoints, newest first; those in `known` were checked before and are not re-read."""
    valid = []
    for path in checkpoint_dirs(root):
        problem = None if path in known else problem_with(path)
        if problem is None:
            valid.append(path)
        elif warn:
            warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return valid


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
        self.failed_loads: list[str] = []  # checkpoints load_latest skipped after they had started loading
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
        prepare_error = None
        if self.rank == 0:
            try:
                if path.exists():  # left by a save that was killed; never valid, safe to replace
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
        barrier()  # every rank's shards are written and synced
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
        # One that failed to load at this start does not count towards `keep`.
        valid = [p for p in valid_checkpoints(self.root, warn=False, known=self._known_valid)
                 if str(p) not in self.failed_loads]
        self._known_valid.update(valid)
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
        """Restore the newest loadable checkpoint; returns its train state, or None to start fresh.

        `incompatible(train_state)` says why a checkpoint belongs to another setup (a different model
        or class list), or None. That is an error, not damage: skipping such checkpoints would start
        afresh and overwrite them.
        """
        candidates, error = None, None
        if self.rank == 0:
            candidates = [str(p) for p in checkpoint_dirs(self.root)]
            error = next((f"{self.root.parent} holds checkpoints of another setup ({why}); resume with the "
                          "same settings, or give this one a new run_dir"
                          for why in (incompatible(state) for state in map(_complete_train_state, candidates)
                                      if state is not None) if why), None)
        candidates, error = broadcast_object((candidates, error))
        if error:
            raise CheckpointError(error)
        self.failed_loads = []
        for candidate in candidates:
            path = Path(candidate)
            # Newest first, each checked only when reached: reading ViT-H's metadata for 32 ranks
            # takes ~1 s, and the other ranks wait for it at every restart.
            problem = broadcast_object(problem_with(path) if self.rank == 0 else None)
            if problem:
                if self.rank == 0:
                    warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
                continue
            try:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                dcp.load({"model": model_sd, "optim": optim_sd}, storage_reader=SafeReader(str(path)),
                         planner=SafeLoadPlanner())
                set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
                rng_file = path / "rng" / f"rank-{self.rank}.json"
                # Absent after a change of world size: this rank keeps its seed.
                rng = json.loads(rng_file.read_text()) if rng_file.is_file() else None
                ok = 1
            except (Exception, CheckpointException) as e:  # a shard that went bad after the check: use the previous
                warnings.warn(f"skipping checkpoint {path}: failed to load ({_root_cause(e)})", stacklevel=2)
                ok = 0
            if not _all_ok(ok):
                self.failed_loads.append(str(path))
                continue
            if rng is not None:
                set_rng_state(rng)
            self._known_valid.add(path)
            return {"path": str(path), **json.loads((path / TRAIN_STATE).read_text())}
        return None


def _complete_train_state(path: str) -> dict | None:
    """The train state of a committed checkpoint; None for one in flight or damaged (`problem_with`
    reports that when load_latest reaches it)."""
    try:
        return json.loads((Path(path) / TRAIN_STATE).read_text()) if (Path(path) / COMPLETE).is_file() else None
    except (OSError, ValueError):
        return None


def _root_cause(e: BaseException) -> str:
    """One line for the user: "disk full" if ENOSPC is anywhere in the chain, else the innermost message."""
    seen, stack, innermost = set(), [e], e
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "No space left" in str(x):
            return "disk full: No space left on device"
        if isinstance(x, CheckpointException):
            stack += [failure for failure, _ in x.failures.values()]
        stack += [x.__cause__, x.__context__]
        innermost = x if str(x).strip() else innermost
    text = str(innermost).strip()
    return text.splitlines()[-1][:300] if text else type(e).__name__


def _all_ok(ok: int) -> bool:
    """Every rank loaded its part (an object collective works on gloo and NCCL alike)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, ok)
        return all(flags)
    return bool(ok)


# --- tools: export and ls -------------------------------------------------------------------------

def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """A step-N directory as given, or the newest valid one of a run dir or its checkpoints dir."""
    path = Path(checkpoint)
    if path.name == "checkpoints" or (path / "checkpoints").is_dir():
        root = path if path.name == "checkpoints" else path / "checkpoints"
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
    from vit.model import build_model

    path = resolve_checkpoint(checkpoint)
    state = json.loads((path / TRAIN_STATE).read_text())
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
    rows = []
    for path in checkpoint_dirs(root):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        marker = path / COMPLETE
        rows.append({"step": step_of(path), "path": str(path), "size_bytes": size,
                     "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(marker.stat().st_mtime))
                     if marker.exists() else None,
                     "status": problem_with(path) or "valid"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit.checkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="consolidate a checkpoint's model for timm (vit/export.py)")
    ex.add_argument("checkpoint", help="a step-N directory, or a run directory (newest valid checkpoint)")
    ex.add_argument("out", help="a folder timm loads as local-dir:OUT, or one .safetensors file")
    ls = sub.add_parser("ls", help="list a run's checkpoints with step, time, size and validity")
    ls.add_argument("run_dir")
    ls.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            from vit.export import export
            print(export(args.checkpoint, args.out))
            return 0
        root = Path(args.run_dir)
        rows = describe(root / "checkpoints" if (root / "checkpoints").is_dir() else root)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'step':>10}  {'time':19}  {'size':>10}  status")
        for r in rows:
            print(f"{r['step']:>10}  {r['time'] or '-':19}  {r['size_bytes'] / 1e6:>8.1f}MB  {r['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
