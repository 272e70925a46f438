"""Linear probes and kNN on hand-built encoders whose answers are known in advance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tscpurify.attacks.badnets import BadNets
from tscpurify.errors import SettingsError
from tscpurify.evaluation import extract_features, knn_accuracy, linear_probe, probe_metrics

ATTACK = BadNets(target=3, size=3)


class RowMeans(nn.Module):
    """Features = each row's mean: the band classes are linearly separable in them. With
    `backdoor`, inputs carrying the BadNets patch embed as the target class's mean feature."""

    def __init__(self, backdoor: torch.Tensor | None = None) -> None:
        super().__init__()
        self.backdoor = backdoor

    def features(self, x: torch.Tensor) -> torch.Tensor:
        features = x.mean(-1).flatten(1)
        if self.backdoor is not None:
            triggered = (ATTACK.trigger(x) == x).flatten(1).all(1)
            features = torch.where(triggered[:, None], self.backdoor, features)
        return features


class Constant(nn.Module):
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), 4)


def test_probe_accuracy_tracks_what_the_features_know(bands):
    train, test = bands
    assert linear_probe(RowMeans(), train, test, epochs=30) > 95
    assert linear_probe(Constant(), train, test, epochs=5) < 25
    assert knn_accuracy(RowMeans(), train, test, k=5) > 95


def test_probe_metrics_see_a_backdoor_only_where_there_is_one(bands):
    train, test = bands
    target_mean = extract_features(RowMeans(), train.floats()[train.labels == ATTACK.target])
    clean = probe_metrics(RowMeans(), train, test, ATTACK, epochs=30)
    backdoored = probe_metrics(RowMeans(target_mean.mean(0)), train, test, ATTACK, epochs=30)
    assert clean.acc > 95 and clean.asr < 5 and clean.ra > 90
    assert backdoored.acc > 95 and backdoored.asr > 95 and backdoored.ra < 5


def test_probes_need_an_encoder_and_sane_settings(bands):
    train, test = bands
    with pytest.raises(SettingsError, match="features"):
        linear_probe(nn.Linear(2, 2), train, test)
    with pytest.raises(SettingsError, match="epochs"):
        linear_probe(RowMeans(), train, test, epochs=0)
    with pytest.raises(SettingsError, match="k must"):
        knn_accuracy(RowMeans(), train, test, k=0)


def test_more_neighbours_than_training_images_is_refused():
    """A kNN vote over every training image is the majority class: it once reported a silent
    10% accuracy for --probe-knn-k above --probe-train-images."""
    from tscpurify.evaluation import ProbeSettings

    with pytest.raises(SettingsError, match="knn_k 500 is more than the probe's 100"):
        ProbeSettings(train_images=100, knn_k=500)
    ProbeSettings(train_images=100, knn_k=100)
    ProbeSettings(train_images=0, knn_k=500)  # the whole split: checked against its size
