#!/usr/bin/env python
"""Training-step throughput: our model and training core against a plain timm step, same batch.

"ours" is exactly what the loop runs: `init_distributed()` (a group of one), `build_model`,
`shard_model` (FSDP2 with the real mixed-precision policy and the recipe's `fsdp` wrapping),
`build_optimizer` (fused AdamW) and `vit.engine.train.train_step` with clipping 1.0, in a process whose
host memory is set up as the loop's is (`init_distributed`).
"timm" is `timm.create_model('<name>_224')` with autocast (bf16 on CUDA), fused AdamW,
`clip_grad_norm_` and cross-entropy. The two take turns
(A B A B ... after warm-up) and each reports the median of its per-round step times, so drift in
clocks or in other load on the machine hits both alike.

Rows (`--rows`; CPU default `base`, GPU default all): `base`, `ac` (activation checkpointing),
`compile` (torch.compile per block), `compile-sac` (compiled, selective activation checkpointing:
every other block), `compile-float8` (compiled, torchao float8 projections; on CPU emulated),
`fsdp-per-block` (FSDP2's defaults, instead of the recipe's
units of 4 blocks kept gathered: one unit per block, resharded after forward), `no-fsdp` (CPU only:
our model and step without FSDP2, which isolates FSDP2's own cost; on a GPU its parameters would
stay fp32, where the loop's run in bf16), `sdpa` (one row per attention backend), `sweep` (micro-batch
sweep with and without AC; an implementation that runs out of memory stops there). `compile-sac` and
`compile-float8` run ours only: "ours/timm eager" compares every row with timm's `base` row at the
same micro-batch. MFU counts model FLOPs (`train_flops_per_image`), so AC's recompute is not
credited. Peak memory is this implementation's own: the other one's parameters and optimizer state
are subtracted.

    python benchmarks/train_step.py                      # CPU: vit_tiny + vit_base, fp32, batch 8
    python benchmarks/train_step.py --rows base,ac,sweep --out bench.md   # GPU: vit_huge bf16
    python benchmarks/train_step.py --rows base,compile,compile-sac,compile-float8 --batch 32,64   # benchmarks/gpu.sh
    python benchmarks/train_step.py --tiny               # seconds: the test suite's smoke run
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a checkout without `pip install`

from vit.engine.distributed import close, init_distributed  # noqa: E402
from vit.engine.metrics import peak_flops  # noqa: E402
from vit.engine.optim import build_optimizer  # noqa: E402
from vit.engine.parallel import precompute_float8_scales_after_each_step, resolve_precision, shard_model  # noqa: E402
from vit.engine.train import train_step  # noqa: E402
from vit.models.vit import IN21K_CLASSES, build_model, train_flops_per_image  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
RECIPE = OmegaConf.load(CONF / "pretrain.yaml")
LR, WD = RECIPE.optim.lr, RECIPE.optim.weight_decay
EXTRA_ROWS = ("ac", "compile", "compile-sac", "compile-float8", "fsdp-per-block", "no-fsdp", "sdpa", "sweep")
OURS_ONLY_ROWS = ("compile-sac", "compile-float8")  # timm has no such option: compared with timm's base row
CPU_ONLY_ROWS = ("no-fsdp",)
SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION")  # cuDNN last: a sticky CUDA error there cannot spoil the others


@dataclass(frozen=True)
class Row:
    name: str
    batch: int
    ac: bool | str = False  # model.grad_checkpointing's values
    compile: bool = False
    float8: bool = False
    fsdp: tuple[int, bool] | None = None  # (unit_blocks, reshard_after_forward); None: the config's
    shard: bool = True  # False: no FSDP2 at all
    sdpa: str | None = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="comma list (default: CPU vit_tiny_patch16,vit_base_patch16; GPU vit_huge_patch14)")
    p.add_argument("--batch", help="micro-batch, or a comma list: every row at each (default: CPU 8, GPU 32)")
    p.add_argument("--batches", default="32,48,64,96,128,192,256", help="the sweep row's micro-batches")
    p.add_argument("--steps", type=int, help="timed steps per implementation per round (default: CPU 1, GPU 5)")
    p.add_argument("--warmup", type=int, help="untimed steps per implementation first (default: CPU 1, GPU 3)")
    p.add_argument("--rounds", type=int, help="A/B rounds; the median is reported (default: CPU 5, GPU 5)")
    p.add_argument("--rows", help=f"comma list of base,{','.join(EXTRA_ROWS)} (default: CPU base; GPU all)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=IN21K_CLASSES)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-timm", action="store_true", help="run ours only (e.g. timm is not installed)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile rows (the CPU smoke test uses aot_eager: no codegen)")
    p.add_argument("--tiny", action="store_true",
                   help="vit_tiny at 32 px, batch 2, 1 round: a smoke test (or a dry run of other flags)")
    p.add_argument("--time-budget", type=float, help="seconds; rows not started by then are skipped")
    p.add_argument("--out", help="also write the table here (markdown) and the rows next to it as .json")
    args = p.parse_args(argv)
    args.argv = sys.argv if argv is None else ["benchmarks/train_step.py", *argv]
    return args


def fill_defaults(args: argparse.Namespace, cuda: bool) -> None:
    if args.tiny:  # the model and sizes are forced (a dry run of any command line); the rest are defaults
        defaults = dict(steps=1, warmup=1, rounds=1, rows="base")
        batches = len(set(str(args.batch or 2).split(",")))  # as many micro-batches as asked for, tiny ones
        args.model, args.img_size, args.num_classes, args.batches = "vit_tiny_patch16", 32, 10, "2,4"
        args.batch = ",".join(str(2 * (i + 1)) for i in range(batches))
    elif cuda:
        defaults = dict(model="vit_huge_patch14", batch=32, steps=5, warmup=3, rounds=5, rows=",".join(r for r in ("base", *EXTRA_ROWS) if r not in CPU_ONLY_ROWS))
    else:
        defaults = dict(model="vit_tiny_patch16,vit_base_patch16", batch=8, steps=1, warmup=1, rounds=5, rows="base")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.batch = list(dict.fromkeys(int(b) for b in str(args.batch).split(",")))


def plan_rows(args: argparse.Namespace, cuda: bool) -> list[Row]:
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(wanted) - {"base", *EXTRA_ROWS}
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))}")
    if cuda and set(wanted) & set(CPU_ONLY_ROWS):
        raise SystemExit(f"rows {', '.join(CPU_ONLY_ROWS)} run on CPU only (--device cpu)")
    rows = []
    for batch in args.batch:
        if "base" in wanted:
            rows.append(Row("base", batch))
        if "ac" in wanted:
            rows.append(Row("ac", batch, ac=True))
        if "compile" in wanted:
            rows.append(Row("compile", batch, compile=True))
        if "compile-sac" in wanted:
            rows.append(Row("compile-sac", batch, ac="selective", compile=True))
        if "compile-float8" in wanted:
            rows.append(Row("compile-float8", batch, compile=True, float8=True))
        if "fsdp-per-block" in wanted:
            rows.append(Row("fsdp-per-block", batch, fsdp=(1, True)))
        if "no-fsdp" in wanted:
            rows.append(Row("no-fsdp", batch, shard=False))
        if "sdpa" in wanted:
            rows += [Row(f"sdpa-{b.split('_')[0].lower()}", batch, sdpa=b) for b in SDPA]
    if "sweep" in wanted:
        for ac in (False, True):  # AC's point is a bigger batch: sweep with and without it
            rows += [Row("sweep-ac" if ac else "sweep", int(b), ac=ac) for b in args.batches.split(",")]
    return rows


# --- the two implementations -------------------------------------------------------------------------

def resident_bytes(model, optimizer) -> int:
    """Parameters plus optimizer state: what stays allocated while the other implementation runs."""
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    total = sum(nbytes(p) for p in model.parameters())
    return total + sum(nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def build_ours(args, name: str, row: Row, world):
    with world.device:
        model = build_model(name, args.num_classes, img_size=args.img_size, grad_checkpointing=row.ac)
    unit_blocks, reshard = row.fsdp or (RECIPE.fsdp.unit_blocks, RECIPE.fsdp.reshard_after_forward)
    if row.shard:
        # float8 on CPU can only be emulated: the same code path, no float8 matmuls
        float8 = (row.float8 if world.device.type == "cuda" else "emulate") if row.float8 else False
        shard_model(model, world, resolve_precision("auto", world.device), compile_blocks=row.compile,
                    unit_blocks=unit_blocks, reshard_after_forward=reshard, float8=float8,
                    compile_backend=args.compile_backend)
    optimizer = build_optimizer(model, LR, WD)
    if row.float8:
        precompute_float8_scales_after_each_step(model, optimizer)
    model.train()

    def step(x, y):
        train_step(model, optimizer, [(x, y)], world.device, grad_clip=1.0)
    return step, model, optimizer


def build_timm(args, name: str, row: Row, device: torch.device):
    import timm
    cuda = device.type == "cuda"
    with device:  # initialise on the device: ViT-H's init on the host takes longer than the benchmark
        model = timm.create_model(f"{name}_224", pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
    model.set_grad_checkpointing(row.ac)
    if row.compile:
        for block in model.blocks:
            block.compile(backend=args.compile_backend)  # the same granularity as ours
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
    model.train()
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if cuda else nullcontext

    def step(x, y):
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, model, optimizer


# --- measuring -----------------------------------------------------------------------------------------

def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_row(args, name: str, row: Row, world, impls: list[str]) -> dict[str, dict]:
    """Build `impls`, warm up, time them in turns; returns {impl: result} (status ok / oom / error)."""
    device, cuda = world.device, world.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    results = {impl: {"status": "ok", "times": [], "peak": 0} for impl in impls}
    built = {}
    torch.manual_seed(0)
    x = torch.randn(row.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (row.batch,), device=device)
    kernel = nullcontext
    if row.sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = lambda: sdpa_kernel(getattr(SDPBackend, row.sdpa))  # noqa: E731
    try:
        for impl in impls:
            try:
                built[impl] = build_ours(args, name, row, world) if impl == "ours" else build_timm(args, name, row, device)
                with kernel():
                    for _ in range(args.warmup):
                        built[impl][0](x, y)
                sync()
            except Exception as e:  # noqa: BLE001 (an out-of-memory or a missing kernel fails this impl only)
                fail(results[impl], e)
                built.pop(impl, None)
            if impl not in built:  # outside `except`: its traceback no longer pins the activations
                free_memory(device)
        for _ in range(args.rounds):
            for impl, (step, model, optimizer) in list(built.items()):
                others = sum(resident_bytes(m, o) for i, (_, m, o) in built.items() if i != impl)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    sync()
                    t = time.perf_counter()
                    with kernel():
                        for _ in range(args.steps):
                            step(x, y)
                    sync()
                except Exception as e:  # noqa: BLE001
                    fail(results[impl], e)
                    del built[impl]
                if impl not in built:
                    free_memory(device)
                    continue
                results[impl]["times"].append((time.perf_counter() - t) / args.steps)
                if cuda:
                    peak = torch.cuda.max_memory_allocated(device) - others
                    results[impl]["peak"] = max(results[impl]["peak"], peak)
    finally:
        built.clear()
        if row.compile:
            torch._dynamo.reset()
        free_memory(device)
    return results


def fail(result: dict, e: Exception) -> None:
    oom = isinstance(e, torch.OutOfMemoryError)
    result["status"] = "oom" if oom else "error"
    first_line = (str(e).strip().splitlines() or [""])[0][:160]
    result["error"] = "out of memory" if oom else f"{type(e).__name__}: {first_line}"


def summarise(name: str, row: Row, results: dict[str, dict], args, device) -> list[dict]:
    flops = train_flops_per_image(name, args.num_classes, args.img_size)
    peak = peak_flops(device)
    out = []
    for impl, r in results.items():
        rec = {"model": name, "row": row.name, "impl": impl, "batch": row.batch, "status": r["status"]}
        if r["status"] == "ok" and r["times"]:
            t = statistics.median(r["times"])
            rec.update(step_ms=1e3 * t, best_ms=1e3 * min(r["times"]), images_per_s=row.batch / t,
                       tflops=row.batch / t * flops / 1e12, rounds=len(r["times"]))
            rec["mfu"] = rec["tflops"] * 1e12 / peak if peak else None
            rec["peak_mem_gb"] = r["peak"] / 1e9 if device.type == "cuda" else None
        else:
            rec["error"] = r.get("error", "no timed round")
        out.append(rec)
    ours = next((r for r in out if r["impl"] == "ours" and "images_per_s" in r), None)
    timm_ = next((r for r in out if r["impl"] == "timm" and "images_per_s" in r), None)
    if ours and timm_:
        ours["ratio"] = ours["images_per_s"] / timm_["images_per_s"]
    return out


# --- reporting -----------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if Path("/proc/cpuinfo").exists() else "CPU"
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def header(args, device) -> str:
    import importlib.metadata as md
    try:
        timm_version = md.version("timm")
    except md.PackageNotFoundError:
        timm_version = "not installed"
    return (f"train_step benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}, {device_name(device)}, "
            f"torch {torch.__version__}, timm {timm_version}, "
            f"precision {resolve_precision('auto', device)}, {args.img_size} px, {args.num_classes} classes, "
            f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up, "
            f"compile backend {args.compile_backend}\n"
            f"command: `python {shlex.join(args.argv)}`")


def markdown(records: list[dict]) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)
    # "best ms" (fastest round) beside the median: on a shared machine it shows how much is noise.
    lines = ["| model | row | impl | batch | step ms | best ms | img/s | TFLOP/s | MFU | peak mem GB | ours/timm img/s "
             "| ours/timm eager |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r["status"] in ("ok",) and "images_per_s" in r:
            cells = [f(r["step_ms"], ".1f"), f(r["best_ms"], ".1f"), f(r["images_per_s"], ".2f"), f(r["tflops"], ".3g"),
                     f(r["mfu"], ".1%"), f(r["peak_mem_gb"], ".1f"), f(r.get("ratio"), ".3f") if "ratio" in r else "",
                     f(r.get("vs_timm_eager"), ".3f") if "vs_timm_eager" in r else ""]
        else:
            cells = [r["status"] + (f": {r['error']}" if r.get("error") else "")] + [""] * 7
        lines.append(f"| {r['model']} | {r['row']} | {r['impl']} | {r['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = init_distributed(args.device)
    device = world.device
    fill_defaults(args, device.type == "cuda")
    rows = plan_rows(args, device.type == "cuda")
    impls = ["ours"]
    if not args.no_timm:
        try:
            import timm  # noqa: F401
            impls.append("timm")
        except ImportError:
            print("timm is not importable: the timm baseline rows are skipped", flush=True)
    head = header(args, device)
    print(head, flush=True)
    started, records = time.monotonic(), []

    def write_table() -> None:  # after every row: a part killed by `timeout` still leaves its table
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            for path, text in ((out, f"{head}\n\n{markdown(records)}\n"),
                               (out.with_suffix(".json"), json.dumps({"header": head, "rows": records}, indent=1))):
                path.with_name(path.name + ".tmp").write_text(text)
                path.with_name(path.name + ".tmp").replace(path)

    def on_term(signum, frame):
        write_table()
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    for name in args.model.split(","):
        oom = set()  # implementations that ran out of memory in a sweep: no bigger batch for them
        for row in rows:
            run_impls = [i for i in impls if not (row.name.startswith("sweep") and (row.name, i) in oom)
                         and not (i == "timm" and row.name in OURS_ONLY_ROWS)]
            if not run_impls:
                continue
            if args.time_budget and time.monotonic() - started > args.time_budget:
                print(f"skipped {name} {row.name} batch {row.batch}: time budget {args.time_budget:g}s exceeded", flush=True)
                records += [{"model": name, "row": row.name, "impl": i, "batch": row.batch, "status": "skipped",
                             "error": "time budget"} for i in run_impls]
                continue
            t = time.monotonic()
            try:
                recs = summarise(name, row, run_row(args, name, row, world, run_impls), args, device)
            except Exception as e:  # noqa: BLE001 (e.g. a sticky CUDA error in free_memory): keep what we have
                recs = [{"model": name, "row": row.name, "impl": i, "batch": row.batch, "status": "error",
                         "error": f"{type(e).__name__}: {str(e).strip()[:160]}"} for i in run_impls]
            for r in recs:
                if r["status"] == "oom":
                    oom.add((row.name, r["impl"]))
                    print(f"{name} {row.name} batch {row.batch}: {r['impl']} is out of memory; "
                          "larger batches are skipped for it", flush=True)
            records += recs
            timm_eager = next((r for r in records if r["model"] == name and r["row"] == "base" and r["impl"] == "timm"
                               and r["batch"] == row.batch and "images_per_s" in r), None)
            for r in recs:
                if r["impl"] == "ours" and "images_per_s" in r and timm_eager:
                    r["vs_timm_eager"] = r["images_per_s"] / timm_eager["images_per_s"]
            write_table()
            print(markdown(recs).split("\n", 2)[2] + f"   ({time.monotonic() - t:.0f}s)", flush=True)
            ours = next((r for r in recs if "ratio" in r), None)
            if ours:
                print(f"ratio ours/timm (img/s) {name} {row.name} batch {row.batch}: {ours['ratio']:.3f}", flush=True)
    table = f"{head}\n\n{markdown(records)}\n"
    print("\n" + table, flush=True)
    write_table()
    close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
