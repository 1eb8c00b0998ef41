"""Mask selection ops: N:M, top-k, magnitude, DARE, DELLA.

Each public function validates its arguments, then dispatches to a backend (reference | triton | cuda).
"""
from __future__ import annotations

import torch

from ..._dispatch import dispatch, import_backend
from ..._validate import FLOAT_DTYPES, check_nm, check_tensor
from . import reference  # noqa: F401  (registers the oracle)

import_backend(__name__, "triton")
import_backend(__name__, "cuda")


def nm_mask(scores: torch.Tensor, n: int, m: int, *, backend: str = None) -> torch.Tensor:
    """Boolean keep-mask of the ``n`` largest of every ``m`` consecutive entries along the last dim.

    scores: [..., k] float (fp32/fp16/bf16), finite, k divisible by m. Returns bool of the same shape with
    exactly n True per group. Ties go to the lower index (a stable descending order), on every backend.
    """
    check_tensor("scores", scores, min_ndim=1, dtypes=FLOAT_DTYPES, finite=True)
    n, m = check_nm(n, m, scores.shape[-1] if scores.dim() else 0)
    return dispatch("nm_mask", backend, scores, n, m)
