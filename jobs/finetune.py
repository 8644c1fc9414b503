"""Fine-tune a pretrained ViT: `python jobs/finetune.py task=coco|ade20k pretrained=PATH [overrides]`,
with `-m cluster=sg_h100` on Slurm (or `sbatch sbatch/finetune_<task>.sh`)."""
import hydra
from omegaconf import DictConfig

import vit.cluster.launch
from hydra_plugins.vit_slurm_launcher.vit_slurm_launcher import register

register()  # hydra/launcher=vit_slurm, which the cluster configs select


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def main(cfg: DictConfig):
    return vit.cluster.launch.main(cfg)


if __name__ == "__main__":
    main()
