"""CUDA backend of csr_linear: two kernels, picked by the number of tokens.

* rows  (csrc/csr.cu): one warp per row over the CSR arrays, fp32 FMAs; 1..16 tokens, any dtype. The decode
  kernel, near the bytes floor at 1 token on large weights (BENCHMARKS.md).
* tiles (csrc/csr_tiles.cu): fp16/bf16 with in_features a multiple of 8, any number of tokens; the weight in
  16x128 tiles (ops/csr/tiles.py) expanded to dense in shared memory for the tensor cores. Its cost per tile
  does not grow with the tokens, while the rows kernel's grows with tokens x nonzeros; which one runs is
  :func:`use_tiles` (measured crossover).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..._dispatch import register
from ..._ext import dtype_code, load_extension, stream_ptr
from .format import CSRMatrix
from .tiles import tile_layout, tiles_apply

MAX_TOKENS = 16  # of the rows kernel
#: Where the tiles kernel beats the rows kernel (bench_csr.py's rows_us vs tiles_us, BENCHMARKS.md): never
#: below TILES_MIN_TOKENS tokens, always from MAX_TOKENS on, and in between from tokens x density >= the
#: bound below, which is larger for big weights (28672x8192: the rows kernel is near the bytes floor there
#: and wins up to 8 tokens at 70% sparsity; 4096x4096 .. 11008x4096: the tiles kernel wins from 8 tokens at
#: 90% and from 4 at 50%).
TILES_MIN_TOKENS = 4
TILES_MIN_WORK = ((1 << 26, 0.8), (None, 2.5))  # (max N*K, tokens * density bound)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The 16-byte vector loads need 16-byte aligned, contiguous arrays (views from a file may not be)."""
    if not t.is_contiguous() or t.data_ptr() % 16:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _supports(x2: torch.Tensor, csr: CSRMatrix, bias: Optional[torch.Tensor]) -> List[str]:
    reasons = []
    if x2.shape[0] > MAX_TOKENS and not tiles_apply(x2, csr):
        reasons.append(f"the CUDA CSR kernels take more than {MAX_TOKENS} tokens only for float16/bfloat16 "
                       f"with in_features a multiple of 8; x has {x2.shape[0]} tokens, dtype {x2.dtype}, "
                       f"in_features {csr.shape[1]} (the Triton SpMM serves this)")
    return reasons


@register("csr_linear", "cuda", supports=_supports)
def csr_linear(x2: torch.Tensor, csr: CSRMatrix, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if tiles_apply(x2, csr) and use_tiles(x2.shape[0], csr.shape, csr.density):
        return csr_linear_tiles(x2, csr, bias)
    return csr_linear_rows(x2, csr, bias)


def use_tiles(tokens: int, shape, density: float) -> bool:
    """Whether the tiles kernel (rather than the rows kernel) runs for this many tokens; see TILES_MIN_WORK."""
    if tokens >= MAX_TOKENS:
        return True
    if tokens < TILES_MIN_TOKENS:
        return False
    size = shape[0] * shape[1]
    bound = next(b for limit, b in TILES_MIN_WORK if limit is None or size <= limit)
    return tokens * density >= bound


def csr_linear_rows(x2: torch.Tensor, csr: CSRMatrix, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The warp-per-row kernel (1..16 tokens, any dtype); x2 [tokens, K] contiguous, in the weight's dtype."""
    if x2.shape[0] > MAX_TOKENS:
        raise ValueError(f"the rows kernel takes 1..{MAX_TOKENS} tokens, got {x2.shape[0]}")
    ext = load_extension()
    tokens, k = x2.shape
    n = csr.shape[0]
    y = torch.empty(tokens, n, dtype=x2.dtype, device=x2.device)
    code = dtype_code(x2.dtype)
    group = _group_size(ext, k, tokens, code)
    vals, cols = _aligned(csr.values), _aligned(csr.col_indices)
    ext.csr_spmm(_schedule(csr).data_ptr(), cols.data_ptr(), vals.data_ptr(), x2.data_ptr(),
                 0 if bias is None else bias.contiguous().data_ptr(), y.data_ptr(),
                 n, k, tokens, code, dtype_code(csr.col_indices.dtype), group, stream_ptr(x2))
    return y


def csr_linear_tiles(x2: torch.Tensor, csr: CSRMatrix, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The tensor-core tiles kernel (fp16/bf16, K % 8 == 0, any number of tokens).

    The first call builds the tile layout (a second copy of the weight, 4 bytes per nonzero) and keeps it
    on ``csr``.
    """
    if not tiles_apply(x2, csr):
        raise ValueError(f"the tiles kernel needs float16/bfloat16 and in_features a multiple of 8, got "
                         f"{x2.dtype} and in_features {csr.shape[1]}")
    ext = load_extension()
    tokens, k = x2.shape
    n = csr.shape[0]
    ptr, entries = tile_layout(csr)
    splits = _tiles_splits(ext, n, k, tokens)
    y = torch.empty(tokens, n, dtype=x2.dtype, device=x2.device)
    part = torch.empty(splits * tokens * n, dtype=torch.float32, device=x2.device) if splits > 1 else None
    x2 = _aligned(x2)
    ext.csr_tiles_spmm(entries.data_ptr(), ptr.data_ptr(), x2.data_ptr(),
                       0 if bias is None else bias.contiguous().data_ptr(), y.data_ptr(),
                       0 if part is None else part.data_ptr(), n, k, tokens, dtype_code(x2.dtype), splits,
                       stream_ptr(x2))
    return y


_SPLITS = {}


def _tiles_splits(ext, n: int, k: int, tokens: int) -> int:
    key = (n, k, tokens, torch.cuda.current_device())
    splits = _SPLITS.get(key)
    if splits is None:
        splits = _SPLITS[key] = int(ext.csr_tiles_splits(n, k, tokens))
    return splits


def _schedule(csr: CSRMatrix) -> torch.Tensor:
    """int64 [N, 2]: per row in row_order, {start slot, (length << 32) | row}: one 16-byte load per row.

    Derived from the CSR arrays once and kept on the CSRMatrix object (not saved; rebuilt after a load).
    """
    sched = csr.__dict__.get("_cuda_schedule")
    if sched is None or sched.device != csr.device:
        order = csr.row_order.long()
        sched = torch.stack([csr.crow_indices[order], (csr.row_lengths.long()[order] << 32) | order], 1).contiguous()
        csr.__dict__["_cuda_schedule"] = sched
    return sched


_GROUPS = {}


def _group_size(ext, k: int, tokens: int, code: int) -> int:
    key = (k, min(tokens, MAX_TOKENS), code, torch.cuda.current_device())
    group = _GROUPS.get(key)
    if group is None:
        group = _GROUPS[key] = int(ext.csr_group_size(k, tokens, code))
    return group
