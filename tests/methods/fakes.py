"""Small fake zoo models for the method tests: a few conv stages + a linear head."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdengine.models.base import KDModel, ModelOutput

NUM_CLASSES = 7


class FakeNet(KDModel):
    """``len(channels)`` conv stages (stride 2 after the first), features before each stage's
    final ReLU, global average pool of the last ReLU into a linear ``head``. ``hints=True``: the
    output lists ``hints`` too, ``2 * features[i]`` (not ``relu(features[i])``, so a test can tell
    which one a method used)."""

    def __init__(self, channels=(4, 8, 8), num_classes=NUM_CLASSES, in_channels=3, hints=False):
        super().__init__()
        self.hints = hints
        self.stage_channels = tuple(channels)
        self.num_classes = num_classes
        convs, c_in = [], in_channels
        for i, c in enumerate(channels):
            convs.append(nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1))
            c_in = c
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(c_in, num_classes)

    @property
    def head(self) -> nn.Module:
        return self.fc

    def forward(self, x):
        feats = []
        for conv in self.convs:
            x = conv(x)
            feats.append(x)
            x = F.relu(x)
        return ModelOutput(self.fc(x.mean((2, 3))), feats, [2 * f for f in feats] if self.hints else None)


def batch(b=6, size=8, num_classes=NUM_CLASSES, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (b,), generator=g)
    return x, y


def run(models, trainable, x):
    """Forward each model as the engine would: frozen ones under no_grad."""
    outs = []
    for m, t in zip(models, trainable):
        if t:
            outs.append(m(x))
        else:
            with torch.no_grad():
                outs.append(m(x))
    return outs


def random_outputs(channel_lists, b=4, sizes=(8, 4, 2, 1), num_classes=NUM_CLASSES, seed=1, dtype=torch.float64,
                   hints=()):
    """ModelOutputs of fixed random leaves (logits [B, K], features [B, C_i, H_i, H_i]); the
    outputs whose index is in ``hints`` list random ``hints`` leaves of the features' shapes too."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for m, channels in enumerate(channel_lists):
        logits = (2 * torch.randn(b, num_classes, generator=g, dtype=dtype)).requires_grad_()

        def maps():
            return [torch.randn(b, c, s, s, generator=g, dtype=dtype).requires_grad_() for c, s in zip(channels, sizes)]

        feats = maps()
        outs.append(ModelOutput(logits, feats, maps() if m in hints else None))
    return outs


def leaves(outputs):
    return [t for o in outputs for t in [o.logits, *o.features]]
