"""Stop requests from signals. The handlers only set a flag; the loop acts on it at a step boundary.

USR2 is Slurm's warning before the time limit (and, with `preempt_send_user_signal`, before a
preemption); USR1 is left alone because NCCL uses it. TERM comes from scancel, KillWait and
torchrun's own shutdown; INT is Ctrl-C (a second Ctrl-C aborts at once).
"""
from __future__ import annotations

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
