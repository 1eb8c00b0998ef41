"""The tile layout of the tensor-core CSR kernel (csrc/csr_tiles.cu), derived from a :class:`CSRMatrix`.

W [N, K] is cut into tiles of ``TILE_ROWS`` (16) rows x ``TILE_COLS`` (128) columns; ``nt = ceil(K / 128)``
tiles per band of 16 rows. The nonzeros of tile (b, t) are ``entries[ptr[b * nt + t] : ptr[b * nt + t + 1]]``,
each an int32 word::

    word = (value bits << 16) | (row % 16) * 128 + (col % 128)       # value bits: the fp16/bf16 bit pattern

Every tile holds a multiple of 4 words (the padding repeats one of the tile's own words, which the kernel
writes twice to the same place), so each tile starts on a 16-byte boundary. 4 bytes per nonzero, like the CSR
arrays with int16 indices; ``ptr`` is int64 [ceil(N/16) * nt + 1].

The layout is built on the CSR's device (torch ops, bands in chunks to bound the temporary memory) the first
time the tensor-core kernel runs, and kept on the CSRMatrix object; it is not saved with the weight.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .format import CSRMatrix

TILE_ROWS = 16
TILE_COLS = 128
GROUP = 4  # words per 16-byte load
_BUILD_SLOTS = 1 << 24  # CSR slots converted per step: the int64 temporaries stay ~10 x 8 bytes x this
_CACHE_KEY = "_tile_layout"


def tiles_apply(x2: torch.Tensor, csr: CSRMatrix) -> bool:
    """Whether the tensor-core tiles kernel can take these inputs: fp16/bf16 and in_features a multiple of 8."""
    return x2.dtype in (torch.float16, torch.bfloat16) and csr.shape[1] % 8 == 0


def tile_layout(csr: CSRMatrix) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ptr int64 [ceil(N/16) * ceil(K/128) + 1], entries int32 [E]) of a fp16/bf16 CSRMatrix; cached on it."""
    cached = csr.__dict__.get(_CACHE_KEY)
    if cached is not None and cached[0].device == csr.device:
        return cached
    if csr.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the tile layout holds 16-bit values (float16/bfloat16), got {csr.dtype}")
    n, k = csr.shape
    nt = -(-k // TILE_COLS)
    ptrs, words = [], []
    offset = 0
    step = _rows_per_step(csr)
    for r0 in range(0, n, step):
        p, w = _build_rows(csr, r0, min(n, r0 + step), nt)
        ptrs.append(p[:-1] + offset)
        words.append(w)
        offset += w.numel()
    ptr = torch.cat(ptrs + [torch.tensor([offset], dtype=torch.int64, device=csr.device)])
    entries = torch.cat(words) if words else torch.zeros(0, dtype=torch.int32, device=csr.device)
    csr.__dict__[_CACHE_KEY] = (ptr, entries)
    return ptr, entries


def _rows_per_step(csr: CSRMatrix) -> int:
    """Whole bands of rows holding about _BUILD_SLOTS slots on average (at least one band)."""
    n = csr.shape[0]
    per_row = max(1, csr.values.numel() // max(1, n))
    return max(TILE_ROWS, _BUILD_SLOTS // per_row // TILE_ROWS * TILE_ROWS)


def _build_rows(csr: CSRMatrix, r0: int, r1: int, nt: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ptr (local, [bands * nt + 1]) and words of rows r0 .. r1 (r0 a multiple of TILE_ROWS)."""
    dev = csr.device
    bands = -(-(r1 - r0) // TILE_ROWS)
    s0, s1 = int(csr.crow_indices[r0]), int(csr.crow_indices[r1])
    lengths = csr.row_lengths[r0:r1].to(torch.int64)
    slots = csr.crow_indices[r0 + 1:r1 + 1] - csr.crow_indices[r0:r1]
    rows = torch.repeat_interleave(torch.arange(r0, r1, device=dev), slots, output_size=s1 - s0)
    pos = torch.arange(s0, s1, device=dev) - csr.crow_indices[rows]
    valid = pos < lengths[rows - r0]
    rows = rows[valid] - r0
    cols = csr.col_indices[s0:s1][valid].to(torch.int64)
    bits = csr.values[s0:s1][valid].view(torch.int16).to(torch.int64) & 0xFFFF
    key = (rows // TILE_ROWS) * nt + cols // TILE_COLS
    word = (bits << 16) | ((rows % TILE_ROWS) * TILE_COLS + cols % TILE_COLS)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # the int32 with the same bits
    order = torch.sort(key, stable=True).indices
    word = word[order]
    groups = bands * nt
    counts = torch.bincount(key, minlength=groups)
    padded = (counts + GROUP - 1) // GROUP * GROUP
    ptr = torch.zeros(groups + 1, dtype=torch.int64, device=dev)
    torch.cumsum(padded, 0, out=ptr[1:])
    total = int(ptr[-1])
    first = torch.cumsum(counts, 0) - counts  # where each tile's words start in the sorted order
    tile = torch.repeat_interleave(torch.arange(groups, device=dev), padded, output_size=total)
    j = torch.arange(total, device=dev) - ptr[tile]
    src = first[tile] + torch.minimum(j, counts[tile] - 1)
    return ptr, word[src].to(torch.int32)


def tiles_to_dense(ptr: torch.Tensor, entries: torch.Tensor, shape: Tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """Decode a tile layout back to the dense W [N, K] (torch; for tests and inspection)."""
    n, k = shape
    nt = -(-k // TILE_COLS)
    bands = -(-n // TILE_ROWS)
    dense = torch.zeros(bands * TILE_ROWS, nt * TILE_COLS, dtype=dtype, device=entries.device)
    if entries.numel() == 0:
        return dense[:n, :k]
    tile = torch.repeat_interleave(torch.arange(bands * nt, device=entries.device), ptr.diff(),
                                   output_size=entries.numel())
    w = entries.to(torch.int64) & 0xFFFFFFFF
    loc = w & 0xFFFF
    bits = (w >> 16).to(torch.int32)
    bits = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16)
    rows = (tile // nt) * TILE_ROWS + loc // TILE_COLS
    cols = (tile % nt) * TILE_COLS + loc % TILE_COLS
    dense[rows, cols] = bits.view(dtype)
    return dense[:n, :k]
