"""compat.mergekit: same names and values as mergekit.sparsify, exact results on deterministic methods
(against mergekit's formulas re-derived here), seeded reproducibility and distribution on random ones."""
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
@pytest.mark.parametrize("density,gamma", [(0.3, 0.05), (0.95, 0.2), (0.5, 0.01)])
def test_magnitude_outliers_exact(norm, density, gamma):
    t = _distinct((20, 15))
    n = t.numel()
    n_top = int(gamma * n)
    n_bot = n - int(density * n) - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    expected = _scaled(t, t * _top_positions(t, n_top, n - n_bot), norm)
    got = mk.sparsify(t, density, "magnitude_outliers", gamma=gamma, rescale_norm=norm)
    assert torch.equal(got, expected)


def test_magnitude_outliers_keeps_mergekits_empty_slice():
    # int(gamma * n) == 0: mergekit's indices[n_bot:-0] is empty, so nothing is kept
    t = _distinct((4, 5))
    assert (mk.sparsify(t, 0.5, "magnitude_outliers", gamma=0.0) == 0).all()
    assert (mk.magnitude_outliers(t, 0.5, gamma=0.01) == 0).all()


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
    (lambda: mk.sparsify(torch.randn(4), 0.1, "magnitude"), "keeps no entry"),
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
