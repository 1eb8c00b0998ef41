"""One registry of op implementations, one dispatch function, one place that says why a backend cannot run.

Every op has a 'reference' implementation (plain torch, the oracle) and may have 'triton' and 'cuda' ones.
Backend modules declare what they take when they register::

    @register("topk_mask", "cuda", dtypes=KERNEL_DTYPES, limits={"numel": 2**31 - 1}, supports=whole_tensor_only)

and the public op validates its inputs and calls :func:`dispatch`. Selection:

* ``backend=None`` / ``'auto'``: the ``SPARSITY_ENGINE_BACKEND`` environment variable if set (and the op
  implements that backend), else the highest-priority implementation that can run these inputs; the
  reference can always run, so 'auto' never fails for lack of a backend.
* ``backend='reference' | 'triton' | 'cuda'``: exactly that one, or a :class:`BackendUnavailableError`
  listing why it cannot run (not installed, not built, no GPU, tensors on the CPU, dtype ...).

A backend's reasons are plain sentences (as xformers' ``not_supported_reasons``), in this order: why the
backend cannot run at all here (:func:`backend_reasons`), the tensors' devices, the declared ``dtypes`` and
``limits`` (sentences generated from the declarations), then the implementation's own ``supports`` callback
for whatever a declaration cannot say.
"""
from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "SPARSITY_ENGINE_BACKEND"
_DEFAULT_PRIORITY = {"cuda": 30, "triton": 20, "reference": 0}
# where each backend's implementations run unless a registration says otherwise ('cpu' for Triton means its
# interpreter, TRITON_INTERPRET=1, and only when the backend is asked for by name)
_DEFAULT_DEVICES = {"reference": ("cpu", "cuda"), "triton": ("cuda",), "cuda": ("cuda",)}
# limits that describe the declared tensor rather than an argument
_TENSOR_LIMITS = {"numel": ("elements", lambda t: t.numel()),
                  "cols": ("entries per row (last dimension)", lambda t: t.shape[-1] if t.dim() else 1)}

Supports = Callable[..., Iterable[str]]


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run this op on these inputs; the message says why."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Impl:
    """One backend's implementation of one op, with what it declared it takes."""
    op: str
    backend: str
    fn: Callable[..., Any]
    priority: int
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    tensor: Union[int, str] = 0
    limits: Mapping[str, int] = field(default_factory=dict)
    devices: Tuple[str, ...] = ()
    supports: Optional[Supports] = None
    _params: Tuple[str, ...] = ()

    def argument(self, args: Sequence[Any], kwargs: Mapping[str, Any], which: Union[int, str]) -> Any:
        """The argument at position ``which`` or named ``which`` (its default when not passed)."""
        if isinstance(which, int):
            return args[which] if which < len(args) else None
        if which in kwargs:
            return kwargs[which]
        if which in self._params:
            i = self._params.index(which)
            if i < len(args):
                return args[i]
            default = inspect.signature(self.fn).parameters[which].default
            return None if default is inspect.Parameter.empty else default
        return None

    def declared_reasons(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> List[str]:
        """Sentences generated from ``dtypes`` and ``limits``."""
        reasons = []
        what = f"the {self.backend} {self.op} kernel"
        t = self.argument(args, kwargs, self.tensor)
        if isinstance(t, (list, tuple)) and t and isinstance(t[0], torch.Tensor):
            t = t[0]  # a list of like tensors (the models of a merge): the first stands for all
        name = self.tensor if isinstance(self.tensor, str) else "the input"
        if self.dtypes is not None and isinstance(t, torch.Tensor) and t.dtype not in self.dtypes:
            reasons.append(f"{name} dtype {_dtype_name(t.dtype)} is not supported by {what} "
                           f"({', '.join(map(_dtype_name, self.dtypes))} are)")
        for key, limit in self.limits.items():
            if key in _TENSOR_LIMITS:
                if not isinstance(t, torch.Tensor):
                    continue
                noun, measure = _TENSOR_LIMITS[key]
                value = measure(t)
                if value > limit:
                    reasons.append(f"{value} {noun} exceed {what}'s limit of {limit}")
                continue
            value = self.argument(args, kwargs, key)
            if isinstance(value, (list, tuple)):
                if len(value) > limit:
                    reasons.append(f"{len(value)} entries in {key} exceed {what}'s limit of {limit}")
            elif isinstance(value, int) and value > limit:
                reasons.append(f"{key}={value} exceeds {what}'s limit of {limit}")
        return reasons

    def reasons(self, args: Sequence[Any], kwargs: Mapping[str, Any], *, auto: bool) -> List[str]:
        reasons = backend_reasons(self.backend)
        if reasons:
            return reasons
        reasons = _device_reasons(self.backend, _tensors_in(args, kwargs), auto=auto, devices=self.devices)
        if reasons:
            return reasons
        reasons = self.declared_reasons(args, kwargs)
        if self.supports is not None:
            reasons += [str(r) for r in self.supports(*args, **kwargs)]
        return reasons


_REGISTRY: Dict[str, Dict[str, Impl]] = {}
_IMPORT_FAILURES: Dict[str, List[str]] = {}


def register(op: str, backend: str, *, dtypes: Optional[Sequence[torch.dtype]] = None, tensor: Union[int, str] = 0,
             limits: Optional[Mapping[str, int]] = None, devices: Optional[Sequence[str]] = None,
             supports: Optional[Supports] = None, priority: Optional[int] = None) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    dtypes: the dtypes it takes for the argument ``tensor`` (a position or a parameter name; default the first
    argument). limits: maxima, inclusive: ``'numel'`` and ``'cols'`` (last dimension) of that tensor, or any
    parameter name (an int argument's value, a list argument's length). devices: device types it runs on
    (default by backend: reference cpu and cuda, triton and cuda on CUDA). supports(*args, **kwargs): extra
    reasons (sentences) why it cannot run these inputs, for what the declarations cannot say. priority:
    'auto' tries higher first (default cuda 30, triton 20, reference 0).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        impl = Impl(op, backend, fn, _DEFAULT_PRIORITY[backend] if priority is None else priority,
                    tuple(dtypes) if dtypes is not None else None, tensor, dict(limits or {}),
                    tuple(devices) if devices is not None else _DEFAULT_DEVICES[backend], supports,
                    tuple(inspect.signature(fn).parameters))
        _REGISTRY.setdefault(op, {})[backend] = impl
        return fn

    return deco


def import_backend(package: str, backend: str) -> None:
    """Import ``package.backend`` (a backend module that registers implementations).

    A backend whose module cannot be imported (Triton absent, say) is recorded, not fatal: its ops simply have
    no implementation there and :func:`backends` says why.
    """
    try:
        importlib.import_module(f"{package}.{backend}")
    except ImportError as exc:
        _IMPORT_FAILURES.setdefault(backend, []).append(f"{package}.{backend} failed to import: {exc}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _setting() -> Tuple[str, str]:
    """The environment that decides whether a backend can run at all."""
    return os.environ.get("TRITON_INTERPRET", "0"), os.environ.get("SPARSITY_ENGINE_NO_EXT", "0")


# backends found able to run, per setting: the answer cannot turn from yes to no within a process (a GPU does
# not go away, a loaded extension stays loaded)
_AVAILABLE: set = set()


def backend_reasons(backend: str) -> List[str]:
    """Why ``backend`` cannot run at all on this machine (empty list: it can)."""
    if backend == "reference":
        return []
    key = (backend,) + _setting()
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


def _tensors_in(args: Sequence[Any], kwargs: Mapping[str, Any]) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _device_reasons(backend: str, tensors: List[torch.Tensor], *, auto: bool,
                    devices: Optional[Sequence[str]] = None) -> List[str]:
    devices = _DEFAULT_DEVICES[backend] if devices is None else devices
    if not tensors:
        return []
    kinds = sorted({t.device.type for t in tensors})
    if kinds == ["cuda"] and len({t.device for t in tensors}) > 1 and backend != "reference":
        return ["the tensors are on different CUDA devices"]
    if all(k in devices for k in kinds):
        return []
    if backend == "triton" and kinds == ["cpu"] and _interpreting() and not auto:
        return []
    where = " and ".join(kinds)
    if backend == "triton":
        if _interpreting():
            return [f"tensors are on {where}: 'auto' picks Triton only for CUDA tensors "
                    "(the interpreter runs CPU tensors when 'triton' is asked for by name)"]
        return [f"tensors are on {where}; Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"]
    if backend == "cuda":
        return [f"tensors are on {where}; the CUDA extension needs CUDA tensors"]
    return [f"tensors are on {where}; this implementation runs on {' or '.join(devices)}"]


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
            failed = "".join(f"; {r}" for r in _IMPORT_FAILURES.get(name, []))
            raise BackendUnavailableError(
                f"{op}: backend {name!r} has no implementation of this op (implemented: {sorted(impls)}){failed}")
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


_PLANS: Dict[tuple, Impl] = {}


def choose_cached(op: str, backend: Optional[str], key: Hashable, *args: Any, **kwargs: Any) -> Impl:
    """:func:`choose`, remembered under ``key``: for ops called per token (CSR inference), whose choice depends
    on a few facts of the inputs (device, dtypes, a size class) that the caller puts in ``key``. The backend
    asked for, the environment variable and the backends' settings are part of the cache key here."""
    full = (op, resolve_backend(backend), backend is not None and backend != "auto", os.environ.get(ENV_VAR, ""),
            _setting(), key)
    impl = _PLANS.get(full)
    if impl is None:
        impl = _PLANS[full] = choose(op, backend, *args, **kwargs)
    return impl


def dispatch(op: str, backend: Optional[str], *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on the chosen backend (see module docstring)."""
    return choose(op, backend, *args, **kwargs).fn(*args, **kwargs)


def explain(op: str, *args: Any, **kwargs: Any) -> Dict[str, List[str]]:
    """For each backend implementing ``op``: the reasons it cannot run these inputs (empty: it can)."""
    return {b: impl.reasons(args, kwargs, auto=True) for b, impl in sorted(_REGISTRY.get(op, {}).items())}


def registered_ops() -> Dict[str, List[str]]:
    """op name -> the backends that implement it."""
    return {op: sorted(impls) for op, impls in sorted(_REGISTRY.items())}


def implementation(op: str, backend: str) -> Impl:
    """The registered implementation of ``op`` on ``backend`` (KeyError if there is none)."""
    return _REGISTRY[op][backend]


def backends() -> Dict[str, Dict[str, Any]]:
    """What each backend can do on this machine: available or not, why not, and which ops it implements."""
    report = {}
    for name in BACKENDS:
        reasons = list(_IMPORT_FAILURES.get(name, [])) + backend_reasons(name)
        ops = sorted(op for op, impls in _REGISTRY.items() if name in impls)
        report[name] = {"available": not backend_reasons(name), "reasons": reasons, "ops": ops}
    return report
