"""A pretraining checkpoint as a folder that timm loads and preprocesses for as it was trained:

    python jobs/checkpoint.py export RUN_OR_STEP_DIR OUT_DIR
    timm.create_model("local-dir:OUT_DIR", pretrained=True)       # timm >= 1.0.26 for safetensors

OUT_DIR holds model.safetensors (timm's names) and config.json: the timm architecture, num_classes,
label_names (the class names in label order: the synsets) and a pretrained_cfg with the eval
preprocessing of the run's data config (mean, std, interpolation, crop_pct). timm's own defaults
for the architecture (vit_huge_patch14_224: mean/std 0.5, bicubic, crop 0.9) are not what this
recipe trains with, and a model fed other inputs than it was trained on loses accuracy quietly.
An OUT ending in .safetensors gets the single file of vit.engine.checkpoint.export_safetensors instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from vit.data.transforms import build_transform
from vit.engine.checkpoint import consolidated_model, export_safetensors
from vit.models.vit import VARIANTS


def export(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    if str(out).endswith(".safetensors"):
        return export_safetensors(checkpoint, out)
    return export_timm_folder(checkpoint, out)


def export_timm_folder(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    sd, state = consolidated_model(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "step": str(state["step"])})
    (out / "config.json").write_text(json.dumps(timm_config(state), indent=1))
    return out


def timm_config(state: dict) -> dict:
    """timm's config.json for a checkpoint's train state (its config and classes)."""
    cfg, classes = state["config"], state["classes"]
    name, size = cfg["model"]["name"], cfg["data"]["img_size"]
    preprocessing = build_transform(cfg["data"], train=False)
    return {
        "architecture": f"{name}_224",  # our variants are timm's *_224 models at any img_size
        "num_classes": len(classes),
        "num_features": VARIANTS[name].embed_dim,
        "global_pool": "token",
        "model_args": {"img_size": size},
        "label_names": list(classes),
        "pretrained_cfg": {
            "input_size": [3, size, size], "fixed_input_size": True, "crop_mode": "center",
            "interpolation": preprocessing.interpolation, "crop_pct": preprocessing.crop_pct,
            "mean": list(preprocessing.mean), "std": list(preprocessing.std),
            "num_classes": len(classes), "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }
