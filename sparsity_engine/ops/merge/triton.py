"""Triton kernels for the merge ops: fused generalized task arithmetic, TIES consensus, Breadcrumbs.

One merged tensor costs these passes over base + the N fine-tuned tensors (never a stacked copy; the N
inputs are N pointer arguments, so each pass reads every input once):

* magnitude / breadcrumbs: the band of kept positions of each model in the (|delta| descending, flat index
  ascending) order comes from the masks family's selection (``masks.select_edges``, through dispatch: the CUDA
  radix select of csrc/masks_select.cu, or the Triton one). Each edge is (K, J): an entry is before it iff its
  key > K, or key == K and its flat index < J, so the fused pass keeps exactly the reference's entries with
  two compares.
* random (DARE): no pre-pass; one Philox call per entry gives four 32-bit words (models 0-3; a second seed
  for 4-7), keep = (word >> 8) / 2**24 < density_i: depends on the seed and the flat index only, never on the
  launch configuration (reference.dare_keeps draws the same). With a rescale the norms pass draws and stores
  the decisions (a bit per model, a byte per entry) and the merge pass reads them: the draw is most of either
  pass's time.
* della: the sparsified task vectors come from the masks family (``masks.della_deltas``: on CUDA one kernel per
  (row, model) forms, ranks, draws and writes them with their norm terms), then the fused pass.
* rescale (l1 / l2 / linf): one reduction pass computing each model's norm before and after its mask (per-block
  partials; DELLA's come with its task vectors), then one single-program kernel turning them into the factors.
* the fused pass: deltas, masks, rescale, weights, sign election, disjoint weighted mean, lambda, + base,
  one write; it also flags NaN/Inf in any input and any overflow of the output (x * 0 summed per block), so
  validation costs no read. The flag is read once per merged tensor.

Backends: 'triton' (everything above on Triton, the selection and DELLA included) and 'cuda' (the same fused
pass; the selection and DELLA on the masks family's CUDA kernels wherever they take the inputs).

Programs take TB entries and walk them in sub-tiles of SUB with 4 warps, which keeps registers per thread low
and many warps in flight.

Arithmetic is fp32 with a rounding to the base dtype wherever mergekit's torch code stores an intermediate
(delta, sparsified delta, weighted delta, sums, quotient), models summed in model order as the reference sums
them, and the random draws are the reference's (reference.sparsify_deltas), so results match the reference
to the last bit except for the order in which the l1 / l2 rescale norms are summed (the factor may then
differ in its last bit; the kept entries never do).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..._dispatch import explain, register
from ..._validate import raise_nonfinite
from .. import masks
from .._triton_common import magnitude_key, round_to
from . import reference as ref

MAX_MODELS = 8
TB = 4096           # entries per program of the merge passes
SUB = 512           # entries per sub-tile inside a program: 4 warps at 4 entries per thread
NUM_WARPS = 4
INT_MAX = 2**31 - 1

# Kernel variants, as constants the kernels compare against (pass ``.value`` to a launch).
# SPARS_*: how each model's keep mask is formed. SPARS_BITS: the keep decisions of a random draw, one bit per
# model in a byte per entry, written by the norms pass so that the merge pass reads them instead of drawing
# again. SPARS_PRESPARSE: the inputs are already sparsified task vectors (DELLA).
SPARS_NONE, SPARS_BAND, SPARS_RANDOM, SPARS_PRESPARSE, SPARS_BITS = (tl.constexpr(v) for v in range(5))
NORM_NONE, NORM_L1, NORM_L2, NORM_LINF = (tl.constexpr(v) for v in range(4))
CONSENSUS_NONE, CONSENSUS_SUM, CONSENSUS_COUNT = (tl.constexpr(v) for v in range(3))
PHASE_NORMS, PHASE_MERGE = tl.constexpr(0), tl.constexpr(1)
NORM_CODE = {None: NORM_NONE, "l1": NORM_L1, "l2": NORM_L2, "linf": NORM_LINF}
CONSENSUS_CODE = {None: CONSENSUS_NONE, "sum": CONSENSUS_SUM, "count": CONSENSUS_COUNT}
_NP = {n: 1 << (n - 1).bit_length() for n in range(1, MAX_MODELS + 1)}  # next power of 2 of a model count


# ------------------------------------------------------------------ device helpers

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
        d = round_to(x.to(tl.float32) - b, x.dtype).to(x.dtype)
    else:
        d = x
    return x, d


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
    """Model i's keep mask: band of magnitude ranks (SPARS_BAND), Bernoulli(density_i) from the random word
    (SPARS_RANDOM), bit i of the stored keep byte ``rnd`` (SPARS_BITS), all (SPARS_NONE, SPARS_PRESPARSE).
    HAS_LO False: every band starts at rank 0 (magnitude), so the lower edge is not tested."""
    if SPARS == SPARS_BAND:
        key = magnitude_key(d)
        keep = _before(key, idx, 2 * i + 1, k_ptr, j_ptr, LATER_FIRST)
        if HAS_LO:
            lo = _before(key, idx, 2 * i, k_ptr, j_ptr, LATER_FIRST)
            keep = keep & (lo.to(tl.int32) == 0)
    elif SPARS == SPARS_RANDOM:
        u = (rnd >> 8).to(tl.float32) * (1.0 / 16777216.0)  # 24 random bits: a uniform in [0, 1)
        keep = u < tl.load(dens_ptr + i)
    elif SPARS == SPARS_BITS:
        keep = ((rnd >> i) & 1) != 0
    else:
        keep = rnd == rnd
    return keep


@triton.jit
def _norm_terms(v, NORM: tl.constexpr):
    a = tl.abs(v)
    if NORM == NORM_L2:
        a = a * a
    return a


@triton.jit
def _acc(acc, v, NORM: tl.constexpr):
    """acc + v, or max(acc, v) for linf."""
    if NORM == NORM_LINF:
        r = tl.maximum(acc, v)
    else:
        r = acc + v
    return r


@triton.jit
def _reduce(acc, NORM: tl.constexpr):
    if NORM == NORM_LINF:
        r = tl.max(acc, 0)
    else:
        r = tl.sum(acc, 0)
    return r


@triton.jit
def _sign(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


# ------------------------------------------------------------------ kernels

@triton.jit
def _merge_kernel(t0, t1, t2, t3, t4, t5, t6, t7, base_ptr, out_ptr, n, w_ptr, scale_ptr, dens_ptr, seed_ptr,
                  k_ptr, j_ptr, norm_ptr, flag_ptr, bits_ptr, lam,
                  N: tl.constexpr, HAS_BASE: tl.constexpr, SPARS: tl.constexpr, LATER_FIRST: tl.constexpr,
                  CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, RESCALE: tl.constexpr,
                  APPLY_LAMBDA: tl.constexpr, PHASE: tl.constexpr, TB: tl.constexpr, SUB: tl.constexpr,
                  NP: tl.constexpr, HAS_LO: tl.constexpr, WRITE_BITS: tl.constexpr):
    """One program per block of TB entries, walked in sub-tiles of SUB (few registers, many warps in flight).
    PHASE_NORMS: per-model norms before / after the mask of this block into norm_ptr [nblocks, 2, NP]; WRITE_BITS:
    also each entry's keep decisions (bit i: model i) into bits_ptr [n] uint8, for a phase 1 with SPARS 4.
    PHASE_MERGE: the fused merge, writing out; flag_ptr[0] = 1 if any input or output value is NaN/Inf."""
    pid = tl.program_id(0)
    DT = out_ptr.dtype.element_ty
    # PHASE_NORMS: element-wise accumulators per model (bi before, ai after the mask), reduced once per program
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
            if SPARS == SPARS_RANDOM:
                r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), idx)
                if N > 4:
                    r4, r5, r6, r7 = tl.randint4x(tl.load(seed_ptr + 1), idx)
            elif SPARS == SPARS_BITS:
                r0 = tl.load(bits_ptr + idx, mask=m, other=0).to(tl.uint32)
                r1, r2, r3, r4, r5, r6, r7 = r0, r0, r0, r0, r0, r0, r0
            if PHASE == PHASE_NORMS:
                kbits = tl.zeros((SUB,), dtype=tl.uint32)
                for i in tl.static_range(N):
                    _, d = _load_delta(_pick(i, t0, t1, t2, t3, t4, t5, t6, t7), idx, m, b, HAS_BASE, SPARS == SPARS_PRESPARSE)
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
                    x, d = _load_delta(_pick(i, t0, t1, t2, t3, t4, t5, t6, t7), idx, m, b, HAS_BASE, SPARS == SPARS_PRESPARSE)
                    nonfinite += tl.where(m, x.to(tl.float32) * 0.0, 0.0)
                    keep = _keep(d, idx, i, k_ptr, j_ptr, dens_ptr, _pick(i, r0, r1, r2, r3, r4, r5, r6, r7),
                                 SPARS, LATER_FIRST, HAS_LO)
                    sd = tl.where(keep, d.to(tl.float32), 0.0)
                    if RESCALE != NORM_NONE:
                        sd = round_to(sd * tl.load(scale_ptr + i), DT)
                    w = tl.load(w_ptr + i)
                    wd = round_to(sd * w, DT)
                    if CONSENSUS == CONSENSUS_NONE:
                        mixed += wd
                        divisor += w
                    else:
                        if CONSENSUS == CONSENSUS_SUM:
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
                if CONSENSUS != CONSENSUS_NONE:
                    elected = tl.where(vote >= 0, 1.0, -1.0)
                    for i in tl.static_range(N):
                        wd = _pick(i, w0, w1, w2, w3, w4, w5, w6, w7)
                        agree = wd * elected > 0  # sign(wd) == elected: a 0 never agrees
                        mixed += tl.where(agree, wd, 0.0)
                        divisor += tl.where(agree, tl.load(w_ptr + i), 0.0)
                mixed = round_to(mixed, DT)
                if NORMALIZE:
                    divisor = round_to(divisor, DT)
                    if CONSENSUS != CONSENSUS_NONE:
                        divisor = tl.where(divisor == 0, 1.0, divisor)
                    else:
                        divisor = tl.where(tl.abs(divisor) < 1e-8, 1.0, divisor)
                    mixed = round_to(tl.math.div_rn(mixed, divisor), DT)  # '/' is approximate on GPUs
                if APPLY_LAMBDA:
                    mixed = round_to(mixed * lam, DT)
                result = round_to(b + mixed, DT)
                # an overflow of the dtype (weights, lambda_, a rescale) is flagged like a bad input
                nonfinite += tl.where(m, result * 0.0, 0.0)
                tl.store(out_ptr + idx, result.to(DT), mask=m)
    if PHASE == PHASE_NORMS:
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
        if NORM == NORM_LINF:
            acc_b = tl.maximum(acc_b, b)
            acc_a = tl.maximum(acc_a, a)
        else:
            acc_b += b
            acc_a += a
        start += BLOCK
    if NORM == NORM_LINF:
        nb = tl.max(acc_b, 0)
        na = tl.max(acc_a, 0)
    else:
        nb = tl.sum(acc_b, 0)
        na = tl.sum(acc_a, 0)
    if NORM == NORM_L2:
        nb = tl.sqrt_rn(nb)
        na = tl.sqrt_rn(na)
    before = round_to(nb, DT)
    after = round_to(na, DT)
    ratio = round_to(tl.math.div_rn(before, after), DT)
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

class _Plan:
    """One fused merge: the N input tensors (pointer arguments), the per-model parameters on the device, the
    band edges, the rescale factors, and the passes."""

    def __init__(self, base: Optional[torch.Tensor], tensors: List[torch.Tensor], weights: Sequence[float],
                 dens: Optional[Sequence[float]] = None, flag: Optional[torch.Tensor] = None):
        self.base = base
        self.tensors = tensors
        self.n = tensors[0].numel()
        self.N = len(tensors)
        self.device = tensors[0].device
        self.ptrs = list(tensors) + [tensors[0]] * (MAX_MODELS - self.N)  # unused slots point at model 0
        self.nblocks = triton.cdiv(self.n, TB)
        N = self.N
        # weights [N], keep densities [N], ones [N]: fp32, one copy to the device
        host = torch.tensor(list(weights) + list(dens if dens is not None else [1.0] * N) + [1.0] * N,
                            dtype=torch.float32)
        params = masks.to_device(host, self.device)
        self.weights, self.dens, self.ones = params[:N], params[N:2 * N], params[2 * N:]
        # NaN/Inf flag of the passes (one an earlier kernel of the merge may already have set: DELLA's deltas)
        self.flag = flag if flag is not None else torch.zeros(1, dtype=torch.int32, device=self.device)
        self.edges = None   # int32 [2, 2N]: (K, J) of edge 2i + j of model i (j = 0: band start, 1: end)
        self.seeds = None   # int32 [2]: Philox seeds of models 0-3 and 4-7
        self.scale = None   # fp32 [N] once rescaled
        self.bits = None    # uint8 [n] keep decisions of a random draw once the norms pass stored them
        self.later_first = False
        self.has_lo = True  # False when every band starts at rank 0 (magnitude)

    @property
    def base_arg(self) -> torch.Tensor:
        return self.base if self.base is not None else self.tensors[0]

    def select_bands(self, bands: List[Optional[tuple]], *, later_first: bool, backend: str) -> None:
        """bands[i] = (lo, hi) kept positions of model i in descending-magnitude order, or None (keep all).
        Equal magnitudes are ordered by flat index, ascending (magnitude) or descending (``later_first``,
        breadcrumbs), as reference.descending_rank."""
        self.later_first = later_first
        self.has_lo = any(band is not None and band[0] > 0 for band in bands)
        rows = []
        for i, band in enumerate(bands):
            lo, hi = band if band is not None else (0, self.n)
            rows += [(i, lo, later_first), (i, hi, later_first)]
        self.edges = masks.select_edges(self.tensors, self.base, rows, magnitude=True, backend=backend)

    def launch(self, out, *, spars, consensus, normalize, rescale_norm, lambda_, phase, norms=None,
               bits=None) -> None:
        """One pass of _merge_kernel (PHASE_NORMS: norms into ``norms``, and keep bits into ``bits`` when given;
        PHASE_MERGE: the merge into ``out``, reading ``bits`` when spars is SPARS_BITS)."""
        edges = self.edges if self.edges is not None else self.flag.expand(2, 1)
        _merge_kernel[(self.nblocks,)](
            *self.ptrs, self.base_arg, out if out is not None else self.tensors[0], self.n,
            self.weights, self.scale if self.scale is not None else self.ones, self.dens,
            self.seeds if self.seeds is not None else self.flag, edges[0], edges[1],
            norms if norms is not None else self.ones, self.flag, bits if bits is not None else self.flag,
            float(lambda_), N=self.N, HAS_BASE=self.base is not None, SPARS=spars.value,
            LATER_FIRST=self.later_first, CONSENSUS=CONSENSUS_CODE[consensus].value, NORMALIZE=bool(normalize),
            RESCALE=NORM_CODE[rescale_norm].value, APPLY_LAMBDA=lambda_ != 1, PHASE=phase.value, TB=TB, SUB=SUB,
            NP=_NP[self.N], HAS_LO=self.has_lo, WRITE_BITS=phase is PHASE_NORMS and bits is not None,
            num_warps=NUM_WARPS,
            # IEEE fp32 as torch computes it: no mul+add contraction into FMA (bit-identical results)
            enable_fp_fusion=False)

    def rescale(self, spars, rescale_norm, active: List[bool]) -> None:
        """scale_i = norm(delta_i) / norm(masked delta_i), rounded like mergekit's 0-d tensors; 1 where no
        rescale. A random draw keeps its decisions (uint8 [n]) for the merge pass instead of drawing twice."""
        parts = torch.empty((self.nblocks, 2, _NP[self.N]), dtype=torch.float32, device=self.device)
        if spars is SPARS_RANDOM:
            self.bits = torch.empty(self.n, dtype=torch.uint8, device=self.device)
        self.launch(None, spars=spars, consensus=None, normalize=False, rescale_norm=rescale_norm,
                    lambda_=1.0, phase=PHASE_NORMS, norms=parts, bits=self.bits)
        self.scale_from_parts(parts, rescale_norm, active)

    def scale_from_parts(self, parts: torch.Tensor, rescale_norm: str, active: List[bool]) -> None:
        """self.scale (fp32 [N]) from norm partials [P, 2, NP(N)] (before / after each model's mask)."""
        self.scale = torch.empty(self.N, dtype=torch.float32, device=self.device)
        _rescale_scale_kernel[(1,)](parts, self.scale, self.tensors[0], parts.shape[0], self.N,
                                    sum(1 << i for i, a in enumerate(active) if a), ref.RESCALE_EPS,
                                    NORM=NORM_CODE[rescale_norm].value, NP=_NP[self.N], BLOCK=256, num_warps=4,
                                    enable_fp_fusion=False)

    def check(self, base: torch.Tensor, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Read the NaN/Inf flag of the merge pass (one host read); raise naming the bad input, or saying that the
        result overflows the dtype."""
        if int(self.flag.item()):
            raise_nonfinite(base, tensors)
            raise ValueError(f"{what}: the result overflows {str(base.dtype).replace('torch.', '')} (the weights, "
                             "lambda_ or the rescale push it past the dtype's largest value)")


@functools.lru_cache(maxsize=256)
def _rounded(values: tuple, dtype: torch.dtype) -> list:
    """values rounded to dtype as mergekit's weight tensor holds them (cached: the same for every tensor)."""
    return torch.tensor(values, dtype=dtype).float().tolist()


def _merge_supports(base, tensors, weights, **kwargs):
    if len(tensors) > MAX_MODELS:
        return [f"the fused kernel merges at most {MAX_MODELS} models, got {len(tensors)}"]
    return []


_LIMITS = {"numel": INT_MAX - 1}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@register("merge_task_vectors", "triton", dtypes=_DTYPES, limits=_LIMITS, supports=_merge_supports)
def merge_task_vectors(base, tensors, weights, **kwargs):
    return fused_merge(base, tensors, weights, parts_backend="triton", **kwargs)


# The 'cuda' merge is the same fused Triton pass with its band edges and DELLA task vectors from the masks
# family's CUDA kernels (DELLA's where its kernel takes the rows: fp16 / bf16, rows up to 65535, else Triton's).
@register("merge_task_vectors", "cuda", dtypes=_DTYPES, limits=_LIMITS, supports=_merge_supports)
def merge_task_vectors_cuda(base, tensors, weights, **kwargs):
    return fused_merge(base, tensors, weights, parts_backend="cuda", **kwargs)


def _della_backend(parts_backend: str, base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> str:
    """The CUDA merge's DELLA on the CUDA kernel where it takes these inputs, else on Triton."""
    if parts_backend == "cuda" and explain("della_deltas", base, list(tensors), [], [], [], [], None).get("cuda"):
        return "triton"
    return parts_backend


def fused_merge(base, tensors, weights, *, spars, consensus, densities, epsilons, gammas, lambda_, normalize,
                rescale_norm, generator=None, parts_backend: str = "triton", bad=None):
    """The fused merge; ``parts_backend`` ('triton' | 'cuda') is the masks family's backend for the band edges
    and DELLA's task vectors. bad: None (read the passes' NaN/Inf flag and raise here: one host wait), or the
    caller's zeroed int32 [1] flag, which the passes set and the caller reads (merge_task_vectors)."""
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
    norm = rescale_norm if mode is not SPARS_NONE else None
    if mode is SPARS_PRESPARSE:
        # density 0 keeps nothing whatever epsilon is (p = 0): no warning about shrinking it
        eps = ref.della_epsilons(densities, epsilons, active)
        flag = bad if bad is not None else torch.zeros(1, dtype=torch.int32, device=base.device)
        deltas, parts = masks.della_deltas(base, ts, densities, eps, masks.draw_seeds(generator, N), active, norm,
                                           bad=flag, backend=_della_backend(parts_backend, base, ts))
        plan = _Plan(base, list(deltas.unbind(0)), weights, flag=flag)
        if parts is not None:
            plan.scale_from_parts(F.pad(parts, (0, _NP[N] - N)).contiguous(), norm, active)
    elif mode is SPARS_RANDOM:
        plan = _Plan(base, ts, weights, dens=[d if a else 1.0 for d, a in zip(densities, active)], flag=bad)
        plan.seeds = masks.to_device(torch.tensor(masks.draw_seeds(generator, ref.dare_seed_count(N)),
                                                  dtype=torch.int32), base.device)
    else:
        plan = _Plan(base, ts, weights, flag=bad)
    if mode is SPARS_BAND:
        bands = []
        for i in range(N):
            if not active[i]:
                bands.append(None)
            elif spars == "magnitude":
                bands.append((0, masks.magnitude_count(n, densities[i])))
            else:
                bands.append(ref.breadcrumbs_band(n, densities[i], gammas[i]))
        plan.select_bands(bands, later_first=spars == "magnitude_outliers", backend=parts_backend)
    if norm is not None and plan.scale is None:
        plan.rescale(mode, norm, active)
    plan.launch(out, spars=SPARS_BITS if plan.bits is not None else mode, consensus=consensus, normalize=normalize,
                rescale_norm=norm, lambda_=lambda_, phase=PHASE_MERGE, bits=plan.bits)
    if bad is None:
        plan.check(base, ts, "merge_task_vectors")
    return out


@register("magnitude_outliers", "triton", dtypes=_DTYPES, limits=_LIMITS)
def magnitude_outliers(t, density, gamma, rescale_norm=None):
    return outliers(t, density, gamma, rescale_norm, parts_backend="triton")


@register("magnitude_outliers", "cuda", dtypes=_DTYPES, limits=_LIMITS)
def magnitude_outliers_cuda(t, density, gamma, rescale_norm=None):
    return outliers(t, density, gamma, rescale_norm, parts_backend="cuda")


def outliers(t, density, gamma, rescale_norm=None, parts_backend: str = "triton"):
    """Breadcrumbs' band of one tensor, its edges from masks.select_edges on ``parts_backend``."""
    if density >= 1:
        return t
    x = t.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    plan = _Plan(None, [x], [1.0])
    plan.select_bands([ref.breadcrumbs_band(x.numel(), density, gamma)], later_first=True, backend=parts_backend)
    if rescale_norm is not None:
        plan.rescale(SPARS_BAND, rescale_norm, [True])
    plan.launch(out, spars=SPARS_BAND, consensus=None, normalize=False, rescale_norm=rescale_norm,
                lambda_=1.0, phase=PHASE_MERGE)
    plan.check(x, [], "magnitude_outliers")
    return out


@register("ties_consensus", "triton", dtypes=_DTYPES)
def ties_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    d = deltas.contiguous()
    N = d.shape[0]
    M = d[0].numel() if N else 0
    out = torch.empty(d.shape, dtype=torch.int8, device=d.device)
    if M:
        _consensus_kernel[(triton.cdiv(M, 1024),)](d, out, M, N=N, COUNT=method == "count", BLOCK=1024)
    return out.view(torch.bool)
