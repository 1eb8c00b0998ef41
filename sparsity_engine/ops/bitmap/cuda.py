"""CUDA backend of the bitmap ops (csrc/bitmap.cu): the tensor-core linear and the bitmap -> dense kernel.

Thin wrappers: they take the format's arrays as they are (validated when the BitmapMatrix was built; they must be
contiguous and 16-byte aligned, as every torch allocation is: the launcher raises ValueError otherwise), allocate
outputs and pass pointers, sizes, the dtype code and the current stream to the extension. No host synchronisation, so they can be captured in a CUDA
graph.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..._dispatch import register
from ..._ext import dtype_code, load_extension, stream_ptr
from .format import DTYPES, BitmapMatrix


def _supports(x2: torch.Tensor, bm: BitmapMatrix, bias: Optional[torch.Tensor]) -> List[str]:
    if x2.dtype not in DTYPES:
        return [f"the CUDA bitmap kernel takes float16/bfloat16, got {x2.dtype}"]
    return []


@register("bitmap_linear", "cuda", supports=_supports)
def bitmap_linear(x2: torch.Tensor, bm: BitmapMatrix, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return linear(x2, bm.masks, bm.offsets, bm.values, bias, bm.shape[0], bm.shape[1], bm.max_group)


#: How the kernel stages a group of 8 tiles in shared memory: 0 = cp.async, 16 bytes a lane, 3 stages (the one
#: measured on a GPU, BENCHMARKS.md); 1 = the bulk-copy engine (cp.async.bulk completing on an mbarrier), 3
#: stages; 2 = bulk copies, 2 stages, 4 blocks per SM at 1..8 tokens. All three compute the same sums in the
#: same order. Variants 1 and 2 have not run on a GPU yet: the tests and benchmarks include them only with
#: SE_BITMAP_BULK=1 (scripts/gpu_session.sh bitmap-bulk), so 0 stays the default until
#: they are measured.
VARIANT = 0
VARIANTS = (0, 1, 2)


def linear(x2: torch.Tensor, masks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
           bias: Optional[torch.Tensor], n: int, k: int, max_group: int,
           out: Optional[torch.Tensor] = None, variant: Optional[int] = None) -> torch.Tensor:
    """y [T, n] = x2 [T, k] @ W^T (+ bias) for any T >= 1; x2 contiguous in the weight's dtype and device.

    ``out`` (optional, [T, n], contiguous, x2's dtype): written in full (tests poison it first).
    ``variant``: see :data:`VARIANT` (default).
    """
    ext = load_extension()
    tokens = x2.shape[0]
    y = out if out is not None else torch.empty(tokens, n, dtype=x2.dtype, device=x2.device)
    ptr = x2.data_ptr()
    vec = k % 8 == 0 and ptr % 16 == 0
    ext.bitmap_linear(masks.data_ptr(), offsets.data_ptr(), values.data_ptr(), ptr,
                      0 if bias is None else bias.data_ptr(), y.data_ptr(), n, k, tokens, max_group,
                      dtype_code(x2.dtype), int(vec), VARIANT if variant is None else variant, stream_ptr(x2))
    return y


def to_dense(bm: BitmapMatrix, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense weight [N, K] by one kernel (every element written; sync-free, so graph-capturable)."""
    return dense_from_arrays(bm.masks, bm.offsets, bm.values, bm.shape[0], bm.shape[1], out)


def dense_from_arrays(masks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, n: int, k: int,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    ext = load_extension()
    w = out if out is not None else torch.empty(n, k, dtype=values.dtype, device=values.device)
    ext.bitmap_to_dense(masks.data_ptr(), offsets.data_ptr(), values.data_ptr(), w.data_ptr(), n, k,
                        dtype_code(values.dtype), stream_ptr(values))
    return w


def smem_bytes(tokens: int, max_group: int, variant: Optional[int] = None) -> int:
    """Shared memory per block the linear kernel uses (its occupancy depends on it)."""
    return int(load_extension().bitmap_smem_bytes(tokens, max_group, VARIANT if variant is None else variant))


__all__ = ["bitmap_linear", "linear", "to_dense", "dense_from_arrays", "smem_bytes", "VARIANT", "VARIANTS"]
