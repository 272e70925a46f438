"""Judging an encoder by what a downstream user would build on it: ACC and ASR of probes.

As in the TSC paper's SSL evaluation (Peng et al., ICML 2025, arXiv 2506.07467) and BadEncoder's
(Jia, Liu & Gong, IEEE S&P 2022, arXiv 2108.00352): freeze the encoder, train a linear
classifier on clean labelled downstream data over its features, then report clean test accuracy
(ACC) and the share of triggered non-target test inputs classified as the target (ASR). Labels
enter here only, after purification, never inside it. kNN accuracy (cosine, majority vote) is a
training-free second opinion.

Example:
    acc = linear_probe(encoder, train_data, test_data)
    metrics = probe_metrics(encoder, train_data, test_data, BadNets(target=0))   # acc, asr, ra
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..attacks.base import Attack
from ..data.images import ImageData
from ..data.subset import select_clean_subset
from ..errors import DataError, SettingsError
from ..training import device_of
from .metrics import Metrics, evaluate

Features = Callable[[Tensor], Tensor]


def encoder_features(model: nn.Module) -> Features:
    """The encoder's `features(x)` method; SettingsError if the model has none."""
    features = getattr(model, "features", None)
    if not callable(features):
        raise SettingsError(f"{type(model).__name__} has no features(x) method; probes need "
                            f"an encoder such as create_model('simclr')")
    return features


@torch.no_grad()
def extract_features(model: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """`model.features` of float images in [0, 1], in eval mode (the mode is restored), on CPU."""
    features, device, was_training = encoder_features(model), device_of(model), model.training
    model.eval()
    try:
        return torch.cat([features(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


class ProbeClassifier(nn.Module):
    """Frozen encoder features → standardisation → linear layer: a classifier that
    `evaluation.evaluate` can score like any other model."""

    def __init__(self, encoder: nn.Module, mean: Tensor, std: Tensor, linear: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.linear = encoder, linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear((encoder_features(self.encoder)(x) - self.mean) / self.std)


def train_probe(model: nn.Module, train: ImageData, epochs: int = 50, lr: float = 1e-2,
                batch_size: int = 256, seed: int = 0, features: Tensor | None = None
                ) -> ProbeClassifier:
    """Fit a linear probe on the frozen features of `train` (Adam, cross-entropy).

    Features are computed once (or passed in as `features`, the model's features of `train`)
    and standardised with the training set's statistics, so one learning rate suits encoders
    whose features differ in scale (e.g. before and after TSC).
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise SettingsError(f"a probe needs epochs ≥ 1, lr > 0, batch_size ≥ 1; got "
                            f"{epochs}, {lr}, {batch_size}")
    if features is None:
        features = extract_features(model, train.floats())
    mean, std = features.mean(0), features.std(0) + 1e-6
    inputs = (features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(features.shape[1], train.num_classes)
    with torch.no_grad():  # a seeded initialisation, independent of the global RNG
        bound = 1 / features.shape[1] ** 0.5
        linear.weight.copy_(torch.rand(linear.weight.shape, generator=generator) * 2 * bound
                            - bound)
        linear.bias.zero_()
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(inputs), batch_size):
                index = order[start:start + batch_size]
                loss = F.cross_entropy(linear(inputs[index]), train.labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    device = device_of(model)
    return ProbeClassifier(model, mean.to(device), std.to(device), linear.to(device)).eval()


def linear_probe(model: nn.Module, train: ImageData, test: ImageData, epochs: int = 50,
                 lr: float = 1e-2, batch_size: int = 256, seed: int = 0) -> float:
    """Clean test accuracy (%) of a linear probe trained on `train` over frozen features."""
    probe = train_probe(model, train, epochs, lr, batch_size, seed)
    return evaluate(probe, test).acc


def probe_metrics(model: nn.Module, train: ImageData, test: ImageData, attack: Attack | None,
                  epochs: int = 50, lr: float = 1e-2, batch_size: int = 256, seed: int = 0
                  ) -> Metrics:
    """ACC, ASR and RA (%) of a linear probe trained on clean labelled `train` data.

    ASR: share of triggered test inputs whose true class is not the target that the probe
    classifies as the target (the definitions of `evaluation.evaluate`, applied to the probe).
    """
    probe = train_probe(model, train, epochs, lr, batch_size, seed)
    return evaluate(probe, test, attack)


def knn_accuracy(model: nn.Module, train: ImageData, test: ImageData, k: int = 20,
                 batch_size: int = 1000, train_features: Tensor | None = None) -> float:
    """Test accuracy (%) of a k-nearest-neighbour vote over cosine similarity of the features
    (`train_features`: the model's features of `train`, if already computed)."""
    if not 1 <= k <= len(train):
        raise SettingsError(f"k must lie in [1, {len(train)}] (the training set size), got {k}")
    if train_features is None:
        train_features = extract_features(model, train.floats())
    bank = F.normalize(train_features, dim=1)
    queries = F.normalize(extract_features(model, test.floats()), dim=1)
    correct = 0
    for start in range(0, len(queries), batch_size):
        nearest = (queries[start:start + batch_size] @ bank.T).topk(k, dim=1).indices
        votes = F.one_hot(train.labels[nearest], train.num_classes).sum(1)
        # argmax takes the first maximum, so ties go to the smaller class index: deterministic.
        predicted = votes.argmax(1)
        correct += int((predicted == test.labels[start:start + batch_size]).sum())
    return 100 * correct / len(test)


@dataclass(frozen=True)
class ProbeSettings:
    """How an encoder run is judged: recorded in its sidecar, so `tscpurify evaluate` and
    `tscpurify purify` measure every encoder, before and after, the same way."""

    train_images: int = field(default=10000, metadata={
        "help": "labelled images the linear probe and kNN learn from: a class-stratified, "
                "seeded sample of the training split (0 = all; 10,000 keeps a probe ≈ 10 s)"})
    test_images: int = field(default=0, metadata={
        "help": "test images for ACC and ASR: a seeded sample of the test split (0 = all)"})
    epochs: int = field(default=50, metadata={"help": "linear-probe epochs (Adam)"})
    lr: float = field(default=1e-2, metadata={"help": "linear-probe learning rate"})
    knn_k: int = field(default=20, metadata={
        "help": "neighbours of the kNN vote (0 = no kNN accuracy)"})
    seed: int = field(default=0, metadata={"help": "seed of the samples and of the probe"})

    def __post_init__(self) -> None:
        if min(self.train_images, self.test_images, self.knn_k) < 0 or self.epochs < 1 \
                or self.lr <= 0:
            raise SettingsError(f"probe settings need train_images, test_images, knn_k ≥ 0, "
                                f"epochs ≥ 1 and lr > 0; got {self}")
        if self.train_images and self.knn_k > self.train_images:
            # A vote over every training image is the majority class: a silent 10% accuracy.
            raise SettingsError(f"knn_k {self.knn_k} is more than the probe's {self.train_images}"
                                f" training images; use fewer neighbours or more images")

    def samples(self, train: ImageData, test: ImageData) -> tuple[ImageData, ImageData]:
        """The probe's training and test data, drawn from full splits by these settings."""
        if 0 < self.train_images < len(train):
            train = train.subset(select_clean_subset(train.labels, self.train_images, self.seed))
        if 0 < self.test_images < len(test):
            order = torch.randperm(len(test), generator=torch.Generator().manual_seed(self.seed))
            test = test.subset(order[:self.test_images].sort().values)
        return train, test


def encoder_metrics(model: nn.Module, train: ImageData, test: ImageData, attack: Attack | None,
                    settings: ProbeSettings | None = None) -> dict[str, float | None]:
    """Linear-probe ACC / ASR / RA and kNN accuracy (%) of an encoder, per `settings`.

    `train` and `test` are the full splits; the settings draw the samples. Evaluation only:
    this is where labels meet an encoder, never inside pre-training or purification.
    """
    settings = settings or ProbeSettings()
    train, test = settings.samples(train, test)
    if settings.knn_k > len(train):  # a training split smaller than the settings assumed
        raise DataError(f"knn_k {settings.knn_k} is more than the {len(train)} training images")
    features = extract_features(model, train.floats())  # shared by the probe and the kNN bank
    probe = train_probe(model, train, settings.epochs, settings.lr, seed=settings.seed,
                        features=features)
    metrics: dict[str, float | None] = evaluate(probe, test, attack).as_dict()
    if settings.knn_k:
        metrics["knn_acc"] = knn_accuracy(model, train, test, k=settings.knn_k,
                                          train_features=features)
    return metrics
