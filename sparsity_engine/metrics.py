"""Model metrics for the Dense -> Masked -> CSR comparison: size, sparsity, compute, agreement, time.

Definitions (per call, no state):

* :func:`size_mb` -- bytes of every parameter and buffer (each storage counted once) / 1e6.
* :func:`sparsity` -- fraction of zeros over the weights of the linear layers (nn.Linear and CSRLinear; a
  CSRLinear's pruned entries count as zeros), or over one tensor / CSRMatrix.
* :func:`compute_ratio` -- nonzero multiply-accumulates / dense multiply-accumulates of the linear layers
  (per token: sum of nnz(W) / sum of out*in). Attention score products and the like are not counted.
* :func:`top1_match` -- fraction of rows (all dims but the last) whose argmax over the last dim agrees.
* :func:`compare_dense_masked_csr` -- the rows of the comparison table (one per model).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._validate import check_tensor
from .ops.csr import CSRMatrix

Tensors = Union[nn.Module, torch.Tensor, CSRMatrix, Mapping[str, torch.Tensor], Iterable[torch.Tensor]]

__all__ = ["size_mb", "sparsity", "compute_ratio", "top1_match", "compare_dense_masked_csr",
           "format_table", "plot_comparison", "comparison_figure"]


def _tensors(obj: Tensors) -> List[torch.Tensor]:
    if isinstance(obj, nn.Module):
        return list(obj.parameters()) + list(obj.buffers())
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, CSRMatrix):
        return [obj.crow_indices, obj.col_indices, obj.values, obj.row_lengths, obj.row_order]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    raise TypeError("model_or_tensors must be an nn.Module, a tensor, a CSRMatrix, or a dict/list of tensors; "
                    f"got {type(obj).__name__}")


def size_mb(model_or_tensors: Tensors) -> float:
    """Megabytes (1e6 bytes) held by the parameters and buffers (or the given tensors); shared storage once."""
    seen, total = set(), 0
    for t in _tensors(model_or_tensors):
        key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        total += t.numel() * t.element_size()
    return total / 1e6


def _linear_counts(model: nn.Module):
    """(nonzeros, total entries) of each linear weight: nn.Linear, CSRLinear and BitmapLinear."""
    from .nn import BitmapLinear, CSRLinear

    counts = []
    for module in model.modules():
        if isinstance(module, CSRLinear):
            counts.append((module.csr.nnz, module.out_features * module.in_features))
        elif isinstance(module, BitmapLinear):
            counts.append((int(module.nnz), module.out_features * module.in_features))
        elif isinstance(module, nn.Linear):
            w = module.weight.detach()
            counts.append((int((w != 0).sum()), w.numel()))
    return counts


def sparsity(model_or_tensor: Union[nn.Module, torch.Tensor, CSRMatrix]) -> float:
    """Fraction of zero weights: over all linear layers of a model, or over one tensor / CSRMatrix."""
    if isinstance(model_or_tensor, CSRMatrix):
        n, k = model_or_tensor.shape
        return 1.0 - model_or_tensor.nnz / (n * k) if n * k else 0.0
    if isinstance(model_or_tensor, torch.Tensor):
        return float((model_or_tensor == 0).sum()) / max(1, model_or_tensor.numel())
    if not isinstance(model_or_tensor, nn.Module):
        raise TypeError(f"model_or_tensor must be an nn.Module, a tensor or a CSRMatrix, got "
                        f"{type(model_or_tensor).__name__}")
    counts = _linear_counts(model_or_tensor)
    total = sum(t for _, t in counts)
    return 1.0 - sum(nz for nz, _ in counts) / total if total else 0.0


def compute_ratio(model: nn.Module) -> float:
    """Nonzero MACs / dense MACs of the linear layers (1.0 = dense; 0.3 = 70% of the MACs skipped)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    counts = _linear_counts(model)
    total = sum(t for _, t in counts)
    return sum(nz for nz, _ in counts) / total if total else 1.0


def top1_match(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows (every index but the last dim) where argmax over the last dim of a and b agree."""
    check_tensor("a", a, min_ndim=1, nonempty=True)
    check_tensor("b", b, min_ndim=1, nonempty=True)
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def _default_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}; pass output_fn=")


def _call(model: nn.Module, inputs: Any):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _time_forward(model: nn.Module, inputs: Any, reps: int, warmup: int, min_seconds: float = 0.2) -> tuple:
    """(median ms of one forward, repetitions timed): at least ``reps`` repetitions and, beyond those, as many
    as fill ``min_seconds`` (up to 1000), so a fast forward is timed over enough calls to mean something.
    Synchronised on CUDA."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        _call(model, inputs)
    times: List[float] = []
    while len(times) < reps or (sum(times) < min_seconds * 1e3 and len(times) < 1000):
        sync()
        t0 = time.perf_counter()
        _call(model, inputs)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


@torch.no_grad()
def compare_dense_masked_csr(dense: nn.Module, masked: nn.Module, inputs: Any, *,
                             csr: Optional[nn.Module] = None, min_sparsity: float = 0.3,
                             output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
                             reps: int = 10, warmup: int = 2, min_seconds: float = 0.2) -> List[Dict[str, Any]]:
    """Rows comparing a dense model, its masked (pruned, zeros in dense weights) copy and the CSR version.

    ``inputs``: a tensor, a tuple (positional) or a dict (keyword arguments) for one forward. ``csr``: the
    CSR model; by default a deep copy of ``masked`` converted with ``sparsify_linears_(min_sparsity=...)``.
    ``output_fn(out) -> tensor`` picks the tensor compared (default: the output, ``.logits`` or
    ``.last_hidden_state``). Each row: model, size_mb, sparsity, compute_ratio, top1_match (argmax agreement
    with the dense output over the last dim), cosine (mean cosine similarity with the dense output rows),
    rel_err (relative Frobenius error against dense), ms_per_forward (median over ``timed_reps`` forwards: at
    least ``reps``, more until ``min_seconds`` of forwards were timed).
    """
    from .nn import sparsify_linears_

    for name, m in (("dense", dense), ("masked", masked)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    if csr is None:
        csr = copy.deepcopy(masked)
        sparsify_linears_(csr, min_sparsity=min_sparsity)
    pick = output_fn or _default_output
    ref = pick(_call(dense, inputs)).float()
    rows = []
    for label, model in (("dense", dense), ("masked", masked), ("csr", csr)):
        out = pick(_call(model, inputs)).float()
        cos = torch.nn.functional.cosine_similarity(out.reshape(-1, out.shape[-1]),
                                                    ref.reshape(-1, ref.shape[-1]), dim=-1)
        ms, timed = _time_forward(model, inputs, reps, warmup, min_seconds)
        rows.append(dict(model=label, size_mb=size_mb(model), sparsity=sparsity(model),
                         compute_ratio=compute_ratio(model), top1_match=top1_match(out, ref),
                         cosine=float(cos.mean()),
                         rel_err=float((out - ref).norm() / ref.norm().clamp_min(1e-30)),
                         ms_per_forward=ms, timed_reps=timed))
    return rows


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table of the comparison rows."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot_comparison(rows: Sequence[Dict[str, Any]], path: str, title: str = "Dense vs Masked vs CSR") -> str:
    """Horizontal bar charts (size, compute ratio, agreement, time per forward) of the rows, one panel each,
    saved as PNG at ``path``. The model names label the rows once, on the left, so long names never overlap;
    each bar carries its value.

    Agreement is ``top1_match`` where the rows carry it, else ``cosine`` (e.g. for sentence encoders).
    """
    import matplotlib.pyplot as plt

    fig = comparison_figure(rows, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_figure(rows: Sequence[Dict[str, Any]], title: str = "Dense vs Masked vs CSR"):
    """The matplotlib figure of :func:`plot_comparison` (laid out, not saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agree = ("top1_match", "top-1 match") if all("top1_match" in r for r in rows) else ("cosine", "cosine to dense")
    keys = [("size_mb", "size (MB)"), ("compute_ratio", "compute ratio"), agree, ("ms_per_forward", "ms / forward")]
    labels = [str(r["model"]) for r in rows]
    ys = list(range(len(rows)))[::-1]            # first row on top
    colors = ["#888", "#c84", "#48c", "#4a4", "#a4a", "#4aa", "#aa4"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys) + 2.5, 0.45 * len(rows) + 1.6), sharey=True)
    for ax, (key, name) in zip(axes, keys):
        vals = [float(r[key]) for r in rows]
        ax.barh(ys, vals, color=[colors[i % len(colors)] for i in range(len(rows))])
        for y, v in zip(ys, vals):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=7)
        ax.set_xlim(0, max(vals + [1e-9]) * 1.6)
        ax.set_xticks([])                          # each bar carries its value
        ax.set_title(name, fontsize=9)
    axes[0].set_yticks(ys, labels, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
