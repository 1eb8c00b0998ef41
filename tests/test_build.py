"""The CUDA extension machinery: csrc/ compiles and links for sm_90 on any machine with nvcc (no GPU needed),
the library imports and carries every family's functions; loading, caching and reasons on a GPU."""
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from sparsity_engine import _build, _ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")


def _can_build():
    if _build.find_nvcc() is None:
        return "nvcc not found"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 not installed"
    return None


def _import_so(path):
    loader = importlib.machinery.ExtensionFileLoader("sparsity_engine._C", path)
    spec = importlib.util.spec_from_file_location("sparsity_engine._C", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _installed_build_of(digest):
    """The ahead-of-time library ``pip install`` built (setup.py calls the same ``_build.build_extension``) when it
    was built from exactly these sources, with its architectures; else None."""
    spec = importlib.util.find_spec(_ext.MODULE_NAME)
    if spec is None or spec.origin is None:
        return None
    info = _describe_in_fresh_process(spec.origin)
    return (spec.origin, info["archs"]) if info["version"] == digest else None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The whole csrc/ built by ``_build.build_extension`` for sm_90: the library ``pip install -e`` just built from
    these sources when there is one (CI's install builds it, and a compile error fails the install), else one
    build for this module (two minutes on 2 CPU cores). Returns (path, source digest, architectures)."""
    why = _can_build()
    if why:
        pytest.skip(f"cannot build the CUDA extension here: {why}")
    digest = _build.source_hash(CSRC)  # before building: the version the library must report
    installed = _installed_build_of(digest)
    if installed is not None:
        return installed[0], digest, installed[1]
    root = tmp_path_factory.mktemp("ext")
    output = str(root / ("_C" + sysconfig.get_config_var("EXT_SUFFIX")))
    _build.build_extension(CSRC, output, str(root / "build"), ["90"])
    return output, digest, ["90"]


def _describe_in_fresh_process(path):
    """What the library at ``path`` reports, asked by a new interpreter: in a process that already loaded
    another sparsity_engine._C (the just-in-time build, on a GPU machine) the answers could come from that
    one (seen on a GPU machine: compiled_archs ['90a'] from a fresh ['90'] build)."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import test_build as t; m = t._import_so(sys.argv[1]); "
            "print(json.dumps(dict(families=list(m.families()), names=dir(m), version=m.version(), "
            "archs=list(m.compiled_archs()), max_m=m.masks_nm_mask_max_m(), cudart=m.cuda_runtime_version())))")
    res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    import json
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_build_imports_and_lists_every_family(built):
    path, digest, archs = built
    info = _describe_in_fresh_process(path)
    families = sorted(n[: -len("_bindings.cpp")] for n in os.listdir(CSRC) if n.endswith("_bindings.cpp"))
    assert info["families"] == families
    assert "masks" in families and "csr" in families
    names = info["names"]
    assert {"masks_nm_mask", "masks_nm_mask_max_m", "masks_select_edges", "masks_select_write"} <= set(names)
    for family in families:
        assert any(n.startswith(family + "_") for n in names), f"no function of family {family!r} bound"
    # csrc/README's rule: every kernel file and every bound function is named after its family
    module_level = {"version", "compiled_archs", "families", "cuda_runtime_version"}
    for n in names:
        if not n.startswith("_") and n not in module_level:
            assert any(n.startswith(f + "_") for f in families), f"{n!r} is not prefixed with its family"
    for f in os.listdir(CSRC):
        if f.endswith(".cu"):
            assert any(f == fam + ".cu" or f.startswith(fam + "_") for fam in families), f"csrc/{f}: no family"
    assert info["version"] == digest
    assert info["archs"] == archs and any(a.startswith("90") for a in archs)
    assert info["max_m"] == 256  # callable without a GPU
    assert info["cudart"] >= 11000


def test_build_writes_nothing_into_the_source_tree(built):
    assert not [n for n in os.listdir(CSRC) if n.endswith((".o", ".so", ".ninja", ".d"))]


def test_build_failure_raises_with_compiler_output(tmp_path):
    if _can_build():
        pytest.skip(_can_build())
    src = tmp_path / "src"
    src.mkdir()
    for name in ("common.h", "registry.h", "bindings.cpp"):
        (src / name).write_text((open(os.path.join(CSRC, name)).read()))
    (src / "broken.cu").write_text("int broken( { return 0; }\n")
    out = tmp_path / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    with pytest.raises(_build.BuildError, match="broken.cu"):
        _build.build_extension(str(src), str(out), str(tmp_path / "build"), ["90"])
    assert not out.exists()  # no half-written library


def test_build_module_imports_without_torch():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print('torch' in sys.modules, m.DEFAULT_AOT_ARCHS)")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "sparsity_engine", "_build.py")],
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False"


def test_archs_parsing_and_gencode(monkeypatch):
    assert _build.parse_archs("80;90") == ["80", "90"]
    assert _build.parse_archs("8.0 9.0+PTX") == ["80", "90+PTX"]
    assert _build.gencode_flags(["90+PTX"]) == ["-gencode=arch=compute_90,code=sm_90",
                                               "-gencode=arch=compute_90,code=compute_90"]
    assert _build.gencode_flags(["90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv(_build.ARCH_ENV, "80;90")
    assert _build.archs_from_env(_build.DEFAULT_AOT_ARCHS) == ["80", "90"]
    monkeypatch.delenv(_build.ARCH_ENV)
    assert _build.archs_from_env(_build.DEFAULT_AOT_ARCHS) == ["90+PTX"]
    monkeypatch.setenv(_build.ARCH_ENV, "hopper")
    with pytest.raises(ValueError, match=_build.ARCH_ENV):
        _build.archs_from_env(_build.DEFAULT_AOT_ARCHS)


def test_find_nvcc_looks_in_cuda_home(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert _build.find_nvcc() == str(fake)


def test_arch_covers():
    assert _ext.arch_covers("90", (9, 0)) and _ext.arch_covers("90a", (9, 0))
    assert not _ext.arch_covers("90a", (10, 0)) and not _ext.arch_covers("90", (10, 0))
    assert _ext.arch_covers("90+PTX", (10, 0)) and not _ext.arch_covers("90+PTX", (8, 9))
    assert _ext.arch_covers("80", (8, 6)) and not _ext.arch_covers("86", (8, 0))


def test_dtype_codes_match_common_h():
    header = open(os.path.join(CSRC, "common.h")).read()
    for dtype, name in [(torch.float32, "kF32"), (torch.float16, "kF16"), (torch.bfloat16, "kBF16"),
                        (torch.int32, "kI32"), (torch.int16, "kI16"), (torch.uint8, "kU8"), (torch.int64, "kI64")]:
        assert f"{name} = {_ext.dtype_code(dtype)}" in header
    with pytest.raises(TypeError, match="dtype"):
        _ext.dtype_code(torch.complex64)


def test_extension_reasons_is_a_list_of_sentences():
    reasons = _ext.extension_reasons()
    assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons)
    if not torch.cuda.is_available():
        assert reasons and "GPU" in reasons[0]
        with pytest.raises(_ext.ExtensionUnavailableError, match="GPU"):
            _ext.load_extension()


def test_cache_dir_names_python_platform_arch_and_hash(tmp_path, monkeypatch):
    if _build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    monkeypatch.setenv("SPARSITY_ENGINE_CACHE", str(tmp_path))
    folder = _ext.jit_dir(CSRC, _build.find_nvcc(), "90a")
    assert os.path.dirname(folder) == str(tmp_path)
    name = os.path.basename(folder)
    assert name.startswith(sys.implementation.cache_tag) and "-sm90a-" in name


@pytest.mark.cuda
def test_load_extension_on_gpu():
    assert _ext.extension_reasons() == []
    ext = _ext.load_extension()
    assert ext is _ext.load_extension()  # cached in-process
    info = _ext.extension_info()
    assert info["kind"] in ("ahead-of-time", "just-in-time")
    cap = torch.cuda.get_device_capability()
    assert any(_ext.arch_covers(a, cap) for a in ext.compiled_archs())
    # one direct call through the raw binding: 2:4 on a known row, ties to the lower index
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, -1.0, -1.0, -1.0, -1.0]], device="cuda")
    out = torch.full(x.shape, True, dtype=torch.bool, device="cuda")
    ext.masks_nm_mask(x.data_ptr(), out.data_ptr(), x.numel(), 2, 4, _ext.dtype_code(x.dtype), _ext.stream_ptr(x))
    torch.cuda.synchronize()
    assert out.tolist() == [[False, True, True, False, True, True, False, False]]
    with pytest.raises(ValueError, match="n must be"):
        ext.masks_nm_mask(x.data_ptr(), out.data_ptr(), x.numel(), 5, 4, 0, _ext.stream_ptr(x))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (4, 8), (5, 16), (16, 32), (7, 12), (40, 64)])
def test_cuda_nm_mask_every_path(dtype, n, m):
    """Vectorised path (m in 2..32, aligned), generic path (other m), tails and unaligned inputs vs the
    reference, with many exact ties (scores rounded to a few values)."""
    from sparsity_engine.ops.masks import cuda as masks_cuda, reference

    base = (torch.randn(1000 * m + m, device="cuda") * 4).round().to(dtype)  # ties everywhere
    for x in (base[: 997 * m].view(997, m), base[m: m + 131 * m], base[1: 1 + 64 * m]):
        poison = torch.full((x.numel(),), 7, dtype=torch.uint8, device="cuda")
        del poison  # the caching allocator hands this block (bytes 7) to the kernel's output next
        got = masks_cuda.nm_mask(x, n, m)
        assert got.view(torch.uint8).max() <= 1
        assert torch.equal(got, reference.nm_mask(x, n, m))
        assert int(got.sum()) == x.numel() // m * n


def test_installed_extension_imports_without_a_gpu():
    """The ahead-of-time build that ``pip install`` made (where nvcc was found) imports and lists every family."""
    spec = importlib.util.find_spec(_ext.MODULE_NAME)
    if spec is None or spec.origin is None:
        pytest.skip("no ahead-of-time extension installed (nvcc absent at install time, or not installed)")
    info = _describe_in_fresh_process(spec.origin)
    if info["version"] != _build.source_hash(CSRC):
        # e.g. a development checkout whose package path also reaches another tree's build (_ext ignores such a
        # build too); the installed build of these sources is what this test is about
        pytest.skip(f"the installed extension {spec.origin} was built from other sources")
    families = sorted(n[: -len("_bindings.cpp")] for n in os.listdir(CSRC) if n.endswith("_bindings.cpp"))
    assert info["families"] == families
    assert any(a.startswith("90") for a in info["archs"]), info["archs"]
    assert info["max_m"] == 256
