"""Triton kernel launches without ``JITFunction.run``'s per-call host work.

A whole-model merge launches a few Triton kernels per tensor, hundreds per model. On the lent H200 hosts
``kernel[grid](*args, **kwargs)`` costs 33 us of Python per launch in a tight loop and 140 us inside a
whole-model merge (2026-12-02, ``scripts/host_time.py``): the binder specializes every argument, the cache key
is rebuilt as a string, the globals are checked, and every tensor pointer is validated with a driver call. That
is more than the kernel itself for most tensors, and it is what bounds a whole-model merge.

:class:`FastKernel` wraps a ``@triton.jit`` function. The first launch of a variant goes through Triton (which
compiles it, or finds it in its cache) and keeps the compiled kernel; later launches of the same variant call
the compiled kernel's C launcher directly with raw pointers. A variant is keyed by every fact Triton
specializes a kernel on, computed here from the arguments:

* tensors: dtype and whether the data pointer is 16-byte aligned;
* integers: 32 / 64-bit range, divisible by 16, equal to 1 (Triton makes 1 a constant);
* floats and bools: their type only; None: a constant;
* the keyword arguments (constexprs and launch options) by value, and the device.

The fast launch passes no launch metadata and no hooks, so it is taken only while no launch hook is registered
(profilers such as proton register some; Triton 3.6 keeps them as empty hook chains otherwise).

If Triton ever specialized on something else, the key would be too coarse: ``VERIFY = True`` (the GPU tests set
it) checks every fast launch against the kernel Triton's own dispatch picks. Under ``TRITON_INTERPRET=1``,
with Triton's launch hooks set (profilers), or with ``SPARSITY_ENGINE_TRITON_FAST_LAUNCH=0``, every launch goes
through Triton.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import torch
from triton import knobs

from ._ext import raw_stream

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ENABLED = not _INTERPRET and os.environ.get("SPARSITY_ENGINE_TRITON_FAST_LAUNCH", "1") != "0"
VERIFY = False  # True: every fast launch asserts Triton's own dispatch would pick the same compiled kernel

_INT32 = range(-2**31, 2**31)

# the current device without torch.cuda's Python layers (what Triton's own launch asks)
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)


class Ptr:
    """A device address with a dtype: all a Triton launch reads of a tensor argument (Triton takes any object
    with ``data_ptr()`` and ``dtype``). Slicing a small parameter buffer into tensor views for every launch
    costs host time that a raw address does not."""
    __slots__ = ("address", "dtype")

    def __init__(self, address: int, dtype: torch.dtype):
        self.address = address
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self.address


def _facts(args: Tuple[Any, ...]) -> Tuple[tuple, list]:
    """(the specialization key of the positional arguments, the arguments as the C launcher takes them)."""
    key, raw = [], []
    for a in args:
        if isinstance(a, (torch.Tensor, Ptr)):
            p = a.data_ptr()
            key.append((a.dtype, p & 15 == 0))
            raw.append(p)
        elif isinstance(a, bool):
            key.append(bool)
            raw.append(a)
        elif isinstance(a, int):
            key.append((a in _INT32, a % 16 == 0, a == 1))
            raw.append(a)
        elif isinstance(a, float):
            key.append(float)
            raw.append(a)
        elif a is None:
            key.append(None)
            raw.append(a)
        else:  # anything else (tensor descriptors, tuples): Triton's own path
            return None, None
    return tuple(key), raw


class _Variant:
    __slots__ = ("kernel", "launcher", "function", "metadata", "tail")

    def __init__(self, kernel, tail):
        self.kernel = kernel                  # triton CompiledKernel (one device's)
        self.launcher = kernel.run            # its C launcher
        self.function = kernel.function       # CUfunction handle
        self.metadata = kernel.packed_metadata
        self.tail = tail  # values of the parameters after the positional ones, in signature order


class FastKernel:
    """``FastKernel(jit_fn)[grid](*args, **kwargs)`` launches like ``jit_fn[grid](*args, **kwargs)``.

    Positional arguments are the kernel's leading runtime parameters; keyword arguments must be constexprs or
    Triton's options (num_warps, enable_fp_fusion, ...). Launches go to torch's current stream of the first
    tensor argument's device, as Triton's do.
    """

    def __init__(self, fn):
        self.fn = fn
        self._variants: Dict[tuple, _Variant] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs) -> None:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if not _ENABLED or first is None or not first.is_cuda or _hooks_set():
            self.fn[grid](*args, **kwargs)
            return
        arg_key, raw = _facts(args)
        if arg_key is None:
            self.fn[grid](*args, **kwargs)
            return
        device = _current_device()  # as Triton: the current device's compiled kernel and stream
        key = (device, arg_key, tuple(kwargs.items()))
        variant = self._variants.get(key)
        if variant is None:
            self._check_keywords(kwargs)
            kernel = self.fn[grid](*args, **kwargs)
            self._variants[key] = _Variant(kernel, self._tail(len(args), kwargs))
            return
        if VERIFY:
            self._verify(variant.kernel, device, args, kwargs)
        variant.launcher(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                         raw_stream(device), variant.function, variant.metadata, None, None, None,
                         *raw, *variant.tail)

    def _check_keywords(self, kwargs) -> None:
        """Keyword arguments enter the key by value: a runtime parameter there would be frozen at its first value."""
        for name, param in zip(self.fn.arg_names, self.fn.params):
            if name in kwargs and not param.is_constexpr:
                raise TypeError(f"FastKernel({self.fn.__name__}): runtime parameter {name!r} must be passed "
                                "positionally")

    def _tail(self, npos: int, kwargs) -> tuple:
        return tuple(kwargs[name] if name in kwargs else param.default
                     for name, param in zip(self.fn.arg_names[npos:], self.fn.params[npos:]))

    def _verify(self, kernel, device, args, kwargs) -> None:
        from triton.runtime.jit import compute_cache_key

        kernel_cache, key_cache, _, _, binder = self.fn.device_caches[device]
        kwargs = dict(kwargs)  # the options JITFunction.run adds before it binds (Triton 3.6)
        kwargs["debug"] = kwargs.get("debug", self.fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        _, specialization, options = binder(*args, **kwargs)
        expected = kernel_cache.get(compute_cache_key(key_cache, specialization, options))
        if expected is not kernel:
            raise AssertionError(f"FastKernel({self.fn.__name__}) launched a variant Triton would not pick for "
                                 f"this call: {specialization}")


def _hook_active(hook) -> bool:
    """Triton 3.6 keeps its launch hooks as (usually empty) HookChain objects; older versions as None or a
    callable."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


def _hooks_set() -> bool:
    return _hook_active(knobs.runtime.launch_enter_hook) or _hook_active(knobs.runtime.launch_exit_hook)
