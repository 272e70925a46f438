"""A SimCLR encoder: a convolutional trunk ending in global average pooling, plus a projection head.

Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, https://arxiv.org/abs/2002.05709. As in the paper, the head is
Linear → ReLU → Linear and the contrastive loss reads its output, while downstream tasks (linear
probes, kNN) read the trunk's features.

`forward(x)` returns the projection, so that TSC's "the final output is never permuted" rule
protects exactly what its SimCLR loss compares; `features(x)` returns the trunk's feature
vector. Both are plain module calls, so `derive_spec` traces the model like any classifier.

Example:
    model = create_model("simclr", trunk="cnn", width=16)
    z, h = model(x), model.features(x)        # (N, 64) projections, (N, 2·width) features
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SettingsError
from .cnn import conv_norm_relu
from .normalize import default_normalize
from .registered import MODELS
from .resnet import ResNet18

TRUNKS = ("cnn", "resnet18")


class CNNTrunk(nn.Sequential):
    """The small CNN's two conv stages (width, 2·width, each ending in 2×2 max-pooling), then
    global average pooling.

    Average pooling instead of the classifier's flatten keeps the feature vector independent of the
    image size, so one encoder serves 28×28 and 32×32 inputs.
    """

    def __init__(self, in_channels: int, width: int, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> None:
        w = width
        super().__init__(
            default_normalize(in_channels, mean, std),
            *conv_norm_relu(in_channels, w), *conv_norm_relu(w, w), nn.MaxPool2d(2),
            *conv_norm_relu(w, 2 * w), *conv_norm_relu(2 * w, 2 * w), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 2 * w


class ResNetTrunk(nn.Module):
    """ResNet-18 (as in `models.resnet`) without its classifier: features after global pooling."""

    def __init__(self, in_channels: int, width: int, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> None:
        super().__init__()
        net = ResNet18(1, in_channels, width, mean, std)
        # Borrow the layers rather than re-declaring them, so both models build the same blocks.
        self.normalize, self.conv1, self.bn1 = net.normalize, net.conv1, net.bn1
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_dim = 8 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class SimCLR(nn.Module):
    """Trunk + projection head (Linear → ReLU → Linear).

    Args:
        trunk: any module mapping images to (N, trunk.out_dim) features.
        proj_dim: size of the projection the contrastive loss compares (default 64).
        hidden_dim: the head's hidden width; None = the feature size, as in SimCLR.
    """

    def __init__(self, trunk: nn.Module, proj_dim: int = 64, hidden_dim: int | None = None
                 ) -> None:
        super().__init__()
        feature_dim = int(trunk.out_dim)
        hidden = hidden_dim or feature_dim
        self.trunk = trunk
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(),
                                  nn.Linear(hidden, proj_dim))
        self.feature_dim, self.proj_dim = feature_dim, proj_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features (N, feature_dim), the representation downstream probes read."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


@MODELS.register("simclr")
def simclr(trunk: str = "cnn", in_channels: int = 1, width: int = 16, proj_dim: int = 64,
           hidden_dim: int | None = None, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None) -> SimCLR:
    """A SimCLR encoder. `trunk` is 'cnn' (features: 2·width) or 'resnet18' (features: 8·width;
    a narrow width such as 8–16 keeps it CPU-sized).

    It takes no `num_classes`: an encoder is not a classifier, and refusing the argument keeps
    the supervised training path from silently fitting cross-entropy to projections.
    """
    if width < 1 or proj_dim < 1:
        raise SettingsError(f"simclr needs width ≥ 1 and proj_dim ≥ 1, got {width}, {proj_dim}")
    builders = {"cnn": CNNTrunk, "resnet18": ResNetTrunk}
    if trunk not in builders:
        raise SettingsError(f"unknown simclr trunk {trunk!r}; choices: {', '.join(TRUNKS)}")
    return SimCLR(builders[trunk](in_channels, width, mean, std), proj_dim, hidden_dim)
