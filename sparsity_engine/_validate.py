"""Shared argument checks. Every message names the argument and says what was expected.

Type problems raise TypeError, value problems ValueError (both subclasses of what callers catch).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterable, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None, finite: bool = False,
                 nonempty: bool = False) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given rank, dtype, and (optionally) only finite values.

    ``finite=True`` reads the whole tensor once (and syncs on a GPU): use it for weights and Hessians,
    not in a hot loop.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if finite:
        check_finite(name, t)
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ValueError if ``t`` holds NaN or Inf, saying how many."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return
    # One reduction in the common case: NaN and Inf both survive the max of |t|. Count only when bad.
    if bool(torch.isfinite(torch.linalg.vector_norm(t, ord=float("inf")))):
        return
    bad = int((~torch.isfinite(t)).sum().item())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s) out of {t.numel()}; it must be finite")


def finite_amax(name: str, t: torch.Tensor) -> float:
    """max |t| (0 for an empty tensor), after checking that t is finite: one reduction and one host read, the
    cost of check_finite; ops use the bound to rule out an overflow of their result without another pass."""
    if t.numel() == 0:
        return 0.0
    amax = float(torch.linalg.vector_norm(t.detach(), ord=float("inf")))
    if not math.isfinite(amax):
        check_finite(name, t)
    return amax


def check_result(op: str, out: torch.Tensor, why: str) -> torch.Tensor:
    """Raise ValueError if ``out`` (the result of ``op`` on finite inputs) holds Inf/NaN: it overflowed its dtype.
    One reduction and one host read; ``why`` says which arguments drove it there."""
    if out.numel() and out.is_floating_point():
        if not math.isfinite(float(torch.linalg.vector_norm(out.detach(), ord=float("inf")))):
            raise ValueError(f"{op}: the result overflows {str(out.dtype).replace('torch.', '')} ({why})")
    return out


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def check_same_device(*named: Tuple[str, torch.Tensor]) -> None:
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"tensors must be on one device, got {where}")


def check_linear_input(x, shape: Tuple[int, int], dtype: torch.dtype, device: torch.device, bias, what: str) -> None:
    """The arguments of a sparse linear layer ``y = x @ W^T + bias`` whose weight (CSR, bitmap ...: ``what``) has
    ``shape`` (out, in), ``dtype`` and ``device``: x [..., in] of the weight's dtype and device (as nn.Linear
    requires), bias [out] of that dtype and device."""
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    n, k = shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have in_features={k} as its last dimension, got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"x must have the weight dtype {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the {what} weight is on {device}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(dtype,))
        if bias.shape[0] != n or bias.device != device:
            raise ValueError(f"bias must have shape ({n},) on {device}, got {tuple(bias.shape)} on {bias.device}")


def is_real_number(value) -> bool:
    """A real number that is not a bool (float / int first: the Real check is an ABC lookup, and a whole-model
    merge checks thousands of these)."""
    kind = type(value)
    return kind is float or kind is int or (not isinstance(value, bool) and isinstance(value, Real))


def check_fraction(name: str, value, *, low: float = 0.0, high: float = 1.0,
                   low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """A real number in the interval [low, high] (ends open or closed as asked); returns it as float."""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok_low = v >= low if low_inclusive else v > low
    ok_high = v <= high if high_inclusive else v < high
    if math.isnan(v) or not (ok_low and ok_high):
        interval = ("[" if low_inclusive else "(") + f"{low:g}, {high:g}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def check_int(name: str, value, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")
    return v


def check_nm(n, m, length: int, *, n_name: str = "n", m_name: str = "m", dim_name: str = "the last dimension") -> Tuple[int, int]:
    """N:M pattern: 0 < n <= m, and m divides ``length``."""
    n = check_int(n_name, n, minimum=1)
    m = check_int(m_name, m, minimum=1)
    if n > m:
        raise ValueError(f"{n_name} must be <= {m_name}, got {n_name}={n}, {m_name}={m}")
    if length % m != 0:
        raise ValueError(f"{m_name}={m} must divide {dim_name} ({length}) for an {n}:{m} pattern")
    return n, m


def check_generator(name: str, generator, device: torch.device, *, host_ok: bool = False) -> None:
    """A torch.Generator on the tensor's device type (or, with ``host_ok``, on the CPU: for ops that draw only
    a seed from it on the host), or None."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != torch.device(device).type and not (host_ok and generator.device.type == "cpu"):
        raise ValueError(f"{name} is on {generator.device} but the tensor is on {device}"
                         + (" (a CPU generator is accepted too)" if host_ok else ""))


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_flag(name: str, flag, device: torch.device) -> None:
    """A caller's NaN/Inf flag (ops that take ``bad=``): a zeroed int32 tensor of one element on ``device``."""
    check_tensor(name, flag, dtypes=(torch.int32,))
    if flag.numel() != 1 or flag.device != device:
        raise ValueError(f"{name} must be an int32 tensor of one element on {device}, got shape "
                         f"{tuple(flag.shape)} on {flag.device}")


def raise_nonfinite(base: torch.Tensor, tensors: Sequence[torch.Tensor], name: str = "tensors") -> None:
    """A kernel flagged NaN/Inf: raise ValueError naming the input that holds one (base, tensors[i], or an
    overflowing difference tensors[i] - base); return when every input is finite (the caller then raises
    about its own result). The error path of ops that check during their own pass instead of reading their
    inputs first."""
    if not bool(torch.isfinite(base).all()):
        raise ValueError("base contains NaN/Inf values; it must be finite")
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}[{i}] contains NaN/Inf values; it must be finite")
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t.to(base.dtype) - base).all()):
            raise ValueError(f"{name}[{i}] - base overflows {str(base.dtype).replace('torch.', '')}: the task "
                             "vector must be finite")
