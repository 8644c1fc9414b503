"""What differs between pretraining, COCO detection and ADE20K segmentation, behind one interface.

The training loop (vit/engine/train.py) is the same for all three; a task (vit/tasks/base.py)
supplies the model, the loss of a micro-batch, what to shard and at which learning-rate scale, and
the evaluation, which lives beside it in its module:

  classification   ViT + linear head on the class token; top-1/top-5          (jobs/pretrain.py)
  coco             ViTDet: windowed trunk, simple pyramid, Mask R-CNN; box and mask AP by COCOeval
  ade20k           trunk at 4 depths, pyramid, UperNet + FCN aux; dataset-level mIoU
"""
from __future__ import annotations

from omegaconf import DictConfig

from vit.tasks.ade20k import ADE20KSegmentation
from vit.tasks.base import Task
from vit.tasks.classification import Classification
from vit.tasks.coco import CocoDetection

TASKS = {task.name: task for task in (Classification, CocoDetection, ADE20KSegmentation)}


def build_task(cfg: DictConfig) -> Task:
    return TASKS[cfg.task.name](cfg)
