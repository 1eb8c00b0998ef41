"""CUDA backend of the mask ops: thin wrappers over csrc/masks.cu (N:M), csrc/masks_della.cu (DELLA ranks) and
csrc/select.cu (exact whole-tensor top-k edges by radix select, also the merge family's magnitude bands), built
by sparsity_engine._ext. Each DELLA row is ranked by one thread block, never by a global sort."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..._dispatch import register
from ..._ext import dtype_code, load_extension, stream_ptr
from ..._validate import check_finite, device_flag_check
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


def della_deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor, outs: Sequence[torch.Tensor], lo: Sequence[float],
                 span: Sequence[float], seeds: Sequence[int], active_bits: int, norm_code: int,
                 parts: Optional[torch.Tensor], bad: torch.Tensor) -> None:
    """DELLA task vectors of a merge in one kernel (csrc/masks_della.cu della_deltas_kernel), nothing read back.

    tensors, outs: N <= 8 contiguous fp16 / bf16 tensors shaped like base (rows are the last dim, at most
    DELLA_MAX_COLS long). outs[i] = (tensors[i] - base) kept where u(seeds[i], flat index) < p_i, p_i =
    clamp(lo[i] + span[i] * mean_rank / (n - 1), 0, 1) (as della_probabilities), u the uniform of
    triton.philox_uniforms; unmasked where bit i of active_bits is clear. norm_code 1 / 2 / 3 (l1 / l2 / linf):
    parts [rows, 2, NP] fp32 receives each row's norm terms before / after the mask (NP >= N). bad: int32
    device flag set to 1 when some t - base is NaN/Inf."""
    n = base.shape[-1] if base.dim() else 1
    rows = base.numel() // n
    load_extension().masks_della_deltas(
        [t.data_ptr() for t in tensors], [o.data_ptr() for o in outs], base.data_ptr(), rows, n, list(lo),
        list(span), list(seeds), active_bits, norm_code, parts.data_ptr() if parts is not None else 0,
        parts.shape[-1] if parts is not None else 0, bad.data_ptr(), dtype_code(base.dtype), stream_ptr(base))


@register("della_magprune", "cuda", supports=_della_supports)
def della_magprune(t: torch.Tensor, density: float, epsilon: float, rescale_norm, generator) -> torch.Tensor:
    """Ranks by csrc/masks_della.cu, then the Triton backend's Philox draw with a seed drawn the same way,
    so a generator state gives the same entries on either backend (up to p rounded differently)."""
    from . import triton as masks_triton

    x = t.contiguous()
    kept = masks_triton.keep_with_probabilities(x, della_probabilities(x, density, epsilon),
                                                masks_triton.draw_seed(generator))
    return reference.rescale_masked(t, kept.view(t.shape), rescale_norm)


# ---------------------------------------------------------------- whole-tensor top-k edges (csrc/select.cu)

# Entries per chunk of the select's last pass (the tie-locating granularity; per-chunk counts cost rows x
# chunks x 1 KiB). A module attribute so tests can force many chunks on small tensors.
SELECT_CHUNK = 16384
SELECT_MAX_CHUNKS = 8192
MAGNITUDE, ORDER = 0, 1


def _select_chunk(n: int) -> int:
    chunk = SELECT_CHUNK
    while -(-n // chunk) > SELECT_MAX_CHUNKS:
        chunk *= 2
    return chunk


def select_edges(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], rows: Sequence[Tuple[int, int, bool, int]],
                 *, mode: int, out_k: torch.Tensor, out_j: torch.Tensor, k_shift: int) -> None:
    """Band edges over whole tensors by radix select, written on the device (nothing is read back).

    inputs: up to 8 contiguous tensors of one float dtype and n < 2**31 entries; base: None or like them (keys
    of t - base, rounded to the dtype, for mode MAGNITUDE). rows: (input, p, later_first, slot) with
    1 <= p < n: the entry at 1-based position p of the order (key descending, equal keys by flat index
    ascending, or descending with later_first). Writes, at out_k[slot] / out_j[slot] (int32), K >> k_shift and
    the flat index J such that entry e is among the first p iff key > K, or key == K and e < J (e >= J with
    later_first). MAGNITUDE keys are |d|'s bits (16-bit dtypes shifted up by 16), ORDER keys the
    values' bits mapped to unsigned order (-0.0 as +0.0).
    """
    ext = load_extension()
    x0 = inputs[0]
    n, dev = x0.numel(), x0.device
    chunk = _select_chunk(n)
    nchunks = -(-n // chunk)
    # one scratch allocation (each costs host time on every merge): state int64 [rows, 4], then the histogram
    # [rows, 256] (zeroed by the launcher) and the last pass's per-chunk counts [rows, nchunks, 256], int32
    nrows = len(rows)
    scratch = torch.empty(nrows * (8 + 256 + nchunks * 256), dtype=torch.int32, device=dev)
    state = scratch.data_ptr()
    hist = state + nrows * 8 * 4
    counts = hist + nrows * 256 * 4
    ext.select_edges([t.data_ptr() for t in inputs], base.data_ptr() if base is not None else 0, n,
                     [r[0] for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows], [r[3] for r in rows], mode,
                     dtype_code(x0.dtype), state, hist, counts, chunk, out_k.data_ptr(), out_j.data_ptr(), k_shift,
                     stream_ptr(x0))


def _select_supports(t: torch.Tensor, k: int, *rest) -> List[str]:
    reasons = []
    if t.dtype not in _DTYPES:
        reasons.append(f"dtype {str(t.dtype).replace('torch.', '')} is not supported by the CUDA select kernel "
                       "(float32, float16, bfloat16 are)")
    if t.numel() >= 2**31:
        reasons.append(f"{t.numel()} elements exceed the CUDA select kernel's 2**31 - 1 limit")
    return reasons


def _topk_supports(scores: torch.Tensor, k: int, dim) -> List[str]:
    reasons = _select_supports(scores, k)
    if dim is not None:
        reasons.append("the CUDA select kernel ranks whole tensors (dim=None); per-slice top-k is the Triton "
                       "backend's")
    return reasons


def _select_whole(x: torch.Tensor, k: int, *, mode: int, values: bool, bad: torch.Tensor) -> torch.Tensor:
    """x flat contiguous, 1 <= k < n: keep the k largest keys (ties to the lower index); int8 mask or values.
    bad (int32 [1], zero) becomes 1 if x holds NaN/Inf, seen by the write pass (no read of its own)."""
    edge = torch.empty(2, dtype=torch.int32, device=x.device)
    select_edges([x], None, [(0, k, False, 0)], mode=mode, out_k=edge[:1], out_j=edge[1:], k_shift=0)
    out = torch.empty(x.shape, dtype=x.dtype if values else torch.int8, device=x.device)
    load_extension().select_write(x.data_ptr(), out.data_ptr(), x.numel(), mode, int(values), dtype_code(x.dtype),
                                  edge[:1].data_ptr(), edge[1:].data_ptr(), bad.data_ptr(), stream_ptr(x))
    return out


def _finite_or_raise(name: str, t: torch.Tensor, bad: Optional[torch.Tensor]) -> None:
    """The front end's finiteness check, done by the kernel's flag (one host read) where there is one."""
    if bad is None:
        check_finite(name, t)
        return

    def raise_error():
        check_finite(name, t)  # counts the bad entries and raises with the argument's name
        raise ValueError(f"{name} contains NaN/Inf values; it must be finite")

    device_flag_check(bad, raise_error)


def validates_finite(fn):
    """Mark a backend function that checks its input for NaN/Inf itself (the front end then skips its read)."""
    fn.validates_finite = True
    return fn


@register("topk_mask", "cuda", supports=_topk_supports)
@validates_finite
def topk_mask(scores: torch.Tensor, k: int, dim) -> torch.Tensor:
    flat = scores.contiguous().view(-1)
    if k == 0 or k >= flat.numel():
        _finite_or_raise("scores", flat, None)
        return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
    bad = torch.zeros(1, dtype=torch.int32, device=flat.device)
    mask = _select_whole(flat, k, mode=ORDER, values=False, bad=bad)
    _finite_or_raise("scores", flat, bad)
    return mask.view(torch.bool).view(scores.shape)


@register("magnitude_prune", "cuda", supports=_select_supports)
@validates_finite
def magnitude_prune(t: torch.Tensor, k: int, rescale_norm) -> torch.Tensor:
    flat = t.contiguous().view(-1)
    if k >= flat.numel() or k == 0:
        _finite_or_raise("t", flat, None)
        masked = flat.clone() if k else torch.zeros_like(flat)
    else:
        bad = torch.zeros(1, dtype=torch.int32, device=flat.device)
        masked = _select_whole(flat, k, mode=MAGNITUDE, values=True, bad=bad)
        _finite_or_raise("t", flat, bad)
    return reference.rescale_masked(t, masked.view(t.shape), rescale_norm)
