"""CUDA backend of the bitmap ops (csrc/bitmap.cu): the tensor-core linear and the bitmap -> dense kernel.

Thin wrappers: they take the format's arrays as they are (validated when the BitmapMatrix was built; they must be
contiguous and 16-byte aligned, as every torch allocation is: the launcher raises ValueError otherwise), allocate
outputs and pass pointers, sizes, the dtype code and the current stream to the extension. No host synchronisation, so they can be captured in a CUDA
graph.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from ..._dispatch import register
from ..._ext import dtype_code, load_extension, raw_stream, stream_ptr
from .format import DTYPES, BitmapMatrix


def _supports(x2: torch.Tensor, bm: BitmapMatrix, bias: Optional[torch.Tensor]) -> List[str]:
    if x2.dtype not in DTYPES:
        return [f"the CUDA bitmap kernel takes float16/bfloat16, got {x2.dtype}"]
    return []


@register("bitmap_linear", "cuda", supports=_supports)
def bitmap_linear(x2: torch.Tensor, bm: BitmapMatrix, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return linear(x2, bm.masks, bm.offsets, bm.values, bias, bm.shape[0], bm.shape[1], bm.max_group)


#: Which kernel runs: 0 = tensor cores, each group of 8 tiles staged by cp.async, 16 bytes a lane, 3 stages (the
#: one measured on a GPU, BENCHMARKS.md); 1 = the bulk-copy engine (cp.async.bulk completing on an mbarrier), 3
#: stages; 2 = bulk copies, 2 stages, 4 blocks per SM at 1..8 tokens; 3 = CUDA cores, work per nonzero (a lane
#: walks the set bits of its mask words: one value, one activation and one fp32 multiply-add per nonzero and
#: token), 1..4 tokens a pass, for decode; 4 = 3 reading the values in aligned pairs (half the shared loads, more
#: instructions). Tests and benchmarks run the default one, or those named by SE_BITMAP_VARIANTS (see
#: :func:`requested_variants`), so 0 stays the default until the others are measured.
VARIANT = 0
VARIANTS = (0, 1, 2, 3, 4)
#: Variants that compute the same sums in the same order (bit-identical outputs): they differ only in staging.
SAME_SUMS = ((0, 1, 2), (3, 4))


#: When a call without an explicit variant runs the CUDA-core kernel instead of :data:`VARIANT`: at most
#: ``max_tokens`` tokens and a fullest group of 8 tiles at most ``max_group_density`` dense (max_group / 2048,
#: known on the host without reading the GPU). ``max_tokens`` 0 = never: to be set from bench_bitmap.py's v3/v4
#: columns (scripts/gpu_session.sh bitmap2) against v0's.
GEMV_RULE = {"variant": 3, "max_tokens": 0, "max_group_density": 1.0}


def pick_variant(tokens: int, max_group: int) -> int:
    """The variant a call runs by default (see :data:`GEMV_RULE`)."""
    rule = GEMV_RULE
    if tokens <= rule["max_tokens"] and max_group <= rule["max_group_density"] * 2048:
        return rule["variant"]
    return VARIANT


def requested_variants() -> tuple:
    """The variants tests and benchmarks run: $SE_BITMAP_VARIANTS ('all' or a comma list such as '0,3'), else only
    the default :data:`VARIANT`."""
    spec = os.environ.get("SE_BITMAP_VARIANTS", "").strip()
    if not spec:
        return (VARIANT,)
    if spec == "all":
        return VARIANTS
    try:
        chosen = tuple(int(v) for v in spec.split(","))
    except ValueError:
        chosen = ()
    if not chosen or any(v not in VARIANTS for v in chosen):
        raise ValueError(f"SE_BITMAP_VARIANTS must be 'all' or a comma list of {VARIANTS}, got {spec!r}")
    return chosen


def linear(x2: torch.Tensor, masks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
           bias: Optional[torch.Tensor], n: int, k: int, max_group: int,
           out: Optional[torch.Tensor] = None, variant: Optional[int] = None) -> torch.Tensor:
    """y [T, n] = x2 [T, k] @ W^T (+ bias) for any T >= 1; x2 contiguous in the weight's dtype and device.

    ``out`` (optional, [T, n], contiguous, x2's dtype): written in full (tests poison it first).
    ``variant``: see :data:`VARIANT` (default: :func:`pick_variant`).
    """
    ext = load_extension()
    tokens = x2.shape[0]
    y = out if out is not None else torch.empty(tokens, n, dtype=x2.dtype, device=x2.device)
    ptr = x2.data_ptr()
    vec = k % 8 == 0 and ptr % 16 == 0
    ext.bitmap_linear(masks.data_ptr(), offsets.data_ptr(), values.data_ptr(), ptr,
                      0 if bias is None else bias.data_ptr(), y.data_ptr(), n, k, tokens, max_group,
                      dtype_code(x2.dtype), int(vec), pick_variant(tokens, max_group) if variant is None else variant,
                      stream_ptr(x2))
    return y


def linear_nd(x: torch.Tensor, masks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
              bias: Optional[torch.Tensor], n: int, k: int, max_group: int, tokens: int) -> torch.Tensor:
    """y [..., n] = x [..., k] @ W^T (+ bias) by the kernel, for BitmapLinear's eager calls: x contiguous, on the
    weight's device and dtype, ``tokens`` = x.numel() // k >= 1 rows (all checked by the caller). No reshapes and
    no second look at the arrays: one allocation and one launch (host time per call is what decode pays)."""
    ext = load_extension()
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    ptr = x.data_ptr()
    ext.bitmap_linear(masks.data_ptr(), offsets.data_ptr(), values.data_ptr(), ptr,
                      0 if bias is None else bias.data_ptr(), y.data_ptr(), n, k, tokens, max_group,
                      _CODES[x.dtype], int(k % 8 == 0 and ptr % 16 == 0), pick_variant(tokens, max_group),
                      raw_stream(x.get_device()))
    return y


_CODES = {dt: dtype_code(dt) for dt in DTYPES}


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


__all__ = ["bitmap_linear", "linear", "linear_nd", "to_dense", "dense_from_arrays", "smem_bytes", "requested_variants", "VARIANT",
           "VARIANTS", "SAME_SUMS", "GEMV_RULE",
           "pick_variant"]
