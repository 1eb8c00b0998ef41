"""SparseGPTPruner: one layer's SparseGPT lifecycle (add_batch -> prune / prune_task_vector -> free).

Mirrors the published ``SparseGPT`` class: calibration inputs are averaged into the Hessian
``H = 2/n sum X^T X`` (HessianAccumulator), then :func:`sparsity_engine.sparsegpt_prune` (or
:func:`prune_task_vector`) prunes the weight with OBS error compensation and writes it back into the layer.
Works on ``nn.Linear`` (weight [out, in]) and transformers' ``Conv1D`` (weight stored [in, out]); results are
always in the [out, in] orientation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.hessian import HessianAccumulator
from ..ops.obs import PruneResult, prune_task_vector, sparsegpt_prune


def _is_conv1d(layer) -> bool:
    # transformers' Conv1D (GPT-2): a Linear with its weight stored [in, out]; matched by name so that
    # transformers is not imported here
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and isinstance(
        getattr(layer, "weight", None), torch.Tensor)


class SparseGPTPruner:
    """SparseGPT for one ``nn.Linear`` / transformers ``Conv1D`` layer.

    ``add_batch(inp)`` with the layer's input ([..., in_features]; the leading dim of a 3-D input counts
    batch rows, as published), then ``prune(...)`` or ``prune_task_vector(base_weight, ...)``, then ``free()``.
    ``backend`` is passed to every op (None = auto).
    """

    def __init__(self, layer: nn.Module, *, backend: Optional[str] = None):
        if isinstance(layer, nn.Linear):
            self.transposed = False
        elif _is_conv1d(layer):
            self.transposed = True
        else:
            raise TypeError(f"layer must be an nn.Linear or a transformers Conv1D, got {type(layer).__name__}")
        self.layer = layer
        self.backend = backend
        self.rows, self.columns = self._weight().shape
        self._acc: Optional[HessianAccumulator] = HessianAccumulator(self.columns, layer.weight.device,
                                                                     backend=backend)

    def _weight(self) -> torch.Tensor:
        """The layer's weight as [out, in] (a view for Conv1D)."""
        w = self.layer.weight.data
        return w.t() if self.transposed else w

    def _accumulator(self) -> HessianAccumulator:
        if self._acc is None:
            raise RuntimeError("SparseGPTPruner was freed; create a new one for another layer")
        return self._acc

    @property
    def H(self) -> torch.Tensor:
        """The float32 [in, in] Hessian averaged so far."""
        return self._accumulator().H

    @property
    def nsamples(self) -> int:
        return self._accumulator().nsamples

    def add_batch(self, inp: torch.Tensor, out: Optional[torch.Tensor] = None) -> None:
        """Average one calibration batch of the layer's input into H (``out`` is accepted for forward-hook
        compatibility and ignored)."""
        if not isinstance(inp, torch.Tensor):
            raise TypeError(f"inp must be a torch.Tensor, got {type(inp).__name__}")
        if inp.dim() < 1 or inp.shape[-1] != self.columns:
            raise ValueError(f"inp must have shape [..., {self.columns}] (the layer's in_features), "
                             f"got {tuple(inp.shape)}")
        self._accumulator().add_batch(inp.detach())

    def _check_calibrated(self) -> torch.Tensor:
        if self.nsamples == 0:
            raise RuntimeError("SparseGPTPruner has no calibration data: call add_batch(inp) first")
        return self.H

    def _write(self, w_out_in: torch.Tensor) -> None:
        target = self.layer.weight.data
        target.copy_(w_out_in.t() if self.transposed else w_out_in)

    def prune(self, *, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0, blocksize: int = 128,
              percdamp: float = 0.01) -> PruneResult:
        """SparseGPT-prune the layer's weight in place; returns PruneResult in the [out, in] orientation."""
        H = self._check_calibrated()
        res = sparsegpt_prune(self._weight(), H, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m,
                              blocksize=blocksize, percdamp=percdamp, backend=self.backend)
        self._write(res.weight)
        return res

    def prune_task_vector(self, base_weight: torch.Tensor, *, density: float, rescale: bool = False,
                          prune_n: int = 0, prune_m: int = 0, blocksize: int = 128,
                          percdamp: float = 0.01) -> PruneResult:
        """The layer holds the fine-tuned weight; ``base_weight`` (shaped like ``layer.weight``) the base.

        delta = fine-tuned - base (float32) is pruned to ``density`` with error compensation; the layer
        becomes base + pruned delta (in its dtype). Returns PruneResult whose weight is the pruned delta
        (float32, [out, in]).
        """
        H = self._check_calibrated()
        if not isinstance(base_weight, torch.Tensor):
            raise TypeError(f"base_weight must be a torch.Tensor, got {type(base_weight).__name__}")
        if base_weight.shape != self.layer.weight.shape:
            raise ValueError(f"base_weight must have the layer's weight shape {tuple(self.layer.weight.shape)}, "
                             f"got {tuple(base_weight.shape)}")
        base = base_weight.t() if self.transposed else base_weight
        base = base.to(device=self.layer.weight.device, dtype=torch.float32)
        delta = self._weight().float() - base
        res = prune_task_vector(delta, H, density=density, rescale=rescale, prune_n=prune_n, prune_m=prune_m,
                                blocksize=blocksize, percdamp=percdamp, backend=self.backend)
        self._write((base + res.weight).to(self.layer.weight.dtype))
        return res

    def free(self) -> None:
        """Release the Hessian."""
        if self._acc is not None:
            self._acc.free()
        self._acc = None
