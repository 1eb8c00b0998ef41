"""Triton backend of SparseGPT: the inverse factor prepared once, then per block of columns one kernel launch
that runs the whole column-by-column OBS loop for a tile of rows in registers, plus one fp32 matmul for the
lazy update of the columns to the right.

Inverse factor. Let J reverse the order of rows/columns and ``J H_d J = L L^T`` (one Cholesky). Then
``H_d = M M^T`` with ``M = J L J`` upper triangular, so ``H_d^-1 = M^-T M^-1`` and, by uniqueness of the
Cholesky factor (positive diagonal), the published ``U = chol(H_d^-1, upper)`` is ``M^-1 = J L^-1 J``: one
Cholesky and one triangular inverse instead of three O(n^3) factorisations. We keep ``Linv = L^-1`` and read
``U[a, b] = Linv[n-1-a, n-1-b]``; each block copies out its slab ``U[i1:i2, i1:]`` (O(blocksize x n)).

Per block the kernel holds a [BLOCK_R, blocksize] tile of W; rows are independent inside a block, so each
program runs all ``blocksize`` column steps on its rows (extract column i, zero the pruned entries, err =
(w - q) / U_ii, W1 -= err U[i, i:]) and writes Q, Err and the loss. Unstructured masks are chosen before the
launch over all rows of the block, exactly as the reference (one top-k per block); N:M masks are chosen inside
the loop from the current tile. The masks depend on the last bits, so matmuls run in true fp32 (tf32 off),
except the lazy update of large blocks: one TF32 tensor-core product over operands split as x = hi + lo
(3xTF32: hi hi + hi lo + lo hi, an error of ~2^-20 relative instead of fp32's 2^-24; the mask agreement with
the fp32 reference and the loss were measured unchanged to 1e-4 at every benchmark shape, BENCHMARKS.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._dispatch import register
from .reference import PruneResult, damped_factor, fp32_matmul

MAX_BLOCKSIZE = 256  # one register tile per program holds [BLOCK_R, blocksize] fp32
_INV_CHUNK = 1024    # columns of L^-1 solved at a time (bounds the workspace)


# ---------------------------------------------------------------- inverse factor

def _reversed_factor(hessian, dead, damp, dtype):
    """L^-1 with J H_d J = L L^T (lower, float32, column-major), or None if H_d is not positive definite.

    One n x n buffer holds J H_d J, then L (Cholesky in place), then L^-1: its columns j..j2 need only
    L[j:, j:], and later chunks read only L[j2:, j2:], so each solved chunk overwrites the columns it came
    from. Besides that buffer the work space is O(n x _INV_CHUNK)."""
    n = hessian.shape[0]
    buf = torch.empty((n, n), dtype=torch.float32, device=hessian.device).t()  # column-major, as LAPACK keeps L
    for j in range(0, n, _INV_CHUNK):
        j2 = min(j + _INV_CHUNK, n)
        buf[j:j2] = hessian[n - j2:n - j].flip((0, 1))  # J H J a chunk of rows at a time (flip copies)
    diag = buf.diagonal()
    diag[dead.flip(0)] = 1
    diag += damp
    info = torch.empty((), dtype=torch.int32, device=buf.device)
    torch.linalg.cholesky_ex(buf, out=(buf, info))
    if int(info) != 0:
        return None
    finite = torch.ones((), dtype=torch.bool, device=buf.device)
    for j in range(0, n, _INV_CHUNK):
        j2 = min(j + _INV_CHUNK, n)
        eye = torch.eye(n - j, j2 - j, dtype=buf.dtype, device=buf.device)
        inv = torch.linalg.solve_triangular(buf[j:, j:], eye, upper=False)
        finite &= torch.isfinite(inv).all()
        buf[j:, j:j2] = inv  # rows above j stay zero: L's upper triangle
    return buf if bool(finite) else None


def upper_inverse_factor(hessian: torch.Tensor, percdamp: float, who: str = "sparsegpt_prune"):
    """(U, dead): the published upper Cholesky factor of H_d^-1, via the reversed Cholesky (for tests)."""
    Linv, dead = damped_factor(hessian, percdamp, torch.float32, _reversed_factor, who)
    return Linv.flip((0, 1)), dead


# ---------------------------------------------------------------- kernel

@triton.jit
def _nm_choose(W1, dg, c, i, pr, PRUNE_N: tl.constexpr, PRUNE_M: tl.constexpr):
    """Add to ``pr`` the PRUNE_N lowest w^2/d^2 of columns i..i+M-1 per row (ties: lower index first)."""
    s = tl.math.div_rn(W1 * W1, (dg * dg)[None, :])
    in_group = (c >= i) & (c < i + PRUNE_M)
    rank = tl.zeros(W1.shape, dtype=tl.int32)
    for j in tl.static_range(PRUNE_M):
        sj = tl.sum(tl.where(c[None, :] == i + j, s, 0.0), axis=1)[:, None]
        before = (sj < s) | ((sj == s) & ((i + j) < c[None, :]))
        rank += before.to(tl.int32)
    return pr | (in_group[None, :] & (rank < PRUNE_N))


@triton.jit
def _nm_choose_grouped(W1, dg, i, pr, PRUNE_N: tl.constexpr, PRUNE_M: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """_nm_choose for a power-of-two PRUNE_M: the tile viewed as [rows, groups, M] gives the group's M columns
    with one reduction, so the scores and ranks cost [rows, M] work instead of [rows, BLOCK_C]."""
    G: tl.constexpr = BLOCK_C // PRUNE_M
    in_group = (tl.arange(0, G) == i // PRUNE_M)
    m = tl.arange(0, PRUNE_M)
    sel = in_group[None, :, None]
    w = tl.sum(tl.where(sel, tl.reshape(W1, (BLOCK_R, G, PRUNE_M)), 0.0), axis=1)
    d = tl.sum(tl.where(in_group[:, None], tl.reshape(dg, (G, PRUNE_M)), 0.0), axis=0)
    s = tl.math.div_rn(w * w, (d * d)[None, :])
    rank = tl.zeros((BLOCK_R, PRUNE_M), dtype=tl.int32)
    for j in tl.static_range(PRUNE_M):
        sj = tl.sum(tl.where(m[None, :] == j, s, 0.0), axis=1)[:, None]
        rank += ((sj < s) | ((sj == s) & (j < m[None, :]))).to(tl.int32)
    chosen = sel & (rank < PRUNE_N)[:, None, :]
    return tl.reshape(tl.reshape(pr, (BLOCK_R, G, PRUNE_M)) | chosen, (BLOCK_R, BLOCK_C))


@triton.jit
def _obs_block_kernel(w_ptr, stride_w, u_ptr, stride_u, prune_ptr, err_ptr, stride_e, keep_ptr, stride_k,
                      loss_ptr, rows, i1, count: tl.constexpr,
                      PRUNE_N: tl.constexpr, PRUNE_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    r_ok = r < rows
    c_ok = c < count
    tile_ok = r_ok[:, None] & c_ok[None, :]
    W1 = tl.load(w_ptr + r[:, None] * stride_w + i1 + c[None, :], mask=tile_ok, other=0.0)
    dg = tl.load(u_ptr + c * stride_u + c, mask=c_ok, other=1.0)
    if PRUNE_N == 0:
        pr = tl.load(prune_ptr + r[:, None] * count + c[None, :], mask=tile_ok, other=0) != 0
    else:
        pr = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int1)
    for i in range(0, count):
        if PRUNE_N > 0:
            if i % PRUNE_M == 0:
                if (PRUNE_M & (PRUNE_M - 1)) == 0:
                    pr = _nm_choose_grouped(W1, dg, i, pr, PRUNE_N, PRUNE_M, BLOCK_R, BLOCK_C)
                else:
                    pr = _nm_choose(W1, dg, c, i, pr, PRUNE_N, PRUNE_M)
        # w - q: the current value where column i is pruned, 0 where kept (one row reduction per column)
        diff = tl.sum(tl.where((c[None, :] == i) & pr, W1, 0.0), axis=1)
        e = tl.math.div_rn(diff, tl.load(u_ptr + i * stride_u + i))
        # columns > i only: column i keeps its value at step i, from which Q, Err and the loss follow
        u = tl.load(u_ptr + i * stride_u + c, mask=c_ok & (c > i), other=0.0)
        W1 = W1 - e[:, None] * u[None, :]
    Q = tl.where(pr, 0.0, W1)
    E = tl.where(pr, tl.math.div_rn(W1, dg[None, :]), 0.0)  # err_i = (w - q) / U_ii, as in the loop
    loss = tl.sum(tl.where(pr, tl.math.div_rn(W1 * W1, (dg * dg)[None, :]), 0.0), axis=1)
    tl.store(w_ptr + r[:, None] * stride_w + i1 + c[None, :], Q, mask=tile_ok)
    tl.store(err_ptr + r[:, None] * stride_e + c[None, :], E, mask=tile_ok)
    tl.store(keep_ptr + r[:, None] * stride_k + i1 + c[None, :], (~pr).to(tl.int8), mask=tile_ok)
    old = tl.load(loss_ptr + r, mask=r_ok, other=0.0)
    tl.store(loss_ptr + r, old + 0.5 * loss, mask=r_ok)


# How the lazy update W[:, i2:] -= Err @ U[i1:i2, i2:] runs: 'cublas' (torch.addmm in true fp32), 'tf32x3'
# (one cuBLAS TF32 tensor-core product over the split operands, ~fp32 accuracy) or 'auto' (tf32x3 on a GPU
# for updates of at least TF32X3_MIN_ELEMENTS entries of W, where the product outweighs the split's launches;
# below that the split's launches cost more than they save: BENCHMARKS.md, SparseGPT, fp32_ms / x3_ms).
LAZY_UPDATE = "auto"
TF32X3_MIN_ELEMENTS = 1 << 25
_TF32_HI = -(1 << 13)  # int32 mask clearing the 13 low mantissa bits: what is left is exact in TF32


def _split3(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[hi, hi, lo] (dim=1) or [hi, lo, hi] (dim=0) stacked along ``dim``, where x = hi + lo exactly and hi
    has TF32's 10 mantissa bits, so one TF32 product of the stacks is hi_a hi_b + hi_a lo_b + lo_a hi_b."""
    k = x.shape[dim]
    out = x.new_empty((x.shape[0], 3 * k) if dim == 1 else (3 * k, x.shape[1]))
    parts = out.split(k, dim=dim)
    hi, second, third = parts if dim == 1 else (parts[0], parts[2], parts[1])
    torch.bitwise_and(x.view(torch.int32), _TF32_HI, out=hi.view(torch.int32))
    second.copy_(hi)
    torch.sub(x, hi, out=third)
    return out


def _lazy_update(W: torch.Tensor, i2: int, err: torch.Tensor, slab: torch.Tensor) -> None:
    mode = LAZY_UPDATE
    if mode == "auto":
        big = err.shape[0] * slab.shape[1] >= TF32X3_MIN_ELEMENTS
        mode = "tf32x3" if W.is_cuda and big else "cublas"
    if mode == "cublas":
        W[:, i2:].addmm_(err, slab, alpha=-1.0)
        return
    a, b = _split3(err, 1), _split3(slab, 0)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        W[:, i2:].addmm_(a, b, alpha=-1.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# ---------------------------------------------------------------- launcher

def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """sorted(flat)[k] (0-based) without a full sort: one top-k from the shorter side."""
    n = flat.numel()
    if k + 1 <= n - k:
        return torch.topk(flat, k + 1, largest=False, sorted=False).values.max()
    return torch.topk(flat, n - k, largest=True, sorted=False).values.min()


def _unstructured_prune(W1: torch.Tensor, dg: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's adaptive rule on one block (bool True = pruned), as int8 [rows, count]."""
    if sparsity <= 0:
        return torch.zeros(W1.shape, dtype=torch.int8, device=W1.device)
    if sparsity >= 1:
        return torch.ones(W1.shape, dtype=torch.int8, device=W1.device)
    scores = W1 ** 2 / dg.reshape(1, -1) ** 2
    thresh = _kth_smallest(scores.flatten(), int(scores.numel() * sparsity))
    return (scores <= thresh).to(torch.int8)


# (rows per program, warps): small tiles for few rows keep enough programs in flight to hide the
# per-column latency; tests/benchmarks may override it
TILE_OVERRIDE = None


def _tile(rows: int):
    if TILE_OVERRIDE is not None:
        return TILE_OVERRIDE
    return 8, 4  # best or tied for 4096..28672 rows in benchmarks/bench_sparsegpt.py --sweep


@register("sparsegpt_prune", "triton", tensor="weight", dtypes=(torch.float32, torch.float16, torch.bfloat16),
          limits={"blocksize": MAX_BLOCKSIZE})
def sparsegpt_prune(weight, hessian, sparsity, prune_n, prune_m, blocksize, percdamp) -> PruneResult:
    rows, cols = weight.shape
    with fp32_matmul():
        Linv, dead = damped_factor(hessian, percdamp, torch.float32, _reversed_factor, "sparsegpt_prune")
        W = weight.to(dtype=torch.float32, copy=True).contiguous()
        W[:, dead] = 0
        keep = torch.empty(rows, cols, dtype=torch.int8, device=W.device)
        loss = torch.zeros(rows, dtype=torch.float32, device=W.device)
        err = torch.empty(rows, blocksize, dtype=torch.float32, device=W.device)
        block_c = triton.next_power_of_2(blocksize)
        block_r, warps = _tile(rows)
        grid = (triton.cdiv(rows, block_r),)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            count = i2 - i1
            # U[i1:i2, i1:] from the reversed inverse: rows/cols n-1-a of Linv, copied contiguous
            slab = Linv[cols - i2:cols - i1, :cols - i1].flip((0, 1)).contiguous()
            prune = (_unstructured_prune(W[:, i1:i2], torch.diagonal(slab[:, :count]), sparsity)
                     if prune_n == 0 else err)  # N:M: the kernel does not read it
            _obs_block_kernel[grid](W, W.stride(0), slab, slab.stride(0), prune, err, err.stride(0),
                                    keep, keep.stride(0), loss, rows, i1, count,
                                    PRUNE_N=prune_n, PRUNE_M=max(prune_m, 1), BLOCK_R=block_r,
                                    BLOCK_C=block_c, num_warps=warps)
            if i2 < cols:
                _lazy_update(W, i2, err[:, :count], slab[:, count:])
    return PruneResult(W.to(weight.dtype), keep.view(torch.bool), loss)
