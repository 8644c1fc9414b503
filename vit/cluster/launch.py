"""The Hydra task function of jobs/pretrain.py and jobs/finetune.py: train in this process
(vit/cluster/worker.py), or, in a task of a job the Slurm launcher submitted, run this node's agent
(vit/cluster/agent.py), which starts torchrun over the workers. (A plan is jobs/plan.py's.)
"""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from vit.cluster.worker import run_training
from vit.errors import ConfigError, fail
from vit.run_dir import slurm_dir


def run_slurm_node(cfg: DictConfig) -> None:
    """A task of a job the Slurm launcher submitted (one per node): write the resolved config, run this
    node's agent (torchrun over the workers, the stop path, the requeue decision)."""
    from vit.cluster.agent import NodeAgent

    config = slurm_dir(cfg.run_dir) / f"config-{os.environ['SLURM_JOB_ID']}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    tmp = config.with_name(f"{config.name}.{os.environ.get('SLURM_NODEID', '0')}.tmp")
    OmegaConf.save(cfg, tmp, resolve=True)
    os.replace(tmp, config)  # every node writes the same bytes; the rename keeps readers safe
    cluster = cfg.cluster
    code = NodeAgent(["-m", "vit.cluster.worker", str(config)], cfg.run_dir, cluster.procs_per_node,
                     cluster.max_requeues, cluster.crash_loop_limit, cluster.signal_lead_s).run()
    if code:
        raise RuntimeError(f"training on node {os.environ.get('SLURM_NODEID')} ended with status {code}; "
                           f"see {cfg.run_dir}/status.json and the logs in {cfg.run_dir}/slurm")


def main(cfg: DictConfig) -> dict | None:
    """The Hydra task function of `jobs/*.py` run here: the training itself. (A task of a job the Slurm
    launcher submitted runs `run_slurm_node` instead.)"""
    if cfg.cluster.launcher == "slurm" and "RANK" not in os.environ:  # not as a rank of torchrun
        fail(ConfigError("cluster", f"{cfg.cluster.nodes}-node Slurm cluster config without -m would train here, "
                         "on this machine", "submit it with -m (python jobs/<script>.py -m cluster=...)"))
    return run_training(cfg)
