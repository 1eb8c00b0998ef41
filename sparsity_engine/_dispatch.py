"""One registry of op implementations, one dispatch function, one place that says why a backend cannot run.

Every op has a 'reference' implementation (plain torch, the oracle) and may have 'triton' and 'cuda' ones.
Backend modules register with :func:`register`; the public op validates its inputs and calls
:func:`dispatch`. Selection:

* ``backend=None`` / ``'auto'``: the ``SPARSITY_ENGINE_BACKEND`` environment variable if set (and the op
  implements that backend), else the highest-priority implementation that can run these inputs; the
  reference can always run, so 'auto' never fails for lack of a backend.
* ``backend='reference' | 'triton' | 'cuda'``: exactly that one, or a :class:`BackendUnavailableError`
  listing why it cannot run (not installed, not built, no GPU, tensors on the CPU, dtype ...).

A backend's reasons are plain sentences (as xformers' ``not_supported_reasons``): the global ones (can the
backend run at all on this machine) from :func:`backend_reasons`, the per-call ones from the tensors'
devices and from the implementation's own ``supports(*args, **kwargs)`` callback.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "SPARSITY_ENGINE_BACKEND"
_DEFAULT_PRIORITY = {"cuda": 30, "triton": 20, "reference": 0}

Supports = Callable[..., Iterable[str]]


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run this op on these inputs; the message says why."""


@dataclass
class Impl:
    op: str
    backend: str
    fn: Callable[..., Any]
    supports: Optional[Supports]
    priority: int

    def reasons(self, args: Sequence[Any], kwargs: Dict[str, Any], *, auto: bool) -> List[str]:
        reasons = backend_reasons(self.backend)
        if reasons:
            return reasons
        reasons = _device_reasons(self.backend, _tensors_in(args, kwargs), auto=auto)
        if reasons:
            return reasons
        if self.supports is not None:
            return [str(r) for r in self.supports(*args, **kwargs)]
        return []


_REGISTRY: Dict[str, Dict[str, Impl]] = {}
_IMPORT_FAILURES: Dict[str, List[str]] = {}


def register(op: str, backend: str, *, supports: Optional[Supports] = None,
             priority: Optional[int] = None) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    ``supports(*args, **kwargs)`` returns the reasons (sentences) why this implementation cannot run the
    given inputs, empty when it can; device placement is already checked for every backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        prio = _DEFAULT_PRIORITY[backend] if priority is None else priority
        _REGISTRY.setdefault(op, {})[backend] = Impl(op, backend, fn, supports, prio)
        return fn

    return deco


def import_backend(package: str, backend: str) -> None:
    """Import ``package.backend`` (a backend module that registers implementations).

    A backend whose module cannot be imported (Triton absent on macOS, say) is recorded, not fatal: its
    ops simply have no implementation there and :func:`backends` says why.
    """
    try:
        importlib.import_module(f"{package}.{backend}")
    except ImportError as exc:
        _IMPORT_FAILURES.setdefault(backend, []).append(f"{package}.{backend} failed to import: {exc}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# backends found able to run, per TRITON_INTERPRET setting: a merge asks on every call and the answer cannot turn
# from yes to no within a process (a GPU does not go away, a loaded extension stays loaded)
_AVAILABLE: set = set()


def backend_reasons(backend: str) -> List[str]:
    """Why ``backend`` cannot run at all on this machine (empty list: it can)."""
    if backend == "reference":
        return []
    key = (backend, os.environ.get("TRITON_INTERPRET", "0"), os.environ.get("SPARSITY_ENGINE_NO_EXT", "0"))
    if key in _AVAILABLE:
        return []
    reasons = _backend_reasons(backend)
    if not reasons:
        _AVAILABLE.add(key)
    return reasons


def _backend_reasons(backend: str) -> List[str]:
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return [f"Triton is not installed ({exc})"]
        if not torch.cuda.is_available() and not _interpreting():
            return ["no CUDA GPU is visible to torch and TRITON_INTERPRET=1 is not set"]
        return []
    if backend == "cuda":
        if not torch.cuda.is_available():
            return ["no CUDA GPU is visible to torch"]
        from . import _ext  # imported late: loading may build the extension just in time

        return _ext.extension_reasons()
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _tensors_in(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)) and value and not isinstance(value[0], (int, float)):
            # lists of per-model numbers are skipped at their first entry (a merge's host time adds up)
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _device_reasons(backend: str, tensors: List[torch.Tensor], *, auto: bool) -> List[str]:
    if backend == "reference" or not tensors:
        return []
    first = tensors[0].device
    if first.type == "cuda" and all(t.device == first for t in tensors):  # the common case, checked first
        return []
    devices = sorted({t.device.type for t in tensors})
    if devices == ["cuda"]:
        return ["the tensors are on different CUDA devices"]
    if backend == "triton" and devices == ["cpu"] and _interpreting() and not auto:
        return []
    where = " and ".join(devices)
    if backend == "triton":
        if _interpreting():
            return [f"tensors are on {where}: 'auto' picks Triton only for CUDA tensors "
                    "(the interpreter runs CPU tensors when 'triton' is asked for by name)"]
        return [f"tensors are on {where}; Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"]
    return [f"tensors are on {where}; the CUDA extension needs CUDA tensors"]


def resolve_backend(backend: Optional[str]) -> Optional[str]:
    """Normalise the ``backend=`` argument: None for automatic choice, else a backend name."""
    if backend is None or backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env in ("", "auto"):
            return None
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {env!r}")
        return env
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'auto' or one of {BACKENDS}; got {backend!r}")
    return backend


def choose(op: str, backend: Optional[str], *args: Any, **kwargs: Any) -> Impl:
    """The implementation ``dispatch`` would run, or an error saying why none of the requested can."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation is registered for op {op!r}")
    explicit = backend is not None and backend != "auto"
    name = resolve_backend(backend)
    if name is not None and (explicit or name in impls):
        impl = impls.get(name)
        if impl is None:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} has no implementation of this op (implemented: {sorted(impls)})")
        reasons = impl.reasons(args, kwargs, auto=False)
        if reasons:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run these inputs: " + "; ".join(reasons))
        return impl
    rejected = []
    for impl in sorted(impls.values(), key=lambda i: -i.priority):
        reasons = impl.reasons(args, kwargs, auto=True)
        if not reasons:
            return impl
        rejected.append(f"{impl.backend}: " + "; ".join(reasons))
    raise BackendUnavailableError(f"{op}: no backend can run these inputs:\n  " + "\n  ".join(rejected))


def dispatch(op: str, backend: Optional[str], *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on the chosen backend (see module docstring)."""
    return choose(op, backend, *args, **kwargs).fn(*args, **kwargs)


def explain(op: str, *args: Any, **kwargs: Any) -> Dict[str, List[str]]:
    """For each backend implementing ``op``: the reasons it cannot run these inputs (empty: it can)."""
    return {b: impl.reasons(args, kwargs, auto=True) for b, impl in sorted(_REGISTRY.get(op, {}).items())}


def registered_ops() -> Dict[str, List[str]]:
    """op name -> the backends that implement it."""
    return {op: sorted(impls) for op, impls in sorted(_REGISTRY.items())}


def backends() -> Dict[str, Dict[str, Any]]:
    """What each backend can do on this machine: available or not, why not, and which ops it implements."""
    report = {}
    for name in BACKENDS:
        reasons = list(_IMPORT_FAILURES.get(name, [])) + backend_reasons(name)
        ops = sorted(op for op, impls in _REGISTRY.items() if name in impls)
        report[name] = {"available": not backend_reasons(name), "reasons": reasons, "ops": ops}
    return report
