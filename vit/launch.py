"""What an entry point does with a composed config: check it, then train here or hand over to Slurm.

User errors (config, data, checkpoint) end in one line on stderr and exit status 2, no traceback.
"""
from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import time
import traceback

from omegaconf import DictConfig

from vit.config import validate
from vit.distributed import close
from vit.errors import USER_ERRORS, ConfigError, fail
from vit.journal import Journal
from vit.run_dir import read_status, slurm_dir, write_status

STARTED = time.time()


def user_error_reported(run_dir: str | os.PathLike) -> bool:
    """Whether a rank of this run reported a user error since this process started."""
    status = read_status(run_dir)
    return bool(status.get("user_error")) and status.get("time", 0) >= STARTED


def run_training(cfg: DictConfig) -> dict:
    """Train in this process (a rank of torchrun, or a single process) and record how it ended."""
    from vit.train import TrainState, train

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


def run_slurm_node(cfg: DictConfig) -> None:
    """A submitit task (one per node): write the resolved config, run torchrun, decide on requeue."""
    from omegaconf import OmegaConf

    from vit.slurm import NodeAgent

    config = slurm_dir(cfg.run_dir) / f"config-{os.environ['SLURM_JOB_ID']}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    tmp = config.with_name(f"{config.name}.{os.environ.get('SLURM_NODEID', '0')}.tmp")
    OmegaConf.save(cfg, tmp, resolve=True)
    os.replace(tmp, config)  # every node writes the same bytes; the rename keeps readers safe
    cluster = cfg.cluster
    code = NodeAgent(["-m", "vit.launch", str(config)], cfg.run_dir, cluster.procs_per_node,
                     cluster.max_requeues, cluster.crash_loop_limit, cluster.signal_lead_s).run()
    if code:
        raise RuntimeError(f"training on node {os.environ.get('SLURM_NODEID')} ended with status {code}; "
                           f"see {cfg.run_dir}/status.json and the logs in {cfg.run_dir}/slurm")


def main(cfg: DictConfig) -> dict | None:
    """The Hydra task function of `jobs/*.py`: the plan, a Slurm node agent, or the training itself."""
    if cfg.get("plan"):
        from vit.plan import format_plan, plan
        print(format_plan(plan(cfg)))
        return None
    if cfg.cluster.launcher == "slurm" and "RANK" not in os.environ:
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # a task of our own submission; not any salloc shell
            return run_slurm_node(cfg)
        fail(ConfigError("cluster", f"{cfg.cluster.nodes}-node Slurm cluster config without -m would train here, "
                         "on this machine", "submit it with -m (python jobs/<script>.py -m cluster=...)"))
    return run_training(cfg)


if __name__ == "__main__":  # a torchrun worker started by the node agent: `python -m vit.launch CONFIG`
    from omegaconf import OmegaConf

    run_training(OmegaConf.load(sys.argv[1]))
    # Everything is saved and the group is closed: skip interpreter teardown, where native threads of
    # the distributed stack have been seen to abort a finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
