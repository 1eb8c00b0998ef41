"""Plain-torch oracle for the CSR ops: conversion and x @ W^T through the exact dense weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dispatch import register
from .format import ALIGN, CSRMatrix, row_starts_padded


@register("to_csr", "reference")
def to_csr(weight: torch.Tensor, index_dtype: torch.dtype) -> CSRMatrix:
    """Drop the zeros of ``weight`` [N, K]; rows padded to ALIGN slots (see CSRMatrix)."""
    n_rows, n_cols = weight.shape
    keep = weight != 0
    lengths = keep.sum(1)                                   # int64 [N]
    crow = row_starts_padded(lengths)                       # int64 [N+1], multiples of ALIGN
    rows, cols = keep.nonzero(as_tuple=True)                # row-major: rows ascending, cols ascending
    true_start = torch.cumsum(lengths, 0) - lengths
    slot = crow[rows] + (torch.arange(rows.numel(), device=weight.device) - true_start[rows])
    total = int(crow[-1])
    values = torch.zeros(total, dtype=weight.dtype, device=weight.device)
    col_indices = torch.zeros(total, dtype=index_dtype, device=weight.device)
    values[slot] = weight[rows, cols]
    col_indices[slot] = cols.to(index_dtype)
    # longest rows first: a warp that picks up the next row late then gets a short one (LPT scheduling)
    order = torch.sort(lengths, descending=True, stable=True).indices.to(torch.int32)
    return CSRMatrix(crow, col_indices, values, lengths.to(torch.int32), order, (n_rows, n_cols))


@register("csr_linear", "reference")
def csr_linear(x2: torch.Tensor, csr: CSRMatrix, bias) -> torch.Tensor:
    """x2 [T, K] @ W^T (+ bias) with W the exact dense weight: what nn.Linear computes, bit for bit."""
    return F.linear(x2, csr.to_dense(), bias)


@register("csr_to_dense", "reference")
def csr_to_dense(csr: CSRMatrix) -> torch.Tensor:
    """The dense weight [N, K]: every stored value written once, zeros elsewhere."""
    return csr.to_dense()


__all__ = ["to_csr", "csr_linear", "csr_to_dense", "ALIGN"]
