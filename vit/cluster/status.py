"""Where a run stands, and how much of its allocated time became training: read from the journal.

`summarize(run_dir)` is what `jobs/status.py` prints and what tests assert on. Definitions:

Allocation
    One start of the training processes: from a `job_start` (Slurm: the node agent of one job
    restart) or, for local runs without one, from the process start (`train_start.unix - startup_s`),
    to the last event written before the next start. Allocated GPU time = sum over allocations of
    wall time x GPUs, GPUs = job_start's num_nodes x procs_per_node, else train_start's world_size,
    else the submit's num_nodes x procs_per_node. Time after a hard kill's last event is invisible:
    it counts as queue wait when Slurm restarts the job, and not at all locally.
Training time
    Between consecutive step marks (train_start, then each `metrics` event) minus the checkpoint
    stalls and evaluations inside that window. The first window after a start also contains warm-up
    (data workers, compilation): its steps are charged at the allocation's steady step time (median
    of its later windows, else of all allocations), the excess counts as startup.
Kept / lost
    Steps of an allocation up to the step the next allocation started from (its resume step, 0 for a
    fresh start) are kept, later ones were recomputed: lost work. The last allocation is kept whole
    unless it crashed, in which case only steps up to the last committed checkpoint are kept (what a
    resume would start from). A window that straddles the limit is split in proportion to its steps.
    After a crash or a hard kill (no stop/exit), the time from the last step mark to the crash is lost too.
Goodput
    Kept training GPU time / allocated GPU time. The remainder splits into
    startup (allocation start -> train_start, plus the first window's excess; includes the resume),
    checkpoint (checkpoint_begin -> checkpoint_commit of synchronous saves, and a save cut off by the
    end of the allocation; async saves overlap training and count as training, except the wait for
    one after the allocation's last step, at a stop or the end), lost, evaluation (the `eval_s` before
    the `evaluation` event; journals without it: the preceding event -> the `evaluation` event), and
    other (shutdown, requeue decision, gaps). Time is booked once: a save that runs on during an
    evaluation stalls nothing then.
Queue wait (not part of goodput)
    submit -> next job_start, requeue -> next job_start, and the last event of a hard-killed Slurm
    allocation -> the next job_start. A wait still going on is `waiting_s`.
Restarts
    One per `requeue` event (its cause: time_limit, preemption, failure, step_limit), plus one per
    later start not preceded by one: after a crash "failure", after a clean stop "step_limit" or
    "stopped", otherwise "hard_kill"; none after a completed one (a rerun: it interrupted nothing).
    Crashes are counted separately from `crash` events.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from vit.cluster.slurm import job_state
from vit.journal import read_journal
from vit.run_dir import JOURNAL

TERMINAL = ("exit", "crash", "requeue", "agent_exit")
CATEGORIES = ("training", "startup", "checkpoint", "lost", "evaluation", "other")


# --- splitting the journal into allocations --------------------------------------------------------

def _has(events: list[dict], name: str) -> bool:
    return any(e["event"] == name for e in events)


def _first(events: list[dict], name: str) -> dict | None:
    return next((e for e in events if e["event"] == name), None)


def split_allocations(events: list[dict]) -> list[list[dict]]:
    """Group the worker and agent events by allocation (submit events belong to none)."""
    allocs: list[list[dict]] = []
    for e in events:
        if e["event"] == "submit":
            continue
        cur = allocs[-1] if allocs else None
        new = cur is None or e["event"] == "job_start"
        # Local reruns carry no job_start: a second (resume, train_start) pair, or one after the
        # previous process ended, starts the next allocation.
        if cur and e["event"] in ("resume", "train_start") and (_has(cur, "train_start") or
                                                               any(x["event"] in TERMINAL for x in cur)):
            new = True
        if cur and (e.get("job_id"), e.get("restart")) != (cur[-1].get("job_id"), cur[-1].get("restart")):
            new = True  # a different Slurm job or restart, whatever its first event
        if new:
            allocs.append([e])
        else:
            cur.append(e)
    return allocs


def _gpus(alloc: list[dict], submit: dict | None) -> int:
    js, ts = _first(alloc, "job_start"), _first(alloc, "train_start")
    if js and js.get("num_nodes") and js.get("procs_per_node"):
        return int(js["num_nodes"]) * int(js["procs_per_node"])
    if ts and ts.get("world_size"):
        return int(ts["world_size"])
    if submit and submit.get("num_nodes") and submit.get("procs_per_node"):
        return int(submit["num_nodes"]) * int(submit["procs_per_node"])
    return 1


def _start(alloc: list[dict]) -> float:
    ts = _first(alloc, "train_start")
    if _first(alloc, "job_start") or ts is None:
        return alloc[0]["unix"]
    return min(alloc[0]["unix"], ts["unix"] - (ts.get("startup_s") or 0.0))


def _overlap(a: float, b: float, intervals: list[tuple[float, float]]) -> float:
    return sum((max(0.0, min(b, y) - max(a, x)) for x, y in intervals), 0.0)


def _minus(a: float, b: float, intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of [a, b] outside the intervals (sorted, disjoint)."""
    parts = []
    for x, y in intervals:
        if x < b and y > a:
            parts.append((a, x))
            a = y
    return [(x, y) for x, y in parts + [(a, b)] if y > x]


def _ending(alloc: list[dict]) -> str:
    """How the allocation's training ended: completed, stopped, crash, or open (running or killed)."""
    if _has(alloc, "crash"):
        return "crash"
    ex = next((e for e in reversed(alloc) if e["event"] == "exit"), None)
    if ex:
        return "completed" if ex.get("state") == "completed" else "stopped"
    rq = _first(alloc, "requeue")
    if rq:  # the workers died without writing: the agent saw the failure
        return "crash" if rq.get("cause") == "failure" else "stopped"
    ae = _first(alloc, "agent_exit")
    return "crash" if ae and ae.get("state") == "failed" else "open"


# --- one allocation's time -------------------------------------------------------------------------

def _windows(alloc: list[dict]):
    """Step marks, checkpoint stalls and evaluations of one allocation."""
    ts = _first(alloc, "train_start")
    end = alloc[-1]["unix"]
    marks = [(ts["unix"], ts["step"])] if ts else []
    stalls, evals, async_saves = [], [], []
    for i, e in enumerate(alloc):
        if ts and e["event"] == "metrics" and e["unix"] >= ts["unix"]:
            marks.append((e["unix"], e["step"]))
        elif e["event"] == "checkpoint_begin":
            commit = next((c for c in alloc[i + 1:]
                           if c["event"] == "checkpoint_commit" and c["step"] == e["step"]), None)
            if commit is None:  # cut off by the end of the allocation: it stalled to the end
                stalls.append((e["unix"], end))
            else:
                (async_saves if e.get("async_save") else stalls).append((e["unix"], commit["unix"]))
        elif e["event"] == "evaluation" and i:
            # Journals from before eval_s: the preceding event may be a log some steps back.
            evals.append((e["unix"] - e["eval_s"] if "eval_s" in e else alloc[i - 1]["unix"], e["unix"]))
    # An async save overlaps training, except once the last step is done (the save at a stop or at
    # the end): waiting for it then is a stall like a synchronous save.
    t_last = marks[-1][0] if marks else alloc[0]["unix"]
    stalls += [(max(b, t_last), c) for b, c in async_saves if c > t_last]
    stalls = [part for a, b in stalls for part in _minus(a, b, evals)]  # the final evaluation overlaps its save
    steps = []  # (from_step, to_step, seconds of step time)
    for (t0, s0), (t1, s1) in zip(marks, marks[1:]):
        steps.append((s0, s1, max(0.0, t1 - t0 - _overlap(t0, t1, stalls) - _overlap(t0, t1, evals))))
    return marks, stalls, evals, steps


def _steady(steps: list[tuple]) -> float | None:
    rates = [sec / (b - a) for a, b, sec in steps[1:] if b > a]
    return statistics.median(rates) if rates else None


def _account(alloc: list[dict], gpus: int, keep_until: float, steady: float | None) -> dict:
    start, end = _start(alloc), alloc[-1]["unix"]
    marks, stalls, evals, steps = _windows(alloc)
    out = dict.fromkeys(CATEGORIES, 0.0)
    wall = end - start
    out["checkpoint"] = _overlap(start, end, stalls)
    out["evaluation"] = _overlap(start, end, evals)
    if not marks:  # never reached train_start: all of it was a failed start-up
        out["startup"] = max(0.0, wall - out["checkpoint"] - out["evaluation"])
    else:
        out["startup"] = marks[0][0] - start
        for k, (a, b, sec) in enumerate(steps):
            if k == 0 and steady is not None and b > a:  # warm-up beyond the steady step time is startup
                out["startup"] += max(0.0, sec - steady * (b - a))
                sec = min(sec, steady * (b - a))
            kept = sec * min(1.0, max(0.0, (keep_until - a) / (b - a))) if b > a else 0.0
            out["training"] += kept
            out["lost"] += sec - kept
        ending = _ending(alloc)
        if ending in ("crash", "open") and keep_until < math.inf:
            # Steps after the last mark, up to the crash (or the kill), never reached a checkpoint.
            t_last = marks[-1][0]
            crash = _first(alloc, "crash")
            stop = crash["unix"] if crash else end
            out["lost"] += max(0.0, stop - t_last - _overlap(t_last, stop, stalls) - _overlap(t_last, stop, evals))
    out["other"] = max(0.0, wall - sum(out[k] for k in CATEGORIES if k != "other"))
    last_step = next((e["step"] for e in reversed(alloc) if e.get("step") is not None), None)
    return {"job_id": alloc[0].get("job_id"), "restart": alloc[0].get("restart"), "start": start, "end": end,
            "wall_s": wall, "gpus": gpus, "start_step": marks[0][1] if marks else None, "end_step": last_step,
            "ending": _ending(alloc), "seconds": out}


# --- restarts, queue wait, Slurm --------------------------------------------------------------------

def _unlogged_cause(alloc: list[dict]) -> str:
    """Why an allocation was followed by another without a requeue event: the journal tells."""
    ending = _ending(alloc)
    if ending == "crash":
        return "failure"
    if ending == "stopped":
        ex = next((e for e in reversed(alloc) if e["event"] == "exit"), {})
        return "step_limit" if ex.get("stop") == "step_limit" else "stopped"
    return "hard_kill"


def restart_list(allocs: list[list[dict]]) -> list[tuple[int | None, str]]:
    """(step, cause) per restart: every requeue, and every later start the agent did not record."""
    out = []
    for i, alloc in enumerate(allocs):
        rq = next((e for e in reversed(alloc) if e["event"] == "requeue"), None)
        if rq:
            out.append((rq.get("step"), rq.get("cause") or "unknown"))
        elif i + 1 < len(allocs) and _ending(alloc) != "completed":  # a rerun of a completed run interrupted nothing
            out.append((next((e["step"] for e in reversed(alloc) if e.get("step") is not None), None),
                        _unlogged_cause(alloc)))
    return out


def _queue_wait(events: list[dict]) -> tuple[float, float | None]:
    waited, since, prev_end, started = 0.0, None, None, set()
    for e in events:
        if e["event"] == "job_start":
            started.add(e.get("job_id"))
        # The submit line is written after sbatch returns: a job that started at once can beat it.
        if e["event"] == "submit" and since is None and e.get("job_id") not in started:
            since = e["unix"]
        elif e["event"] == "requeue":
            since = e["unix"]
        elif e["event"] == "job_start":
            if since is None and prev_end is not None:
                since = prev_end  # a hard-killed Slurm allocation: its end was not journaled
            if since is not None:
                waited += max(0.0, e["unix"] - since)
            since = None
        if e["event"] != "submit":
            prev_end = e["unix"]
    return waited, (time.time() - since if since is not None else None)


# --- the summary -----------------------------------------------------------------------------------

def summarize(run_dir: str | os.PathLike, slurm: bool = True, recent: int = 5) -> dict:
    """Everything `jobs/status.py` shows, as a JSON-able dict (see the module docstring)."""
    events = [e for e in read_journal(run_dir) if isinstance(e, dict) and "event" in e and "unix" in e]
    allocs = split_allocations(events)
    submits = [e for e in events if e["event"] == "submit"]
    metrics = [e for e in events if e["event"] == "metrics"]
    train_starts = [e for e in events if e["event"] == "train_start"]
    last_ts = train_starts[-1] if train_starts else {}

    # Where each allocation's kept steps end: where the next one started training from.
    starts = [(_first(a, "train_start") or {}).get("step") for a in allocs]
    commits = [max((e["step"] for e in a if e["event"] == "checkpoint_commit"), default=None) for a in allocs]
    per_alloc_steps = [_windows(a)[3] for a in allocs]
    all_rates = [sec / (b - a) for st in per_alloc_steps for a, b, sec in st[1:] if b > a]
    fallback = statistics.median(all_rates) if all_rates else None
    rows = []
    for i, alloc in enumerate(allocs):
        later = next((s for s in starts[i + 1:] if s is not None), None)
        if later is not None:
            keep_until = later
        elif _ending(alloc) == "crash":
            keep_until = max((c for c in commits[:i + 1] if c is not None), default=0)
        else:
            keep_until = math.inf
        submit = next((s for s in reversed(submits) if s["unix"] <= alloc[0]["unix"]), None)
        steady = _steady(per_alloc_steps[i]) or fallback
        rows.append(_account(alloc, _gpus(alloc, submit), keep_until, steady))

    allocated = sum(r["wall_s"] * r["gpus"] for r in rows)
    gpu_s = {k: sum(r["seconds"][k] * r["gpus"] for r in rows) for k in CATEGORIES}
    breakdown = {k: (v / allocated if allocated > 0 else None) for k, v in gpu_s.items()}

    # Recent throughput: the last few logs of the latest allocation that logged, past its warm-up window.
    recent_metrics = []
    for alloc in reversed(allocs):
        ms = [e for e in alloc if e["event"] == "metrics"]
        if ms:
            recent_metrics = (ms[1:] if len(ms) > 1 else ms)[-recent:]
            break
    ips = [m["images_per_s"] for m in recent_metrics if m.get("images_per_s")]
    mfus = [m["mfu"] for m in recent_metrics if m.get("mfu") is not None]
    images_per_s = sum(ips) / len(ips) if ips else None

    step = next((e["step"] for e in reversed(events) if e.get("step") is not None and e["event"] != "submit"), None)
    total = next((e["total_steps"] for e in reversed(events) if e.get("total_steps")), None)
    global_batch = last_ts.get("global_batch")
    if step is not None and total is not None and step >= total:
        eta = 0.0
    elif step is not None and total and images_per_s and global_batch:
        eta = (total - step) * global_batch / images_per_s
    else:
        eta = None

    causes = Counter(cause for _, cause in restart_list(allocs))
    queue_wait, waiting = _queue_wait(events)
    job_id = next((e["job_id"] for e in reversed(events) if e.get("job_id")), None)
    last_metric = metrics[-1] if metrics else {}
    return {
        "run_dir": str(run_dir),
        "step": step, "total_steps": total,
        "epoch": last_metric.get("epoch"), "loss": last_metric.get("loss"), "lr": last_metric.get("lr"),
        "images_per_s": images_per_s, "mfu": sum(mfus) / len(mfus) if mfus else None, "eta_s": eta,
        "run_state": _ending(allocs[-1]) if allocs else ("queued" if submits else None),
        "job_id": job_id, "job_state": job_state(job_id) if slurm else None,
        "restarts": sum(causes.values()), "restart_causes": dict(causes),
        "crashes": sum(1 for e in events if e["event"] == "crash"),
        "goodput": breakdown["training"], "breakdown": breakdown,
        "breakdown_gpu_s": gpu_s, "allocated_gpu_s": allocated,
        "queue_wait_s": queue_wait, "waiting_s": waiting,
        "allocations": rows,
    }


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every run directory at or below `root` that has a journal (a multirun's sweep points)."""
    return sorted(p.parent for p in Path(root).rglob(JOURNAL))


# --- text, plot, TensorBoard -----------------------------------------------------------------------

def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {s % 60:02d}s"


def format_summary(s: dict) -> str:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    job = f"  (Slurm job {s['job_id']}: {s['job_state'] or 'state unknown'})" if s["job_id"] else ""
    pct = f" ({s['step'] / s['total_steps']:.1%})" if s["step"] is not None and s["total_steps"] else ""
    causes = ", ".join(f"{k} {v}" for k, v in sorted(s["restart_causes"].items()))
    lines = [
        f"run      {s['run_dir']}{job}  [{s['run_state'] or 'no journal'}]",
        f"step     {num(s['step'], ',')}/{num(s['total_steps'], ',')}{pct}  epoch {num(s['epoch'], '')}  "
        f"loss {num(s['loss'], '.4f')}  {num(s['images_per_s'], ',.1f')} img/s  MFU {num(s['mfu'], '.1%')}  "
        f"ETA {format_duration(s['eta_s'])}",
        f"restarts {s['restarts']}" + (f" ({causes})" if causes else "") + f"  crashes {s['crashes']}",
    ]
    if s["goodput"] is not None:
        parts = ", ".join(f"{k} {v:.1%}" for k, v in s["breakdown"].items() if k != "training")
        lines.append(f"goodput  {s['goodput']:.1%} of {s['allocated_gpu_s'] / 3600:,.2f} GPU-h allocated ({parts})")
    if s["job_id"]:  # queue wait exists only under Slurm
        lines.append(f"queued   {format_duration(s['queue_wait_s'])} in total"
                     + (f", waiting now for {format_duration(s['waiting_s'])}" if s["waiting_s"] is not None else ""))
    return "\n".join(lines)


RESTART_STYLES = {  # cause -> (color, linestyle)
    "time_limit": ("tab:gray", "--"), "preemption": ("tab:red", ":"), "failure": ("tab:orange", "-"),
    "step_limit": ("tab:blue", "-."), "hard_kill": ("black", "-"),
}


def plot(run_dir: str | os.PathLike, out: str | os.PathLike | None = None):
    """Loss, learning rate and throughput against step, with restarts as vertical lines; returns the Figure."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    events = read_journal(run_dir)
    marks = [(s, c) for s, c in restart_list(split_allocations(events)) if s is not None]
    latest: dict[int, dict] = {}
    for e in events:
        if e.get("event") == "metrics":
            latest[e["step"]] = e  # a recomputed step shows its final value
    steps = sorted(latest)
    fig = Figure(figsize=(9, 8), constrained_layout=True)
    axes = fig.subplots(3, 1, sharex=True)
    for ax, key, label in zip(axes, ("loss", "lr", "images_per_s"), ("loss", "learning rate", "images/s")):
        xs = [s for s in steps if latest[s].get(key) is not None]
        ax.plot(xs, [latest[s][key] for s in xs], color="tab:blue", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        seen = set()
        for step, cause in marks:
            color, style = RESTART_STYLES.get(cause, ("tab:purple", "-"))
            ax.axvline(step, color=color, linestyle=style, linewidth=1.2, gid=f"restart:{cause}",
                       label=cause.replace("_", " ") if cause not in seen else None)
            seen.add(cause)
    if seen:
        axes[0].legend(loc="upper right", title="restarts", fontsize=8)
    axes[-1].set_xlabel("step")
    axes[0].set_title(str(run_dir))
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig


def write_tensorboard(run_dir: str | os.PathLike) -> Path | None:
    """Rewrite `<run_dir>/tensorboard/` from the journal's metrics and evaluations; None without TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    log_dir = Path(run_dir) / "tensorboard"
    for old in log_dir.glob("events.out.tfevents.*"):  # regenerated in full each time: no duplicates
        old.unlink()
    writer = SummaryWriter(str(log_dir))
    for e in read_journal(run_dir):
        if e.get("event") == "metrics":
            for k in ("loss", "lr", "grad_norm", "images_per_s", "mfu"):
                if e.get(k) is not None:
                    writer.add_scalar(f"train/{k}", e[k], e["step"], walltime=e["unix"])
        elif e.get("event") == "evaluation":
            for k, v in e.items():
                if k.startswith("val_"):
                    writer.add_scalar(f"eval/{k}", v, e["step"], walltime=e["unix"])
    writer.close()
    return log_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/status.py", description="Progress, restarts and goodput of a run.")
    parser.add_argument("run_dir", help="a run directory (with journal.jsonl), or with -m a multirun directory")
    parser.add_argument("-m", "--multirun", action="store_true", help="every run below run_dir that has a journal")
    parser.add_argument("--json", action="store_true",
                        help="print a machine-readable summary (with -m: a dict run_dir -> summary)")
    parser.add_argument("--plot", metavar="PNG", help="plot loss, lr and throughput against step (one run)")
    parser.add_argument("--tensorboard", action="store_true", help="write <run_dir>/tensorboard/ from the journal")
    parser.add_argument("--no-slurm", action="store_true", help="do not ask Slurm for the job state")
    args = parser.parse_args(argv)

    runs = find_runs(args.run_dir) if args.multirun else [Path(args.run_dir)]
    runs = [r for r in runs if (r / JOURNAL).exists()]
    if not runs:
        print(f"error: no {JOURNAL} {'below' if args.multirun else 'in'} {args.run_dir}", file=sys.stderr)
        return 1
    if args.plot and len(runs) > 1:
        print("error: --plot takes one run", file=sys.stderr)
        return 1
    summaries = [summarize(r, slurm=not args.no_slurm) for r in runs]
    if args.json:
        print(json.dumps(summaries[0] if not args.multirun else {s["run_dir"]: s for s in summaries}, indent=1))
    else:
        print("\n\n".join(format_summary(s) for s in summaries))
    if args.plot:
        plot(runs[0], args.plot)
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    if args.tensorboard:
        for r in runs:
            where = write_tensorboard(r)
            note = f"tensorboard: {where}" if where else "tensorboard: not installed (pip install tensorboard)"
            print(note, file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
