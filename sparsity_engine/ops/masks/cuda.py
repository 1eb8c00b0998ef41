"""CUDA backend of the mask ops: thin wrapper over csrc/masks.cu (built by sparsity_engine._ext)."""
from __future__ import annotations

from typing import List

import torch

from ..._dispatch import register
from ..._ext import dtype_code, load_extension, stream_ptr

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_M = 256  # csrc/masks.cu kMaxM: the generic kernel reads the m scores of a group per element


def _nm_supports(scores: torch.Tensor, n: int, m: int) -> List[str]:
    reasons = []
    if scores.dtype not in _DTYPES:
        reasons.append(f"dtype {str(scores.dtype).replace('torch.', '')} is not supported by the CUDA nm_mask "
                       "kernel (float32, float16, bfloat16 are)")
    if m > MAX_M:
        reasons.append(f"m={m} exceeds the CUDA nm_mask kernel's limit of {MAX_M}")
    return reasons


@register("nm_mask", "cuda", supports=_nm_supports)
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """One byte per element; a 16-byte aligned contiguous input takes the vectorised path."""
    ext = load_extension()
    x = scores.contiguous()
    out = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    ext.masks_nm_mask(x.data_ptr(), out.data_ptr(), x.numel(), n, m, dtype_code(x.dtype), stream_ptr(x))
    return out
