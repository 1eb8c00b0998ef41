"""Triton kernels for the mask ops: N:M, the selection (select_edges, top-k, magnitude), DARE, DELLA.

* selection: order-preserving int32 keys in the dtype's width (ops/_triton_common.py; of |x| for magnitude).
  ``select_edges`` finds band edges over whole tensors by a radix select over 8-bit digits (4 passes for fp32,
  2 for fp16 / bf16, each one read; the digit is picked on the device) and locates the tie at the edge from
  the last pass's per-block counts. Whole-tensor top-k and magnitude are an edge plus one write pass; tensors
  up to SINGLE_PROGRAM_MAX elements, and every per-row selection, use one program per row instead: the row is
  read once and the k-th key is found by a 32-step bitwise binary search on counts. On a GPU with the
  extension, 'auto' prefers the CUDA backend's selection (cuda.py, csrc/masks_select.cu: shared-memory
  histograms, all rows of a merge in one read); this path serves CPUs, per-row selections and GPUs without
  the extension.
* DARE: one read, one write; counter-based Philox (one call per 4 elements), the counter being the flat
  index, so a seed reproduces the draw whatever the launch configuration. The reference computes the same
  Philox stream in torch (reference.philox_uniforms): a seed keeps the same entries on every backend.
* DELLA: one program per row sorts (magnitude key, column) pairs once, takes mean ranks of equal magnitudes
  from two segmented scans, and draws, masks and writes in the same pass; rows longer than DELLA_SORT_MAX
  are ranked by torch and drawn by a fused elementwise kernel. On a GPU the CUDA backend (cuda.py) ranks rows
  without sorting in registers and draws with the same kernel. Every path forms p with the reference's fp32
  roundings (no FMA contraction) and draws the reference's uniforms, so a seed gives the same entries on all.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._dispatch import register
from .._triton_common import magnitude_key, order_key, round_to
from . import reference


@triton.jit
def _nm_mask_kernel(x_ptr, out_ptr, n_groups, N: tl.constexpr, M: tl.constexpr, M_POW2: tl.constexpr,
                    BLOCK_G: tl.constexpr):
    # One row of the tile per group. An entry is kept iff fewer than N entries of its group rank above it,
    # where j ranks above i when x_j > x_i, or x_j == x_i and j < i (the stable order of the reference).
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    i = tl.arange(0, M_POW2)
    g_ok = g < n_groups
    valid = g_ok[:, None] & (i[None, :] < M)
    base = g * M
    x = tl.load(x_ptr + base[:, None] + i[None, :], mask=valid, other=0.0).to(tl.float32)
    rank = tl.zeros((BLOCK_G, M_POW2), dtype=tl.int32)
    for j in tl.static_range(M):
        xj = tl.load(x_ptr + base + j, mask=g_ok, other=0.0).to(tl.float32)[:, None]
        above = (xj > x) | ((xj == x) & (j < i[None, :]))
        rank += above.to(tl.int32)
    keep = (rank < N).to(tl.int8)
    tl.store(out_ptr + base[:, None] + i[None, :], keep, mask=valid)


@register("nm_mask", "triton", dtypes=(torch.float32, torch.float16, torch.bfloat16))
def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    x = scores.contiguous()
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    n_groups = x.numel() // m
    if n_groups == 0:
        return out.view(torch.bool)
    block_g = max(1, min(256, 4096 // triton.next_power_of_2(m)))
    grid = (triton.cdiv(n_groups, block_g),)
    _nm_mask_kernel[grid](x, out, n_groups, N=n, M=m, M_POW2=triton.next_power_of_2(m), BLOCK_G=block_g)
    return out.view(torch.bool)


# ---------------------------------------------------------------- declarations

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_LIMIT = {"numel": 2**31 - 1}  # flat indices are int32 in the selection's edges


def _tuned(key, warps):
    """Autotune num_warps on a GPU (for idempotent kernels only: each trial rewrites the whole output);
    under Triton's interpreter the kernel runs as is."""
    def deco(kernel):
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return kernel
        return triton.autotune([triton.Config({}, num_warps=w) for w in warps], key=key)(kernel)
    return deco


@triton.jit
def _key(x, MAGNITUDE: tl.constexpr):
    """The selection key of x (see ops/_triton_common.py): of |x| for magnitude, of x for top-k."""
    if MAGNITUDE:
        k = magnitude_key(x)
    else:
        k = order_key(x)
    return k


# ---------------------------------------------------------------- top-k: one row per program

@_tuned(key=["BLOCK", "SINGLE", "MAGNITUDE", "WRITE_VALUES"], warps=(2, 4, 8, 16))
@triton.jit
def _topk_rows_kernel(x_ptr, out_ptr, n, k, MAGNITUDE: tl.constexpr, WRITE_VALUES: tl.constexpr,
                      BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """Per row of n: the k-th largest key T by a bitwise binary search (32 counting steps over the row),
    then keep key > T plus the first k - #(key > T) entries equal to T (lowest index first).

    SINGLE: the row fits in one block and is read once; else each step streams the row in chunks.
    WRITE_VALUES: write x where kept, 0 elsewhere (magnitude); else an int8 0/1 mask.
    """
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        valid = offs < n
        x = tl.load(x_ptr + base + offs, mask=valid, other=0.0)
        key = _key(x, MAGNITUDE)
    thr = tl.full((), -2147483648, tl.int64)
    for b in tl.static_range(32):
        cand = (thr + (1 << (31 - b))).to(tl.int32)
        if SINGLE:
            cnt = tl.sum(((key >= cand) & valid).to(tl.int32), axis=0)
        else:
            cnt = tl.zeros((), tl.int32)
            start = 0
            while start < n:
                o = start + offs
                start += BLOCK
                v = o < n
                kk = _key(tl.load(x_ptr + base + o, mask=v, other=0.0), MAGNITUDE)
                cnt += tl.sum(((kk >= cand) & v).to(tl.int32), axis=0)
        thr = tl.where(cnt >= k, cand.to(tl.int64), thr)
    t32 = thr.to(tl.int32)
    if SINGLE:
        above = (key > t32) & valid
        need = k - tl.sum(above.to(tl.int32), axis=0)
        tie = (key == t32) & valid
        before = tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)
        keep = above | (tie & (before < need))
        if WRITE_VALUES:
            tl.store(out_ptr + base + offs, tl.where(keep, x, 0.0), mask=valid)
        else:
            tl.store(out_ptr + base + offs, keep.to(tl.int8), mask=valid)
    else:
        gt = tl.zeros((), tl.int32)
        start = 0
        while start < n:
            o = start + offs
            start += BLOCK
            v = o < n
            kk = _key(tl.load(x_ptr + base + o, mask=v, other=0.0), MAGNITUDE)
            gt += tl.sum(((kk > t32) & v).to(tl.int32), axis=0)
        need = k - gt
        seen = tl.zeros((), tl.int32)
        start = 0
        while start < n:
            o = start + offs
            start += BLOCK
            v = o < n
            xx = tl.load(x_ptr + base + o, mask=v, other=0.0)
            kk = _key(xx, MAGNITUDE)
            tie = (kk == t32) & v
            before = seen + tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)
            keep = ((kk > t32) & v) | (tie & (before < need))
            seen += tl.sum(tie.to(tl.int32), axis=0)
            if WRITE_VALUES:
                tl.store(out_ptr + base + o, tl.where(keep, xx, 0.0), mask=v)
            else:
                tl.store(out_ptr + base + o, keep.to(tl.int8), mask=v)


# Whole-tensor selections up to this many elements run in one program (one read); larger ones find their edge
# with select_edges. A module attribute so tests can force the radix path on small tensors.
SINGLE_PROGRAM_MAX = 16384
_ROW_BLOCK_MAX = 16384


def _select_rows(x: torch.Tensor, k: int, *, magnitude: bool, values: bool) -> torch.Tensor:
    """x [rows, n] contiguous: per row keep the k largest (of |x| with magnitude); int8 mask or masked values."""
    rows, n = x.shape
    out = torch.empty(x.shape, dtype=x.dtype if values else torch.int8, device=x.device)
    if x.numel() == 0:
        return out
    block = min(max(16, triton.next_power_of_2(n)), _ROW_BLOCK_MAX)
    _topk_rows_kernel[(rows,)](x, out, n, k, MAGNITUDE=magnitude, WRITE_VALUES=values, BLOCK=block,
                               SINGLE=n <= block)
    return out


# ---------------------------------------------------------------- select_edges: radix select over whole tensors

# Entries per program of the digit passes, which is also the granularity at which ties are located. A module
# attribute so tests can force many blocks on small tensors.
SELECT_BLOCK = 4096
_BINS = 256
_CUMSUM_BLOCK = 1024  # blocks' counts scanned per step when the tie is located


@triton.jit
def _edge_key(t_ptr, base_ptr, o, m, MAGNITUDE: tl.constexpr, HAS_BASE: tl.constexpr, WIDTH: tl.constexpr):
    """The key of entries o (of t, or of t - base rounded to t's dtype), offset by 2**(WIDTH-1) into
    [0, 2**WIDTH) as an int64, so that its 8-bit digits from the top order it."""
    x = tl.load(t_ptr + o, mask=m, other=0.0)
    if HAS_BASE:
        b = tl.load(base_ptr + o, mask=m, other=0.0)
        d = round_to(x.to(tl.float32) - b.to(tl.float32), x.dtype).to(x.dtype)
    else:
        d = x
    return _key(d, MAGNITUDE).to(tl.int64) + (1 << (WIDTH - 1))


@triton.jit
def _edge_hist_kernel(t_ptr, base_ptr, n, state_ptr, counts_ptr, shift, FIRST: tl.constexpr,
                      MAGNITUDE: tl.constexpr, HAS_BASE: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """counts[block, 256]: this block's histogram of the 8-bit digit at ``shift`` among the entries whose
    higher digits equal the prefix chosen so far (state[0]; none before the first pass)."""
    pid = tl.program_id(0)
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    u = _edge_key(t_ptr, base_ptr, o, m, MAGNITUDE, HAS_BASE, WIDTH)
    if FIRST:
        prefix = tl.zeros((), tl.int64)
    else:
        prefix = tl.load(state_ptr)
    match = m & ((u >> (shift + 8)) == prefix)
    digit = ((u >> shift) & 255).to(tl.int32)
    tl.store(counts_ptr + pid * 256 + tl.arange(0, 256), tl.histogram(digit, 256, mask=match))


@triton.jit
def _edge_pick_kernel(hist_ptr, state_ptr, p, FIRST: tl.constexpr):
    """Pick the digit holding the rem-th largest remaining entry (rem = p on the first pass):
    state = [prefix, rem, ties] becomes [prefix * 256 + digit, rank inside the digit, its count]."""
    b = tl.arange(0, 256)
    h = tl.load(hist_ptr + b).to(tl.int64)
    if FIRST:
        rem = tl.full((), p, tl.int64)
        prefix = tl.zeros((), tl.int64)
    else:
        rem = tl.load(state_ptr + 1)
        prefix = tl.load(state_ptr)
    at_or_above = tl.cumsum(h, axis=0, reverse=True)
    chosen = tl.max(tl.where(at_or_above >= rem, b, -1), axis=0)
    sel = b == chosen
    above = tl.sum(tl.where(sel, at_or_above - h, 0), axis=0)
    tl.store(state_ptr, (prefix << 8) | chosen.to(tl.int64))
    tl.store(state_ptr + 1, rem - above)
    tl.store(state_ptr + 2, tl.sum(tl.where(sel, h, 0), axis=0))


@triton.jit
def _edge_locate_kernel(t_ptr, base_ptr, n, state_ptr, counts_ptr, nblocks, out_ptr, out_stride, slot,
                        LATER_FIRST: tl.constexpr, MAGNITUDE: tl.constexpr, HAS_BASE: tl.constexpr,
                        WIDTH: tl.constexpr, BLOCK: tl.constexpr, CUMSUM_BLOCK: tl.constexpr):
    """The edge (K, J) from the final state: J is the flat index of the equal entry of 0-based rank j in index
    order (j = rem, or ties - rem with LATER_FIRST), n when there is none. The last pass's per-block counts of
    K's digit give the block holding it and its rank inside; one scan of that block gives its index."""
    u_key = tl.load(state_ptr)
    rem = tl.load(state_ptr + 1)
    ties = tl.load(state_ptr + 2)
    if LATER_FIRST:
        j = ties - rem
    else:
        j = rem
    digit = (u_key & 255).to(tl.int32)
    # blocks whose running count of equal entries stays <= j come before the one holding entry j
    blk = tl.zeros((), tl.int64)
    before = tl.zeros((), tl.int64)
    run = tl.zeros((), tl.int64)
    start = 0
    while start < nblocks:
        r = start + tl.arange(0, CUMSUM_BLOCK)
        c = tl.load(counts_ptr + r.to(tl.int64) * 256 + digit, mask=r < nblocks, other=0).to(tl.int64)
        incl = run + tl.cumsum(c, axis=0)
        done = (incl <= j) & (r < nblocks)
        blk += tl.sum(done.to(tl.int64), axis=0)
        before += tl.sum(tl.where(done, c, 0), axis=0)
        run += tl.sum(c, axis=0)
        start += CUMSUM_BLOCK
    o = blk * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tie = (m & (_edge_key(t_ptr, base_ptr, o, m, MAGNITUDE, HAS_BASE, WIDTH) == u_key)).to(tl.int64)
    hit = (tie > 0) & (tl.cumsum(tie, axis=0) - tie == j - before)
    found = tl.sum(tl.where(hit, o, 0), axis=0)
    J = tl.where(j < ties, found, n)
    tl.store(out_ptr + slot, (u_key - (1 << (WIDTH - 1))).to(tl.int32))
    tl.store(out_ptr + out_stride + slot, J.to(tl.int32))


@register("select_edges", "triton", tensor="inputs", dtypes=KERNEL_DTYPES, limits=INT32_LIMIT)
def select_edges(inputs, base, rows, magnitude, out):
    """Each row's edge by most-significant-digit radix select: per 8-bit digit one pass over its input (each
    block's histogram of the digit among the entries matching the prefix so far) and a one-program pick of
    the digit on the device; then one program locates J. Nothing is read back to the host."""
    x0 = inputs[0]
    n = x0.numel()
    width = 32 if x0.dtype == torch.float32 else 16
    nblocks = triton.cdiv(n, SELECT_BLOCK)
    counts = torch.empty((nblocks, _BINS), dtype=torch.int32, device=x0.device)
    state = torch.empty(3, dtype=torch.int64, device=x0.device)
    has_base = base is not None
    for m, p, later_first, slot in rows:
        t = inputs[m]
        flags = dict(MAGNITUDE=bool(magnitude), HAS_BASE=has_base, WIDTH=width)
        for shift in range(width - 8, -1, -8):
            first = shift == width - 8
            _edge_hist_kernel[(nblocks,)](t, base if has_base else t, n, state, counts, shift, FIRST=first,
                                          BLOCK=SELECT_BLOCK, **flags)
            _edge_pick_kernel[(1,)](counts.sum(0, dtype=torch.int64), state, p, FIRST=first)
        _edge_locate_kernel[(1,)](t, base if has_base else t, n, state, counts, nblocks, out, out.stride(0), slot,
                                  LATER_FIRST=bool(later_first), BLOCK=SELECT_BLOCK, CUMSUM_BLOCK=_CUMSUM_BLOCK,
                                  **flags)


@triton.jit
def _edge_write_kernel(x_ptr, out_ptr, n, edge_ptr, MAGNITUDE: tl.constexpr, VALUES: tl.constexpr,
                       BLOCK: tl.constexpr):
    """keep = key > K, or key == K and index < J (the edge at edge[0], edge[1]); x where kept (VALUES) or an
    int8 0/1 mask."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m, other=0.0)
    key = _key(x, MAGNITUDE)
    K = tl.load(edge_ptr)
    J = tl.load(edge_ptr + 1)
    keep = (key > K) | ((key == K) & (o < J))
    if VALUES:
        tl.store(out_ptr + o, tl.where(keep, x, 0.0), mask=m)
    else:
        tl.store(out_ptr + o, keep.to(tl.int8), mask=m)


_WRITE_BLOCK = 4096


def _select_whole(x: torch.Tensor, k: int, *, magnitude: bool, values: bool) -> torch.Tensor:
    """x flat contiguous [n], 0 < k < n: keep the k largest (of |x| with magnitude) over the whole tensor."""
    n = x.numel()
    if n <= SINGLE_PROGRAM_MAX:
        return _select_rows(x.view(1, n), k, magnitude=magnitude, values=values).view(n)
    edge = torch.empty((2, 1), dtype=torch.int32, device=x.device)
    select_edges([x], None, [(0, k, False, 0)], magnitude, edge)
    out = torch.empty(n, dtype=x.dtype if values else torch.int8, device=x.device)
    _edge_write_kernel[(triton.cdiv(n, _WRITE_BLOCK),)](x, out, n, edge, MAGNITUDE=magnitude, VALUES=values,
                                                        BLOCK=_WRITE_BLOCK, num_warps=8)
    return out


@register("topk_mask", "triton", dtypes=KERNEL_DTYPES, limits=INT32_LIMIT)
def topk_mask(scores: torch.Tensor, k: int, dim) -> torch.Tensor:
    if dim is None:
        flat = scores.contiguous().view(-1)
        if k == 0 or k >= flat.numel():
            return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
        return _select_whole(flat, k, magnitude=False, values=False).view(torch.bool).view(scores.shape)
    moved = scores.movedim(dim, -1)
    n = moved.shape[-1]
    if k == 0 or k >= n or moved.numel() == 0:
        return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
    rows = moved.contiguous().view(-1, n)
    mask = _select_rows(rows, k, magnitude=False, values=False).view(torch.bool).view(moved.shape)
    return mask.movedim(-1, dim)


@register("magnitude_prune", "triton", dtypes=KERNEL_DTYPES, limits=INT32_LIMIT)
def magnitude_prune(t: torch.Tensor, k: int, rescale_norm) -> torch.Tensor:
    flat = t.contiguous().view(-1)
    masked = flat.clone() if k >= flat.numel() else _select_whole(flat, k, magnitude=True, values=True)
    return reference.rescale_masked(t, masked.view(t.shape), rescale_norm, op="magnitude_prune")


# ---------------------------------------------------------------- DARE

@triton.jit
def _block_uniforms(seed, start, BLOCK: tl.constexpr):
    """Uniforms in [0, 1) for flat indices start .. start + BLOCK (start a multiple of 4): element e takes lane
    e % 4 of Philox4x32(seed, counter e // 4), so one Philox call serves four elements and the value of an
    element depends only on the seed and its flat index (not on the launch configuration)."""
    g = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    u0, u1, u2, u3 = tl.rand4x(seed, g)
    # join adds a minor dim: [g, i, j] holds lane 2 * i + j after the reshape
    return tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK,))


@triton.jit
def _uniform_at(seed, e):
    """The uniform of flat index e (any shape of int64 indices), equal to _block_uniforms' value for e."""
    u0, u1, u2, u3 = tl.rand4x(seed, e // 4)
    lane = e % 4
    return tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))


@triton.jit
def _dare_kernel(x_ptr, out_ptr, n, seed, p, scale, BLOCK: tl.constexpr):
    """out = x * scale (in fp32, rounded once to the dtype) where u(seed, flat index) < p, else 0: one read, one
    write, launch-independent."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    o = start + tl.arange(0, BLOCK)
    v = o < n
    x = tl.load(x_ptr + o, mask=v, other=0.0)
    keep = _block_uniforms(seed, start, BLOCK) < p
    DT = out_ptr.dtype.element_ty
    y = round_to(tl.where(keep, x.to(tl.float32) * scale, 0.0), DT)  # to nearest even, on the interpreter too
    tl.store(out_ptr + o, y.to(DT), mask=v)


_DARE_BLOCK = 4096


def dare_with_seed(t: torch.Tensor, density: float, rescale: bool, seed: int) -> torch.Tensor:
    """DARE with an explicit Philox seed (the registered op draws the seed from the generator)."""
    x = t.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        scale = 1.0 / density if rescale else 1.0
        grid = (triton.cdiv(n, _DARE_BLOCK),)
        _dare_kernel[grid](x, out, n, seed, reference.keep_probability(t.dtype, density), scale,
                           BLOCK=_DARE_BLOCK, num_warps=8, enable_fp_fusion=False)
    return out.view(t.shape)


@register("dare", "triton", dtypes=KERNEL_DTYPES, limits=INT32_LIMIT)
def dare(t: torch.Tensor, density: float, rescale: bool, generator) -> torch.Tensor:
    return dare_with_seed(t, density, rescale, reference.draw_seed(generator))


# ---------------------------------------------------------------- DELLA

@triton.jit
def _same_key_run(ka, ca, kb, cb):
    # segmented count over a sorted sequence: the right part's trailing run extends into the left's
    return kb, cb + tl.where(ka == kb, ca, 0)


@_tuned(key=["ROW_BLOCK", "WIDE"], warps=(4, 8, 16))
@triton.jit
def _della_rows_kernel(x_ptr, out_ptr, n, seed, lo, span, inv_nm1, frac0, ROW_BLOCK: tl.constexpr,
                       WIDE: tl.constexpr):
    """One row per program: sort (magnitude key, column) pairs once, take each entry's mean rank among
    equal magnitudes from two segmented scans, p = clamp(lo + span * rank / (n - 1)), keep where
    u(seed, flat index) < p; written back at the original columns."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    j = tl.arange(0, ROW_BLOCK)
    valid = j < n
    x = tl.load(x_ptr + base + j, mask=valid, other=0.0)
    if WIDE:  # fp32: 31-bit magnitude key above a 32-bit column
        mag = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        packed = tl.where(valid, (mag.to(tl.int64) << 32) | j.to(tl.int64), 9223372036854775807)
        srt = tl.sort(packed)
        key = srt >> 32
        col = (srt & 0xFFFFFFFF).to(tl.int32)
    else:  # 16-bit floats: 15-bit magnitude key above a 16-bit column fits an int32
        mag = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        packed = tl.where(valid, (mag << 16) | j, 2147483647)
        srt = tl.sort(packed)
        key = srt >> 16
        col = srt & 0xFFFF
    one = tl.full((ROW_BLOCK,), 1, tl.int32)
    _, run_before = tl.associative_scan((key, one), 0, _same_key_run)
    _, run_after = tl.associative_scan((key, one), 0, _same_key_run, reverse=True)
    # ranks j - run_before + 1 .. j + run_after - 1 share one magnitude: take their mean
    mean_rank = (2 * j - run_before + run_after).to(tl.float32) * 0.5
    # rank / (n - 1); a single column (inv_nm1 = 0) sits in the middle (frac0 = 1/2)
    p = tl.minimum(tl.maximum(lo + span * (mean_rank * inv_nm1 + frac0), 0.0), 1.0)
    ok = j < n
    keep = (_uniform_at(seed, base + col) < p) & ok
    xv = tl.load(x_ptr + base + col, mask=ok, other=0.0)
    tl.store(out_ptr + base + col, tl.where(keep, xv, 0.0), mask=ok)


@triton.jit
def _bernoulli_keep_kernel(x_ptr, p_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
    """out = x where u(seed, flat index) < p, else 0 (the DELLA path for rows too long to sort)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    o = start + tl.arange(0, BLOCK)
    v = o < n
    x = tl.load(x_ptr + o, mask=v, other=0.0)
    p = tl.load(p_ptr + o, mask=v, other=0.0)
    tl.store(out_ptr + o, tl.where(_block_uniforms(seed, start, BLOCK) < p, x, 0.0), mask=v)


# Longer rows are ranked by torch (one sort), then drawn by the fused kernel: the in-register sort falls off a
# performance cliff past 8192 entries (BENCHMARKS.md).
DELLA_SORT_MAX = 8192


def della_with_seed(t: torch.Tensor, density: float, epsilon: float, rescale_norm, seed: int) -> torch.Tensor:
    """DELLA with an explicit Philox seed (the registered op draws it from the generator)."""
    x = t.contiguous()
    n = x.shape[-1] if x.dim() else 1
    out = torch.empty_like(x)
    if x.numel():
        rows = x.numel() // n
        lo, span = density - epsilon, 2.0 * epsilon
        # float32 rows padded to a power of two missed the reference ranks on the GPU while the same kernel
        # passed unpadded: such rows take the torch-ranked path until that is understood
        padded_fp32 = x.dtype == torch.float32 and n & (n - 1) != 0
        if n <= DELLA_SORT_MAX and not padded_fp32:
            block = max(16, triton.next_power_of_2(n))
            inv_nm1, frac0 = (reference.della_inv_nm1(n), 0.0) if n > 1 else (0.0, 0.5)
            # the reference's roundings (no multiply-add contracted into an FMA): the same p, so the same draw
            _della_rows_kernel[(rows,)](x, out, n, seed, lo, span, inv_nm1, frac0, ROW_BLOCK=block,
                                        WIDE=x.dtype == torch.float32, enable_fp_fusion=False)
        else:
            keep_with_probabilities(x, reference.della_probabilities(x, density, epsilon), seed, out=out)
    out = out.view(t.shape)
    return reference.rescale_masked(t, out, rescale_norm, op="della_magprune")


@register("keep_with_probabilities", "triton", dtypes=KERNEL_DTYPES, limits=INT32_LIMIT)
def keep_with_probabilities(x: torch.Tensor, probs: torch.Tensor, seed: int, out=None) -> torch.Tensor:
    """x where u(seed, flat index) < probs, else 0 (x contiguous, probs fp32 of x's shape; written into ``out``
    when given): the draw of every DELLA path, so one seed gives one result whichever backend ranked the rows."""
    out = torch.empty_like(x) if out is None else out
    if x.numel():
        grid = (triton.cdiv(x.numel(), _DARE_BLOCK),)
        _bernoulli_keep_kernel[grid](x, probs.contiguous(), out, x.numel(), seed, BLOCK=_DARE_BLOCK, num_warps=8)
    return out


@register("della_magprune", "triton", dtypes=KERNEL_DTYPES, limits=INT32_LIMIT)
def della_magprune(t: torch.Tensor, density: float, epsilon: float, rescale_norm, generator) -> torch.Tensor:
    return della_with_seed(t, density, epsilon, rescale_norm, reference.draw_seed(generator))


@register("della_deltas", "triton", dtypes=KERNEL_DTYPES, limits=INT32_LIMIT)
def della_deltas(base, tensors, lo, span, seeds, active, norm, bad=None):
    """reference.della_deltas with the documented Philox draw: the deltas are materialised (checked finite, so
    ``bad`` is never set) and each active one is drawn by keep_with_probabilities on the reference's
    probabilities."""
    deltas = reference.task_vectors(base, tensors)
    for i, d in enumerate(deltas):
        if active[i]:
            probs = reference.della_probabilities_between(d, lo[i], span[i])
            deltas[i] = keep_with_probabilities(d.contiguous(), probs, seeds[i]).view(d.shape)
    return reference.stack_with_norm_terms(base, tensors, deltas, norm)


@triton.jit
def _uniforms_kernel(out_ptr, n, seed, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    o = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + o, _block_uniforms(seed, start, BLOCK), mask=o < n)


def philox_uniforms(seed: int, n: int, device) -> torch.Tensor:
    """The uniforms in [0, 1) the random kernels draw for flat indices 0 .. n-1 with this seed (float32 [n]):
    DARE keeps entry i iff u[i] < p, DELLA iff u[i] < p_i. For tests and for reproducing a draw."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        _uniforms_kernel[(triton.cdiv(n, _DARE_BLOCK),)](out, n, seed, BLOCK=_DARE_BLOCK)
    return out
