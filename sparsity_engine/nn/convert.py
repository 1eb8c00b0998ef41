"""In-place model conversion: every pruned nn.Linear to the sparse layer that runs it fastest (or left dense)."""
from __future__ import annotations

import fnmatch
import re
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .._validate import FLOAT_DTYPES, check_fraction
from ..ops.bitmap import choose_format
from ..ops.bitmap.format import DTYPES as BITMAP_DTYPES
from .bitmap_linear import BitmapLinear
from .csr_linear import CSRLinear

Patterns = Union[None, str, Sequence[str]]
FORMATS = ("auto", "bitmap", "csr")


def _matches(name: str, patterns: Patterns) -> bool:
    if isinstance(patterns, str):
        patterns = [patterns]
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"include/exclude patterns must be strings, got {type(pat).__name__}")
        if pat.startswith("re:"):
            if re.search(pat[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pat):
            return True
    return False


def _shared_weights(model: nn.Module) -> set:
    """ids of parameters that more than one module uses (tied embeddings, say)."""
    seen, shared = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared


def layer_format(weight: torch.Tensor, sparsity: float, format: str) -> str:
    """'bitmap', 'csr' or 'dense' for one Linear's weight under ``format`` (see :func:`sparsify_linears_`)."""
    if format == "csr":
        return "csr"
    if format == "bitmap":
        if weight.dtype not in BITMAP_DTYPES:
            raise TypeError(f"format='bitmap' needs float16/bfloat16 weights, got {weight.dtype} (use 'auto' or 'csr')")
        return "bitmap"
    return choose_format(weight.dtype, sparsity)


def sparsify_linears_(model: nn.Module, *, min_sparsity: float = 0.3, include: Patterns = None,
                      exclude: Patterns = None, format: str = "auto", index_dtype: Optional[torch.dtype] = None,
                      backend: Optional[str] = None) -> List[str]:
    """Replace, in place, every pruned ``nn.Linear`` of ``model`` by a sparse layer; return the converted names.

    A Linear is a candidate when the fraction of exact zeros in its weight is >= ``min_sparsity``, its name
    (as in ``model.named_modules()``, e.g. ``encoder.layer.0.attention.self.query``) matches ``include``
    (default: every name) and does not match ``exclude``. Patterns: a string or a list of strings; each is a
    shell glob matched against the whole name (``"*.query"``, ``"encoder.layer.[0-3].*"``), or a regular
    expression searched in the name when prefixed with ``re:`` (``"re:attention\\.(query|key)$"``). A
    Linear whose weight is shared with another module (tied weights) is left alone: converting it would
    untie it.

    ``format``: 'auto' (default) picks per layer by the measured rule ``ops.bitmap.choose_format``: fp16/bf16
    layers become :class:`BitmapLinear` where the bitmap kernel beats dense, :class:`CSRLinear` at the very high
    sparsities where CSR does, and stay ``nn.Linear`` where neither wins (not returned); fp32 layers become
    CSRLinear (there is no fp32 bitmap kernel). 'bitmap' forces BitmapLinear (fp16/bf16 only), 'csr' forces
    CSRLinear (``index_dtype`` and ``backend`` are passed to it). Each converted layer holds one copy of its
    weight. Outputs are unchanged up to the kernels' fp32-accumulation rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    min_sparsity = check_fraction("min_sparsity", min_sparsity)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    shared = _shared_weights(model)
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not name:
            continue
        if include is not None and not _matches(name, include):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        if id(module.weight) in shared or module.weight.dtype not in FLOAT_DTYPES:
            continue
        w = module.weight.detach()
        zeros = (w == 0).sum().item() / max(1, w.numel())
        if zeros >= min_sparsity and w.numel():
            kind = layer_format(w, zeros, format)
            if kind != "dense":
                targets.append((name, kind))
    for name, kind in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if kind == "bitmap":
            layer = BitmapLinear.from_linear(linear)
        else:
            layer = CSRLinear.from_linear(linear, index_dtype=index_dtype, backend=backend)
            layer.one_copy = format == "auto"
        setattr(parent, child, layer)
    return [name for name, _ in targets]
