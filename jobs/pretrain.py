"""Pretrain a ViT: `python jobs/pretrain.py [overrides]` here, `-m cluster=sg_h100` on Slurm."""
import hydra
from omegaconf import DictConfig

import vit.cluster.launch
from hydra_plugins.vit_slurm_launcher.vit_slurm_launcher import register

register()  # hydra/launcher=vit_slurm, which the cluster configs select


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig):
    return vit.cluster.launch.main(cfg)


if __name__ == "__main__":
    main()
