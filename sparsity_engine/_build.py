"""Builds csrc/ into the ``sparsity_engine._C`` extension with nvcc through ninja.

Standard library only (no torch): ``setup.py`` loads this file by path before anything is installed, and the
just-in-time path (:mod:`sparsity_engine._ext`) uses the same function, so an ahead-of-time and a
just-in-time build compile the same sources with the same flags.

The extension is plain CUDA C++ bound with pybind11 and links cudart statically; it needs nvcc, a host C++
compiler, pybind11's headers and Python's headers, but no GPU and no CUDA torch.

Architectures are given as strings: ``"90"`` (sm_90 machine code), ``"90a"`` (sm_90a machine code, the
Hopper-specific instructions; runs on compute capability 9.0 only), ``"90+PTX"`` (sm_90 machine code plus
compute_90 PTX that the driver compiles for newer GPUs).
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import List, Optional, Sequence

ARCH_ENV = "SPARSITY_ENGINE_CUDA_ARCHS"
DEFAULT_AOT_ARCHS = ("90+PTX",)  # sm_90 machine code + compute_90 PTX
SOURCE_SUFFIXES = (".cu", ".cpp")
HEADER_SUFFIXES = (".h", ".cuh", ".hpp")
_ARCH_RE = re.compile(r"^(\d{2,3})(a?)(\+PTX)?$")
_ERROR_LINES = 60  # lines of compiler output kept in a BuildError message


class BuildError(RuntimeError):
    """The extension failed to compile or link; the message carries the compiler output."""


def find_nvcc() -> Optional[str]:
    """Path of nvcc: on PATH, else $CUDA_HOME/bin ($CUDA_PATH too), else /usr/local/cuda/bin; None if absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in roots:
        if root:
            candidate = os.path.join(root, "bin", "nvcc")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return None


def nvcc_version(nvcc: str) -> str:
    """The last line of ``nvcc --version`` (e.g. 'Build cuda_13.0.r13.0/compiler.36424714_0')."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown"


def parse_archs(spec) -> List[str]:
    """Normalise an arch list ("80;90", "8.0 9.0+PTX", ["90a"]) to ['80', '90', ...]; ValueError if malformed."""
    items = re.split(r"[;,\s]+", spec) if isinstance(spec, str) else list(spec)
    archs = []
    for item in items:
        item = str(item).strip().replace(".", "").replace("sm_", "")
        if not item:
            continue
        if not _ARCH_RE.match(item):
            raise ValueError(f"{ARCH_ENV}: cannot read the architecture {item!r}; expected entries such as "
                             "'80', '90', '90a' or '90+PTX' separated by ';'")
        if item not in archs:
            archs.append(item)
    if not archs:
        raise ValueError(f"{ARCH_ENV}: no architecture given (got {spec!r})")
    return archs


def archs_from_env(default: Sequence[str] = DEFAULT_AOT_ARCHS) -> List[str]:
    """Architectures from $SPARSITY_ENGINE_CUDA_ARCHS (e.g. "80;90+PTX") or ``default``."""
    value = os.environ.get(ARCH_ENV, "").strip()
    return parse_archs(value) if value else parse_archs(default)


def gencode_flags(archs: Sequence[str]) -> List[str]:
    """nvcc -gencode flags: '90' -> sm_90 code, '90a' -> sm_90a code, '+PTX' adds the compute_XX PTX."""
    flags = []
    for arch in parse_archs(archs):
        num, suffix, ptx = _ARCH_RE.match(arch).groups()
        virt = f"compute_{num}{suffix}"
        flags.append(f"-gencode=arch={virt},code=sm_{num}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch={virt},code={virt}")
    return flags


def list_sources(source_dir: str) -> List[str]:
    """Every csrc/*.cu and csrc/*.cpp, sorted (the compile inputs)."""
    names = sorted(n for n in os.listdir(source_dir) if n.endswith(SOURCE_SUFFIXES))
    return [os.path.join(source_dir, n) for n in names]


def source_hash(source_dir: str) -> str:
    """sha256 (16 hex digits) over the names and contents of the sources and headers in ``source_dir``."""
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(source_dir) if n.endswith(SOURCE_SUFFIXES + HEADER_SUFFIXES))
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(source_dir, name), "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def find_ninja() -> str:
    """ninja on PATH, else the binary of the ``ninja`` Python package; BuildError if neither."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary

        candidate = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(candidate):
            return candidate
    except ImportError:
        pass
    raise BuildError("ninja not found: install it (pip install ninja) to build the CUDA extension")


def _include_dirs(source_dir: str) -> List[str]:
    try:
        import pybind11
    except ImportError as exc:
        raise BuildError(f"pybind11 is missing (pip install pybind11) to build the CUDA extension: {exc}")
    dirs = [source_dir, pybind11.get_include()]
    for key in ("include", "platinclude"):
        path = sysconfig.get_paths().get(key)
        if path and path not in dirs:
            dirs.append(path)
    return dirs


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_build_ninja(source_dir: str, output: str, build_dir: str, archs: Sequence[str], nvcc: str) -> str:
    """Write build_dir/build.ninja (compile every source, link one shared library at ``output``)."""
    archs = parse_archs(archs)
    defines = [f"-DSE_VERSION=\"{source_hash(source_dir)}\"", f"-DSE_ARCHS=\"{';'.join(archs)}\""]
    includes = [f"-I{d}" for d in _include_dirs(source_dir)]
    # hidden visibility: two builds loaded in one process (an out-of-date ahead-of-time one and a fresh
    # just-in-time one) must not share inline statics such as the binder list.
    cflags = (["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
               "--expt-relaxed-constexpr", "-lineinfo"] + gencode_flags(archs) + includes + defines)
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {shlex.quote(nvcc)}",
        f"cflags = {' '.join(shlex.quote(f) for f in cflags)}",
        "rule compile",
        "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc -shared -cudart static $in -o $out",
        "  description = link $out",
    ]
    objects = []
    for src in list_sources(source_dir):
        obj = os.path.join(build_dir, os.path.basename(src) + ".o")
        objects.append(obj)
        lines.append(f"build {_ninja_escape(obj)}: compile {_ninja_escape(src)}")
    lines.append(f"build {_ninja_escape(output)}: link {' '.join(_ninja_escape(o) for o in objects)}")
    lines.append(f"default {_ninja_escape(output)}")
    path = os.path.join(build_dir, "build.ninja")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if "error" in line.lower()]
    start = max(0, errors[0] - 5) if errors else max(0, len(lines) - _ERROR_LINES)
    return "\n".join(lines[start:start + _ERROR_LINES])


def build_extension(source_dir: str, output: str, build_dir: str, archs: Sequence[str] = DEFAULT_AOT_ARCHS,
                    verbose: bool = False) -> str:
    """Compile every ``source_dir``/*.cu and *.cpp with nvcc and link them into the shared library ``output``.

    Objects and build.ninja live in ``build_dir`` (incremental across calls); the library is linked there
    and moved into ``output`` with os.replace, so a reader never sees a half-written file. ``archs``: see
    the module docstring. Parallel jobs: $MAX_JOBS, else ninja's default. Returns ``output``; raises
    BuildError with the compiler's output on failure.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (looked on PATH, in $CUDA_HOME/bin and /usr/local/cuda/bin)")
    if not list_sources(source_dir):
        raise BuildError(f"no .cu / .cpp sources in {source_dir}")
    source_dir, output, build_dir = (os.path.abspath(p) for p in (source_dir, output, build_dir))
    os.makedirs(build_dir, exist_ok=True)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staged = os.path.join(build_dir, os.path.basename(output))
    write_build_ninja(source_dir, staged, build_dir, archs, nvcc)
    cmd = [find_ninja(), "-C", build_dir]
    if os.environ.get("MAX_JOBS"):
        cmd += ["-j", os.environ["MAX_JOBS"]]
    if verbose:
        cmd.append("-v")
        print("sparsity_engine: " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if verbose and proc.stdout:
        print(proc.stdout, file=sys.stderr)
    if proc.returncode != 0:
        raise BuildError(f"building the CUDA extension failed (ninja exit {proc.returncode}, build dir "
                         f"{build_dir}):\n{_tail(proc.stdout)}")
    # copy next to the target, then rename: atomic even when build_dir is on another file system
    fd, tmp = tempfile.mkstemp(prefix=".se_ext_", suffix=".so", dir=os.path.dirname(output))
    os.close(fd)
    try:
        shutil.copy2(staged, tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output
