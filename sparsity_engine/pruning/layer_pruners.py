"""One layer, one method: SparseGPT, Wanda and magnitude pruning of a weight [out, in] given its Hessian.

All three take the weight in [out, in] orientation and the layer's calibration Hessian
``H = 2/n * X^T X`` (float32 [in, in], SparseGPT's running average), and return a ``PruneResult``
(pruned weight in the input dtype, boolean keep-mask, per-row loss). The loss is the same quantity for
every method, so methods compare fairly: ``loss_i = 1/2 * dW_i H dW_i^T`` with ``dW = W - W_pruned``
(for SparseGPT this equals the loss SparseGPT reports, up to its damping).

* ``magnitude``: keep the largest |W| of the whole layer (unstructured), or the n largest |W| of every m
  consecutive inputs (N:M).
* ``wanda`` (Sun et al. 2023): score ``|W_ij| * ||X_j||`` with ``||X_j||^2 = n/2 * H_jj`` (the scale does
  not change the ranking, so ``sqrt(diag H)`` is used); unstructured keeps the top scores *per output row*,
  N:M the n top scores per group of m inputs. No weight update.
* ``sparsegpt``: :func:`sparsity_engine.sparsegpt_prune` (OBS error compensation).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .settings import METHODS, LayerSpec  # noqa: F401  (LayerSpec is part of this module's interface)

def _result(weight: torch.Tensor, mask: torch.Tensor, loss: torch.Tensor):
    from ..ops.obs import PruneResult

    return PruneResult(weight, mask, loss)


def _keep_density(k_keep: int, n: int) -> float:
    # topk_mask keeps int(density * n) entries; the half step makes that exactly k_keep despite rounding
    return min(1.0, (k_keep + 0.5) / n)


@contextlib.contextmanager
def _report_precision(t: torch.Tensor):
    """The reported losses are measurements, not decisions: on a GPU their fp32 products use TF32 tensor
    cores (restored afterwards), which makes them ~8x cheaper (a 7B block: ~4.6 TFLOP per block of them)."""
    if not t.is_cuda:
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def row_losses(w0: torch.Tensor, w1: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``1/2 * diag(dW H dW^T)`` per output row, float32 [out] (dW = w0 - w1, both [out, in])."""
    dw = w0.float() - w1.float()
    with _report_precision(dw):
        return 0.5 * ((dw @ H.float()) * dw).sum(dim=1)


def energy(w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``1/2 * tr(W H W^T)`` as a 0-d float32 tensor on W's device (no synchronisation)."""
    wf = w.float()
    with _report_precision(wf):
        return 0.5 * ((wf @ H.float()) * wf).sum()


def output_energy(w: torch.Tensor, H: torch.Tensor) -> float:
    """``1/2 * tr(W H W^T)``: the loss of pruning everything, the denominator of the relative error."""
    return float(energy(w, H))


def magnitude_layer(weight: torch.Tensor, H: Optional[torch.Tensor], spec: LayerSpec, *, backend=None):
    """Magnitude needs no Hessian; with one (``H``) the loss is measured, else it is None."""
    from ..ops.masks import nm_mask, topk_mask

    scores = weight.detach().float().abs()
    if spec.structured:
        mask = nm_mask(scores, spec.pattern.n, spec.pattern.m, backend=backend)
    else:
        k_keep = scores.numel() - int(scores.numel() * spec.sparsity)
        mask = topk_mask(scores, _keep_density(k_keep, scores.numel()), backend=backend)
    pruned = weight * mask.to(weight.dtype)
    return _result(pruned, mask, None if H is None else row_losses(weight, pruned, H))


def wanda_layer(weight: torch.Tensor, H: torch.Tensor, spec: LayerSpec, *, backend=None):
    from ..ops.masks import nm_mask, topk_mask

    col_norm = torch.diagonal(H).float().clamp_min(0).sqrt()       # proportional to ||X_j||
    scores = weight.detach().float().abs() * col_norm.unsqueeze(0)
    if spec.structured:
        mask = nm_mask(scores, spec.pattern.n, spec.pattern.m, backend=backend)
    else:
        cols = scores.shape[1]
        k_keep = cols - int(cols * spec.sparsity)
        mask = topk_mask(scores, _keep_density(k_keep, cols), dim=1, backend=backend)
    pruned = weight * mask.to(weight.dtype)
    return _result(pruned, mask, row_losses(weight, pruned, H))


def sparsegpt_layer(weight: torch.Tensor, H: torch.Tensor, spec: LayerSpec, *, blocksize: int = 128,
                    percdamp: float = 0.01, backend=None):
    from ..ops.obs import sparsegpt_prune

    nm = spec.pattern.sparsegpt_args() if spec.structured else {}
    res = sparsegpt_prune(weight, H, sparsity=spec.sparsity, **nm, blocksize=blocksize, percdamp=percdamp,
                          backend=backend)
    # re-measured on the undamped H so all methods report the same quantity
    return _result(res.weight, res.mask, row_losses(weight, res.weight, H))


def prune_layer(weight: torch.Tensor, H: torch.Tensor, spec: LayerSpec, *, blocksize: int = 128,
                percdamp: float = 0.01, backend: Optional[str] = None):
    """Dispatch on ``spec.method``; weight [out, in], H float32 [in, in]. Returns a PruneResult."""
    if spec.method == "sparsegpt":
        return sparsegpt_layer(weight, H, spec, blocksize=blocksize, percdamp=percdamp, backend=backend)
    if spec.method == "wanda":
        return wanda_layer(weight, H, spec, backend=backend)
    if spec.method == "magnitude":
        return magnitude_layer(weight, H, spec, backend=backend)
    raise ValueError(f"method must be one of {METHODS}, got {spec.method!r}")
