"""Loading the compiled CUDA extension ``sparsity_engine._C`` (ahead of time, or built just in time).

:func:`load_extension` returns the module, trying in order:

1. the ahead-of-time build installed by ``setup.py`` (``sparsity_engine/_C*.so``), if it was built from the
   current sources and its architectures cover this GPU;
2. a just-in-time build of the csrc/ sources (the repository's ``csrc/`` in a source checkout, the copy
   shipped as ``sparsity_engine/_csrc`` in a wheel) into a cache directory::

       $SPARSITY_ENGINE_CACHE or ~/.cache/sparsity_engine/ext/<python tag>-<platform>-sm<arch>-<hash>/

   where <hash> covers the sources and the nvcc version. A file lock makes concurrent processes wait for
   one build instead of racing.

The result (module or failure) is cached for the process; :func:`extension_reasons` says why the extension
cannot be used (empty list: it can). ``SPARSITY_ENGINE_NO_EXT=1`` disables the extension.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
import threading
import time
from types import ModuleType
from typing import List, Optional

import torch

from . import _build

MODULE_NAME = "sparsity_engine._C"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REASON_LINES = 12  # lines of a build error kept in extension_reasons()

# Must match csrc/common.h (enum DType).
_DTYPE_CODES = {
    torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3, torch.int16: 4, torch.uint8: 5,
    torch.int64: 6,
}

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_reasons: Optional[List[str]] = None
_info: dict = {}  # how the module was obtained (for backends() and benchmarks)


class ExtensionUnavailableError(RuntimeError):
    """The CUDA extension cannot be loaded or built here; the message lists why."""


def dtype_code(dtype: torch.dtype) -> int:
    """The csrc/common.h DType code of a torch dtype; TypeError for dtypes the kernels do not take."""
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype must be one of {sorted(str(d) for d in _DTYPE_CODES)} for the CUDA "
                        f"extension, got {dtype}") from None


try:  # without building a torch.cuda.Stream object: ~1 us instead of ~5 (a merge asks several times per call)
    raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # a torch built without CUDA
    def raw_stream(index: int) -> int:
        """The raw cudaStream_t (as an int) of torch's current stream on CUDA device ``index``."""
        return torch.cuda.current_stream(index).cuda_stream


def stream_ptr(t: torch.Tensor) -> int:
    """The raw cudaStream_t (as an int) of torch's current stream on ``t``'s device."""
    return raw_stream(t.device.index)


def source_dir() -> Optional[str]:
    """csrc/ of a source checkout (editable install), else the copy shipped in the wheel; None if neither."""
    for candidate in (os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc"), os.path.join(_PACKAGE_DIR, "_csrc")):
        if os.path.isfile(os.path.join(candidate, "bindings.cpp")) and os.path.isfile(
                os.path.join(candidate, "registry.h")):
            return candidate
    return None


def _device_arch() -> str:
    """JIT target for the current GPU: '90a' on compute capability 9.0 (Hopper-specific code), else 'XY'."""
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}a" if (major, minor) == (9, 0) else f"{major}{minor}"


def arch_covers(arch: str, capability) -> bool:
    """Whether code built for ``arch`` ('90', '90a', '80+PTX') runs on a GPU of ``capability`` (major, minor)."""
    major, minor = capability
    cc = major * 10 + minor
    num, suffix, ptx = _build._ARCH_RE.match(arch).groups()
    num = int(num)
    if ptx and num <= cc:
        return True  # the driver compiles the PTX for this GPU
    if suffix:
        return num == cc  # arch-specific machine code runs on exactly that capability
    return num // 10 == major and num <= cc  # machine code runs on later minors of one major


def _load_from(path: str) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, path)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _aot_module(src: Optional[str], reasons: List[str]) -> Optional[ModuleType]:
    """The ahead-of-time build, if present, current and built for this GPU (else None, a reason noted)."""
    spec = importlib.util.find_spec(MODULE_NAME)
    if spec is None or spec.origin is None:
        return None
    try:
        module = _load_from(spec.origin)
    except ImportError as exc:
        reasons.append(f"the installed extension {spec.origin} does not import: {exc}")
        return None
    if src is not None and module.version() != _build.source_hash(src):
        reasons.append(f"the installed extension was built from other sources than {src}")
        return None
    archs = list(module.compiled_archs())
    capability = torch.cuda.get_device_capability()
    if not any(arch_covers(a, capability) for a in archs):
        reasons.append(f"the installed extension was built for {archs}, not for this GPU "
                       f"(compute capability {capability[0]}.{capability[1]})")
        return None
    _info.update(kind="ahead-of-time", path=spec.origin, archs=archs)
    return module


def cache_root() -> str:
    """$SPARSITY_ENGINE_CACHE, else ~/.cache/sparsity_engine/ext ($XDG_CACHE_HOME honoured)."""
    if os.environ.get("SPARSITY_ENGINE_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["SPARSITY_ENGINE_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sparsity_engine", "ext")


def jit_dir(src: str, nvcc: str, arch: str) -> str:
    """Cache folder of one build: Python tag, platform, GPU arch, hash of the sources and nvcc version."""
    key = hashlib.sha256(f"{_build.source_hash(src)}|{_build.nvcc_version(nvcc)}".encode()).hexdigest()[:16]
    tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}-sm{arch}-{key}"
    return os.path.join(cache_root(), tag)


def _jit_module(src: str) -> ModuleType:
    """Build (once per cache key, under a file lock) and import the just-in-time extension."""
    nvcc = _build.find_nvcc()
    if nvcc is None:
        raise _build.BuildError("nvcc not found (looked on PATH, in $CUDA_HOME/bin and /usr/local/cuda/bin); "
                                "install the CUDA toolkit or set CUDA_HOME")
    arch = _device_arch()
    folder = jit_dir(src, nvcc, arch)
    os.makedirs(folder, exist_ok=True)
    output = os.path.join(folder, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    start = time.perf_counter()
    built = False
    with open(os.path.join(folder, "lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # a second process waits here, then finds the library built
        try:
            if not os.path.isfile(output):
                print(f"sparsity_engine: building the CUDA extension for sm_{arch} into {folder} "
                      "(once per source version)", file=sys.stderr)
                _build.build_extension(src, output, os.path.join(folder, "build"), [arch])
                built = True
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    module = _load_from(output)
    _info.update(kind="just-in-time", path=output, archs=[arch], built_now=built,
                 seconds=round(time.perf_counter() - start, 2))
    return module


def _first_lines(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    more = f"\n... ({len(lines) - _REASON_LINES} more lines)" if len(lines) > _REASON_LINES else ""
    return "\n".join(lines[:_REASON_LINES]) + more


def _try_load() -> None:
    global _module, _reasons
    if os.environ.get("SPARSITY_ENGINE_NO_EXT", "0") == "1":
        _reasons = ["the CUDA extension is disabled (SPARSITY_ENGINE_NO_EXT=1)"]
        return
    if not torch.cuda.is_available():
        _reasons = ["no CUDA GPU is visible to torch"]
        return
    src = source_dir()
    notes: List[str] = []
    module = _aot_module(src, notes)
    if module is None:
        if src is None:
            _reasons = notes + ["the csrc/ sources are not available to build the extension just in time"]
            return
        try:
            module = _jit_module(src)
        except ImportError as exc:
            _reasons = notes + [f"pybind11 or the built extension cannot be imported: {exc}"]
            return
        except (_build.BuildError, OSError) as exc:
            _reasons = notes + [f"building the CUDA extension failed: {_first_lines(exc)}"]
            return
    sys.modules[MODULE_NAME] = module
    _module, _reasons = module, []


def extension_reasons() -> List[str]:
    """Why the CUDA extension cannot be used here (empty: it loads). May build it just in time first."""
    with _lock:
        if _reasons is None:
            _try_load()
        return list(_reasons)


def load_extension() -> ModuleType:
    """The ``sparsity_engine._C`` module (built just in time on first use when needed).

    Raises ExtensionUnavailableError listing the reasons when it cannot be loaded or built.
    """
    if _module is not None:  # every kernel call asks: no lock once loaded
        return _module
    reasons = extension_reasons()
    if reasons:
        raise ExtensionUnavailableError("the sparsity_engine CUDA extension is unavailable: " + "; ".join(reasons))
    return _module


def extension_info() -> dict:
    """How the loaded extension was obtained: kind (ahead-of-time | just-in-time), path, archs, seconds."""
    extension_reasons()
    return dict(_info)
