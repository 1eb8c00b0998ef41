"""Triton backend of csr_linear: an SpMM for any number of tokens (used from 17 tokens on).

One program per (row, block of BLOCK_T tokens): it walks the row's nonzeros BLOCK_NZ at a time, gathers the
matching columns of x for its tokens ([BLOCK_T, BLOCK_NZ], read through the cache: x is small next to W)
and accumulates in fp32. Rows are taken in row_order (longest first).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._dispatch import register
from .format import CSRMatrix


@triton.jit
def _step(acc, p, end, toks, t_ok, col_ptr, val_ptr, x_ptr, K, BLOCK_NZ: tl.constexpr):
    """acc[t, :] += x[t, cols] * vals for the BLOCK_NZ slots from p (masked at the row end)."""
    offs = p + tl.arange(0, BLOCK_NZ).to(tl.int64)
    ok = offs < end
    cols = tl.load(col_ptr + offs, mask=ok, other=0).to(tl.int64)
    vals = tl.load(val_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xt = tl.load(x_ptr + toks[:, None] * K + cols[None, :], mask=t_ok[:, None] & ok[None, :], other=0.0)
    return acc + xt.to(tl.float32) * vals[None, :]


@triton.jit
def _csr_spmm_kernel(crow_ptr, len_ptr, order_ptr, col_ptr, val_ptr, x_ptr, bias_ptr, y_ptr,
                     N, K, T, MAX_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_NZ: tl.constexpr,
                     DYNAMIC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    r = tl.load(order_ptr + pid_r).to(tl.int64)
    start = tl.load(crow_ptr + r)
    end = start + tl.load(len_ptr + r).to(tl.int64)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_ok = toks < T
    acc = tl.zeros((BLOCK_T, BLOCK_NZ), dtype=tl.float32)
    # Triton 3.6's interpreter cannot take a tensor (loaded or argument) as a loop bound: there, loop to the
    # longest row, a compile-time constant (0 and unused when compiled)
    if DYNAMIC:
        for i in range(0, end - start, BLOCK_NZ):
            acc = _step(acc, start + i, end, toks, t_ok, col_ptr, val_ptr, x_ptr, K, BLOCK_NZ)
    else:
        for i in range(0, MAX_LEN, BLOCK_NZ):
            acc = _step(acc, start + i, end, toks, t_ok, col_ptr, val_ptr, x_ptr, K, BLOCK_NZ)
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + r).to(tl.float32)
    tl.store(y_ptr + toks * N + r, out.to(y_ptr.dtype.element_ty), mask=t_ok)


@register("csr_linear", "triton")
def csr_linear(x2: torch.Tensor, csr: CSRMatrix, bias: Optional[torch.Tensor]) -> torch.Tensor:
    tokens, k = x2.shape
    n = csr.shape[0]
    y = torch.empty(tokens, n, dtype=x2.dtype, device=x2.device)
    block_t = max(2, min(64, triton.next_power_of_2(tokens)))
    block_nz = max(16, min(128, 4096 // block_t))
    grid = (n, triton.cdiv(tokens, block_t))
    dynamic = x2.is_cuda
    max_len = 0 if dynamic else int(csr.row_lengths.max())
    b = bias.contiguous() if bias is not None else y  # never read without HAS_BIAS
    _csr_spmm_kernel[grid](csr.crow_indices, csr.row_lengths, csr.row_order, csr.col_indices, csr.values,
                           x2, b, y, n, k, tokens, max_len, HAS_BIAS=bias is not None, BLOCK_T=block_t,
                           BLOCK_NZ=block_nz, DYNAMIC=dynamic)
    return y


@triton.jit
def _csr_to_dense_kernel(crow_ptr, len_ptr, col_ptr, val_ptr, out_ptr, K, MAX_LEN: tl.constexpr,
                         BLOCK: tl.constexpr, DYNAMIC: tl.constexpr):
    # one program per row: scatter its entries into the zeroed dense row
    r = tl.program_id(0).to(tl.int64)
    start = tl.load(crow_ptr + r)
    end = start + tl.load(len_ptr + r).to(tl.int64)
    if DYNAMIC:
        for i in range(0, end - start, BLOCK):
            offs = start + i + tl.arange(0, BLOCK).to(tl.int64)
            ok = offs < end
            cols = tl.load(col_ptr + offs, mask=ok, other=0).to(tl.int64)
            tl.store(out_ptr + r * K + cols, tl.load(val_ptr + offs, mask=ok), mask=ok)
    else:
        for i in range(0, MAX_LEN, BLOCK):
            offs = start + i + tl.arange(0, BLOCK).to(tl.int64)
            ok = offs < end
            cols = tl.load(col_ptr + offs, mask=ok, other=0).to(tl.int64)
            tl.store(out_ptr + r * K + cols, tl.load(val_ptr + offs, mask=ok), mask=ok)


@register("csr_to_dense", "triton")
def csr_to_dense(csr: CSRMatrix) -> torch.Tensor:
    """The dense weight [N, K] (one zero-fill + one scatter pass; the dense fallback of csr_linear)."""
    n, k = csr.shape
    out = torch.zeros(n, k, dtype=csr.dtype, device=csr.device)
    if n == 0 or k == 0 or csr.values.numel() == 0:
        return out
    dynamic = out.is_cuda
    max_len = 0 if dynamic else int(csr.row_lengths.max())
    _csr_to_dense_kernel[(n,)](csr.crow_indices, csr.row_lengths, csr.col_indices, csr.values, out, k,
                               MAX_LEN=max_len, BLOCK=1024, DYNAMIC=dynamic)
    return out
