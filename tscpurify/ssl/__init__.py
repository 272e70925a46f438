"""Self-supervised training: SimCLR pre-training and CLIP training on image-caption pairs,
with the captions they use. Their curve objectives live with the other losses
(`tscpurify.curve.contrastive`), their views with the data (`tscpurify.data.views`), the
attacks on them with the attacks (`tscpurify.attacks.ctrl`, `badencoder`, `poisoned_pairs`)
and their probes with the evaluation (`tscpurify.evaluation.probes`, `zero_shot`).

Purifying a SimCLR encoder without labels:
    encoder = create_model("simclr", width=16)              # forward = projection
    bare = DataLoader(clean.tensor_dataset(labels=False), batch_size=256, shuffle=True)
    purified, report = tscpurify.purify(encoder, bare, loss_fn=simclr_loss())
    probe_metrics(purified, downstream_train, downstream_test, attack)
"""

from .clip import CLIPSettings, train_clip
from .simclr import SimCLRSettings, pretrain_simclr

__all__ = ["CLIPSettings", "SimCLRSettings", "pretrain_simclr", "train_clip"]
