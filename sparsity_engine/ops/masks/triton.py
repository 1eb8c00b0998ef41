"""Triton kernels for the mask ops."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._dispatch import register


@triton.jit
def _nm_mask_kernel(x_ptr, out_ptr, n_groups, N: tl.constexpr, M: tl.constexpr, M_POW2: tl.constexpr,
                    BLOCK_G: tl.constexpr):
    # One row of the tile per group. An entry is kept iff fewer than N entries of its group rank above it,
    # where j ranks above i when x_j > x_i, or x_j == x_i and j < i (the stable order of the reference).
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    i = tl.arange(0, M_POW2)
    g_ok = g < n_groups
    valid = g_ok[:, None] & (i[None, :] < M)
    base = g * M
    x = tl.load(x_ptr + base[:, None] + i[None, :], mask=valid, other=0.0).to(tl.float32)
    rank = tl.zeros((BLOCK_G, M_POW2), dtype=tl.int32)
    for j in tl.static_range(M):
        xj = tl.load(x_ptr + base + j, mask=g_ok, other=0.0).to(tl.float32)[:, None]
        above = (xj > x) | ((xj == x) & (j < i[None, :]))
        rank += above.to(tl.int32)
    keep = (rank < N).to(tl.int8)
    tl.store(out_ptr + base[:, None] + i[None, :], keep, mask=valid)


@register("nm_mask", "triton")
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    x = scores.contiguous()
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    n_groups = x.numel() // m
    if n_groups == 0:
        return out.view(torch.bool)
    block_g = max(1, min(256, 4096 // triton.next_power_of_2(m)))
    grid = (triton.cdiv(n_groups, block_g),)
    _nm_mask_kernel[grid](x, out, n_groups, N=n, M=m, M_POW2=triton.next_power_of_2(m), BLOCK_G=block_g)
    return out.view(torch.bool)
