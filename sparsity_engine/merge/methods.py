"""The merge methods of the ``merge`` job, one tensor at a time, as mergekit 0.1.5 computes them.

Each method has a :class:`MethodSpec` (its parameters with mergekit's scopes and defaults, and its input
contract) and a function ``merge(tensors, base, shared, per_input, generator, backend) -> Tensor`` that gets
every input's tensor (same shape, dtype and device, in the configuration's input order), the index of the base
among them (or None), the shared parameters and one dict of per-input parameters per input.

* the task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) runs through the fused op
  :func:`sparsity_engine.merge_task_vectors` (our kernels on a GPU);
* linear, slerp, nuslerp and model_stock are cheap element-wise math per tensor, written here in plain torch
  with the math in each docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..ops.merge import METHODS as TASK_ARITHMETIC, merge_task_vectors

__all__ = ["Param", "MethodSpec", "METHODS", "linear", "slerp", "nuslerp", "model_stock"]

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A method parameter: name, type (float or bool), scope ('shared' | 'input' | 'non_base'), default."""
    name: str
    kind: type
    scope: str
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodSpec:
    """mergekit's specification of a method: parameters and input contract (base: 'required' | 'optional' |
    'ignored'; min / max inputs counting the base; non_base: the exact number of other inputs, if fixed)."""
    params: Tuple[Param, ...]
    fn: Callable[..., torch.Tensor]
    base: str = "required"
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    non_base: Optional[int] = None
    task_arithmetic: bool = False
    deterministic: bool = True


# ------------------------------------------------------------------ task arithmetic (fused op)

def _kept_at_least_one(sparsification: Optional[str], density: float, numel: int) -> float:
    """mergekit 0.1.5's magnitude keeps max(1, int(density * n)) entries; the op keeps int(density * n). Raise
    a density that would keep none to one that keeps exactly one (1 of 1: density 1). A density above 1 means
    no sparsification, as in mergekit."""
    density = min(density, 1.0)
    if sparsification != "magnitude" or density <= 0 or density >= 1 or int(density * numel) > 0:
        return density
    return 1.0 if numel <= 1 else 1.5 / numel


def _task_arithmetic(method: str):
    spec = TASK_ARITHMETIC[method]

    def merge(tensors: Sequence[torch.Tensor], base: int, shared: Dict[str, Any], per_input: List[Dict[str, Any]],
              generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> torch.Tensor:
        """mergekit's generalized task arithmetic through ``merge_task_vectors`` (see its docstring for the
        math): per non-base model its weight, density and gamma / epsilon; shared normalize, rescale (True:
        match the L1 norm) and lambda. int8_mask only chose the dtype mergekit compared signs in."""
        others = [i for i in range(len(tensors)) if i != base]
        if not others:
            return tensors[base]
        numel = tensors[base].numel()
        pick = lambda key, default: [per_input[i].get(key, default) for i in others]  # noqa: E731
        density = [_kept_at_least_one(spec.sparsification, d, numel) for d in pick("density", 1.0)]
        return merge_task_vectors(tensors[base], [tensors[i] for i in others], pick("weight", 1.0), method=method,
                                  density=density, epsilon=pick("epsilon", 0.15), gamma=pick("gamma", 0.01),
                                  lambda_=shared["lambda"], normalize=shared["normalize"], rescale=shared["rescale"],
                                  generator=generator, backend=backend)

    return merge


def _task_arithmetic_spec(method: str) -> MethodSpec:
    s = TASK_ARITHMETIC[method]
    params = [Param("int8_mask", bool, "shared", False), Param("normalize", bool, "shared", s.normalize),
              Param("rescale", bool, "shared", s.rescale), Param("lambda", float, "shared", 1.0),
              Param("weight", float, "non_base"), Param("density", float, "non_base", 1.0)]
    if s.sparsification == "magnitude_outliers":
        params.append(Param("gamma", float, "non_base", 0.01))
    if s.sparsification == "della_magprune":
        params.append(Param("epsilon", float, "non_base", 0.15))
    return MethodSpec(tuple(params), _task_arithmetic(method), base="required", task_arithmetic=True,
                      deterministic=s.sparsification not in ("random", "della_magprune"))


# ------------------------------------------------------------------ plain torch methods

def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[torch.Tensor], base: Optional[int], shared: Dict[str, Any],
           per_input: List[Dict[str, Any]], generator=None, backend=None) -> torch.Tensor:
    """Weighted average: out = sum_i w_i x_i (/ sum_i w_i with normalize), accumulated in float32 (float64 for
    float64 inputs) with one fused multiply-add per input in input order, then cast to the inputs' dtype. The
    base, if any, is an ordinary input with its own weight (mergekit ignores the base for linear)."""
    first = tensors[0]
    work = _work_dtype(first)
    w = torch.tensor([p["weight"] for p in per_input], dtype=work, device=first.device)
    out = torch.zeros_like(first, dtype=work)
    for i, t in enumerate(tensors):
        out.addcmul_(t, w[i])
    if shared["normalize"]:
        out.div_(w.sum())
    return out.to(first.dtype)


SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


def slerp(tensors: Sequence[torch.Tensor], base: int, shared: Dict[str, Any], per_input: List[Dict[str, Any]],
          generator=None, backend=None) -> torch.Tensor:
    """Spherical interpolation from the base v0 (t = 0) to the other input v1 (t = 1), the whole tensor as one
    vector, in float32 (float64 for float64 inputs):

        a = v0 / |v0|, b = v1 / |v1| (a norm <= 1e-8 counts as 1),  d = clamp(a . b, -1, 1),  theta = acos(d)
        out = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1
        (nearly parallel or antiparallel, |d| > 0.9995:  out = (1 - t) v0 + t v1)

    The result is written in the inputs' dtype."""
    v0, v1 = tensors[base], tensors[1 - base]
    work = _work_dtype(v0)
    a, b = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
    t = torch.tensor(shared["t"], dtype=work, device=v0.device)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    near = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(near, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(near, t, torch.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).to(v0.dtype).reshape(v0.shape)


NUSLERP_EPS = 1e-8


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """Spherical interpolation of v0 and v1 along the last dim (whole tensor if ``flatten``; along dim 0 per
    column if ``row_wise``), in the inputs' dtype: with u = x / max(|x|, 1e-7) per vector, c = clamp(u0 . u1),
    theta = acos(c), out = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta); where 1 - c^2 <= 1e-16
    (colinear) out = (1 - t) v0 + t v1."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(tensors: Sequence[torch.Tensor], base: Optional[int], shared: Dict[str, Any],
            per_input: List[Dict[str, Any]], generator=None, backend=None) -> torch.Tensor:
    """NuSLERP of the two non-base inputs x0, x1 with weights w0, w1: t = w1 / (w0 + w1) (0.5 when
    |w0 + w1| < 1e-6); with a base b, out = b + nuslerp(t, x0 - b, x1 - b), else nuslerp(t, x0, x1) (see
    _nuslerp; nuslerp_flatten default true, nuslerp_row_wise default false), in the inputs' dtype."""
    others = [i for i in range(len(tensors)) if i != base]
    w0, w1 = (per_input[i]["weight"] for i in others)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    x0, x1 = (tensors[i] for i in others)
    row_wise, flatten = shared["nuslerp_row_wise"], shared["nuslerp_flatten"]
    if base is None:
        return _nuslerp(t, x0, x1, row_wise, flatten)
    b = tensors[base]
    return b + _nuslerp(t, x0 - b, x1 - b, row_wise, flatten)


def model_stock(tensors: Sequence[torch.Tensor], base: int, shared: Dict[str, Any],
                per_input: List[Dict[str, Any]], generator=None, backend=None) -> torch.Tensor:
    """Model Stock (Jang et al. 2024) over the base w0 and k >= 2 fine-tunes w_i, in the inputs' dtype:
    cos = mean over pairs i < j of clamp(d_i . d_j / max(|d_i| |d_j|, 1e-6), -1, 1) with d_i = w_i - w0
    (whole tensor; per row with filter_wise, a 1-D tensor being one row), t = k cos / (1 + (k - 1) cos)
    (t = 0 where |1 + (k - 1) cos| < 1e-6), out = t * mean_i(w_i) + (1 - t) * w0."""
    w0 = tensors[base]
    ws = [t for i, t in enumerate(tensors) if i != base]
    shape = w0.shape
    if shared["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos_pairs = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_pairs.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cos_pairs).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    den = 1 + (k - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / torch.where(singular, torch.ones_like(den), den))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


METHODS: Dict[str, MethodSpec] = {
    "linear": MethodSpec((Param("weight", float, "input"), Param("normalize", bool, "shared", True)), linear,
                         base="ignored"),
    "slerp": MethodSpec((Param("t", float, "shared"),), slerp, base="required", min_inputs=2, max_inputs=2),
    "nuslerp": MethodSpec((Param("weight", float, "non_base"), Param("nuslerp_row_wise", bool, "shared", False),
                           Param("nuslerp_flatten", bool, "shared", True)), nuslerp, base="optional", non_base=2),
    "model_stock": MethodSpec((Param("filter_wise", bool, "shared", False),), model_stock, base="required",
                              min_inputs=3),
    **{name: _task_arithmetic_spec(name) for name in TASK_ARITHMETIC},
}


def check_finite_params(method: str, shared: Dict[str, Any], per_input: List[Dict[str, Any]], base: Optional[int],
                        tensor_name: str) -> Optional[str]:
    """A sentence naming a parameter combination that would divide by zero (mergekit would write Inf/NaN), or
    None: linear with normalize and weights summing to 0."""
    if method == "linear" and shared["normalize"]:
        total = sum(p["weight"] for p in per_input)
        if total == 0 or not math.isfinite(total):
            return f"linear with normalize: the weights of {tensor_name!r} sum to {total}, so the average is undefined"
    return None
