"""Hessian accumulation for SparseGPT: ``accumulate_hessian_`` (functional, in place) and ``HessianAccumulator``.

The math is SparseGPT's ``add_batch``: for a batch of b rows of layer inputs with X = inp reshaped to
[b*T, C] in float32, the running average of 2 X^T X over batch rows,

    H <- H * n/(n+b) + (2/(n+b)) * X^T X,     n <- n + b,

where n counts the batch rows seen so far. H is float32 [C, C].

Batch rows (b) by input rank, SparseGPT's convention generalised:

* 2-D ``[T, C]``: one batch row (b = 1);
* 3-D ``[B, T, C]``: b = B;
* k-D ``[d0, ..., d_{k-3}, T, C]``: b = d0 * ... * d_{k-3} (every dim but the last two is a batch dim).

Edge cases: b == 0 (a leading dim of size 0) is a no-op that returns n unchanged (SparseGPT would divide 0 by
0 when n == 0); T == 0 with b > 0 mirrors SparseGPT: H is rescaled by n/(n+b) and the count still grows by b.
With n == 0 the old content of H is not read (a fresh, uninitialised buffer is fine).

Backends: 'reference' (fp32 upcast + one cuBLAS fp32 GEMM, TF32 off) and 'triton' (fp16/bf16 on tensor cores,
upper triangle only, scaling fused; see :mod:`.triton`). float32 inputs always run the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..._dispatch import dispatch, import_backend
from ..._validate import FLOAT_DTYPES, check_finite, check_int, check_result, check_same_device, check_tensor, finite_amax
from . import reference  # noqa: F401  (registers the oracle)

import_backend(__name__, "triton")

__all__ = ["accumulate_hessian_", "HessianAccumulator", "batch_rows"]


def batch_rows(inp: torch.Tensor) -> int:
    """The number of batch rows b that ``inp`` adds to the count (see the module docstring)."""
    return 1 if inp.dim() == 2 else math.prod(inp.shape[:-2])


def _check_hessian(H: torch.Tensor, columns: Optional[int] = None) -> int:
    check_tensor("H", H, ndim=2, dtypes=(torch.float32,))
    if H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(f"H must be a non-empty square [cols, cols] matrix, got shape {tuple(H.shape)}")
    if not H.is_contiguous():
        raise ValueError(f"H must be contiguous (it is updated in place), got strides {H.stride()}")
    return H.shape[0]


def _as_batches(inp: torch.Tensor, columns: int) -> torch.Tensor:
    """Validate ``inp`` and view it as [b, T, C] (a copy, in inp's dtype, only for strides no view can merge)."""
    check_tensor("inp", inp, min_ndim=2, dtypes=FLOAT_DTYPES)
    if inp.shape[-1] != columns:
        raise ValueError(f"inp must have {columns} columns in its last dim (H is [{columns}, {columns}]), "
                         f"got shape {tuple(inp.shape)}")
    inp = inp.detach()
    return inp.unsqueeze(0) if inp.dim() == 2 else inp.flatten(0, -3)


# X^T X sums T products of entries up to max|inp|^2: below this fraction of float32's range no entry of the
# update (nor H plus it) can overflow, decided from the max that the finiteness check computes anyway
_OVERFLOW_HEADROOM = 2.0 ** -8


def _accumulate(H: torch.Tensor, inp: torch.Tensor, nsamples: int, backend: Optional[str]) -> int:
    """Checked inputs -> one backend call. ``H`` has been validated by the caller. An update that could overflow
    float32 (inputs of ~1e17 and more) runs on a copy of H that is checked before it replaces H, so H is never
    left holding Inf: ValueError instead."""
    x = _as_batches(inp, H.shape[0])
    check_same_device(("H", H), ("inp", inp))
    if x.shape[0] == 0:
        return nsamples
    amax = finite_amax("inp", x)
    tokens = x.shape[0] * x.shape[1]
    largest = torch.finfo(torch.float32).max
    if tokens * amax * amax <= largest * _OVERFLOW_HEADROOM:
        return dispatch("accumulate_hessian", backend, H, x, nsamples)
    trial = H.clone()
    total = dispatch("accumulate_hessian", backend, trial, x, nsamples)
    check_result("accumulate_hessian_", trial, f"X^T X of inp overflows float32: |inp| reaches {amax:.4g} over "
                 f"{tokens} tokens; scale the inputs down")
    H.copy_(trial)
    return total


def accumulate_hessian_(H: torch.Tensor, inp: torch.Tensor, nsamples: int, *, backend: Optional[str] = None) -> int:
    """SparseGPT's running Hessian average, in place: H <- H*n/(n+b) + (2/(n+b)) X^T X; returns n + b.

    H: float32 [C, C], contiguous (finite when ``nsamples`` > 0; with ``nsamples`` == 0 it is overwritten
    without being read). inp: [..., T, C] float32/float16/bfloat16, finite, on H's device; b batch rows as
    :func:`batch_rows` says. nsamples: int >= 0, the batch rows already averaged into H.
    """
    _check_hessian(H)
    nsamples = check_int("nsamples", nsamples, minimum=0)
    check_tensor("inp", inp, min_ndim=2, dtypes=FLOAT_DTYPES)
    if nsamples > 0:
        check_finite("H", H)
    return _accumulate(H, inp, nsamples, backend)


class HessianAccumulator:
    """Running SparseGPT Hessian of one layer's inputs: ``add_batch(inp)`` per calibration batch, then ``.H``.

    columns: the layer's input features C. device: where H lives (default: torch's default device).
    backend: as for every op (None = auto). ``.H`` is the live float32 [C, C] buffer, ``.nsamples`` the
    batch rows averaged so far; ``reset()`` starts again, ``free()`` releases H (add_batch then raises until
    ``reset()``).
    """

    def __init__(self, columns: int, device=None, *, backend: Optional[str] = None):
        self.columns = check_int("columns", columns, minimum=1)
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        self.backend = backend
        self.nsamples = 0
        self._H: Optional[torch.Tensor] = torch.zeros(self.columns, self.columns, dtype=torch.float32,
                                                      device=self.device)

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            raise RuntimeError("HessianAccumulator.H was released by free(); call reset() to start again")
        return self._H

    def add_batch(self, inp: torch.Tensor) -> None:
        """Average the batch ``inp`` ([T, C] = one row, [B, T, C], or [..., T, C]) into H."""
        self.nsamples = _accumulate(self.H, inp, self.nsamples, self.backend)

    def reset(self) -> None:
        """Forget every batch: H = 0 (reallocated after free()), nsamples = 0."""
        if self._H is None:
            self._H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=self.device)
        else:
            self._H.zero_()
        self.nsamples = 0

    def free(self) -> None:
        """Release H (SparseGPT's ``free``)."""
        self._H = None

    def __repr__(self) -> str:
        state = "freed" if self._H is None else f"nsamples={self.nsamples}"
        return f"HessianAccumulator(columns={self.columns}, device={self.device}, {state})"
