"""sparsity_engine: Triton and CUDA kernels for large-model sparsity.

Every public op takes ``backend=None`` ('auto'), 'reference', 'triton' or 'cuda'; see :func:`backends`.
Names are loaded on first use, so ``import sparsity_engine`` is cheap and imports no kernel code.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS: Dict[str, str] = {
    # Hessian accumulation
    "HessianAccumulator": "sparsity_engine.ops.hessian",
    "accumulate_hessian_": "sparsity_engine.ops.hessian",
    # SparseGPT / OBS
    "PruneResult": "sparsity_engine.ops.obs",
    "sparsegpt_prune": "sparsity_engine.ops.obs",
    "prune_task_vector": "sparsity_engine.ops.obs",
    "importance_scores": "sparsity_engine.ops.obs",
    # masks
    "topk_mask": "sparsity_engine.ops.masks",
    "nm_mask": "sparsity_engine.ops.masks",
    "magnitude_prune": "sparsity_engine.ops.masks",
    "dare": "sparsity_engine.ops.masks",
    "della_magprune": "sparsity_engine.ops.masks",
    # merges
    "ties_consensus": "sparsity_engine.ops.merge",
    "merge_task_vectors": "sparsity_engine.ops.merge",
    "magnitude_outliers": "sparsity_engine.ops.merge",
    # CSR
    "CSRMatrix": "sparsity_engine.ops.csr",
    "to_csr": "sparsity_engine.ops.csr",
    "csr_linear": "sparsity_engine.ops.csr",
    "CSRLinear": "sparsity_engine.nn",
    "sparsify_linears_": "sparsity_engine.nn",
    # penalties
    "smooth_l0_penalty": "sparsity_engine.ops.penalties",
    "lp_penalty": "sparsity_engine.ops.penalties",
    "anneal_schedule": "sparsity_engine.ops.penalties",
    # blocks
    "SparseGPTPruner": "sparsity_engine.pruning.sparsegpt",
    # dispatch
    "BackendUnavailableError": "sparsity_engine._dispatch",
    "BACKENDS": "sparsity_engine._dispatch",
}

_SUBMODULES = ("metrics", "compat", "nn", "pruning", "ops", "merge", "io")

# the op families, imported by backends() so that it reports every op
_OP_FAMILIES = ("hessian", "obs", "masks", "merge", "csr", "penalties")

__all__ = sorted(_EXPORTS) + ["backends", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"sparsity_engine.{name}")
    raise AttributeError(f"module 'sparsity_engine' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))


def backends() -> Dict[str, Dict[str, Any]]:
    """For each backend ('reference', 'triton', 'cuda'): available (bool), reasons (why not), ops."""
    from . import _dispatch

    for family in _OP_FAMILIES:
        importlib.import_module(f"sparsity_engine.ops.{family}")
    return _dispatch.backends()
