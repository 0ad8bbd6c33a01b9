"""Weights that look trained, for the export and end-to-end tests alike."""

from __future__ import annotations

import torch
from torch import nn


def perturb(model: nn.Module, *, seed: int) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters, as training would.

    Freshly initialized batch norms are identities (mean 0, var 1, weight 1, bias 0), which
    would let an exporter that mishandles them pass a parity test.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()
