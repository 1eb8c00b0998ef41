"""CUDA backend of the merge ops: the Triton fused merge with its magnitude / breadcrumbs band edges found by
the CUDA radix select (csrc/select.cu, via sparsity_engine.ops.masks.cuda.select_edges): two read passes for
fp16/bf16 and four for fp32, histograms in shared memory, no host round trip); DELLA with its task vectors
ranked, drawn and sparsified by one CUDA kernel (csrc/masks_della.cu della_deltas, fp16 / bf16). Task
arithmetic and DARE run exactly the Triton backend's kernels."""
from __future__ import annotations

from typing import List

from ..._dispatch import register
from . import triton as merge_triton


def _merge_supports(base, tensors, weights, **kwargs) -> List[str]:
    return merge_triton._merge_supports(base, tensors, weights, **kwargs)


@register("merge_task_vectors", "cuda", supports=_merge_supports)
def merge_task_vectors(base, tensors, weights, **kwargs):
    return merge_triton.merge_with_selector(base, tensors, weights, selector="cuda", **kwargs)


@register("magnitude_outliers", "cuda")
def magnitude_outliers(t, density, gamma, rescale_norm=None):
    return merge_triton.outliers_with_selector(t, density, gamma, rescale_norm, selector="cuda")
