"""`python jobs/checkpoint.py export RUN OUT_DIR` gives a folder that timm loads with
`create_model("local-dir:OUT_DIR", pretrained=True)`: our weights, our synsets, our preprocessing.
(An OUT ending in .safetensors is the single file, tested in test_checkpoint.py.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import CLASSES, make_imagefolder
from helpers import run_job

from vit.models.vit import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run on a 3-synset tree with bicubic resizing and a 0.9 eval crop: not timm's defaults
    for its preprocessing, and not ours either, so the export must carry the run's own."""
    tmp = tmp_path_factory.mktemp("export")
    root = make_imagefolder(tmp / "train")
    run_job(tmp / "run", "data=imagenet21k", f"data.root={root}", "data.val_per_class=0", "data.num_workers=0",
            "data.num_classes=3", "data.num_samples=12", "data.interpolation=bicubic", "data.eval_crop_pct=0.9",
            "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "train.global_batch=4", "train.micro_batch=4",
            "train.steps=4", "train.eval_every=0", "optim.warmup_steps=1")
    return tmp / "run"


def test_the_exported_folder_loads_in_timm_with_the_trained_preprocessing_and_synsets(trained, tmp_path):
    import timm
    from timm.data import resolve_data_config

    out = tmp_path / "vit_tiny_in21k"
    proc = subprocess.run([sys.executable, "jobs/checkpoint.py", "export", str(trained), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out) and sorted(p.name for p in out.iterdir()) == ["config.json",
                                                                                          "model.safetensors"]
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert theirs.num_classes == 3 and theirs.pretrained_cfg["label_names"] == list(CLASSES)
    data = resolve_data_config({}, model=theirs)
    assert tuple(data["mean"]) == (0.5, 0.5, 0.5) and tuple(data["std"]) == (0.25, 0.25, 0.25)
    assert data["interpolation"] == "bicubic" and data["crop_pct"] == 0.9 and data["input_size"] == (3, 32, 32)

    from safetensors.torch import load_file

    ours = build_model("vit_tiny_patch16", num_classes=3, img_size=32).eval()
    ours.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"



def test_a_checkpoint_saved_before_a_key_was_in_conf_exports_and_checks_as_it_trained(trained, tmp_path):
    """Runs saved before `data.interpolation` was in conf/ trained with bilinear resizing, the code's
    value then: their saved config is read with it, not refused for the missing key."""
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    for state_file in old.glob("checkpoints/step-*/train_state.json"):
        state = json.loads(state_file.read_text())
        del state["config"]["data"]["interpolation"]
        state_file.write_text(json.dumps(state))
    check = subprocess.run([sys.executable, "jobs/checkpoint.py", "check", str(old)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "step-4" in check.stdout, check.stdout + check.stderr[-3000:]
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "jobs/checkpoint.py", "export", str(old), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 0.9 and cfg["mean"] == [0.5, 0.5, 0.5]
