"""Plan a run without training or submitting: `python jobs/plan.py cluster=sg_h100 [planner.mfu=0.45 ...]`.

Composes the same config as jobs/pretrain.py and prints steps, FLOPs, time, requeues and checkpoints.
"""
import sys

import hydra
from omegaconf import DictConfig

from hydra_plugins.vit_slurm_launcher.vit_slurm_launcher import register
from vit.cluster.plan import format_plan, plan

register()  # hydra/launcher=vit_slurm, which the cluster configs select


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    print(format_plan(plan(cfg)))


if __name__ == "__main__":
    if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        # With cluster=sg_h100 a multirun hands the task to the Slurm launcher, which would submit it.
        sys.exit("error: jobs/plan.py plans one config; drop -m (one call per sweep point)")
    if not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
        sys.argv.append("hydra.run.dir=.")  # Hydra creates its run dir: a plan must not create the run's
    main()
