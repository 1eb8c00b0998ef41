"""Pruning blocks and jobs: SparseGPTPruner (one layer), the model pipeline (in memory and streamed from disk
to disk), calibration data, task vectors, perplexity.

Names are loaded on first use (``from sparsity_engine.pruning import prune_model``), so importing this
package pulls in neither transformers nor any kernel.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SparseGPTPruner": "sparsegpt",
    "PruneConfig": "settings",
    "NMPattern": "settings",
    "prune_model": "pipeline",
    "run_prune_job": "pipeline",
    "capture_block_inputs": "capture",
    "run_eval": "evaluate",
    "TaskVectorConfig": "task_vectors",
    "prune_task_vectors": "task_vectors",
    "run_task_vector_job": "task_vectors",
    "calibration_ids": "calibration",
    "find_blocks": "models",
    "find_linears": "models",
    "LayerSpec": "settings",
    "prune_layer": "layer_pruners",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
