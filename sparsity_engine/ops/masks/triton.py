"""Triton kernels for the mask ops: N:M, top-k / magnitude threshold selection, DARE, DELLA.

* top-k (whole tensor): order-preserving int32 keys of the fp32-upcast values (of |x| for magnitude), a radix
  select over 8-bit digits (4 histogram passes for fp32, 3 for fp16, 2 for bf16; the prefix stays on the
  device), then one pass that writes the mask or the masked tensor; ties at the threshold go to the lower
  flat index through per-block tie counts and an exclusive scan (that pass runs only when ties must split).
  Tensors up to SINGLE_PROGRAM_MAX elements, and every per-row selection, use one program per row: the row
  is read once and the k-th key is found by a 32-step bitwise binary search on counts. On a GPU with the
  extension, 'auto' sends whole-tensor selections to the CUDA backend (cuda.py, csrc/select.cu: shared-memory
  histograms, 2.0-2.5x faster than these passes on an H200); this path serves CPUs and per-row selections.
* DARE: one read, one write; counter-based Philox (one call per 4 elements), the counter being the flat
  index, so a seed reproduces the draw whatever the launch configuration.
* DELLA: one program per row sorts (magnitude key, column) pairs once, takes mean ranks of equal magnitudes
  from two segmented scans, and draws, masks and writes in the same pass; rows longer than DELLA_SORT_MAX
  are ranked by torch and drawn by a fused elementwise kernel. On a GPU the CUDA backend (cuda.py) ranks rows
  without sorting in registers and draws with the same kernel, so a seed gives the same entries on both.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._dispatch import register
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


@register("nm_mask", "triton")
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


# ---------------------------------------------------------------- shared helpers

_INT32_LIMIT = 2**31 - 1


def _kernel_reasons(t: torch.Tensor) -> list:
    reasons = []
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {str(t.dtype).replace('torch.', '')} is not supported by the Triton kernels "
                       "(float32, float16, bfloat16 are)")
    if t.numel() > _INT32_LIMIT:
        reasons.append(f"{t.numel()} elements exceed the Triton kernels' 2**31 - 1 limit")
    return reasons


def _supports_first(*args, **kwargs):
    return _kernel_reasons(args[0])


@triton.jit
def _order_key(x, ABS: tl.constexpr):
    """int32 key with the order of the float values (of |x| when ABS); -0.0 and +0.0 get the same key."""
    xf = x.to(tl.float32)
    xf = tl.where(xf == 0.0, 0.0, xf)
    bits = xf.to(tl.int32, bitcast=True)
    if ABS:
        return bits & 0x7FFFFFFF
    # negative floats map to minus their magnitude bits: a larger float gets a larger signed integer, and
    # the low bits that a 16-bit float leaves zero in its fp32 upcast stay zero (two radix digits decide)
    return tl.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


# ---------------------------------------------------------------- top-k select: one row per program

def _tuned(key, warps):
    """Autotune num_warps on a GPU (for idempotent kernels only: each trial rewrites the whole output);
    under Triton's interpreter the kernel runs as is."""
    def deco(kernel):
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return kernel
        return triton.autotune([triton.Config({}, num_warps=w) for w in warps], key=key)(kernel)
    return deco


@_tuned(key=["BLOCK", "SINGLE", "ABS", "WRITE_VALUES"], warps=(2, 4, 8, 16))
@triton.jit
def _topk_rows_kernel(x_ptr, out_ptr, n, k, ABS: tl.constexpr, WRITE_VALUES: tl.constexpr,
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
        key = _order_key(x, ABS)
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
                kk = _order_key(tl.load(x_ptr + base + o, mask=v, other=0.0), ABS)
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
            kk = _order_key(tl.load(x_ptr + base + o, mask=v, other=0.0), ABS)
            gt += tl.sum(((kk > t32) & v).to(tl.int32), axis=0)
        need = k - gt
        seen = tl.zeros((), tl.int32)
        start = 0
        while start < n:
            o = start + offs
            start += BLOCK
            v = o < n
            xx = tl.load(x_ptr + base + o, mask=v, other=0.0)
            kk = _order_key(xx, ABS)
            tie = (kk == t32) & v
            before = seen + tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)
            keep = ((kk > t32) & v) | (tie & (before < need))
            seen += tl.sum(tie.to(tl.int32), axis=0)
            if WRITE_VALUES:
                tl.store(out_ptr + base + o, tl.where(keep, xx, 0.0), mask=v)
            else:
                tl.store(out_ptr + base + o, keep.to(tl.int8), mask=v)


# ---------------------------------------------------------------- top-k select: whole tensor, radix passes

# 8-bit digits of the 32-bit key, most significant first: tl.histogram costs grow with the bin count (2048
# bins made each pass ~15x slower than a read on an H100); bf16 / fp16 keys are decided by 2 / 3 digits
_DIGITS = {torch.float32: (8, 8, 8, 8), torch.float16: (8, 8, 8), torch.bfloat16: (8, 8)}
_NBINS = 256
_HIST_BLOCK = 4096
_WRITE_BLOCK = 4096


@triton.jit
def _radix_hist_kernel(x_ptr, hist_ptr, state_ptr, n, n_iters, nprog, ABS: tl.constexpr, SHIFT: tl.constexpr,
                       DIGIT_BITS: tl.constexpr, NBINS: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of one digit (bits SHIFT .. SHIFT+DIGIT_BITS of the unsigned key) over the entries whose
    higher digits equal the prefix chosen so far (state[0]); each program loops over blocks and adds its
    private histogram to the global one once."""
    pid = tl.program_id(0)
    prefix = tl.load(state_ptr)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((NBINS,), tl.int32)
    it = 0
    while it < n_iters:  # a while loop: Triton's interpreter cannot range() over a runtime bound
        o = (pid + it * nprog).to(tl.int64) * BLOCK + offs
        it += 1
        v = o < n
        u = _order_key(tl.load(x_ptr + o, mask=v, other=0.0), ABS).to(tl.int64) + 2147483648
        match = v & ((u >> (SHIFT + DIGIT_BITS)) == prefix)
        digit = ((u >> SHIFT) & ((1 << DIGIT_BITS) - 1)).to(tl.int32)
        acc += tl.histogram(digit, NBINS, mask=match)
    tl.atomic_add(hist_ptr + tl.arange(0, NBINS), acc)


@triton.jit
def _radix_select_kernel(hist_ptr, state_ptr, DIGIT_BITS: tl.constexpr, NBINS: tl.constexpr):
    """Pick the digit holding the k-th largest remaining entry: state = [prefix, k_left, n_equal].
    Zeroes the histogram for the next pass."""
    b = tl.arange(0, NBINS)
    h = tl.load(hist_ptr + b).to(tl.int64)
    k_left = tl.load(state_ptr + 1)
    at_or_above = tl.cumsum(h, axis=0, reverse=True)
    chosen = tl.max(tl.where(at_or_above >= k_left, b, -1), axis=0)
    sel = b == chosen
    above = tl.sum(tl.where(sel, at_or_above - h, 0), axis=0)
    equal = tl.sum(tl.where(sel, h, 0), axis=0)
    prefix = tl.load(state_ptr)
    tl.store(state_ptr, (prefix << DIGIT_BITS) | chosen.to(tl.int64))
    tl.store(state_ptr + 1, k_left - above)
    tl.store(state_ptr + 2, equal)
    tl.store(hist_ptr + b, tl.zeros((NBINS,), tl.int32))


@triton.jit
def _tie_count_kernel(x_ptr, counts_ptr, n, thr, ABS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = o < n
    u = _order_key(tl.load(x_ptr + o, mask=v, other=0.0), ABS).to(tl.int64) + 2147483648
    tl.store(counts_ptr + pid, tl.sum(((u == thr) & v).to(tl.int32), axis=0))


@triton.jit
def _threshold_write_kernel(x_ptr, out_ptr, ties_before_ptr, n, thr, need, ABS: tl.constexpr,
                            TIES: tl.constexpr, WRITE_VALUES: tl.constexpr, BLOCK: tl.constexpr):
    """keep = key > thr, plus (TIES) the entries equal to thr whose global tie index is < need."""
    pid = tl.program_id(0)
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = o < n
    x = tl.load(x_ptr + o, mask=v, other=0.0)
    u = _order_key(x, ABS).to(tl.int64) + 2147483648
    if TIES:
        tie = ((u == thr) & v).to(tl.int32)
        rank = tl.load(ties_before_ptr + pid) + tl.cumsum(tie, axis=0) - tie
        keep = (u > thr) | ((tie > 0) & (rank < need))
    else:
        keep = u >= thr
    if WRITE_VALUES:
        tl.store(out_ptr + o, tl.where(keep, x, 0.0), mask=v)
    else:
        tl.store(out_ptr + o, keep.to(tl.int8), mask=v)


# Whole-tensor selections up to this many elements run in one program (one read); larger ones use the
# radix passes. A module attribute so tests can force the radix path on small tensors.
SINGLE_PROGRAM_MAX = 16384
_ROW_BLOCK_MAX = 16384


def _num_programs(device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _select_rows(x: torch.Tensor, k: int, *, abs_: bool, values: bool) -> torch.Tensor:
    """x [rows, n] contiguous: per row keep the k largest (of |x| when abs_); int8 mask or masked values."""
    rows, n = x.shape
    out = torch.empty(x.shape, dtype=x.dtype if values else torch.int8, device=x.device)
    if x.numel() == 0:
        return out
    block = min(max(16, triton.next_power_of_2(n)), _ROW_BLOCK_MAX)
    _topk_rows_kernel[(rows,)](x, out, n, k, ABS=abs_, WRITE_VALUES=values, BLOCK=block, SINGLE=n <= block)
    return out


def _select_whole(x: torch.Tensor, k: int, *, abs_: bool, values: bool) -> torch.Tensor:
    """x flat contiguous [n]: keep the k largest (of |x| when abs_) over the whole tensor."""
    n = x.numel()
    if n <= SINGLE_PROGRAM_MAX:
        return _select_rows(x.view(1, n), k, abs_=abs_, values=values).view(n)
    # 16-bit floats upcast exactly to fp32 keys whose low 16 (bf16) / 13 (fp16) bits are zero
    digits = _DIGITS[x.dtype]
    state = torch.tensor([0, k, 0], dtype=torch.int64, device=x.device)
    hist = torch.zeros(_NBINS, dtype=torch.int32, device=x.device)
    n_blocks = triton.cdiv(n, _HIST_BLOCK)
    grid = (min(n_blocks, _num_programs(x.device)),)
    shift = 32
    for bits in digits:
        shift -= bits
        _radix_hist_kernel[grid](x, hist, state, n, triton.cdiv(n_blocks, grid[0]), grid[0], ABS=abs_,
                                 SHIFT=shift, DIGIT_BITS=bits, NBINS=_NBINS, BLOCK=_HIST_BLOCK, num_warps=8)
        _radix_select_kernel[(1,)](hist, state, DIGIT_BITS=bits, NBINS=_NBINS, num_warps=4)
    prefix, need, equal = state.tolist()
    thr = prefix << shift
    out = torch.empty(n, dtype=x.dtype if values else torch.int8, device=x.device)
    w_blocks = triton.cdiv(n, _WRITE_BLOCK)
    ties = need < equal
    before = state  # unused placeholder pointer when there are no ties to split
    if ties:
        counts = torch.empty(w_blocks, dtype=torch.int32, device=x.device)
        _tie_count_kernel[(w_blocks,)](x, counts, n, thr, ABS=abs_, BLOCK=_WRITE_BLOCK, num_warps=8)
        before = (torch.cumsum(counts, 0, dtype=torch.int32) - counts).contiguous()
    _threshold_write_kernel[(w_blocks,)](x, out, before, n, thr, need, ABS=abs_, TIES=ties,
                                         WRITE_VALUES=values, BLOCK=_WRITE_BLOCK, num_warps=8)
    return out


@register("topk_mask", "triton", supports=_supports_first)
def topk_mask(scores: torch.Tensor, k: int, dim) -> torch.Tensor:
    if dim is None:
        flat = scores.contiguous().view(-1)
        if k == 0 or k >= flat.numel():
            return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
        return _select_whole(flat, k, abs_=False, values=False).view(torch.bool).view(scores.shape)
    moved = scores.movedim(dim, -1)
    n = moved.shape[-1]
    if k == 0 or k >= n or moved.numel() == 0:
        return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
    rows = moved.contiguous().view(-1, n)
    mask = _select_rows(rows, k, abs_=False, values=False).view(torch.bool).view(moved.shape)
    return mask.movedim(-1, dim)


@register("magnitude_prune", "triton", supports=_supports_first)
def magnitude_prune(t: torch.Tensor, k: int, rescale_norm) -> torch.Tensor:
    flat = t.contiguous().view(-1)
    masked = flat.clone() if k >= flat.numel() else _select_whole(flat, k, abs_=True, values=True)
    return reference.rescale_masked(t, masked.view(t.shape), rescale_norm)


# ---------------------------------------------------------------- DARE

def draw_seed(generator) -> int:
    """A 31-bit seed for the in-kernel Philox generator, drawn from ``generator`` (or torch's default)."""
    if generator is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())


def _keep_probability(t: torch.Tensor, p: float) -> float:
    # as the reference (mergekit): the probability is rounded to the work dtype before the draw
    return float(torch.tensor(p, dtype=reference.work_dtype(t)).float())


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
    """out = x * scale where u(seed, flat index) < p, else 0: one read, one write, launch-independent."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    o = start + tl.arange(0, BLOCK)
    v = o < n
    x = tl.load(x_ptr + o, mask=v, other=0.0)
    keep = _block_uniforms(seed, start, BLOCK) < p
    y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
    tl.store(out_ptr + o, y.to(out_ptr.dtype.element_ty), mask=v)


_DARE_BLOCK = 4096


def dare_with_seed(t: torch.Tensor, density: float, rescale: bool, seed: int) -> torch.Tensor:
    """DARE with an explicit Philox seed (the registered op draws the seed from the generator)."""
    x = t.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        scale = 1.0 / density if rescale else 1.0
        grid = (triton.cdiv(n, _DARE_BLOCK),)
        _dare_kernel[grid](x, out, n, seed, _keep_probability(t, density), scale, BLOCK=_DARE_BLOCK,
                           num_warps=8)
    return out.view(t.shape)


@register("dare", "triton", supports=_supports_first)
def dare(t: torch.Tensor, density: float, rescale: bool, generator) -> torch.Tensor:
    return dare_with_seed(t, density, rescale, draw_seed(generator))


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


# Longer rows are ranked by torch (one sort), then drawn by the fused kernel. On an H200 (2026-12-01) rows of
# 8192 sorted in registers ran at 0.67x mergekit's time, but rows of 11008 (padded to 16384) took ~0.9 s per
# 4096 x 11008 tensor in the whole-model merge: the in-register sort falls off a cliff past 8192.
DELLA_SORT_MAX = 8192


def della_with_seed(t: torch.Tensor, density: float, epsilon: float, rescale_norm, seed: int) -> torch.Tensor:
    """DELLA with an explicit Philox seed (the registered op draws it from the generator)."""
    x = t.contiguous()
    n = x.shape[-1] if x.dim() else 1
    out = torch.empty_like(x)
    if x.numel():
        rows = x.numel() // n
        lo, span = density - epsilon, 2.0 * epsilon
        # float32 rows padded to a power of two missed the reference ranks on an H200 (2026-12-01, 256 x 11008)
        # while the same kernel passed unpadded: such rows take the torch-ranked path until that is fixed
        padded_fp32 = x.dtype == torch.float32 and n & (n - 1) != 0
        if n <= DELLA_SORT_MAX and not padded_fp32:
            block = max(16, triton.next_power_of_2(n))
            inv_nm1, frac0 = (1.0 / (n - 1), 0.0) if n > 1 else (0.0, 0.5)
            _della_rows_kernel[(rows,)](x, out, n, seed, lo, span, inv_nm1, frac0, ROW_BLOCK=block,
                                        WIDE=x.dtype == torch.float32)
        else:
            keep_with_probabilities(x, reference.della_probabilities(x, density, epsilon), seed, out=out)
    out = out.view(t.shape)
    return reference.rescale_masked(t, out, rescale_norm)


def keep_with_probabilities(x: torch.Tensor, probs: torch.Tensor, seed: int, out=None) -> torch.Tensor:
    """x where u(seed, flat index) < probs, else 0 (x contiguous, probs fp32 of x's shape; written into ``out``
    when given): the draw of every DELLA path, so one seed gives one result whichever backend ranked the rows."""
    out = torch.empty_like(x) if out is None else out
    if x.numel():
        grid = (triton.cdiv(x.numel(), _DARE_BLOCK),)
        _bernoulli_keep_kernel[grid](x, probs.contiguous(), out, x.numel(), seed, BLOCK=_DARE_BLOCK, num_warps=8)
    return out


@register("della_magprune", "triton", supports=_supports_first)
def della_magprune(t: torch.Tensor, density: float, epsilon: float, rescale_norm, generator) -> torch.Tensor:
    return della_with_seed(t, density, epsilon, rescale_norm, draw_seed(generator))


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
