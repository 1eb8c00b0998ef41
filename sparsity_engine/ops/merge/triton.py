"""Triton kernels for the merge ops: fused generalized task arithmetic, TIES consensus, Breadcrumbs.

One merged tensor costs these passes over base + the N fine-tuned tensors (never a stacked copy; the N
inputs are N pointer arguments, so each pass reads every input once):

* magnitude / breadcrumbs: a most-significant-digit radix select per model for the band of kept positions
  in the (|delta| descending, flat index ascending) order, every model and both band edges in the same
  pass. Each edge becomes (K, J): an entry is before it iff its key > K, or key == K and its flat index
  < J, so the fused pass keeps exactly the reference's entries with two compares. The CUDA backend
  (cuda.py) finds the edges with csrc/select.cu (8-bit digits, shared-memory histograms: 2 passes for
  16-bit floats, 4 for fp32, no host round trip); this module's own select is per-block histograms of
  5-bit digits (3 passes for fp16/bf16, 8-bit digits and 4 passes for fp32), summed by torch, and J from
  the last pass's per-block counts of K plus one block scanned by torch.
* random (DARE): no pre-pass; one Philox call per entry gives four 32-bit words (models 0-3; a second seed
  for 4-7), keep = word / 2**32 < density_i: depends on the seed and the flat index only, never on the
  launch configuration. With a rescale the norms pass draws and stores the decisions (a bit per model, a
  byte per entry) and the merge pass reads them: the draw is most of either pass's time.
* della: on the CUDA backend (fp16 / bf16 rows of up to 65535) one kernel per (row, model) forms the task
  vector, ranks its row by a shared-memory histogram, draws with the masks family's Philox uniforms (seed
  per model), writes the sparsified delta and the row's norm terms (csrc/masks_della.cu della_deltas);
  otherwise the deltas are materialised and drawn by the masks family's kernels. Then the fused pass.
* rescale (l1 / l2 / linf): one reduction pass computing each model's norm before and after its mask (per-block
  partials), then one single-program kernel turning them into the factors (no host round trip).
* the fused pass: deltas, masks, rescale, weights, sign election, disjoint weighted mean, lambda, + base,
  one write; it also detects NaN/Inf in any input (x * 0 summed per block), so validation costs no read.

A whole-model merge makes hundreds of these calls, so the host side is kept short: the parameters go up in one
small upload and the flag comes back through sparsity_engine._staging, the kernels are launched through their
compiled kernels (sparsity_engine._launch.FastKernel) with raw addresses into the parameter buffer (Ptr), and
each pass's scratch is one allocation.

Programs take TB entries (the tie-rank granularity) and walk them in sub-tiles of SUB with 4 warps, which
keeps registers per thread low (40-90 for bf16, no spills) and many warps in flight.

Arithmetic is fp32 with a rounding to the base dtype wherever mergekit's torch code stores an intermediate
(delta, sparsified delta, weighted delta, sums, quotient), so results match the reference to the last bit
except for the order in which the rescale norms are summed and, for fp32 with more than four models, the
order in which torch's reduction adds the models (the kernel adds them in model order; fp16 / bf16 results
round the sums to the dtype, which hides it in the tests).
"""
from __future__ import annotations

import functools
import os
import struct
from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ... import _staging
from ..._dispatch import register
from ..._launch import FastKernel, Ptr
from ..._validate import device_flag_check
from . import reference as ref

# Triton's interpreter truncates on a float32 -> bfloat16 cast; the GPU rounds to nearest even
_INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
MAX_MODELS = 8
TB = 4096           # entries per program of the select and merge passes (tie ranks are counted per block)
SUB = 512           # entries per sub-tile inside a program: 4 warps at 4 entries per thread
NUM_WARPS = 4
INT_MAX = 2**31 - 1
# SPARS_BITS: the keep decisions of a random draw, one bit per model in a byte per entry, written by the norms
# pass (phase 0) so that the merge pass reads them instead of drawing again
SPARS_NONE, SPARS_BAND, SPARS_RANDOM, SPARS_PRESPARSE, SPARS_BITS = 0, 1, 2, 3, 4
NORM_CODE = {None: 0, "l1": 1, "l2": 2, "linf": 3}
_NP = {n: 1 << (n - 1).bit_length() for n in range(1, MAX_MODELS + 1)}  # next power of 2 of a model count


# ------------------------------------------------------------------ device helpers

@triton.jit
def _rnd(v, DT: tl.constexpr):
    """fp32 v rounded to the storage dtype DT (round to nearest even), kept as fp32. bf16 is rounded on the
    bits so that Triton's interpreter (which truncates on a bf16 cast) agrees with the GPU and torch."""
    if DT == tl.bfloat16:
        if _INTERPRETING:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
            r = bits.to(tl.float32, bitcast=True)
        else:
            r = v.to(DT).to(tl.float32)  # cvt.rn: round to nearest even on the GPU
    elif DT == tl.float32:
        r = v
    else:
        r = v.to(DT).to(tl.float32)
    return r


@triton.jit
def _pick(i: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    """The i-th of eight values (i is a compile-time constant): selects a model's pointer or random word."""
    if i == 0:
        return a0
    elif i == 1:
        return a1
    elif i == 2:
        return a2
    elif i == 3:
        return a3
    elif i == 4:
        return a4
    elif i == 5:
        return a5
    elif i == 6:
        return a6
    else:
        return a7


@triton.jit
def _load_delta(t_ptr, idx, m, b, HAS_BASE: tl.constexpr, PRESPARSE: tl.constexpr):
    """A model's input x and delta d in the storage dtype: (x - base) rounded as torch rounds it, or x itself."""
    # one return per function: the compiler does not stop at a return inside a compile-time branch
    x = tl.load(t_ptr + idx, mask=m, other=0.0)
    if HAS_BASE and not PRESPARSE:
        d = _rnd(x.to(tl.float32) - b, x.dtype).to(x.dtype)
    else:
        d = x
    return x, d


@triton.jit
def _key(d):
    """|d| as an order-preserving integer (the float's bits without the sign)."""
    if d.dtype == tl.float32:
        key = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        key = d.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return key


@triton.jit
def _before(key, idx, row: tl.constexpr, k_ptr, j_ptr, LATER_FIRST: tl.constexpr):
    """Is the entry before band edge ``row`` (= 2 * model + edge) in the order |d| descending, equal keys by
    index ascending (or descending with LATER_FIRST)? The edge is (K, J): key > K, or key == K and the flat
    index is below J (at or above J with LATER_FIRST)."""
    K = tl.load(k_ptr + row)
    J = tl.load(j_ptr + row)
    if LATER_FIRST:
        later = idx >= J
    else:
        later = idx < J
    # key > K, or key >= K where the index is before J: one compare (J is 0 / n whenever K is INT_MAX)
    return key > K - later.to(tl.int32)


@triton.jit
def _keep(d, idx, i: tl.constexpr, k_ptr, j_ptr, dens_ptr, rnd, SPARS: tl.constexpr, LATER_FIRST: tl.constexpr,
          HAS_LO: tl.constexpr):
    """Model i's keep mask: band of magnitude ranks (1), Bernoulli(density_i) from the random word (2), bit i of
    the stored keep byte ``rnd`` (4), all (0, 3). HAS_LO False: every band starts at rank 0 (magnitude), so the
    lower edge is not tested."""
    if SPARS == 1:
        key = _key(d)
        keep = _before(key, idx, 2 * i + 1, k_ptr, j_ptr, LATER_FIRST)
        if HAS_LO:
            lo = _before(key, idx, 2 * i, k_ptr, j_ptr, LATER_FIRST)
            keep = keep & (lo.to(tl.int32) == 0)
    elif SPARS == 2:
        u = (rnd >> 8).to(tl.float32) * (1.0 / 16777216.0)  # 24 random bits: a uniform in [0, 1)
        keep = u < tl.load(dens_ptr + i)
    elif SPARS == 4:
        keep = ((rnd >> i) & 1) != 0
    else:
        keep = rnd == rnd
    return keep


@triton.jit
def _norm_terms(v, NORM: tl.constexpr):
    a = tl.abs(v)
    if NORM == 2:
        a = a * a
    return a


@triton.jit
def _acc(acc, v, NORM: tl.constexpr):
    """acc + v, or max(acc, v) for linf (NORM 3)."""
    if NORM == 3:
        r = tl.maximum(acc, v)
    else:
        r = acc + v
    return r


@triton.jit
def _reduce(acc, NORM: tl.constexpr):
    if NORM == 3:
        r = tl.max(acc, 0)
    else:
        r = tl.sum(acc, 0)
    return r


@triton.jit
def _sign(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


# ------------------------------------------------------------------ kernels

@triton.jit
def _hist_kernel(t0, t1, t2, t3, t4, t5, t6, t7, base_ptr, n, prefix_ptr, out_ptr, nblocks, shift,
                 N: tl.constexpr, HAS_BASE: tl.constexpr, W: tl.constexpr, TB: tl.constexpr, SUB: tl.constexpr,
                 RP: tl.constexpr):
    """Per block of TB entries, for every (model, band edge) still searching (prefix >= 0): the histogram of
    the next W key bits among entries whose higher bits equal the prefix; out[(model, edge), block, 2**W].
    No atomics: the host sums the blocks, and the last pass's per-block counts give the tie ranks."""
    pid = tl.program_id(0)
    B: tl.constexpr = 1 << W
    bins = tl.arange(0, B)
    rows = tl.arange(0, RP)
    acc = tl.zeros((RP, B), dtype=tl.int32)
    for s in range(0, TB, SUB):
        if pid * TB + s < n:  # the last block may be partial
            idx = pid * TB + s + tl.arange(0, SUB)
            m = idx < n
            b = tl.zeros((SUB,), dtype=tl.float32)
            if HAS_BASE:
                b = tl.load(base_ptr + idx, mask=m, other=0.0).to(tl.float32)
            for i in tl.static_range(N):
                _, d = _load_delta(_pick(i, t0, t1, t2, t3, t4, t5, t6, t7), idx, m, b, HAS_BASE, False)
                top = _key(d) >> shift
                digit = top & (B - 1)
                for j in tl.static_range(2):
                    pre = tl.load(prefix_ptr + i * 2 + j)
                    if pre >= 0:
                        h = tl.histogram(digit, B, mask=m & ((top >> W) == pre))
                        acc = tl.where(rows[:, None] == i * 2 + j, acc + h[None, :], acc)
    tl.store(out_ptr + (rows[:, None] * nblocks + pid) * B + bins[None, :], acc, mask=rows[:, None] < 2 * N)


@triton.jit
def _merge_kernel(t0, t1, t2, t3, t4, t5, t6, t7, base_ptr, out_ptr, n, w_ptr, scale_ptr, dens_ptr, seed_ptr,
                  k_ptr, j_ptr, norm_ptr, flag_ptr, bits_ptr, lam,
                  N: tl.constexpr, HAS_BASE: tl.constexpr, SPARS: tl.constexpr, LATER_FIRST: tl.constexpr,
                  CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, RESCALE: tl.constexpr,
                  APPLY_LAMBDA: tl.constexpr, PHASE: tl.constexpr, TB: tl.constexpr, SUB: tl.constexpr,
                  NP: tl.constexpr, HAS_LO: tl.constexpr, WRITE_BITS: tl.constexpr):
    """One program per block of TB entries, walked in sub-tiles of SUB (few registers, many warps in flight).
    PHASE 0: per-model norms before / after the mask of this block into norm_ptr [nblocks, 2, NP]; WRITE_BITS:
    also each entry's keep decisions (bit i: model i) into bits_ptr [n] uint8, for a phase 1 with SPARS 4.
    PHASE 1: the fused merge, writing out; flag_ptr[0] = 1 if any input holds NaN/Inf."""
    pid = tl.program_id(0)
    DT = out_ptr.dtype.element_ty
    # PHASE 0: element-wise accumulators per model (bi before, ai after the mask), reduced once per program
    # (a block-wide reduction per model and sub-tile costs a barrier each); one [N, SUB] array selected by model
    # costed a compare and a select per model and entry
    b0 = tl.zeros((SUB,), dtype=tl.float32)
    b1, b2, b3, b4, b5, b6, b7 = b0, b0, b0, b0, b0, b0, b0
    a0, a1, a2, a3, a4, a5, a6, a7 = b0, b0, b0, b0, b0, b0, b0, b0
    nonfinite = tl.zeros((SUB,), dtype=tl.float32)
    for s in range(0, TB, SUB):
        if pid * TB + s < n:  # the last block may be partial
            idx = pid * TB + s + tl.arange(0, SUB)
            m = idx < n
            b = tl.zeros((SUB,), dtype=tl.float32)
            if HAS_BASE:
                b = tl.load(base_ptr + idx, mask=m, other=0.0).to(tl.float32)
            # one Philox call gives four 32-bit words per entry: models 0-3, then 4-7 from a second seed; the words
            # depend only on the seed and the flat index, never on the launch configuration
            r0 = idx.to(tl.uint32)
            r1 = r0
            r2 = r0
            r3 = r0
            r4 = r0
            r5 = r0
            r6 = r0
            r7 = r0
            if SPARS == 2:
                r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), idx)
                if N > 4:
                    r4, r5, r6, r7 = tl.randint4x(tl.load(seed_ptr + 1), idx)
            elif SPARS == 4:
                r0 = tl.load(bits_ptr + idx, mask=m, other=0).to(tl.uint32)
                r1, r2, r3, r4, r5, r6, r7 = r0, r0, r0, r0, r0, r0, r0
            if PHASE == 0:
                kbits = tl.zeros((SUB,), dtype=tl.uint32)
                for i in tl.static_range(N):
                    _, d = _load_delta(_pick(i, t0, t1, t2, t3, t4, t5, t6, t7), idx, m, b, HAS_BASE, SPARS == 3)
                    keep = _keep(d, idx, i, k_ptr, j_ptr, dens_ptr, _pick(i, r0, r1, r2, r3, r4, r5, r6, r7),
                                 SPARS, LATER_FIRST, HAS_LO)
                    before = _norm_terms(d.to(tl.float32), RESCALE)
                    after = tl.where(keep, before, 0.0)
                    kbits = kbits | (keep.to(tl.uint32) << i)
                    if i == 0:
                        b0, a0 = _acc(b0, before, RESCALE), _acc(a0, after, RESCALE)
                    elif i == 1:
                        b1, a1 = _acc(b1, before, RESCALE), _acc(a1, after, RESCALE)
                    elif i == 2:
                        b2, a2 = _acc(b2, before, RESCALE), _acc(a2, after, RESCALE)
                    elif i == 3:
                        b3, a3 = _acc(b3, before, RESCALE), _acc(a3, after, RESCALE)
                    elif i == 4:
                        b4, a4 = _acc(b4, before, RESCALE), _acc(a4, after, RESCALE)
                    elif i == 5:
                        b5, a5 = _acc(b5, before, RESCALE), _acc(a5, after, RESCALE)
                    elif i == 6:
                        b6, a6 = _acc(b6, before, RESCALE), _acc(a6, after, RESCALE)
                    else:
                        b7, a7 = _acc(b7, before, RESCALE), _acc(a7, after, RESCALE)
                if WRITE_BITS:
                    tl.store(bits_ptr + idx, kbits.to(tl.uint8), mask=m)
            else:
                # x * 0 is 0 for finite x and NaN for NaN/Inf: one multiply-add per input finds bad inputs, and
                # the host names the culprit (only on that error path)
                nonfinite += tl.where(m, b * 0.0, 0.0)
                vote = tl.zeros((SUB,), dtype=tl.float32)
                mixed = tl.zeros((SUB,), dtype=tl.float32)
                divisor = tl.zeros((SUB,), dtype=tl.float32)
                # the weighted deltas, kept for the second loop of the sign election (unused slots optimised out)
                w0 = vote
                w1 = vote
                w2 = vote
                w3 = vote
                w4 = vote
                w5 = vote
                w6 = vote
                w7 = vote
                for i in tl.static_range(N):
                    x, d = _load_delta(_pick(i, t0, t1, t2, t3, t4, t5, t6, t7), idx, m, b, HAS_BASE, SPARS == 3)
                    nonfinite += tl.where(m, x.to(tl.float32) * 0.0, 0.0)
                    keep = _keep(d, idx, i, k_ptr, j_ptr, dens_ptr, _pick(i, r0, r1, r2, r3, r4, r5, r6, r7),
                                 SPARS, LATER_FIRST, HAS_LO)
                    sd = tl.where(keep, d.to(tl.float32), 0.0)
                    if RESCALE != 0:
                        sd = _rnd(sd * tl.load(scale_ptr + i), DT)
                    w = tl.load(w_ptr + i)
                    wd = _rnd(sd * w, DT)
                    if CONSENSUS == 0:
                        mixed += wd
                        divisor += w
                    else:
                        if CONSENSUS == 1:
                            vote += wd
                        else:
                            vote += _sign(wd)
                        if i == 0:
                            w0 = wd
                        elif i == 1:
                            w1 = wd
                        elif i == 2:
                            w2 = wd
                        elif i == 3:
                            w3 = wd
                        elif i == 4:
                            w4 = wd
                        elif i == 5:
                            w5 = wd
                        elif i == 6:
                            w6 = wd
                        else:
                            w7 = wd
                if CONSENSUS != 0:
                    elected = tl.where(vote >= 0, 1.0, -1.0)
                    for i in tl.static_range(N):
                        wd = _pick(i, w0, w1, w2, w3, w4, w5, w6, w7)
                        agree = wd * elected > 0  # sign(wd) == elected: a 0 never agrees
                        mixed += tl.where(agree, wd, 0.0)
                        divisor += tl.where(agree, tl.load(w_ptr + i), 0.0)
                mixed = _rnd(mixed, DT)
                if NORMALIZE:
                    divisor = _rnd(divisor, DT)
                    if CONSENSUS != 0:
                        divisor = tl.where(divisor == 0, 1.0, divisor)
                    else:
                        divisor = tl.where(tl.abs(divisor) < 1e-8, 1.0, divisor)
                    mixed = _rnd(tl.math.div_rn(mixed, divisor), DT)  # '/' is approximate on GPUs
                if APPLY_LAMBDA:
                    mixed = _rnd(mixed * lam, DT)
                tl.store(out_ptr + idx, _rnd(b + mixed, DT).to(DT), mask=m)
    if PHASE == 0:
        # per-block partial norms, reduced by _rescale_scale_kernel in a fixed order: deterministic, and no
        # contention on 2N addresses from every block (atomics there made this pass ~4x slower than a read)
        for i in tl.static_range(N):
            tl.store(norm_ptr + (pid * 2) * NP + i, _reduce(_pick(i, b0, b1, b2, b3, b4, b5, b6, b7), RESCALE))
            tl.store(norm_ptr + (pid * 2 + 1) * NP + i, _reduce(_pick(i, a0, a1, a2, a3, a4, a5, a6, a7), RESCALE))
    else:
        bad = tl.sum(nonfinite, 0) != 0
        tl.atomic_max(flag_ptr, 1, mask=bad)


@triton.jit
def _rescale_scale_kernel(parts_ptr, scale_ptr, like_ptr, nblocks, N, active_bits, eps, NORM: tl.constexpr,
                          NP: tl.constexpr, BLOCK: tl.constexpr):
    """One program: each model's norms before / after its mask from the per-block partials [nblocks, 2, NP]
    (reduced in a fixed order: deterministic), then scale_i = before / after as mergekit's 0-d tensors give it
    (norms rounded to the dtype of like_ptr, the quotient too); fp32 norms where a dtype norm overflows; 1 where
    a norm is below eps or bit i of active_bits is clear. Replaces ~15 small torch ops (host time per merge)."""
    DT = like_ptr.dtype.element_ty
    models = tl.arange(0, NP)
    acc_b = tl.zeros((BLOCK, NP), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK, NP), dtype=tl.float32)
    start = 0
    while start < nblocks:  # (a range() over a runtime bound fails in Triton's interpreter under NumPy 2)
        rows = start + tl.arange(0, BLOCK)
        m = rows[:, None] < nblocks
        b = tl.load(parts_ptr + (rows[:, None] * 2) * NP + models[None, :], mask=m, other=0.0)
        a = tl.load(parts_ptr + (rows[:, None] * 2 + 1) * NP + models[None, :], mask=m, other=0.0)
        if NORM == 3:
            acc_b = tl.maximum(acc_b, b)
            acc_a = tl.maximum(acc_a, a)
        else:
            acc_b += b
            acc_a += a
        start += BLOCK
    if NORM == 3:
        nb = tl.max(acc_b, 0)
        na = tl.max(acc_a, 0)
    else:
        nb = tl.sum(acc_b, 0)
        na = tl.sum(acc_a, 0)
    if NORM == 2:
        nb = tl.sqrt_rn(nb)
        na = tl.sqrt_rn(na)
    before = _rnd(nb, DT)
    after = _rnd(na, DT)
    ratio = _rnd(tl.math.div_rn(before, after), DT)
    ok = (before >= eps) & (after >= eps)
    big = float("inf")
    wide = (tl.abs(before) == big) | (tl.abs(after) == big)  # the dtype's norm overflowed: take the fp32 one
    ratio = tl.where(wide, tl.math.div_rn(nb, na), ratio)
    ok = tl.where(wide, (nb >= eps) & (na >= eps), ok)
    ok = ok & (((active_bits >> models) & 1) != 0)
    tl.store(scale_ptr + models, tl.where(ok, ratio, 1.0), mask=models < N)


@triton.jit
def _consensus_kernel(d_ptr, out_ptr, M, N: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    m = idx < M
    vote = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(N):
        d = tl.load(d_ptr + i * M + idx, mask=m, other=0.0).to(tl.float32)
        if COUNT:
            vote += tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        else:
            vote += d
    elected = tl.where(vote >= 0, 1.0, -1.0)
    for i in tl.static_range(N):
        d = tl.load(d_ptr + i * M + idx, mask=m, other=0.0).to(tl.float32)
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        tl.store(out_ptr + i * M + idx, (sign == elected).to(tl.int8), mask=m)


# ------------------------------------------------------------------ host side

# launched through their compiled kernels once Triton has one for the variant (a merge's host time, see _launch)
_MERGE = FastKernel(_merge_kernel)
_SCALE = FastKernel(_rescale_scale_kernel)


class _Params(NamedTuple):
    """A plan's packed parameters: the int32 device buffer and the launch arguments pointing into it (Ptr on
    CUDA, tensor views elsewhere): weights [N], densities [N], ones [N] (fp32), K [2N], J [2N], seeds [2],
    NaN/Inf flag [1] (int32)."""
    buf: torch.Tensor
    w: object
    dens: object
    ones: object
    K: object
    J: object
    seeds: object
    flag: object


class _Plan:
    """One fused merge: the N input tensors (pointers), the per-model parameters, and the passes."""

    def __init__(self, base: Optional[torch.Tensor], tensors: List[torch.Tensor]):
        self.base = base
        self.tensors = tensors
        self.n = tensors[0].numel()
        self.N = len(tensors)
        self.device = tensors[0].device
        self.ptrs = list(tensors) + [tensors[0]] * (MAX_MODELS - self.N)  # unused slots point at model 0
        self.nblocks = -(-self.n // TB)  # triton.cdiv is a jit function: slower to call from the host
        # per-model parameters live on the host until a launch packs them into two small device tensors;
        # band edge 2 * i + j of model i (j = 0: lo, 1: hi) is (K, J), see _before
        self.K = [INT_MAX] * (2 * self.N)
        self.J = [0] * (2 * self.N)
        self.dens = [1.0] * self.N
        self.seeds = [0, 0]
        self.weights = [1.0] * self.N
        self.scale = None  # fp32 [N] on the device once rescaled (a tensor, or a Ptr into _scratch)
        self.bits = None   # uint8 [n] keep decisions of a random draw once the norms pass stored them (Ptr / view)
        self._scratch = None  # the rescale pass's buffer (partials, factors, keep bits)
        self.later_first = False
        self.has_lo = True      # False once select_bands sees every band start at rank 0
        self._edges_from = None  # the packed buffer holding the (K, J) the CUDA select found on the device
        self._packed = None

    def _pack(self) -> "_Params":
        """The per-model parameters on the device: one upload (fp32 values as their bits, then int32), with a
        zero NaN/Inf flag last. On CUDA the launch arguments are raw addresses into it (no tensor views)."""
        if self._packed is None:
            N = self.N
            floats = self.weights + self.dens + [1.0] * N
            ints = self.K + self.J + self.seeds + [0]
            buf = _staging.upload(struct.pack(f"{len(floats)}f{len(ints)}i", *floats, *ints), self.device)
            if self._edges_from is not None:  # a later set() must not drop the edges the device found
                buf[3 * N:7 * N].copy_(self._edges_from[3 * N:7 * N])
            if buf.is_cuda:
                a = buf.data_ptr()

                def arg(off, size, dtype):
                    return Ptr(a + 4 * off, dtype)
            else:  # Triton's interpreter reads tensors
                def arg(off, size, dtype):
                    return buf[off:off + size].view(dtype)
            f32, i32 = torch.float32, torch.int32
            self._packed = _Params(buf, arg(0, N, f32), arg(N, N, f32), arg(2 * N, N, f32), arg(3 * N, 2 * N, i32),
                                   arg(5 * N, 2 * N, i32), arg(7 * N, 2, i32), arg(7 * N + 2, 1, i32))
        return self._packed

    def set(self, **params) -> None:
        for k, v in params.items():
            setattr(self, k, v)
        self._packed = None

    @property
    def base_ptr(self):
        return self.base if self.base is not None else self.tensors[0]

    # -- band selection (magnitude, breadcrumbs)
    def select_bands(self, bands: List[Optional[tuple]], *, later_first: bool = False, selector: str = "triton") -> None:
        """bands[i] = (lo, hi) kept positions of model i in descending-magnitude order, or None (keep all).
        Equal magnitudes are ordered by flat index, ascending (magnitude) or descending (``later_first``,
        breadcrumbs), as reference.descending_rank. selector 'cuda': the edges are found by csrc/select.cu
        and written into the packed parameters on the device; 'triton': by _hist_kernel passes here."""
        n = self.n
        self.later_first = later_first
        self.has_lo = any(band is not None and band[0] > 0 for band in bands)
        targets = []  # per (model, edge): the edge position p, or None when it needs no search
        for i, band in enumerate(bands):
            lo, hi = band if band is not None else (0, n)
            for j, p in enumerate((lo, hi)):
                r = 2 * i + j
                if p <= 0:                          # nothing before the edge
                    self.K[r], self.J[r] = INT_MAX, n if later_first else 0
                    targets.append(None)
                elif p >= n:                        # everything before the edge
                    self.K[r] = -1
                    targets.append(None)
                else:
                    targets.append(p)
        self._packed = None
        if not any(t is not None for t in targets):
            return
        if selector == "cuda":
            from ..masks import cuda as masks_cuda

            params = self._pack()
            rows = [(r // 2, p, later_first, r) for r, p in enumerate(targets) if p is not None]
            masks_cuda.select_edges(self.tensors, self.base, rows, mode=masks_cuda.MAGNITUDE, out_k=params.K,
                                    out_j=params.J, k_shift=0 if self.tensors[0].dtype == torch.float32 else 16)
            self._edges_from = params.buf
        else:
            self._radix_select(targets)

    def _keys(self, i: int, lo: int, hi: int) -> torch.Tensor:
        """The magnitude keys (as _key) of model i's deltas at flat indices lo .. hi (int32, torch)."""
        t = self.tensors[i].reshape(-1)[lo:hi]
        d = t if self.base is None else t - self.base.reshape(-1)[lo:hi]  # rounded to the dtype, as the kernel
        if d.dtype == torch.float32:
            return d.view(torch.int32) & 0x7FFFFFFF
        return d.view(torch.int16).to(torch.int32) & 0x7FFF

    def _radix_select(self, targets) -> None:
        """Per searching edge: the key K of the p-th largest |delta|, by most-significant-digit radix select over
        the key bits (the digit of each pass chosen on the device), then the index J that splits K's ties: the
        last pass's per-block counts of K give the block holding the tie at the edge, and a torch scan of that
        one block gives its index."""
        if self.tensors[0].dtype == torch.float32:
            width, shifts = 8, [24, 16, 8, 0]
        else:
            width, shifts = 5, [10, 5, 0]  # 15-bit keys: 32-bin histograms are cheap to build
        bins = 1 << width
        rows = 2 * self.N
        dev = self.device
        # prefix < 0 marks an edge that needs no search; remaining = rank still to find below the prefix
        prefix = torch.tensor([0 if t is not None else -1 for t in targets], dtype=torch.int32, device=dev)
        remaining = torch.tensor([t if t is not None else 0 for t in targets], dtype=torch.int64, device=dev)
        per_block = torch.empty((rows, self.nblocks, bins), dtype=torch.int32, device=dev)
        for shift in shifts:
            _hist_kernel[(self.nblocks,)](*self.ptrs, self.base_ptr, self.n, prefix, per_block, self.nblocks, shift,
                                          N=self.N, HAS_BASE=self.base is not None, W=width, TB=TB, SUB=SUB,
                                          RP=triton.next_power_of_2(2 * self.N), num_warps=NUM_WARPS)
            h = per_block.sum(dim=1)                           # [rows, bins] int64
            desc = h.flip(1).cumsum(1)                         # desc[:, k]: entries with digit >= bins - 1 - k
            k = (desc < remaining[:, None]).sum(1).clamp_(max=bins - 1)  # first k with desc[k] >= remaining
            digit = bins - 1 - k
            passed = desc.gather(1, k[:, None])[:, 0] - h.gather(1, digit[:, None])[:, 0]  # digits above
            search = prefix >= 0
            remaining = torch.where(search, remaining - passed, remaining)
            prefix = torch.where(search, (prefix << width) | digit.to(torch.int32), prefix)
        last = (prefix & (bins - 1)).long().clamp(min=0)
        ties_dev = h.gather(1, last[:, None])[:, 0]            # count of the edge key
        # per block, the entries equal to the edge key (matching prefix and last digit), cumulated
        cum = per_block.gather(2, last[:, None, None].expand(rows, self.nblocks, 1))[:, :, 0].cumsum(1)
        prefix_h, remaining_h, ties_h = (v.tolist() for v in torch.stack([prefix.long(), remaining, ties_dev]).cpu())
        for r in range(rows):
            if targets[r] is None:
                continue
            ties, rem = int(ties_h[r]), int(remaining_h[r])
            self.K[r] = int(prefix_h[r])
            j = ties - rem if self.later_first else rem   # the j-th equal key (0-based, index order) splits them
            if j >= ties:
                self.J[r] = self.n
                continue
            blk = int(torch.searchsorted(cum[r], j, right=True))
            before = int(cum[r, blk - 1]) if blk > 0 else 0
            lo = blk * TB
            hits = torch.nonzero(self._keys(r // 2, lo, min(self.n, lo + TB)) == self.K[r])[:, 0]
            self.J[r] = lo + int(hits[j - before])

    # -- the fused passes
    def flag(self) -> torch.Tensor:
        """The int32 [1] device flag that a phase-1 launch sets to 1 when an input holds NaN/Inf."""
        return self._pack().buf[7 * self.N + 2:]

    def launch(self, out, *, spars, consensus, normalize, rescale_norm, lambda_, phase, norms=None, bits=None):
        """One pass of _merge_kernel (phase 0: norms into ``norms``, and keep bits into ``bits`` when given;
        phase 1: the merge into ``out``, reading ``bits`` when spars is SPARS_BITS)."""
        p = self._pack()
        N = self.N
        _MERGE[(self.nblocks,)](
            *self.ptrs, self.base_ptr, out if out is not None else self.tensors[0], self.n,
            p.w, self.scale if self.scale is not None else p.ones, p.dens, p.seeds, p.K, p.J,
            norms if norms is not None else p.ones, p.flag, bits if bits is not None else p.flag, float(lambda_),
            N=N, HAS_BASE=self.base is not None, SPARS=spars, LATER_FIRST=self.later_first,
            CONSENSUS={None: 0, "sum": 1, "count": 2}[consensus], NORMALIZE=bool(normalize),
            RESCALE=NORM_CODE[rescale_norm], APPLY_LAMBDA=lambda_ != 1, PHASE=phase, TB=TB, SUB=SUB,
            NP=_NP[N], HAS_LO=self.has_lo, WRITE_BITS=phase == 0 and bits is not None,
            num_warps=NUM_WARPS,
            # IEEE fp32 as torch computes it: no mul+add contraction into FMA (bit-identical results)
            enable_fp_fusion=False)

    def rescale(self, spars, rescale_norm, active: List[bool]) -> None:
        """scale_i = norm(delta_i) / norm(masked delta_i), rounded like mergekit's 0-d tensors; 1 where no rescale."""
        NP = _NP[self.N]
        nparts = self.nblocks * 2 * NP
        # the draw costs more than the rest of a pass (H200: 0.14 of 0.24 ms at 11008x4096, 3 models): a random
        # draw keeps its decisions (uint8 [n]) for the merge pass instead of drawing twice
        nbits = self.n if spars == SPARS_RANDOM else 0
        # one allocation (each costs host time on every merge): partials fp32 [blocks, 2, NP], factors fp32 [NP],
        # keep bits; kept alive by the plan until its last launch is queued
        self._scratch = torch.empty(4 * (nparts + NP) + nbits, dtype=torch.uint8, device=self.device)
        parts = self._scratch_arg(0, nparts, torch.float32)
        scale = self._scratch_arg(4 * nparts, self.N, torch.float32)
        if nbits:
            self.bits = self._scratch_arg(4 * (nparts + NP), nbits, torch.uint8)
        self.launch(None, spars=spars, consensus=None, normalize=False, rescale_norm=rescale_norm,
                    lambda_=1.0, phase=0, norms=parts, bits=self.bits)
        self.scale_from_parts(parts, self.nblocks, rescale_norm, active, scale=scale)

    def keep_bits(self) -> torch.Tensor:
        """The stored keep decisions of a rescaled random draw as a uint8 [n] tensor (bit i: model i kept)."""
        nparts = self.nblocks * 2 * _NP[self.N]
        off = 4 * (nparts + _NP[self.N])
        return self._scratch[off:off + self.n]

    def _scratch_arg(self, offset: int, count: int, dtype: torch.dtype):
        """A launch argument at byte ``offset`` of the scratch buffer: a raw address on CUDA, a view for the
        interpreter."""
        if self._scratch.is_cuda:
            return Ptr(self._scratch.data_ptr() + offset, dtype)
        return self._scratch[offset:offset + count * dtype.itemsize].view(dtype)

    def scale_from_parts(self, parts, blocks: int, rescale_norm: str, active: List[bool], scale=None) -> None:
        """self.scale (fp32 [N], into ``scale`` when given) from per-block norm partials [blocks, 2, NP(N)]
        (before / after each model's mask)."""
        if scale is None:
            scale = torch.empty(self.N, dtype=torch.float32, device=self.device)
        _SCALE[(1,)](parts, scale, self.tensors[0], blocks, self.N, sum(1 << i for i, a in enumerate(active) if a),
                     ref.RESCALE_EPS, NORM=NORM_CODE[rescale_norm], NP=_NP[self.N], BLOCK=256, num_warps=4,
                     enable_fp_fusion=False)
        self.scale = scale


@functools.lru_cache(maxsize=256)
def _rounded(values: tuple, dtype: torch.dtype) -> list:
    """values rounded to dtype as mergekit's weight tensor holds them (cached: the same for every tensor)."""
    return torch.tensor(values, dtype=dtype).float().tolist()


def _raise_nonfinite(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """The kernel flagged NaN/Inf somewhere in its inputs; name the tensor (error path only)."""
    if not bool(torch.isfinite(base).all()):
        raise ValueError("base contains NaN/Inf values; it must be finite")
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensors[{i}] contains NaN/Inf values; it must be finite")
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t - base).all()):
            raise ValueError(f"tensors[{i}] - base overflows {str(base.dtype).replace('torch.', '')}: the task vector "
                             "must be finite")
    raise ValueError("the inputs contain NaN/Inf values; they must be finite")


def _delta_list(base, tensors):
    """Materialised deltas (base dtype), checked finite with one host sync for all of them: the input of the
    masks family's DELLA."""
    out = [t - base for t in tensors]
    if not bool(torch.stack([torch.isfinite(d).all() for d in out]).all()):
        for i, d in enumerate(out):
            if not bool(torch.isfinite(d).all()):
                name = "base" if not bool(torch.isfinite(base).all()) else f"tensors[{i}]"
                raise ValueError(f"{name} contains NaN/Inf values; it must be finite")
    return out


def _draw_seeds(generator, count: int) -> List[int]:
    """``count`` 31-bit Philox seeds from the caller's generator, else torch's default CPU one (so
    torch.manual_seed reproduces a merge)."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(0, INT_MAX, (count,), generator=generator, device=gen_device).tolist()


def _della_cuda_ok(base: torch.Tensor, selector: str) -> bool:
    if selector != "cuda" or base.dtype not in (torch.float16, torch.bfloat16):
        return False
    from ..masks import cuda as masks_cuda

    return (base.shape[-1] if base.dim() else 1) <= masks_cuda.DELLA_MAX_COLS[base.dtype]


def _della_plan(base, ts, weights, densities, epsilons, active, rescale_norm, seeds, selector):
    """The plan of a DELLA merge: its inputs are the sparsified task vectors, model i's drawn with seeds[i]
    (keep entry e iff masks.triton.philox_uniforms(seeds[i])[e] < della_probabilities(delta_i)[e]).

    fp16 / bf16 rows on the CUDA backend: one kernel (csrc/masks_della.cu) forms the deltas, ranks, draws
    and writes them with each row's norm terms, and the rescale factors enter the fused pass (returned norm).
    Otherwise each delta is materialised, drawn by the masks family's kernels, and rescaled by torch (returned
    norm None)."""
    from ..masks import _della_epsilon

    N = len(ts)
    # density 0 keeps nothing whatever epsilon is (p = 0): no warning about shrinking it
    eps = [_della_epsilon(d, e) if a and d > 0 else 0.0 for d, e, a in zip(densities, epsilons, active)]
    if _della_cuda_ok(base, selector):
        from ..masks import cuda as masks_cuda

        outs = torch.empty((N,) + tuple(base.shape), dtype=base.dtype, device=base.device)
        plan = _Plan(base, list(outs.unbind(0)))
        plan.set(weights=weights)
        parts = None
        if rescale_norm is not None:
            cols = base.shape[-1] if base.dim() else 1
            parts = torch.empty((base.numel() // cols, 2, _NP[N]), dtype=torch.float32, device=base.device)
        masks_cuda.della_deltas(ts, base, plan.tensors, [d - e for d, e in zip(densities, eps)],
                                [2.0 * e for e in eps], seeds, sum(1 << i for i, a in enumerate(active) if a),
                                NORM_CODE[rescale_norm], parts, plan.flag())
        if parts is not None:
            plan.scale_from_parts(parts, parts.shape[0], rescale_norm, active)
        return plan, rescale_norm
    from ..masks import triton as masks_triton

    deltas = _delta_list(base, ts)
    for i in range(N):
        if active[i]:
            x = deltas[i]
            masked = masks_triton.keep_with_probabilities(x, _della_probs(x, densities[i], eps[i], selector), seeds[i])
            deltas[i] = ref.rescale_masked(x, masked, rescale_norm)
    plan = _Plan(base, deltas)
    plan.set(weights=weights)
    return plan, None


def _della_probs(x: torch.Tensor, density: float, epsilon: float, selector: str) -> torch.Tensor:
    """della_probabilities of one materialised delta: csrc/masks_della.cu where it takes the rows, else torch."""
    if selector == "cuda":
        from ..masks import cuda as masks_cuda

        if not masks_cuda._della_supports(x, density, epsilon, None, None):
            return masks_cuda.della_probabilities(x, density, epsilon)
    from ..masks import reference as masks_ref

    return masks_ref.della_probabilities(x, density, epsilon)


def _merge_supports(base, tensors, weights, **kwargs):
    reasons = []
    if len(tensors) > MAX_MODELS:
        reasons.append(f"the fused kernel merges at most {MAX_MODELS} models, got {len(tensors)}")
    if base.numel() >= 2**31:
        reasons.append("tensors of 2**31 elements or more are not supported by the fused kernel")
    return reasons


@register("merge_task_vectors", "triton", supports=_merge_supports)
def merge_task_vectors(base, tensors, weights, **kwargs):
    return merge_with_selector(base, tensors, weights, selector="triton", **kwargs)


def merge_with_selector(base, tensors, weights, *, spars, consensus, densities, epsilons, gammas, lambda_,
                        normalize, rescale_norm, generator=None, selector="triton"):
    """The fused merge, with the band edges of magnitude / breadcrumbs found by ``selector`` ('triton' or
    'cuda', see _Plan.select_bands); everything else is the same kernels."""
    dtype = base.dtype
    base = base.contiguous()
    ts = [t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous() for t in tensors]
    N, n = len(ts), base.numel()
    out = torch.empty_like(base)
    if n == 0:
        return out
    active = [spars is not None and d < 1 for d in densities]
    mode = SPARS_NONE
    if any(active):
        mode = {"magnitude": SPARS_BAND, "magnitude_outliers": SPARS_BAND, "random": SPARS_RANDOM,
                "della_magprune": SPARS_PRESPARSE}[spars]
    weights = _rounded(tuple(weights), dtype)
    norm = rescale_norm if mode in (SPARS_BAND, SPARS_RANDOM) else None
    if mode == SPARS_PRESPARSE:
        plan, norm = _della_plan(base, ts, weights, densities, epsilons, active, rescale_norm,
                                 _draw_seeds(generator, N), selector)
    else:
        plan = _Plan(base, ts)
        plan.set(weights=weights)
    if mode == SPARS_BAND:
        bands = []
        for i in range(N):
            if not active[i]:
                bands.append(None)
            elif spars == "magnitude":
                bands.append((0, int(densities[i] * n)))
            else:
                bands.append(ref.breadcrumbs_band(n, densities[i], gammas[i]))
        plan.select_bands(bands, later_first=spars == "magnitude_outliers", selector=selector)
    elif mode == SPARS_RANDOM:
        plan.set(dens=[d if a else 1.0 for d, a in zip(densities, active)])
        plan.set(seeds=_draw_seeds(generator, 2))
    if norm is not None and plan.scale is None:
        plan.rescale(mode, norm, active)
    plan.launch(out, spars=SPARS_BITS if plan.bits is not None else mode, consensus=consensus, normalize=normalize,
                rescale_norm=norm, lambda_=lambda_, phase=1, bits=plan.bits)
    device_flag_check(plan.flag(), lambda: _raise_nonfinite(base, ts))
    return out


@register("magnitude_outliers", "triton")
def magnitude_outliers(t, density, gamma, rescale_norm=None):
    return outliers_with_selector(t, density, gamma, rescale_norm, selector="triton")


def outliers_with_selector(t, density, gamma, rescale_norm=None, selector="triton"):
    """Breadcrumbs' band of one tensor, its edges found by ``selector`` (see _Plan.select_bands)."""
    if density >= 1:
        return t
    x = t.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    plan = _Plan(None, [x])
    plan.select_bands([ref.breadcrumbs_band(x.numel(), density, gamma)], later_first=True, selector=selector)
    if rescale_norm is not None:
        plan.rescale(SPARS_BAND, rescale_norm, [True])
    plan.launch(out, spars=SPARS_BAND, consensus=None, normalize=False, rescale_norm=rescale_norm,
                lambda_=1.0, phase=1)
    return out


@register("ties_consensus", "triton")
def ties_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    d = deltas.contiguous()
    N = d.shape[0]
    M = d[0].numel() if N else 0
    out = torch.empty(d.shape, dtype=torch.int8, device=d.device)
    if M:
        _consensus_kernel[(triton.cdiv(M, 1024),)](d, out, M, N=N, COUNT=method == "count", BLOCK=1024)
    return out.view(torch.bool)
