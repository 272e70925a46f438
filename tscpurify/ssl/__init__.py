"""TSC's self-supervised variant: label-free curve objectives (SimCLR's NT-Xent, CLIP's
contrastive loss), SimCLR augmentations and pre-training, the BadEncoder and CTRL attacks, and
linear/kNN probes that judge an encoder by ACC and ASR on clean labelled downstream data.

Purifying a SimCLR encoder without labels:
    encoder = create_model("simclr", width=16)              # forward = projection
    bare = DataLoader(clean.tensor_dataset(labels=False), batch_size=256, shuffle=True)
    purified, report = tscpurify.purify(encoder, bare, loss_fn=simclr_loss())
    probe_metrics(purified, downstream_train, downstream_test, attack)
"""

from .augment import SimCLRAugment
from .badencoder import BadEncoderSettings, badencoder, badencoder_loss
from .clip import CLIPSettings, train_clip  # noqa: F401
from .losses import bare_images, clip_loss, nt_xent, simclr_loss
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
from .simclr import SimCLRSettings, pretrain_simclr

__all__ = [
    "BadEncoderSettings",
    "ProbeClassifier",
    "ProbeSettings",
    "SimCLRAugment",
    "SimCLRSettings",
    "badencoder",
    "badencoder_loss",
    "bare_images",
    "clip_loss",
    "encoder_features",
    "encoder_metrics",
    "extract_features",
    "knn_accuracy",
    "linear_probe",
    "nt_xent",
    "pretrain_simclr",
    "probe_metrics",
    "simclr_loss",
    "train_probe",
]
