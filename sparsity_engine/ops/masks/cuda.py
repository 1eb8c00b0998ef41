"""CUDA backend of the mask ops: thin wrappers over csrc/masks.cu (N:M), csrc/masks_della.cu (DELLA ranks, the
merge's fused DELLA task vectors) and csrc/masks_select.cu (the selection: band edges over whole tensors by
radix select; whole-tensor top-k and magnitude), built by sparsity_engine._ext. Each DELLA row is ranked by one
thread block, never by a global sort."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..._dispatch import backend_reasons, dispatch, register
from ..._ext import dtype_code, load_extension, stream_ptr
from ..._validate import check_finite, raise_nonfinite
from . import reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_M = 256  # csrc/masks.cu kMaxM: the generic kernel reads the m scores of a group per element
# csrc/masks_della.cu kMaxCols (16-bit histogram counters) and kMaxColsF32 (the largest block radix sort)
DELLA_MAX_COLS = {torch.float16: 65535, torch.bfloat16: 65535, torch.float32: 16384}
INT32_LIMIT = {"numel": 2**31 - 1}


@register("nm_mask", "cuda", dtypes=KERNEL_DTYPES, limits={"m": MAX_M})
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """One byte per element; a 16-byte aligned contiguous input takes the vectorised path."""
    ext = load_extension()
    x = scores.contiguous()
    out = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    ext.masks_nm_mask(x.data_ptr(), out.data_ptr(), x.numel(), n, m, dtype_code(x.dtype), stream_ptr(x))
    return out


def _della_supports(t: torch.Tensor, *rest) -> List[str]:
    """Row length by dtype, and the Philox draw (the Triton backend's keep_with_probabilities)."""
    reasons = []
    n = t.shape[-1] if t.dim() else 1
    limit = DELLA_MAX_COLS.get(t.dtype)
    if limit is not None and n > limit:
        reasons.append(f"rows of {n} entries exceed the CUDA DELLA kernel's limit of {limit} for "
                       f"{str(t.dtype).replace('torch.', '')}")
    reasons += [f"the DELLA draw runs on Triton, which cannot run here: {r}" for r in backend_reasons("triton")]
    return reasons


def della_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """reference.della_probabilities (fp32, t's shape), bit-identical to the reference on any device:
    fp16/bf16 rows ranked by a per-row histogram of their 15-bit magnitude keys, fp32 rows by a block radix
    sort of (31-bit magnitude key, column) pairs."""
    x = t.contiguous()
    n = x.shape[-1] if x.dim() else 1
    probs = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.numel():
        load_extension().masks_della_probs(x.data_ptr(), probs.data_ptr(), x.numel() // n, n, density - epsilon,
                                           2.0 * epsilon, dtype_code(x.dtype), stream_ptr(x))
    return probs


@register("della_deltas", "cuda", dtypes=(torch.float16, torch.bfloat16), limits={"cols": 65535, "tensors": 8})
def della_deltas(base, tensors, lo, span, seeds, active, norm, bad=None):
    """reference.della_deltas in one kernel (csrc/masks_della.cu della_deltas_kernel): per (row, model) one
    block forms t - base in the dtype, ranks the row by a shared-memory histogram of its magnitude keys, draws
    with the Philox uniforms of the Triton backend's keep_with_probabilities (seeds[i] per model), writes the
    masked delta and the row's norm terms ([rows, 2, N]). NaN/Inf deltas set ``bad`` (the caller reads it);
    without one, one host read of its own flag here."""
    N = len(tensors)
    outs = torch.empty((N,) + tuple(base.shape), dtype=base.dtype, device=base.device)
    n = base.shape[-1] if base.dim() else 1
    rows = base.numel() // n
    parts = torch.empty((rows, 2, N), dtype=torch.float32, device=base.device) if norm is not None else None
    caller_reads = bad is not None
    if not caller_reads:
        bad = torch.zeros(1, dtype=torch.int32, device=base.device)
    if base.numel():
        ts = [t.contiguous() for t in tensors]
        load_extension().masks_della_deltas(
            [t.data_ptr() for t in ts], [o.data_ptr() for o in outs], base.contiguous().data_ptr(), rows, n,
            list(lo), list(span), list(seeds), sum(1 << i for i, a in enumerate(active) if a),
            NORM_CODE[norm], parts.data_ptr() if parts is not None else 0, N, bad.data_ptr(),
            dtype_code(base.dtype), stream_ptr(base))
        if not caller_reads and int(bad.item()):
            raise_nonfinite(base, ts)
            raise ValueError("della_deltas: the kernel flagged NaN/Inf in finite inputs")  # a kernel bug
    return outs, parts


NORM_CODE = {None: 0, "l1": 1, "l2": 2, "linf": 3}  # csrc/masks_della.cu's norm argument


@register("della_magprune", "cuda", dtypes=KERNEL_DTYPES, supports=_della_supports)
def della_magprune(t: torch.Tensor, density: float, epsilon: float, rescale_norm, generator) -> torch.Tensor:
    """Ranks by csrc/masks_della.cu (the reference's probabilities, bit for bit), then the Triton backend's
    Philox draw (through dispatch) with a seed drawn the same way: a generator state keeps the same entries as
    the reference and Triton backends."""
    x = t.contiguous()
    kept = dispatch("keep_with_probabilities", "triton", x, della_probabilities(x, density, epsilon),
                    reference.draw_seed(generator))
    return reference.rescale_masked(t, kept.view(t.shape), rescale_norm, op="della_magprune")


# ---------------------------------------------------------------- the selection (csrc/masks_select.cu)

# Entries per chunk of the select's last pass (the tie-locating granularity; per-chunk counts cost rows x
# chunks x 1 KiB). A module attribute so tests can force many chunks on small tensors.
SELECT_CHUNK = 16384
SELECT_MAX_CHUNKS = 8192
MAGNITUDE, ORDER = 0, 1  # csrc/masks_select.cu Mode


def _select_chunk(n: int) -> int:
    chunk = SELECT_CHUNK
    while -(-n // chunk) > SELECT_MAX_CHUNKS:
        chunk *= 2
    return chunk


def launch_select(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor],
                  rows: Sequence[Tuple[int, int, bool, int]], *, mode: int, out_k: torch.Tensor, out_j: torch.Tensor,
                  k_shift: int) -> None:
    """csrc/masks_select.cu's edges, written on the device (nothing is read back).

    inputs: up to 8 contiguous tensors of one float dtype and n < 2**31 entries; base: None or like them (keys
    of t - base, rounded to the dtype, for mode MAGNITUDE). rows: (input, p, later_first, slot) with
    1 <= p < n. Writes, at out_k[slot] / out_j[slot] (int32), K >> k_shift and the flat index J of the edge
    (see masks.select_edges). The kernel's keys are 32-bit unsigned: MAGNITUDE |d|'s bits, ORDER the values'
    bits mapped to unsigned order (-0.0 as +0.0), 16-bit dtypes shifted up by 16.
    """
    ext = load_extension()
    x0 = inputs[0]
    n, dev = x0.numel(), x0.device
    chunk = _select_chunk(n)
    nchunks = -(-n // chunk)
    # one scratch allocation: state int64 [rows, 4], then the histogram [rows, 256] (zeroed by the launcher) and
    # the last pass's per-chunk counts [rows, nchunks, 256], int32
    nrows = len(rows)
    scratch = torch.empty(nrows * (8 + 256 + nchunks * 256), dtype=torch.int32, device=dev)
    state = scratch.data_ptr()
    hist = state + nrows * 8 * 4
    counts = hist + nrows * 256 * 4
    ext.masks_select_edges([t.data_ptr() for t in inputs], base.data_ptr() if base is not None else 0, n,
                           [r[0] for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows],
                           [r[3] for r in rows], mode, dtype_code(x0.dtype), state, hist, counts, chunk,
                           out_k.data_ptr(), out_j.data_ptr(), k_shift, stream_ptr(x0))


@register("select_edges", "cuda", tensor="inputs", dtypes=KERNEL_DTYPES, limits={"numel": 2**31 - 1, "inputs": 8})
def select_edges(inputs, base, rows, magnitude, out):
    """The edges in the masks family's keys (the dtype's own width, signed order keys): 16-bit keys come back
    from the kernel's upper half (k_shift 16); order keys are mapped from unsigned to signed on the device."""
    ts = [t.contiguous() for t in inputs]
    width = 32 if ts[0].dtype == torch.float32 else 16
    for group in _launch_groups(rows):
        launch_select(ts, base.contiguous() if base is not None else None, group,
                      mode=MAGNITUDE if magnitude else ORDER, out_k=out[0], out_j=out[1], k_shift=32 - width)
    if not magnitude:
        # unsigned order u -> signed key: u - 2**(w-1) for positives, u - 2**(w-1) + 1 for negatives (whose bits
        # were inverted, so that -x has the key -|x|)
        half = 1 << (width - 1)
        u = out[0].long() & ((1 << width) - 1)
        searched = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
        searched[[r[3] for r in rows]] = True
        out[0] = torch.where(searched, u - half + (u < half).long(), out[0].long()).to(torch.int32)


def _launch_groups(rows: Sequence[Tuple[int, int, bool, int]]) -> List[list]:
    """The rows split into launches the kernel takes: at most 16 rows, at most 2 of them on one input (a merge's
    band start and end)."""
    groups: List[list] = []
    for row in rows:
        for group in groups:
            if len(group) < 16 and sum(r[0] == row[0] for r in group) < 2:
                group.append(row)
                break
        else:
            groups.append([row])
    return groups


def _select_whole(x: torch.Tensor, k: int, *, mode: int, values: bool, bad: torch.Tensor) -> torch.Tensor:
    """x flat contiguous, 1 <= k < n: keep the k largest keys (ties to the lower index); int8 mask or values.
    bad (int32 [1], zero) becomes 1 if x holds NaN/Inf, seen by the write pass (no read of its own)."""
    edge = torch.empty(2, dtype=torch.int32, device=x.device)
    launch_select([x], None, [(0, k, False, 0)], mode=mode, out_k=edge[:1], out_j=edge[1:], k_shift=0)
    out = torch.empty(x.shape, dtype=x.dtype if values else torch.int8, device=x.device)
    load_extension().masks_select_write(x.data_ptr(), out.data_ptr(), x.numel(), mode, int(values),
                                        dtype_code(x.dtype), edge[:1].data_ptr(), edge[1:].data_ptr(),
                                        bad.data_ptr(), stream_ptr(x))
    return out


def _finite_or_raise(name: str, t: torch.Tensor, bad: Optional[torch.Tensor]) -> None:
    """The front end's finiteness check, done by the kernel's flag (one host read) where there is one."""
    if bad is None or int(bad.item()):
        check_finite(name, t)  # counts the bad entries and raises with the argument's name
    if bad is not None and int(bad.item()):
        raise ValueError(f"{name} contains NaN/Inf values; it must be finite")


def validates_finite(fn):
    """Mark a backend function that checks its input for NaN/Inf itself (the front end then skips its read)."""
    fn.validates_finite = True
    return fn


def _whole_tensor_only(scores: torch.Tensor, k: int, dim) -> List[str]:
    if dim is not None:
        return ["the CUDA select kernel ranks whole tensors (dim=None); per-slice top-k is the Triton backend's"]
    return []


@register("topk_mask", "cuda", dtypes=KERNEL_DTYPES, limits=INT32_LIMIT, supports=_whole_tensor_only)
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


@register("magnitude_prune", "cuda", dtypes=KERNEL_DTYPES, limits=INT32_LIMIT)
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
    return reference.rescale_masked(t, masked.view(t.shape), rescale_norm, op="magnitude_prune")
