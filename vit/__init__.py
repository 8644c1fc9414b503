"""ViT-H/14 pretraining and fine-tuning toolkit for Slurm clusters."""
__version__ = "0.1.0"

from vit.model import VARIANTS, build_model  # noqa: E402

__all__ = ["VARIANTS", "build_model", "__version__"]
