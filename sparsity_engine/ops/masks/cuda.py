"""CUDA backend of the mask ops: thin wrappers over csrc/masks.cu (N:M) and csrc/masks_della.cu (DELLA ranks),
built by sparsity_engine._ext. Each DELLA row is ranked by one thread block, never by a global sort."""
from __future__ import annotations

from typing import List

import torch

from ..._dispatch import register
from ..._ext import dtype_code, load_extension, stream_ptr
from . import reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_M = 256  # csrc/masks.cu kMaxM: the generic kernel reads the m scores of a group per element
# csrc/masks_della.cu kMaxCols (16-bit histogram counters) and kMaxColsF32 (the largest block radix sort)
DELLA_MAX_COLS = {torch.float16: 65535, torch.bfloat16: 65535, torch.float32: 16384}


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


def _della_supports(t: torch.Tensor, density, epsilon, rescale_norm, generator) -> List[str]:
    reasons = []
    n = t.shape[-1] if t.dim() else 1
    if t.dtype not in DELLA_MAX_COLS:
        reasons.append(f"dtype {str(t.dtype).replace('torch.', '')} is not supported by the CUDA DELLA kernel "
                       "(float32, float16 and bfloat16 are)")
    elif n > DELLA_MAX_COLS[t.dtype]:
        reasons.append(f"rows of {n} entries exceed the CUDA DELLA kernel's limit of {DELLA_MAX_COLS[t.dtype]} "
                       f"for {str(t.dtype).replace('torch.', '')}")
    try:
        from . import triton as _  # noqa: F401  (the Philox draw)
    except ImportError as exc:
        reasons.append(f"the CUDA DELLA path draws with the Triton kernel, which cannot be imported ({exc})")
    return reasons


def della_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """reference.della_probabilities (fp32, t's shape), bit-identical to the reference run by torch on the GPU:
    fp16/bf16 rows ranked by a per-row histogram of their 15-bit magnitude keys, fp32 rows by a block radix
    sort of (31-bit magnitude key, column) pairs."""
    x = t.contiguous()
    n = x.shape[-1] if x.dim() else 1
    probs = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.numel():
        load_extension().masks_della_probs(x.data_ptr(), probs.data_ptr(), x.numel() // n, n, density - epsilon,
                                           2.0 * epsilon, dtype_code(x.dtype), stream_ptr(x))
    return probs


@register("della_magprune", "cuda", supports=_della_supports)
def della_magprune(t: torch.Tensor, density: float, epsilon: float, rescale_norm, generator) -> torch.Tensor:
    """Ranks by csrc/masks_della.cu, then the Triton backend's Philox draw with a seed drawn the same way,
    so a generator state gives the same entries on either backend (up to p rounded differently)."""
    from . import triton as masks_triton

    x = t.contiguous()
    kept = masks_triton.keep_with_probabilities(x, della_probabilities(x, density, epsilon),
                                                masks_triton.draw_seed(generator))
    return reference.rescale_masked(t, kept.view(t.shape), rescale_norm)
