"""Distillation losses: pure functions (and small modules where a method has learnable parts).

Only torch is imported here. Shapes, formulas, references and defaults are in each docstring.
"""

from detkd.losses.boxes import bounded_regression_loss, box_kd_loss, giou, ld_loss
from detkd.losses.features import at_loss, cwd_loss, fitnet_loss, pkd_loss
from detkd.losses.fgd import FGDLoss, fgd_masks, pad_boxes
from detkd.losses.logits import kd_loss, sigmoid_kd_loss
from detkd.losses.mgd import MGDLoss

__all__ = [
    "kd_loss",
    "sigmoid_kd_loss",
    "ld_loss",
    "box_kd_loss",
    "bounded_regression_loss",
    "giou",
    "fitnet_loss",
    "cwd_loss",
    "pkd_loss",
    "at_loss",
    "MGDLoss",
    "FGDLoss",
    "fgd_masks",
    "pad_boxes",
]
