"""CUDA backend of the merge ops: the fused pass of csrc/merge.cu (16-byte loads, integer band tests: the
Triton pass is compute bound) with the magnitude / breadcrumbs band edges found by the CUDA radix select
(csrc/select.cu, via sparsity_engine.ops.masks.cuda.select_edges: two read passes for fp16/bf16, four for
fp32, no host round trip). The rescale norms pass and DARE's Philox draw are the Triton backend's kernels."""
from __future__ import annotations

from typing import List

from ..._dispatch import register
from ..._ext import dtype_code, load_extension, stream_ptr
from . import triton as merge_triton

_CONSENSUS = {None: 0, "sum": 1, "count": 2}


def _merge_supports(base, tensors, weights, **kwargs) -> List[str]:
    return merge_triton._merge_supports(base, tensors, weights, **kwargs)


def fused_pass(plan, out, *, spars: int, consensus, normalize: bool, rescale: bool, lambda_: float) -> None:
    """csrc/merge.cu over a triton._Plan (its inputs, packed parameters, band edges, rescale factors and NaN/Inf
    flag): out = base + the merged deltas, bit for bit what the Triton fused pass writes."""
    f32, i32 = plan._pack()
    N = plan.N
    scale = plan.scale if rescale else f32[2 * N:3 * N]
    base = plan.base.data_ptr() if plan.base is not None else 0
    load_extension().merge_fused([t.data_ptr() for t in plan.tensors], base, out.data_ptr(), plan.n, spars,
                                 _CONSENSUS[consensus], int(normalize), int(plan.has_lo), int(plan.later_first),
                                 int(rescale), int(lambda_ != 1), float(lambda_), f32[:N].data_ptr(),
                                 scale.data_ptr(), i32[:2 * N].data_ptr(), i32[2 * N:4 * N].data_ptr(),
                                 plan.flag().data_ptr(), dtype_code(out.dtype), stream_ptr(out))


@register("merge_task_vectors", "cuda", supports=_merge_supports)
def merge_task_vectors(base, tensors, weights, **kwargs):
    return merge_triton.merge_with_selector(base, tensors, weights, selector="cuda", fused=fused_pass, **kwargs)


@register("magnitude_outliers", "cuda")
def magnitude_outliers(t, density, gamma, rescale_norm=None):
    return merge_triton.outliers_with_selector(t, density, gamma, rescale_norm, selector="cuda", fused=fused_pass)
