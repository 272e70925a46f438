"""The curve engine: a quadratic Bezier curve over any model's parameters, its training,
BatchNorm re-estimation at a point, metric profiles along t, and the curve objectives (task
losses in train.py; the label-free contrastive ones, SimCLR's and CLIP's, in contrastive.py)."""

from .batchnorm import recompute_bn_stats
from .bezier import BezierCurve, CurveFunction, fresh_control_point
from .contrastive import bare_images, clip_loss, nt_xent, simclr_loss
from .profile import curve_profile, default_ts
from .train import (
    CurveSettings,
    LossFn,
    ModelFn,
    cross_entropy_loss,
    device_of,
    distillation_loss,
    path_aware_loss,
    to_device,
    train_curve,
)

__all__ = [
    "BezierCurve",
    "bare_images",
    "clip_loss",
    "nt_xent",
    "simclr_loss",
    "CurveFunction",
    "CurveSettings",
    "LossFn",
    "ModelFn",
    "cross_entropy_loss",
    "curve_profile",
    "default_ts",
    "fresh_control_point",
    "device_of",
    "distillation_loss",
    "path_aware_loss",
    "recompute_bn_stats",
    "to_device",
    "train_curve",
]
