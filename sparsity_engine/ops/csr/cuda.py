"""CUDA backend of csr_linear: thin wrapper over csrc/csr.cu (warp-per-row SpMV / SpMM for 1..16 tokens)."""
from __future__ import annotations

from typing import List, Optional

import torch

from ..._dispatch import register
from ..._ext import dtype_code, load_extension, stream_ptr
from .format import CSRMatrix

MAX_TOKENS = 16


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The 16-byte vector loads need 16-byte aligned, contiguous arrays (views from a file may not be)."""
    if not t.is_contiguous() or t.data_ptr() % 16:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _supports(x2: torch.Tensor, csr: CSRMatrix, bias: Optional[torch.Tensor]) -> List[str]:
    reasons = []
    if x2.shape[0] > MAX_TOKENS:
        reasons.append(f"the CUDA CSR kernel is the decode kernel (1..{MAX_TOKENS} tokens); "
                       f"x has {x2.shape[0]} tokens (the Triton SpMM serves larger batches)")
    return reasons


@register("csr_linear", "cuda", supports=_supports)
def csr_linear(x2: torch.Tensor, csr: CSRMatrix, bias: Optional[torch.Tensor]) -> torch.Tensor:
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
