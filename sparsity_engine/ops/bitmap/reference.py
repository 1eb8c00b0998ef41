"""Plain-torch oracle for the bitmap ops: conversion (any device) and x @ W^T through the exact dense weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dispatch import register
from .format import (BAND, GROUP_COLS, GROUP_TILES, BitmapMatrix, pack_bits, padded_shape, to_bit_order,
                     values_length)

_CHUNK_ELEMS = 1 << 25  # weights converted per step: bounds the temporaries (a few bytes per weight)


@register("to_bitmap", "reference")
def to_bitmap(weight: torch.Tensor) -> BitmapMatrix:
    """Bits for the nonzeros of ``weight`` [N, K] and their values in bit order (see format.py); torch ops on
    the weight's device, bands converted in chunks so the temporaries stay near 2^25 weights."""
    n, k = weight.shape
    nbands, ktiles = padded_shape(n, k)
    kp = ktiles * 16
    step = max(1, _CHUNK_ELEMS // max(1, BAND * kp))
    masks, counts, values = [], [], []
    for b0 in range(0, nbands, step):
        b1 = min(nbands, b0 + step)
        rows = weight[b0 * BAND: min(n, b1 * BAND)]
        padded = torch.zeros((b1 - b0) * BAND, kp, dtype=weight.dtype, device=weight.device)
        padded[: rows.shape[0], :k] = rows
        perm = to_bit_order(padded)                  # [bands, ktiles, 8, 32]
        bits = perm != 0
        masks.append(pack_bits(bits))
        counts.append(bits.sum((2, 3)).reshape(-1))
        values.append(perm[bits])                    # row-major over the bit order = the values order
    counts = torch.cat(counts)
    nnz = int(counts.sum())
    if nnz > 2**31 - 1:
        raise ValueError(f"the bitmap format indexes values with int32; this weight has {nnz} nonzeros")
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=weight.device)
    offsets[1:] = counts.cumsum(0)
    vals = torch.zeros(values_length(nnz), dtype=weight.dtype, device=weight.device)
    vals[:nnz] = torch.cat(values)
    max_group = int(counts.reshape(nbands, ktiles // GROUP_TILES, GROUP_TILES).sum(-1).max()) if nbands else 0
    return BitmapMatrix(torch.cat(masks), offsets, vals, (n, k), nnz, max_group)


@register("bitmap_linear", "reference")
def bitmap_linear(x2: torch.Tensor, bm: BitmapMatrix, bias) -> torch.Tensor:
    """x2 [T, K] @ W^T (+ bias) with W the exact dense weight: what nn.Linear computes, bit for bit."""
    return F.linear(x2, bm.to_dense(), bias)


__all__ = ["to_bitmap", "bitmap_linear", "GROUP_COLS"]
