"""ViT-H/14 pretraining and fine-tuning toolkit for Slurm clusters."""
__version__ = "0.1.0"

__all__ = ["VARIANTS", "build_model", "__version__"]


def __getattr__(name: str):
    # Lazy: the Slurm node agent (`python -m vit.cluster.agent`) must not import torch. Until its
    # handler is installed, a USR2 kills it, and importing torch first made that window a second long.
    if name in ("VARIANTS", "build_model"):
        from vit.models import vit
        return getattr(vit, name)
    raise AttributeError(f"module 'vit' has no attribute {name!r}")
