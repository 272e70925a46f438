"""How a model is judged, outside every defense: a classifier by its own predictions (ACC,
ASR, RA, DER), an encoder by probes over its frozen features, a CLIP model zero-shot."""

from .metrics import Metrics, der, evaluate, predict
from .probes import (
    ProbeClassifier,
    ProbeSettings,
    encoder_features,
    encoder_metrics,
    extract_features,
    knn_accuracy,
    linear_probe,
    probe_metrics,
    train_probe,
)
from .zero_shot import zero_shot_metrics

__all__ = [
    "Metrics",
    "ProbeClassifier",
    "ProbeSettings",
    "der",
    "encoder_features",
    "encoder_metrics",
    "evaluate",
    "extract_features",
    "knn_accuracy",
    "linear_probe",
    "predict",
    "probe_metrics",
    "train_probe",
    "zero_shot_metrics",
]
