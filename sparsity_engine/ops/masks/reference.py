"""Plain-torch oracle for the mask ops."""
from __future__ import annotations

import torch

from ..._dispatch import register


@register("nm_mask", "reference")
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group of m consecutive entries (last dim), keep the n largest; ties to the lower index."""
    groups = scores.reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order, True)
    return mask.reshape(scores.shape)
