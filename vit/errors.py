"""The errors a user must fix, and the one way they end a process: one line on stderr, exit status 2.

They are raised before anything is submitted where they can be (config, dataset, checkpoints), and a
job that meets one at run time stops instead of being requeued. Anything else is a crash: it keeps
its traceback and the job may be requeued. Free of torch: the Slurm node agent imports it.
"""
from __future__ import annotations

import sys
from typing import NoReturn


class ConfigError(ValueError):
    """A config value that cannot work, named by its key, with the fix."""

    def __init__(self, key: str, problem: str, fix: str):
        super().__init__(f"{key}: {problem}; {fix}")


class DataError(ValueError):
    """A dataset or data-config problem the user has to fix; the message is one line."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot serve, or a full disk: the user must act (not requeued)."""


class CheckpointRefusedError(CheckpointError):
    """The safe unpickler refused a class in a checkpoint. Not damage: the checkpoint is most likely
    fine and was written by other versions (torch, numpy, omegaconf) than those installed now."""


class CheckpointSaveError(RuntimeError):
    """A save that failed for another reason (an I/O error): not a user error. The job is requeued
    and resumes from the previous checkpoint, which is kept."""


USER_ERRORS = (ConfigError, DataError, CheckpointError)


def fail(error: Exception) -> NoReturn:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
