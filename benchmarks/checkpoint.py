#!/usr/bin/env python
"""Checkpoint save/load throughput of our `Checkpointer` against this disk's own sequential speed.

The state is what a training run saves: an FSDP2-sharded model (world size 1 through
`init_distributed()`) and AdamW after one real step (fp32 weights + exp_avg + exp_avg_sq + step,
about 632M x 12 bytes = 7.6 GB for ViT-H/14 with the 21k head). The baseline is the disk's real
limit for the same bytes: each tensor's own buffer written with `os.write` (no Python copies) and
fsync'ed, then read back with `readinto` into the same buffers after dropping the page cache;
`dd oflag=direct` / `iflag=direct` runs in the same process for reference. Each baseline is the
better of two passes. Async save reports the
time the training loop is blocked (`save()` returning) against a synchronous save.

    python benchmarks/checkpoint.py                       # ViT-H/14 on CPU, files under /tmp
    python benchmarks/checkpoint.py --model vit_base_patch16 --repeat 3 --writer-sweep
    python benchmarks/checkpoint.py --tiny                # seconds: the test suite's smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a checkout without `pip install`

from vit.engine.checkpoint import Checkpointer  # noqa: E402
from vit.engine.distributed import close, init_distributed  # noqa: E402
from vit.engine.optim import build_optimizer  # noqa: E402
from vit.engine.parallel import shard_model  # noqa: E402
from vit.engine.train import train_step  # noqa: E402
from vit.models.vit import IN21K_CLASSES, build_model  # noqa: E402

GB = 1e9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_huge_patch14")
    p.add_argument("--num-classes", type=int, default=IN21K_CLASSES)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the state lives: cuda saves from GPU memory as the training loop does")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (a fresh subdirectory, removed after)")
    p.add_argument("--repeat", type=int, default=1, help="saves/loads of each kind; the median is reported")
    p.add_argument("--tiny", action="store_true", help="vit_tiny at 32 px, 10 classes: a smoke test")
    p.add_argument("--no-dd", action="store_true", help="skip the dd reference")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="drop only this run's files from the page cache (fadvise), not the whole machine's")
    p.add_argument("--writer-sweep", action="store_true",
                   help="also time dcp.save under FileSystemWriter settings (thread_count, single_file_per_rank, sync_files)")
    p.add_argument("--out", help="also write the report here (markdown) and the numbers next to it as .json")
    args = p.parse_args(argv)
    if args.tiny:  # also leaves the machine's page cache alone: the test suite runs beside other work
        args.model, args.img_size, args.num_classes, args.no_drop_caches = "vit_tiny_patch16", 32, 10, True
    args.argv = sys.argv if argv is None else ["benchmarks/checkpoint.py", *argv]
    return args


# --- the disk's own speed --------------------------------------------------------------------------

def byte_views(tensors: list[torch.Tensor]) -> list[memoryview]:
    """Zero-copy byte views of each tensor's buffer (all are contiguous CPU tensors)."""
    return [memoryview(t.detach().reshape(-1).numpy()).cast("B") for t in tensors]


def drop_page_cache(paths: list[Path], system_wide: bool = True) -> str:
    """Make the next read of `paths` come from the disk (they are fsync'ed, so their pages are clean).

    fadvise(DONTNEED) drops just these files' pages and works for any owner; drop_caches (root only)
    empties the whole machine's cache, which also slows whoever else is running here.
    """
    how = "fadvise"
    if system_wide:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            how = "drop_caches+fadvise"
        except OSError:
            pass
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return how


def raw_write(path: Path, views: list[memoryview]) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for view in views:
            while view:  # os.write may write less than asked (at most ~2 GB per call on Linux)
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def raw_read(path: Path, views: list[memoryview]) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for view in views:
            while view:
                n = f.readinto(view)
                if not n:
                    raise EOFError(f"{path} is shorter than written")
                view = view[n:]
    return time.perf_counter() - t


def dd(args: list[str]) -> float | None:
    """GB/s as dd reports it, or None where dd or O_DIRECT is unavailable."""
    try:
        r = subprocess.run(["dd", *args], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", r.stderr)
    return int(m.group(1)) / float(m.group(2)) / GB if r.returncode == 0 and m else None


# --- helpers ----------------------------------------------------------------------------------------

def local_tensors(model, optimizer) -> list[torch.Tensor]:
    """Every tensor a checkpoint holds, as this rank's local shard."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    out = []

    def walk(obj):
        if torch.is_tensor(obj):
            out.append(obj.to_local() if hasattr(obj, "to_local") else obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
    walk(model_sd)
    walk(optim_sd)
    return [t if t.is_contiguous() else t.contiguous() for t in out]


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def async_cached(path: Path, model, optimizer, group, saves: int = 2) -> list[float]:
    """Blocked seconds of `saves` async saves through one FileSystemWriter that keeps its staging buffer."""
    writer = FileSystemWriter(str(path), thread_count=4, sync_files=True, cache_staged_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    blocked = []
    for i in range(saves):
        t = time.perf_counter()
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=writer,
                                checkpoint_id=str(path / f"step-{i}"), process_group=group)
        blocked.append(time.perf_counter() - t)
        future.result()
    return blocked


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = init_distributed(args.device)
    cuda = world.device.type == "cuda"
    root = Path(tempfile.mkdtemp(prefix="vit-ckpt-bench-", dir=args.dir))
    res: dict = {"model": args.model, "dir": str(root)}
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    try:
        where = torch.cuda.get_device_name() if cuda else "CPU"
        say(f"checkpoint benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs, state on {where}, dir {root}\ncommand: `python {shlex.join(args.argv)}`\n")
        # The state: a real FSDP2 model and AdamW state from one real step.
        t = time.perf_counter()
        torch.manual_seed(0)
        with world.device:
            model = build_model(args.model, args.num_classes, img_size=args.img_size)
        shard_model(model, world, "bf16" if cuda else "fp32")
        optimizer = build_optimizer(model, 1e-4, 0.05)
        x = torch.randn(1, 3, args.img_size, args.img_size)
        train_step(model, optimizer, [(x, torch.zeros(1, dtype=torch.long))], world.device)
        tensors = local_tensors(model, optimizer)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        params = sum(p.numel() for p in model.parameters())
        res.update(bytes=nbytes, params=params)
        say(f"state: {args.model}, {params / 1e6:.0f}M parameters, {len(tensors)} tensors, {nbytes / GB:.2f} GB "
            f"(model + AdamW after one step; built in {time.perf_counter() - t:.0f}s)")

        # 1. The disk's own sequential speed for these bytes (from host memory: the disk is what is measured).
        views = byte_views([t.cpu() for t in tensors] if cuda else tensors)
        # Best of two: the baseline is the disk's limit, and one pass can be slowed by other work here.
        raw = root / "raw.bin"
        w = r = float("inf")
        for _ in range(2):
            w = min(w, raw_write(raw, views))
            res["drop"] = drop_page_cache([raw], not args.no_drop_caches)
            r = min(r, raw_read(raw, views))
            raw.unlink()
        res.update(disk_write_gbs=nbytes / w / GB, disk_read_gbs=nbytes / r / GB)
        if not args.no_dd:
            mib = max(nbytes >> 20, 1)
            ddfile = root / "dd.bin"
            res["dd_write_gbs"] = dd(["if=/dev/zero", f"of={ddfile}", "bs=1M", f"count={mib}", "oflag=direct", "conv=fsync"])
            if ddfile.exists():
                drop_page_cache([ddfile], not args.no_drop_caches)
                res["dd_read_gbs"] = dd([f"if={ddfile}", "of=/dev/null", "bs=1M", "iflag=direct"])
            ddfile.unlink(missing_ok=True)

        # 2. Checkpointer: synchronous save, then load (cold cache), `repeat` times.
        sync_ck = Checkpointer(root / "sync", world.rank)
        saves, loads = [], []
        for i in range(args.repeat):
            t = time.perf_counter()
            sync_ck.save(i + 1, model, optimizer, {"bench": True})
            saves.append(time.perf_counter() - t)
            drop_page_cache(files_under(root / "sync" / f"step-{i + 1}"), not args.no_drop_caches)
            t = time.perf_counter()
            state = sync_ck.load_latest(model, optimizer)
            loads.append(time.perf_counter() - t)
            assert state and state["step"] == i + 1, state
        on_disk = sum(f.stat().st_size for f in files_under(root / "sync" / f"step-{args.repeat}"))
        res.update(save_s=saves, load_s=loads, save_gbs=nbytes / med(saves) / GB, load_gbs=nbytes / med(loads) / GB,
                   checkpoint_bytes=on_disk)
        shutil.rmtree(root / "sync")

        # 3. Async save: the loop is blocked until save() returns; finish() waits for the writes.
        async_ck = Checkpointer(root / "async", world.rank, async_save=True)
        blocked, total = [], []
        for i in range(args.repeat):
            t = time.perf_counter()
            async_ck.save(i + 1, model, optimizer, {"bench": True})
            blocked.append(time.perf_counter() - t)
            async_ck.finish()
            total.append(time.perf_counter() - t)
        res.update(async_blocked_s=blocked, async_total_s=total,
                   async_blocked_fraction=med(blocked) / med(saves))
        shutil.rmtree(root / "async")
        if cuda:  # staging into a reused pinned buffer (needs CUDA): only the first save allocates it
            try:
                cached = async_cached(root / "cached", model, optimizer, async_ck.async_group)
                res.update(async_cached_blocked_s=cached, async_cached_blocked_fraction=cached[-1] / med(saves))
            except Exception as e:  # noqa: BLE001 (a variant, not what the loop runs: report and go on)
                say(f"async save with a cached staging buffer failed: {type(e).__name__}: {e}")
            shutil.rmtree(root / "cached", ignore_errors=True)

        # 4. Optional: dcp.save directly under FileSystemWriter settings.
        if args.writer_sweep:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            sweep = []
            settings = [dict(thread_count=n, single_file_per_rank=True, sync_files=True) for n in (1, 2, 4, 8)]
            settings += [dict(thread_count=4, single_file_per_rank=False, sync_files=True),
                         dict(thread_count=4, single_file_per_rank=True, sync_files=False)]
            for s in settings:
                path = root / "sweep"
                t = time.perf_counter()
                dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=FileSystemWriter(str(path), **s))
                if not s["sync_files"]:  # what is not on disk yet is not a checkpoint: count the flush
                    for f in files_under(path):
                        with open(f, "rb+") as fh:
                            os.fsync(fh.fileno())
                sweep.append({**s, "gbs": nbytes / (time.perf_counter() - t) / GB})
                shutil.rmtree(path)
            res["writer_sweep"] = sweep

        # Report.
        def gbs(v):
            return "n/a" if v is None else f"{v:.2f}"

        def pct(v, ref):
            return "" if v is None else f"{v / ref:.0%}"
        dw, dr = res["disk_write_gbs"], res["disk_read_gbs"]
        say(f"\n| what | GB/s | vs disk |\n|---|---:|---:|\n"
            f"| disk sequential write (os.write + fsync) | {dw:.2f} | 100% |\n"
            f"| disk sequential read (readinto, cache dropped via {res['drop']}) | {dr:.2f} | 100% |\n"
            f"| dd write oflag=direct (reference) | {gbs(res.get('dd_write_gbs'))} | {pct(res.get('dd_write_gbs'), dw)} |\n"
            f"| dd read iflag=direct (reference) | {gbs(res.get('dd_read_gbs'))} | {pct(res.get('dd_read_gbs'), dr)} |\n"
            f"| Checkpointer.save (sync, {med(saves):.2f}s) | {res['save_gbs']:.2f} | {res['save_gbs'] / dw:.0%} |\n"
            f"| Checkpointer.load_latest ({med(loads):.2f}s) | {res['load_gbs']:.2f} | {res['load_gbs'] / dr:.0%} |")
        for s in res.get("writer_sweep", []):
            say(f"| dcp.save thread_count={s['thread_count']} single_file_per_rank={s['single_file_per_rank']} "
                f"sync_files={s['sync_files']} | {s['gbs']:.2f} | {s['gbs'] / dw:.0%} |")
        ddw, ddr = res.get("dd_write_gbs"), res.get("dd_read_gbs")
        say(f"\nsave: {res['save_gbs'] / dw:.0%} of the disk's write speed (target >= 70%)"
            + (f", {res['save_gbs'] / ddw:.0%} of dd's" if ddw else "")
            + f"; checkpoint on disk {on_disk / GB:.2f} GB for {nbytes / GB:.2f} GB of tensors")
        say(f"load: {res['load_gbs'] / dr:.0%} of the disk's read speed"
            + (f", {res['load_gbs'] / ddr:.0%} of dd's" if ddr else ""))
        say(f"async save: loop blocked {med(blocked):.2f}s of a {med(saves):.2f}s sync save = "
            f"{res['async_blocked_fraction']:.0%} (target <= 20%); async save done after {med(total):.2f}s")
        if "async_cached_blocked_s" in res:
            say("async save, FileSystemWriter(cache_staged_state_dict=True) reused: "
                f"blocked {res['async_cached_blocked_s'][0]:.2f}s "
                f"on the first save, {res['async_cached_blocked_s'][-1]:.2f}s after = "
                f"{res['async_cached_blocked_fraction']:.0%} of a sync save")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        close()
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
