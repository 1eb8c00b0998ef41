"""compat.mergekit: same names and values as mergekit.sparsify, exact results on deterministic methods
(against mergekit's formulas re-derived here), seeded reproducibility and distribution on random ones."""
import sys

import pytest
import torch

from sparsity_engine.compat import mergekit as mk
from helpers import KERNEL_DEVICE


def _distinct(shape, dtype=torch.float32, device="cpu"):
    """Random values with pairwise distinct magnitudes (mergekit leaves the order of ties to its sort)."""
    n = 1
    for s in shape:
        n *= s
    mags = (torch.randperm(n).float() + 1) / n
    signs = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    return (mags * signs).reshape(shape).to(dtype).to(device)


def _top_positions(t, lo, hi):
    """Mask of the entries ranked lo..hi-1 by |t| descending."""
    order = torch.argsort(t.abs().flatten().float(), descending=True)
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[order[lo:hi]] = 1
    return mask.reshape(t.shape)


def _scaled(t, masked, norm):
    if norm is None:
        return masked
    f = {"l1": lambda x: x.abs().sum(), "l2": lambda x: x.norm(), "linf": lambda x: x.abs().max()}[norm]
    b, a = f(t), f(masked)
    return masked if (b < 1e-7 or a < 1e-7) else masked * (b / a)


def test_enums_mirror_mergekit():
    assert [m.value for m in mk.SparsificationMethod] == ["magnitude", "random", "magnitude_outliers", "della_magprune"]
    assert [m.value for m in mk.RescaleNorm] == ["l1", "l2", "linf"]
    assert mk.SparsificationMethod("random") == "random" and isinstance(mk.RescaleNorm.l1, str)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", [None, "l1", "l2", "linf"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.93])
def test_magnitude_exact(dtype, norm, density):
    t = _distinct((13, 17), dtype)
    k = int(density * t.numel())
    expected = _scaled(t, t * _top_positions(t, 0, k), norm)
    got = mk.sparsify(t, density, mk.SparsificationMethod.magnitude, rescale_norm=norm and mk.RescaleNorm(norm))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("norm", [None, "l1"])
@pytest.mark.parametrize("density,gamma", [(0.3, 0.05), (0.95, 0.2), (0.5, 0.01), (0.5, 0.0), (0.2, 0.9)])
def test_magnitude_outliers_exact(norm, density, gamma):
    # mergekit 0.1.5: ascending order, keep positions [n_bot, n_bot + target) with
    # n_bot = max(0, n - target - int(gamma * n))
    t = _distinct((20, 15))
    n = t.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    lo = n - n_bot - target  # the same band counted from the largest
    expected = _scaled(t, t * _top_positions(t, lo, lo + target), norm)
    got = mk.sparsify(t, density, "magnitude_outliers", gamma=gamma, rescale_norm=norm)
    assert torch.equal(got, expected)


def test_magnitude_keeps_one_entry_for_a_positive_density():
    # mergekit 0.1.5: k = max(1, int(density * n)); density 0 gives zeros, an empty tensor comes back empty
    t = _distinct((3, 7))
    got = mk.sparsify(t, 0.01, "magnitude")
    assert torch.equal(got, t * _top_positions(t, 0, 1))
    for norm in (None, "l1", "l2", "linf"):
        assert torch.equal(mk.sparsify(t, 0.0, "magnitude", rescale_norm=norm), torch.zeros_like(t))
        for shape in ((0,), (2, 0)):
            e = torch.empty(shape)
            for method in mk.SparsificationMethod:
                out = mk.sparsify(e, 0.5, method, gamma=0.1, epsilon=0.1, rescale_norm=norm)
                assert out.shape == e.shape


@pytest.mark.parametrize("method", ["magnitude", "magnitude_outliers"])
def test_float64_ranked_by_float32_magnitudes(method):
    t = _distinct((9, 11), torch.float64)
    got = mk.sparsify(t, 0.4, method, gamma=0.1)
    ref = mk.sparsify(t.float(), 0.4, method, gamma=0.1)
    assert got.dtype == torch.float64
    assert torch.equal(got != 0, ref != 0) and torch.equal(got[got != 0], t[got != 0])
    d = torch.randn(3, 5, 4, dtype=torch.float64)
    assert torch.equal(mk.get_mask(d), torch.sign(d) == torch.where(d.sum(0) >= 0, 1.0, -1.0).double())


def test_density_one_returns_input():
    t = torch.randn(5, 6)
    for method in mk.SparsificationMethod:
        assert mk.sparsify(t, 1.0, method, epsilon=0.1) is t


def test_rescaled_masked_tensor():
    t = torch.tensor([3.0, -4.0, 1.0, 0.0])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.equal(mk.rescaled_masked_tensor(t, mask, None), torch.tensor([3.0, -0.0, 1.0, 0.0]))
    assert torch.allclose(mk.rescaled_masked_tensor(t, mask, mk.RescaleNorm.l1), torch.tensor([6.0, 0.0, 2.0, 0.0]))
    assert torch.allclose(mk.rescaled_masked_tensor(t, mask, "linf"), torch.tensor([4.0, 0.0, 4.0 / 3.0, 0.0]))
    zero = torch.zeros(4)
    assert torch.equal(mk.rescaled_masked_tensor(t, zero, "l2"), t * zero)  # norm below eps: no rescale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_cpu_reproduces_mergekits_draw(dtype):
    # mergekit: mask = bernoulli(full_like(tensor, density)) in fp32 for fp16/fp32 CPU tensors, bf16 kept
    t = torch.randn(30, 40).to(dtype)
    work = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    torch.manual_seed(11)
    mask = torch.bernoulli(torch.full_like(t, 0.3, dtype=work))
    expected = (t.to(work) * mask).to(dtype)
    torch.manual_seed(11)
    assert torch.equal(mk.sparsify(t, 0.3, "random"), expected)


def test_della_cpu_reproduces_mergekits_draw():
    t = torch.randn(12, 50)
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1), dim=1).float() + 1
    rank_norm = ((ranks - 1) / (t.shape[1] - 1)).clamp(0, 1)
    probs = (0.4 - 0.1) + rank_norm * 2 * 0.1
    torch.manual_seed(4)
    mask = torch.bernoulli(probs)
    torch.manual_seed(4)
    assert torch.equal(mk.sparsify(t, 0.4, "della_magprune", epsilon=0.1), t * mask)


@pytest.mark.parametrize("method", ["random", "della_magprune"])
def test_random_methods_keep_rate_and_seed(method):
    t = torch.randn(64, 128, device=KERNEL_DEVICE)
    torch.manual_seed(1)
    a = mk.sparsify(t, 0.3, method, epsilon=0.1)
    torch.manual_seed(1)
    b = mk.sparsify(t, 0.3, method, epsilon=0.1)
    assert torch.equal(a, b)
    assert abs((a != 0).float().mean().item() - 0.3) < 0.02
    scaled = mk.sparsify(t, 0.3, method, epsilon=0.1, rescale_norm="l1")
    assert abs(scaled.abs().sum().item() / t.abs().sum().item() - 1) < 1e-4


def test_della_single_column_is_finite():
    out = mk.della_magprune(torch.randn(50, 1), 0.5, 0.1)
    assert torch.isfinite(out).all()


def test_get_mask_hand_example():
    d = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, -1.0, 2.0, -4.0], [2.0, 1.0, -1.0, 0.0]])
    assert mk.get_mask(d).tolist() == [[True, True, False, False], [False, True, True, True],
                                       [True, False, False, False]]
    assert mk.get_mask(d, "count", mask_dtype=torch.int8).tolist() == [[True, True, False, True],
                                                                       [False, True, True, False],
                                                                       [True, False, False, False]]


def test_get_mask_matches_formula_on_device():
    d = torch.randn(4, 33, 7, device=KERNEL_DEVICE)
    d[:, :3] = 0
    elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    assert torch.equal(mk.get_mask(d), torch.sign(d) == elected)


@pytest.mark.parametrize("call,err", [
    (lambda: mk.sparsify(torch.randn(4), 0.5, "topk"), "method must be one of"),
    (lambda: mk.sparsify(torch.randn(4), 1.5, "magnitude"), "density must be in"),
    (lambda: mk.sparsify(torch.randn(4, 4), 0.5, "della_magprune", epsilon=0.6), "epsilon must keep"),
    (lambda: mk.sparsify(torch.randn(4), 0.5, "magnitude", rescale_norm="l3"), "rescale_norm must be"),
    (lambda: mk.sparsify([1.0, 2.0], 0.5, "magnitude"), "tensor must be a torch.Tensor"),
    (lambda: mk.get_mask(torch.randn(2, 3), "majority"), "method must be 'sum' or 'count'"),
    (lambda: mk.sparsify(torch.tensor([1.0, float("nan")]), 0.5, "magnitude"), "tensor contains 1 NaN"),
])
def test_bad_input(call, err):
    with pytest.raises((ValueError, TypeError), match=err):
        call()


@pytest.mark.parametrize("method", ["magnitude", "magnitude_outliers"])
def test_ties_in_magnitude_ordered_as_mergekits_stable_sorts(method):
    # bf16 values with many equal magnitudes: mergekit's argsort / sort are stable on the CPU and in CUDA's
    # radix sort, so its choice among equal magnitudes is the stable one; ours must be the same
    t = (torch.randint(-6, 7, (24, 10)).float() / 4).to(torch.bfloat16)
    n, density, gamma = t.numel(), 0.4, 0.05
    w = t.abs().view(-1).float()
    mask = torch.zeros(n, dtype=t.dtype)
    if method == "magnitude":
        mask[torch.argsort(w, descending=True, stable=True)[: int(density * n)]] = 1
    else:
        n_top = int(gamma * n)
        n_bot = n - int(density * n) - n_top
        order = torch.sort(w, stable=True).indices
        mask[order[n_bot: n - n_top]] = 1
    expected = t * mask.view(t.shape)
    assert torch.equal(mk.sparsify(t, density, method, gamma=gamma), expected)


# ------------------------------------------------------------------ mergekit 0.1.5's own tests/test_sparsify.py

_REDIRECT_PLUGIN = '''
import sys, types
import sparsity_engine.compat.mergekit as ours
stub = types.ModuleType("mergekit")  # the package itself is not needed: only its sparsify module is asked for
stub.__path__ = []
stub.sparsify = ours
sys.modules["mergekit"] = stub
sys.modules["mergekit.sparsify"] = ours

def pytest_collection_finish(session):
    import mergekit.sparsify
    assert mergekit.sparsify is ours, "mergekit.sparsify was not redirected"
    print("REDIRECTED-TO", ours.__file__)
'''


def test_mergekits_own_sparsify_tests_pass_against_compat(tmp_path):
    """mergekit 0.1.5's tests/test_sparsify.py, fetched from its source archive (mergekit_release: never stored
    here), run with ``mergekit.sparsify`` redirected to this module; it must pass in full (55 tests)."""
    import os
    import subprocess
    import sys

    import mergekit_release

    test_file = mergekit_release.extract_test("test_sparsify.py", str(tmp_path))
    (tmp_path / "redirect_mergekit.py").write_text(_REDIRECT_PLUGIN)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), repo, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "redirect_mergekit", "-p",
                          "no:cacheprovider", "--rootdir", str(tmp_path), test_file],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert "REDIRECTED-TO " + os.path.join(repo, "sparsity_engine", "compat", "mergekit.py") in out, out[-3000:]
    assert res.returncode == 0 and "55 passed" in out and "failed" not in out, out[-3000:]


# ------------------------------------------------------------------ mergekit 0.1.5 runs unchanged with ours

_GTA_CONFIGS = {  # every generalized task-arithmetic method; densities small enough to reach 'keep one'
    "task_arithmetic": "",
    "ties": "density: 0.1",
    "breadcrumbs": "density: 0.4\n      gamma: 0.05",
    "breadcrumbs_ties": "density: 0.4\n      gamma: 0.0",
    "dare_ties": "density: 0.5",
    "dare_linear": "density: 0.05",
    "della": "density: 0.5\n      epsilon: 0.2",
    "della_linear": "density: 0.3\n      epsilon: 0.1",
}


def _gta_yaml(method, base, fts):
    params = _GTA_CONFIGS[method]
    models = "".join(f"  - model: {p}\n    parameters:\n      weight: {w}\n" + (f"      {params}\n" if params else "")
                     for p, w in zip(fts, (1.0, 0.6, -0.3)))
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}dtype: float32\n"


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory):
    pytest.importorskip("transformers")
    from merge_fixtures import write_models

    return write_models(str(tmp_path_factory.mktemp("llamas")))


@pytest.mark.skipif(sys.version_info < (3, 10), reason="mergekit 0.1.5 needs Python >= 3.10")
@pytest.mark.parametrize("method", list(_GTA_CONFIGS))
def test_mergekit_runs_unchanged_with_our_sparsify_and_get_mask(method, tiny_llamas, tmp_path, monkeypatch):
    """mergekit's own merge of tiny LLaMAs, as released and with mergekit's sparsify and get_mask swapped for
    ours: the outputs are identical, bit for bit (random methods too: on the CPU ours draws as mergekit does,
    and both runs start from mergekit's random_seed)."""
    import mergekit_release
    from merge_fixtures import run_mergekit, state_dict

    mergekit_release.require_package()
    import mergekit.merge_methods.generalized_task_arithmetic as gta
    import mergekit.sparsify

    base, fts = tiny_llamas
    text = _gta_yaml(method, base, fts)
    released = state_dict(run_mergekit(text, tmp_path / "released", seed=7))
    calls = {"sparsify": 0, "get_mask": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(gta, "sparsify", counted("sparsify", mk.sparsify))
    monkeypatch.setattr(gta, "get_mask", counted("get_mask", mk.get_mask))
    for name in ("sparsify", "magnitude", "magnitude_outliers", "bernoulli", "della_magprune",
                 "rescaled_masked_tensor"):
        monkeypatch.setattr(mergekit.sparsify, name, getattr(mk, name))
    ours = state_dict(run_mergekit(text, tmp_path / "ours", seed=7))
    assert calls["sparsify"] > 0 or method == "task_arithmetic", calls
    assert calls["get_mask"] > 0 or method in ("task_arithmetic", "breadcrumbs", "dare_linear", "della_linear")
    assert released.keys() == ours.keys() and len(ours) == 2 * 9 + 3
    for name, t in released.items():
        assert torch.equal(t, ours[name]), name
