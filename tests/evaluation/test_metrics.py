import torch
from torch import nn

from tscpurify.attacks import create_attack
from tscpurify.data import ImageData
from tscpurify.evaluation import Metrics, der, evaluate


class ByPatch(nn.Module):
    """Predicts the target 0 iff the bottom-right pixel is lit, else the true class (via
    a label smuggled in the top-left pixel): an exact oracle for ASR and RA."""

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 10).round().long()
        lit = x[:, 0, -2, -2] > 0.99
        out = torch.nn.functional.one_hot(torch.where(lit, 0, label), 10).float()
        return out + 0 * self.dummy

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))


def test_asr_excludes_target_class_samples():
    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    images = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = (labels.float() / 10 * 255).round().to(torch.uint8)
    data = ImageData(images, labels, tuple(str(i) for i in range(10)))
    attack = create_attack("badnets", size=1, margin=1, pattern="white")
    metrics = evaluate(ByPatch(), data, attack)
    assert metrics.acc == 100.0
    # The two class-0 samples would count as successes; they must be excluded.
    assert metrics.asr == 100.0 and metrics.ra == 0.0


def test_der_against_hand_computed_values():
    before = Metrics(acc=90.0, asr=100.0)
    assert der(before, Metrics(acc=88.0, asr=4.0)) == (0.96 - 0.02 + 1) / 2
    assert der(before, Metrics(acc=91.0, asr=100.0)) == 0.5
    # A defense that destroys accuracy must score lower, not higher.
    assert der(before, Metrics(acc=10.0, asr=0.0)) < der(before, Metrics(acc=88.0, asr=0.0))
    assert abs(der(before, Metrics(acc=10.0, asr=0.0)) - 0.6) < 1e-12
