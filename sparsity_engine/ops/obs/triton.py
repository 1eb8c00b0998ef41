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
the loop from the current tile. Matmuls run in true fp32 (tf32 off): the masks depend on exact values.
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
    """L^-1 with J H_d J = L L^T (lower, float32), or None if H_d is not positive definite."""
    n = hessian.shape[0]
    Hr = hessian.flip((0, 1)).to(torch.float32)  # flip copies: the input is never modified
    diag = Hr.diagonal()
    diag[dead.flip(0)] = 1
    diag += damp
    L, info = torch.linalg.cholesky_ex(Hr)
    del Hr
    if int(info) != 0:
        return None
    Linv = torch.zeros(n, n, dtype=L.dtype, device=L.device)  # row-major (L itself is column-major)
    for j in range(0, n, _INV_CHUNK):
        j2 = min(j + _INV_CHUNK, n)
        # columns j..j2 of L^-1 are zero above row j: solve only the trailing system
        eye = torch.eye(n - j, j2 - j, dtype=L.dtype, device=L.device)
        Linv[j:, j:j2] = torch.linalg.solve_triangular(L[j:, j:], eye, upper=False)
    if not bool(torch.isfinite(Linv).all()):
        return None
    return Linv


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


@triton.jit
def _lazy_update_kernel(c_ptr, ldc, a_ptr, lda, b_ptr, ldb, M, N, K: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """C[M, N] -= A[M, K] @ B[K, N] in place (row-major, leading dims ld*), fp32 accumulate on tensor cores."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * lda + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None].to(tl.int64) * ldb + rn[None, :],
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    ptrs = c_ptr + rm[:, None].to(tl.int64) * ldc + rn[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) - acc, mask=ok)


# How the lazy update W[:, i2:] -= Err @ U[i1:i2, i2:] runs: 'cublas' (torch.addmm in true fp32, the
# default) or 'tf32x3' (the Triton kernel above: three TF32 tensor-core products, ~fp32 accuracy).
LAZY_UPDATE = "cublas"


def _lazy_update(W: torch.Tensor, i2: int, err: torch.Tensor, slab: torch.Tensor) -> None:
    if LAZY_UPDATE == "cublas":
        W[:, i2:].addmm_(err, slab, alpha=-1.0)
        return
    M, K = err.shape
    N = slab.shape[1]
    BM, BN, BK = 128, 128, 32
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _lazy_update_kernel[grid](W[:, i2:], W.stride(0), err, err.stride(0), slab, slab.stride(0), M, N, K,
                              BM=BM, BN=BN, BK=BK, PRECISION="tf32x3", num_warps=8, num_stages=3)


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
    return 8, 4  # measured best or tied on H100 for 4096..28672 rows (benchmarks/bench_sparsegpt.py sweep)


@register("sparsegpt_prune", "triton", supports=lambda weight, hessian, sparsity, prune_n, prune_m, blocksize,
          percdamp: _reasons(weight, blocksize))
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


def _reasons(weight: torch.Tensor, blocksize: int) -> list:
    reasons = []
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"weight dtype {str(weight.dtype).replace('torch.', '')} is not supported by the Triton "
                       "kernel (float32, float16, bfloat16 are; float64 runs on the reference)")
    if blocksize > MAX_BLOCKSIZE:
        reasons.append(f"blocksize={blocksize} exceeds the Triton kernel's register tile ({MAX_BLOCKSIZE})")
    return reasons
