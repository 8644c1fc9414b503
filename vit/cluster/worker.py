"""A training process: a rank under torchrun (`python -m vit.cluster.worker CONFIG`, started by the node
agent), or the single process of a local run. It records how it ended in status.json for the agent's
requeue decision. A user error (config, data, checkpoint) ends it in one line and exit status 2.
"""
from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import time
import traceback

from omegaconf import DictConfig, OmegaConf

from vit.config import validate
from vit.engine.distributed import close
from vit.errors import USER_ERRORS, fail
from vit.journal import Journal
from vit.run_dir import read_status, write_status

STARTED = time.time()


def user_error_reported(run_dir: str | os.PathLike) -> bool:
    """Whether a rank of this run reported a user error since this process started."""
    status = read_status(run_dir)
    return bool(status.get("user_error")) and status.get("time", 0) >= STARTED


def run_training(cfg: DictConfig) -> dict:
    """Train in this process (a rank of torchrun, or a single process) and record how it ended."""
    from vit.engine.train import TrainState, train

    rank = int(os.environ.get("RANK", 0))
    state = TrainState()
    try:
        validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        summary = train(cfg, state)
    except USER_ERRORS as e:
        # Every rank reports it: one on a node whose dataset mount is missing must stop the requeues too.
        where = f" (rank {rank} on {socket.gethostname()})" if rank else ""
        write_status(cfg.run_dir, state="failed", error=f"{e}{where}", user_error=True)
        if rank == 0:
            Journal(cfg.run_dir).write("user_error", state.reported_step, error=str(e))
        fail(e)
    except BaseException as e:
        if rank == 0 and not user_error_reported(cfg.run_dir):  # else that error is what this rank died of
            last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
            where = f"{last.filename}:{last.lineno}" if last else "?"
            error = f"{type(e).__name__}: {e}"[:500]
            write_status(cfg.run_dir, state="failed", error=error, where=where, step=state.reported_step)
            Journal(cfg.run_dir).write("crash", state.reported_step, error=error, where=where)
        raise
    finally:
        # Python restores default handlers while it shuts down, and USR2's default is to die: a stop
        # signal that arrives after the final save must not turn a finished rank into a crashed one.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    # The checkpoint is committed on every rank: record the outcome before anything can still die.
    if rank == 0:
        write_status(cfg.run_dir, **summary)
    # Leave the group only after a clean end (after a failure a peer may sit in a collective). The
    # model and optimizer, train's locals, hold process-group state: free them first, or gloo can
    # abort at exit ("terminate called without an active exception").
    gc.collect()
    close()
    return summary


if __name__ == "__main__":  # a torchrun worker started by the node agent: `python -m vit.cluster.worker CONFIG`
    run_training(OmegaConf.load(sys.argv[1]))
    # Everything is saved and the group is closed: skip interpreter teardown, where native threads of
    # the distributed stack have been seen to abort a finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
