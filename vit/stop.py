"""Stop requests from signals. The handlers only set a flag; the loop acts on it at a step boundary.

USR2 is Slurm's warning before the time limit (and, with `preempt_send_user_signal`, before a
preemption); USR1 is left alone because NCCL uses it. TERM comes from scancel, KillWait and
torchrun's own shutdown; INT is Ctrl-C (a second Ctrl-C aborts at once).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import signal

STOP_SIGNALS = {signal.SIGUSR2: "usr2", signal.SIGTERM: "term", signal.SIGINT: "interrupt"}
# `step_limit`: the job reached train.stop_after_steps (a run split into chunks of fixed length).
KINDS = [*STOP_SIGNALS.values(), "step_limit"]


class StopRequest:
    def __init__(self) -> None:
        self.kind: str | None = None

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.kind == "interrupt":
            raise KeyboardInterrupt
        self.request(STOP_SIGNALS[signal.Signals(signum)])

    @property
    def requested(self) -> bool:
        return self.kind is not None

    def request(self, kind: str) -> None:
        self.kind = self.kind or kind

    @staticmethod
    def code(kind: str | None) -> int:
        return 0 if kind is None else 1 + KINDS.index(kind)

    @staticmethod
    def kind_of(code: int) -> str | None:
        return None if code == 0 else KINDS[code - 1]


def ignore_stop_signals() -> None:
    """In a DataLoader worker: the stop signals are the rank's to act on. Slurm sends scancel's,
    KillWait's and a preemption's TERM to every process of the step, and Ctrl-C's INT reaches the
    whole process group; a worker that died of one would crash the rank before it could save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Born with them blocked (stop_signals_blocked); one that came meanwhile is discarded now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked():
    """Processes started inside are born with the stop signals blocked (a fork copies the mask and
    exec keeps it): a TERM between a worker's birth and its init cannot kill it. This process gets
    any that came meanwhile when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@functools.cache
def kill_workers_at_exit() -> None:
    """In the process that starts such workers. A loader kept alive by an exception's traceback still
    has its workers at exit, and multiprocessing's exit handler would TERM them (now ignored) and
    join them forever: SIGKILL them first (atexit runs the later registration first)."""
    atexit.register(lambda: [p.kill() for p in multiprocessing.active_children() if p.daemon])
