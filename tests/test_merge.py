"""Merge ops: TIES consensus and generalized task arithmetic (reference exact values, mergekit's formula
re-derived, kernels against the reference), Breadcrumbs, the state-dict merge, bad input."""
import re

import pytest
import torch

import sparsity_engine as se
from helpers import KERNEL_BACKENDS, KERNEL_DEVICE, RTOL, assert_rel_close

from sparsity_engine.ops.merge import METHODS, magnitude_outliers

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DETERMINISTIC = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]
RANDOM = ["dare_ties", "dare_linear", "della", "della_linear"]


def _poison_allocator(like: torch.Tensor) -> None:
    """Fill and free a block the size of the next output, so an output element the kernel forgets to write
    most likely holds NaN instead of a plausible value."""
    junk = torch.full_like(like, float("nan"))
    del junk


def _models(shape, n, dtype, device="cpu", scale=0.05):
    base = torch.randn(shape, device=device).to(dtype)
    tensors = [(base.float() + scale * torch.randn(shape, device=device)).to(dtype) for _ in range(n)]
    return base, tensors


# ---------------------------------------------------------------- ties_consensus

TOY = torch.tensor([[1.0, -2.0, 0.0, 3.0],
                    [-1.0, -1.0, 2.0, -4.0],
                    [2.0, 1.0, -1.0, 0.0]])


def test_ties_consensus_hand_example_sum():
    # column sums 2, -2, 1, -1 elect +, -, +, -; a zero never agrees
    got = se.ties_consensus(TOY, "sum", backend="reference")
    assert got.tolist() == [[True, True, False, False],
                            [False, True, True, True],
                            [True, False, False, False]]


def test_ties_consensus_hand_example_count():
    # sign counts 1, -1, 0, 0: a zero vote elects +
    got = se.ties_consensus([TOY[0], TOY[1], TOY[2]], "count", backend="reference")
    assert got.tolist() == [[True, True, False, True],
                            [False, True, True, False],
                            [True, False, False, False]]


def test_ties_consensus_zero_sum_elects_plus():
    d = torch.tensor([[1.5], [-1.5]])
    assert se.ties_consensus(d, "sum", backend="reference").tolist() == [[True], [False]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["sum", "count"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 9), (4, 1), (2, 1300)])
def test_ties_consensus_kernel_matches_reference(dtype, method, shape):
    d = torch.randn(shape, device=KERNEL_DEVICE).to(dtype)
    d.view(-1)[::7] = 0
    expected = se.ties_consensus(d, method, backend="reference")
    got = se.ties_consensus(d, method, backend="triton")
    assert got.dtype == torch.bool and torch.equal(got, expected)


# ---------------------------------------------------------------- hand-computed merges

def test_task_arithmetic_exact():
    base = torch.tensor([1.0, 2.0])
    ts = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 4.0])]
    got = se.merge_task_vectors(base, ts, [0.5, 1.0], method="task_arithmetic", backend="reference")
    assert got.tolist() == [1.5, 4.0]
    got = se.merge_task_vectors(base, ts, [0.5, 1.0], method="task_arithmetic", normalize=True, lambda_=3.0,
                                backend="reference")
    assert torch.allclose(got, torch.tensor([2.0, 6.0]))  # deltas (0.5, 2) / 1.5 * 3 + base


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ties_hand_example(backend):
    base = torch.ones(4, device=KERNEL_DEVICE if backend == "triton" else "cpu")
    ts = [base + row.to(base.device) for row in TOY]
    full = se.merge_task_vectors(base, ts, [1.0, 1.0, 1.0], method="ties", backend=backend)
    assert full.tolist() == [2.5, -0.5, 3.0, -3.0]  # agreeing deltas averaged: 3/2, -3/2, 2, -4
    # density 0.5 keeps 2 of 4 per model: (-2, 3), (2, -4), (2, 1) [the tie |1| = |-1| goes to the lower index]
    half = se.merge_task_vectors(base, ts, [1.0, 1.0, 1.0], method="ties", density=0.5, backend=backend)
    assert half.tolist() == [3.0, -1.0, 3.0, -3.0]


def test_method_table_matches_mergekit_registry():
    assert METHODS["ties"] == ("magnitude", "sum", True, False)
    assert METHODS["dare_ties"] == ("random", "sum", False, True)
    assert METHODS["dare_linear"] == ("random", None, False, True)
    assert METHODS["breadcrumbs"] == ("magnitude_outliers", None, False, False)
    assert METHODS["breadcrumbs_ties"] == ("magnitude_outliers", "sum", False, False)
    assert METHODS["della"] == ("della_magprune", "sum", True, True)
    assert METHODS["della_linear"] == ("della_magprune", None, False, True)
    assert METHODS["task_arithmetic"] == (None, None, False, False)


# ---------------------------------------------------------------- mergekit's formula, re-derived

def _keep_positions(delta, lo, hi, later_first=False):
    """Entries at positions [lo, hi) when sorted by |delta| descending, equal magnitudes by flat index
    (ascending, as a stable descending argsort; descending, as a stable ascending sort read backwards)."""
    flat = delta.abs().float().flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], -i if later_first else i))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[lo:hi]] = True
    return keep.reshape(delta.shape)


def _derived_merge(base, tensors, weights, method, density, gamma, lam, normalize, rescale):
    sparsification, consensus, default_norm, default_rescale = METHODS[method]
    normalize = default_norm if normalize is None else normalize
    rescale = default_rescale if rescale is None else rescale
    dt, n = base.dtype, base.numel()
    sparse = []
    for t, dens, gam in zip(tensors, density, gamma):
        d = t.to(dt) - base
        if sparsification is not None and dens < 1:
            if sparsification == "magnitude":  # mergekit 0.1.5: a positive density keeps at least one entry
                keep = _keep_positions(d, 0, max(1, int(dens * n)) if dens > 0 else 0)
            else:  # outliers: the top int(gamma n) go, then the bottom, so int(density n) stay
                top = min(int(gam * n), n - int(dens * n))
                keep = _keep_positions(d, top, top + int(dens * n), later_first=True)
            kept = torch.where(keep, d, torch.zeros_like(d))
            if rescale and d.abs().sum() >= 1e-7 and kept.abs().sum() >= 1e-7:
                kept = kept * (d.abs().sum() / kept.abs().sum())
            d = kept
        sparse.append(d)
    w = [torch.tensor(x, dtype=dt) for x in weights]
    wd = [d * wi for d, wi in zip(sparse, w)]
    total = torch.zeros(base.shape, dtype=dt)
    div = torch.zeros(base.shape, dtype=dt)
    if consensus is not None:
        elected = torch.where(torch.stack(wd).sum(0) >= 0, 1.0, -1.0)
        agree = [torch.sign(x) == elected for x in wd]
        total = torch.stack([torch.where(a, x, torch.zeros_like(x)) for a, x in zip(agree, wd)]).sum(0)
        div = torch.stack([a.to(dt) * wi for a, wi in zip(agree, w)]).sum(0)
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        total = torch.stack(wd).sum(0)
        div = torch.stack(w).sum()
        div = div if div.abs() >= 1e-8 else torch.ones_like(div)
    if normalize:
        total = total / div
    if lam != 1:
        total = total * lam
    return (base + total).to(dt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("normalize,rescale,lam", [(None, None, 1.0), (True, True, 0.7), (False, False, 1.3)])
def test_reference_equals_mergekit_formula(dtype, method, normalize, rescale, lam):
    base, ts = _models((9, 13), 3, dtype)
    weights, density, gamma = [0.3, 0.6, 1.1], [0.5, 0.3, 0.8], [0.02, 0.05, 0.1]
    got = se.merge_task_vectors(base, ts, weights, method=method, density=density, gamma=gamma, lambda_=lam,
                                normalize=normalize, rescale=rescale, backend="reference")
    expected = _derived_merge(base, ts, weights, method, density, gamma, lam, normalize, rescale)
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_small_densities_count_as_mergekit_015(backend, dtype, method):
    """ties keeps max(1, int(density n)) of each delta (one entry at a tiny positive density, none at 0);
    breadcrumbs keeps int(density n) (its count has no floor in 0.1.5): the op itself, on every backend."""
    base, ts = _models((9, 13), 4, dtype, KERNEL_DEVICE)
    density, gamma = [0.001, 0.0, 1.5 / 117, 0.5], [0.02, 0.0, 0.05, 0.01]
    weights = [0.3, 0.6, 1.1, -0.5]
    got = se.merge_task_vectors(base, ts, weights, method=method, density=density, gamma=gamma, backend=backend)
    expected = _derived_merge(base.cpu(), [t.cpu() for t in ts], weights, method, density, gamma, 1.0, None, None)
    assert got.dtype == dtype and torch.equal(got.cpu(), expected)
    if method == "ties":  # model 0 alone, kept at one entry
        one = se.merge_task_vectors(base, ts[:1], [1.0], method=method, density=0.001, backend=backend)
        assert int((one != base).sum()) == 1


def test_scalar_and_list_parameters_agree():
    base, ts = _models((6, 7), 2, torch.float32)
    a = se.merge_task_vectors(base, ts, 0.5, method="ties", density=0.4, backend="reference")
    b = se.merge_task_vectors(base, ts, [0.5, 0.5], method="ties", density=[0.4, 0.4], backend="reference")
    assert torch.equal(a, b)


# ---------------------------------------------------------------- Breadcrumbs

def test_breadcrumbs_hand_example():
    t = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 1.0, 0.05, -0.4, 0.6, 3.0])
    # gamma 0.1 drops the single largest (-5), density 0.5 keeps the next five: 3, 2, 1, 0.6, -0.4
    got = magnitude_outliers(t, 0.5, 0.1, backend="reference")
    assert torch.equal(got, torch.tensor([0.0, 0.0, 0.0, 2.0, 0.0, 1.0, 0.0, -0.4, 0.6, 3.0]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,density,gamma", [((37,), 0.3, 0.05), ((11, 13), 0.9, 0.2), ((5, 64), 0.5, 0.0),
                                                 ((1,), 0.0, 0.5)])
@pytest.mark.parametrize("norm", [None, "l2"])
def test_breadcrumbs_kernel_matches_reference(backend, dtype, shape, density, gamma, norm):
    t = torch.randn(shape, device=KERNEL_DEVICE).to(dtype)
    expected = magnitude_outliers(t, density, gamma, rescale_norm=norm, backend="reference")
    _poison_allocator(t)
    got = magnitude_outliers(t, density, gamma, rescale_norm=norm, backend=backend)
    if norm is None:
        assert torch.equal(got, expected)
    else:
        assert torch.equal(got != 0, expected != 0)
        assert_rel_close(got, expected, RTOL[dtype], "rescaled breadcrumbs")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
# ---------------------------------------------------------------- kernels against the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("shape,n_models", [((7, 13), 1), ((33, 5), 2), ((3, 129), 3), ((257,), 4),
                                            ((3, 3001), 3)])  # several blocks and sub-tiles: tie runs carry over
def test_kernel_matches_reference_deterministic(backend, dtype, method, shape, n_models):
    base, ts = _models(shape, n_models, dtype, KERNEL_DEVICE)
    kw = dict(method=method, density=[0.3, 0.5, 0.7, 0.9][:n_models], gamma=0.04, lambda_=1.2)
    w = [0.5, 1.0, -0.3, 0.8][:n_models]
    expected = se.merge_task_vectors(base, ts, w, backend="reference", **kw)
    _poison_allocator(base)
    got = se.merge_task_vectors(base, ts, w, backend=backend, **kw)
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_kernel_matches_reference_heavy_ties(backend, dtype, method):
    """Integer deltas: every band edge falls inside a long run of equal magnitudes spread over several
    blocks, so the selected edge key, the count of ties before it and the per-block tie ranks all matter."""
    base = torch.randn(3, 5000, device=KERNEL_DEVICE).to(dtype)
    ts = [(base.float() + torch.randint(-3, 4, (3, 5000), device=KERNEL_DEVICE)).to(dtype) for _ in range(3)]
    kw = dict(method=method, density=[0.3, 0.55, 0.8], gamma=0.1)
    expected = se.merge_task_vectors(base, ts, [1.0, 0.5, 0.7], backend="reference", **kw)
    got = se.merge_task_vectors(base, ts, [1.0, 0.5, 0.7], backend=backend, **kw)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [True, "l2", "linf"])
@pytest.mark.parametrize("consensus", [None, "count"])
def test_kernel_matches_reference_rescale_and_count(backend, dtype, rescale, consensus):
    base, ts = _models((19, 21), 3, dtype, KERNEL_DEVICE)
    kw = dict(method="ties", density=0.4, rescale=rescale, consensus=consensus)
    expected = se.merge_task_vectors(base, ts, [1.0, 0.7, 0.4], backend="reference", **kw)
    got = se.merge_task_vectors(base, ts, [1.0, 0.7, 0.4], backend=backend, **kw)
    # the norms are summed in another order: the rescaled deltas may differ in the last bit
    assert_rel_close(got, expected, RTOL[dtype], f"ties rescale={rescale}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rescale_past_fp16_range_stays_finite(backend):
    """Deltas whose l1 norm (~1e5) overflows fp16: the fp32 norms are used, never inf / inf = NaN."""
    base = torch.zeros(200, 500, device=KERNEL_DEVICE, dtype=torch.float16)
    ts = [(torch.rand(200, 500, device=KERNEL_DEVICE) + 0.5).half() for _ in range(2)]
    out = se.merge_task_vectors(base, ts, [1.0, 1.0], method="ties", density=0.5, rescale="l1", backend=backend)
    assert torch.isfinite(out).all()
    expected = se.merge_task_vectors(base.float(), [t.float() for t in ts], [1.0, 1.0], method="ties", density=0.5,
                                     rescale="l1", backend="reference")
    assert_rel_close(out.float(), expected, RTOL[torch.float16], "fp16 l1 rescale past 65504")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_mixed_input_dtype_and_empty(backend):
    base = torch.randn(5, 6, device=KERNEL_DEVICE)
    ts = [torch.randn(5, 6, device=KERNEL_DEVICE).to(torch.bfloat16)]
    expected = se.merge_task_vectors(base, ts, [1.0], method="ties", density=0.5, backend="reference")
    assert torch.equal(se.merge_task_vectors(base, ts, [1.0], method="ties", density=0.5, backend=backend), expected)
    empty = torch.empty(0, 4, device=KERNEL_DEVICE)
    assert se.merge_task_vectors(empty, [empty], [1.0], method="ties", density=0.5, backend=backend).shape == (0, 4)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy sees inf * 0
def test_kernel_flags_non_finite_inputs():
    base, ts = _models((8, 8), 2, torch.float32, KERNEL_DEVICE)
    ts[1][3, 3] = float("inf")
    with pytest.raises(ValueError, match=r"tensors\[1\] contains NaN/Inf"):
        se.merge_task_vectors(base, ts, [1.0, 1.0], method="task_arithmetic", backend="triton")
    base[0, 0] = float("nan")
    with pytest.raises(ValueError, match="base contains"):
        se.merge_task_vectors(base, ts[:1], [1.0], method="ties", density=0.5, backend="triton")


# ---------------------------------------------------------------- random methods

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dare_linear_keep_rate_rescale_and_reproducibility(backend):
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    base, ts = _models((64, 64), 1, torch.float32, dev)
    delta = ts[0] - base
    kw = dict(method="dare_linear", density=0.3, backend=backend)
    out = se.merge_task_vectors(base, ts, [1.0], rescale=False, **kw)
    kept = (out - base).abs() > 0
    rate = kept.float().mean().item()
    assert abs(rate - 0.3) < 0.045  # 4096 draws: sd 0.0072, so 6.3 sd (0.03 was 4.2: missed ~3e-5 of runs)
    assert torch.allclose((out - base)[kept], delta[kept], atol=1e-6)  # kept entries keep their value
    # rescale=True (mergekit: match the L1 norm of the delta)
    out = se.merge_task_vectors(base, ts, [1.0], **kw)
    assert abs((out - base).abs().sum().item() / delta.abs().sum().item() - 1) < 1e-4
    g1, g2 = (torch.Generator(device=dev).manual_seed(7) for _ in range(2))
    a = se.merge_task_vectors(base, ts, [1.0], generator=g1, **kw)
    b = se.merge_task_vectors(base, ts, [1.0], generator=g2, **kw)
    assert torch.equal(a, b)
    c = se.merge_task_vectors(base, ts, [1.0], generator=torch.Generator(device=dev).manual_seed(8), **kw)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("n_models", [3, 6])
def test_dare_keep_bits_of_the_norms_pass_are_the_draw(n_models):
    """A rescaled DARE merge draws once: the norms pass stores each entry's keep decisions (a bit per model) and
    the merge pass reads them. Reading them must give exactly the merge that draws again (models 4-7 use the
    second seed)."""
    from sparsity_engine.ops.merge import triton as mt

    base, ts = _models((37, 301), n_models, torch.bfloat16, KERNEL_DEVICE)
    plan = mt._Plan(base, ts, [1.0, -0.5, 0.8, 0.3, 1.2, 0.7][:n_models], dens=[0.3, 0.5, 0.7, 0.2, 0.9, 0.4][:n_models])
    plan.seeds = torch.tensor([5, 9], dtype=torch.int32, device=base.device)
    kw = dict(consensus="sum", normalize=True, rescale_norm=None, lambda_=1.0, phase=mt.PHASE_MERGE)
    drawn, stored = torch.empty_like(base), torch.empty_like(base)
    plan.launch(drawn, spars=mt.SPARS_RANDOM, **kw)
    plan.rescale(mt.SPARS_RANDOM, "l1", [True] * n_models)
    assert plan.bits is not None and plan.bits.dtype == torch.uint8
    plan.scale = None  # the masks alone
    plan.launch(stored, spars=mt.SPARS_BITS, bits=plan.bits, **kw)
    assert torch.equal(drawn, stored)
    rates = [((plan.bits >> i) & 1).float().mean().item() for i in range(n_models)]
    assert all(abs(r - d) < 0.02 for r, d in zip(rates, [0.3, 0.5, 0.7, 0.2, 0.9, 0.4])), rates


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dare_expected_value(backend):
    """DARE with the L1 rescale is unbiased: over many seeds the mean approaches the unsparsified merge."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    base, ts = _models((16, 64), 2, torch.float32, dev)
    full = se.merge_task_vectors(base, ts, [0.5, 0.5], method="task_arithmetic", backend="reference")
    acc = torch.zeros_like(base)
    reps = 40
    for s in range(reps):
        g = torch.Generator(device=dev).manual_seed(s)
        acc += se.merge_task_vectors(base, ts, [0.5, 0.5], method="dare_linear", density=0.5, generator=g,
                                     backend=backend)
    err = ((acc / reps - full).norm() / (full - base).norm()).item()
    assert err < 0.25, err  # sampling noise alone gives about sqrt(1 / reps) = 0.16


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_keep_rate_favours_large_entries(backend, method):
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    base, ts = _models((64, 64), 1, torch.float32, dev)
    delta = (ts[0] - base).abs()
    out = se.merge_task_vectors(base, ts, [1.0], method=method, density=0.5, epsilon=0.2, rescale=False,
                                generator=torch.Generator(device=dev).manual_seed(1), backend=backend)
    kept = (out - base) != 0
    # 4096 draws with p from 0.3 to 0.7: sd 0.0076 (0.0036 given the seeded uniforms, about 0.513 on the
    # reference); 0.05 is over 6 sd either way (0.03 missed ~1e-6 of runs)
    assert abs(kept.float().mean().item() - 0.5) < 0.05
    large = delta >= delta.median(dim=1, keepdim=True).values
    assert kept[large].float().mean() > kept[~large].float().mean() + 0.1  # about 0.6 against 0.4


def _della_seeds(n_models, dev, seed):
    """The seeds a merge draws from torch.Generator(dev).manual_seed(seed): one per model, in one call."""
    return torch.randint(0, 2**31 - 1, (n_models,), generator=torch.Generator(device=dev).manual_seed(seed),
                         device=dev).tolist()


def _della_expected(base, ts, weights, densities, epsilon, seeds, rescale, consensus, normalize):
    """The DELLA merge the kernels promise for these seeds, built from reference parts: model i keeps entry e
    iff philox_uniforms(seeds[i])[e] < della_probabilities(delta_i)[e], rescaled and combined by the reference."""
    from sparsity_engine.ops.masks import reference as mref
    from sparsity_engine.ops.masks.triton import philox_uniforms
    from sparsity_engine.ops.merge import reference as ref

    sparse = []
    for t, d, seed in zip(ts, densities, seeds):
        delta = t - base
        if d < 1:
            p = mref.della_probabilities(delta, d, min(epsilon, d, 1 - d))
            u = philox_uniforms(seed, delta.numel(), delta.device).view(delta.shape)
            delta = ref.rescale_masked(delta, delta * (u < p).to(delta.dtype), rescale)
        sparse.append(delta)
    return ref.combine_deltas(base, sparse, weights, consensus=consensus, normalize=normalize, lambda_=1.0)


DELLA_CASES = [  # shape, densities, dtype (odd rows: Philox groups of four straddle rows)
    ((37, 203), [0.5, 0.3, 1.0], torch.bfloat16),
    ((301,), [0.2, 0.0, 0.7, 0.5, 0.6], torch.float16),
    ((3, 5, 7), [0.4], torch.bfloat16),
    ((16, 64), [0.5, 0.6], torch.float32),
]


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("shape,densities,dtype", DELLA_CASES)
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_merge_matches_its_draw_exactly(backend, shape, densities, dtype, method):
    """Without a rescale the DELLA merge is exactly the reference's probabilities, the documented Philox
    uniforms and the reference combination (every backend, the reference's own included; every dtype, a model
    with density 0 and one with density 1)."""
    base, ts = _models(shape, len(densities), dtype, KERNEL_DEVICE)
    w = [1.0, 0.7, -0.4, 0.9, 0.5][:len(densities)]
    spec = METHODS[method]
    got = se.merge_task_vectors(base, ts, w, method=method, density=densities, epsilon=0.2, rescale=False,
                                generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(11), backend=backend)
    expected = _della_expected(base, ts, w, densities, 0.2, _della_seeds(len(ts), KERNEL_DEVICE, 11), None,
                               spec.consensus, spec.normalize)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("rescale", ["l1", "l2", "linf"])
def test_della_merge_rescaled_matches_its_draw(backend, rescale):
    """With a rescale only the order of the norm sums differs from the reference (one rounding of the factor)."""
    base, ts = _models((45, 130), 3, torch.bfloat16, KERNEL_DEVICE)
    got = se.merge_task_vectors(base, ts, [1.0, 0.5, 0.8], method="della", density=0.4, epsilon=0.1,
                                rescale=rescale, generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(3),
                                backend=backend)
    expected = _della_expected(base, ts, [1.0, 0.5, 0.8], [0.4] * 3, 0.1, _della_seeds(3, KERNEL_DEVICE, 3),
                               rescale, "sum", True)
    assert_rel_close((got - base).float(), (expected - base).float(), 1e-2, rescale)
    assert ((got != base) == (expected != base)).float().mean() > 0.999


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


RANDOM_CASES = [  # shape, densities, dtype: odd sizes, a density-0 and a density-1 model, six models (two seeds)
    ((7, 13), [0.5, 0.3], torch.float32),
    ((301,), [0.2, 0.0, 0.7, 1.0, 0.5], torch.float16),
    ((3, 5, 7), [0.4], torch.bfloat16),
    ((33, 65), [0.3, 0.5, 0.7, 0.2, 0.9, 0.4], torch.float32),
    ((2, 129), [0.6, 0.25, 0.1], torch.bfloat16),
]


@pytest.mark.parametrize("method", RANDOM)
@pytest.mark.parametrize("shape,densities,dtype", RANDOM_CASES)
def test_random_merges_reference_equals_triton(method, shape, densities, dtype):
    """The same generator state, the same merge on the reference and the Triton backends: bit for bit without
    a rescale or with the linf one (a max: no summation order), over shapes, densities, dtypes and seeds. With
    the l1 rescale (l2 alike) the kept entries are the same and the values differ at most by the factor's
    rounding (its norms are summed in another order)."""
    base, ts = _models(shape, len(densities), dtype, KERNEL_DEVICE)
    w = [1.0, 0.7, -0.4, 0.9, 0.5, 1.2][:len(densities)]
    for seed, rescale in ((0, False), (2**33 + 1, "linf"), (77, True)):
        out = [se.merge_task_vectors(base, ts, w, method=method, density=densities, epsilon=0.1, rescale=rescale,
                                     generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(seed), backend=b)
               for b in ("reference", "triton")]
        if rescale in (False, "linf"):
            assert torch.equal(_bits(out[0]), _bits(out[1])), (seed, rescale)
        else:
            assert torch.equal(out[0] != base, out[1] != base), (seed, rescale)
            assert_rel_close((out[1] - base).float(), (out[0] - base).float(), RTOL[dtype], f"{method} {rescale}")


def test_reference_merges_more_models_than_the_kernels():
    """The reference merges any number of models (the fused kernel takes 8): DARE's draw takes one seed per four
    models (models 8-9 the third), each model keeps its own fraction, and a generator state reproduces the merge."""
    from sparsity_engine.ops.merge import reference as ref
    base, ts = _models((40, 50), 10, torch.float32)
    dens = [0.1 * (i % 9 + 1) for i in range(10)]
    keeps = ref.dare_keeps(base.numel(), [3, 4, 5], dens, "cpu")
    for keep, d in zip(keeps, dens):
        assert abs(keep.float().mean().item() - d) < 6 * (d * (1 - d) / base.numel()) ** 0.5 + 1e-3
    other = ref.dare_keeps(base.numel(), [3, 4, 6], dens, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(keeps[:8], other[:8])) and not torch.equal(keeps[8], other[8])
    merge = lambda: se.merge_task_vectors(base, ts, [0.5] * 10, method="dare_linear", density=dens,  # noqa: E731
                                          backend="reference", generator=torch.Generator().manual_seed(4))
    assert torch.equal(merge(), merge())


def test_reference_dare_keeps_are_the_kernels_stored_bits():
    """reference.dare_keeps (the reference's DARE draw of a merge) equals the keep bits the fused kernel's norms
    pass stores, model by model, for six models (the second seed serves models 4 and 5)."""
    from sparsity_engine.ops.merge import reference as ref
    from sparsity_engine.ops.merge import triton as mt

    dens = [0.3, 0.5, 0.7, 0.2, 0.9, 0.4]
    base, ts = _models((37, 301), 6, torch.bfloat16, KERNEL_DEVICE)
    plan = mt._Plan(base, ts, [1.0] * 6, dens=dens)
    plan.seeds = torch.tensor([5, 2**31 - 2], dtype=torch.int32, device=base.device)
    plan.rescale(mt.SPARS_RANDOM, "l1", [True] * 6)
    keeps = ref.dare_keeps(base.numel(), [5, 2**31 - 2], dens, base.device)
    for i, keep in enumerate(keeps):
        assert torch.equal(((plan.bits >> i) & 1).bool(), keep), i


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,err", [
    (dict(method="tie"), "method must be one of"),
    (dict(method="ties", density=1.5), "density must be in"),
    (dict(method="ties", density=[0.5]), "density must be a number or a list of 2"),
    (dict(method="ties", weights=[1.0]), "weights must have one entry per model"),
    (dict(method="ties", weights=[1.0, float("nan")]), r"weights\[1\] must be finite"),
    (dict(method="ties", rescale="l3"), "rescale must be one of"),
    (dict(method="ties", consensus="majority"), "consensus must be one of"),
    (dict(method="della", epsilon=-0.1), "epsilon must be in"),
    (dict(method="ties", lambda_=float("inf")), "lambda_ must be finite"),
])
def test_merge_bad_arguments(kwargs, err):
    base, ts = _models((4, 4), 2, torch.float32)
    weights = kwargs.pop("weights", [1.0, 1.0])
    with pytest.raises((ValueError, TypeError), match=err):
        se.merge_task_vectors(base, ts, weights, **kwargs)


def test_merge_bad_tensors():
    base, ts = _models((4, 4), 2, torch.float32)
    with pytest.raises(ValueError, match=r"tensors\[1\] must have the shape of base"):
        se.merge_task_vectors(base, [ts[0], torch.randn(4, 5)], [1.0, 1.0], method="ties")
    with pytest.raises(TypeError, match="tensors must be a non-empty list"):
        se.merge_task_vectors(base, [], [], method="ties")
    with pytest.raises(TypeError, match="base must have dtype"):
        se.merge_task_vectors(base.long(), ts, [1.0, 1.0], method="ties")
    bad = ts[0].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"tensors\[0\] contains 1 NaN"):
        se.merge_task_vectors(base, [bad, ts[1]], [1.0, 1.0], method="ties", backend="reference")
    with pytest.raises(ValueError, match="method must be one of"):
        se.ties_consensus(torch.randn(2, 3), "majority")
    with pytest.raises(ValueError, match=r"deltas\[1\] must have the shape"):
        se.ties_consensus([torch.randn(3), torch.randn(4)])
    with pytest.raises(ValueError, match="density must be in"):
        magnitude_outliers(torch.randn(8), -0.1)


# ---------------------------------------------------------------- GPU, real sizes

@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_cuda_real_size_matches_reference(backend, dtype, method):
    base, ts = _models((4096, 4096), 3, dtype, "cuda", scale=0.01)
    kw = dict(method=method, density=0.3, gamma=0.01)
    expected = se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], backend="reference", **kw)
    _poison_allocator(base)
    got = se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], backend=backend, **kw)
    assert torch.equal(got, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_cuda_select_heavy_ties_many_chunks(monkeypatch, dtype, method):
    """The CUDA select with its tie-locating chunks small (thousands of chunks), integer deltas (every edge
    inside a long run of equal magnitudes), one model whose deltas are all zero, and eight models (16 rows)."""
    from sparsity_engine.ops.masks import cuda as mc
    monkeypatch.setattr(mc, "SELECT_CHUNK", 64)
    base = torch.randn(301, 999, device="cuda").to(dtype)
    ts = [(base.float() + torch.randint(-3, 4, base.shape, device="cuda")).to(dtype) for _ in range(7)] + [base]
    w = [1.0, 0.5, 0.7, -0.2, 0.9, 0.3, 1.1, 0.4]
    kw = dict(method=method, density=[0.05, 0.3, 0.55, 0.8, 0.95, 0.5, 0.01, 0.6], gamma=0.1)
    got = se.merge_task_vectors(base, ts, w, backend="cuda", **kw)
    # same fused pass, the Triton select: the edges must agree exactly
    assert torch.equal(got, se.merge_task_vectors(base, ts, w, backend="triton", **kw))
    if dtype != torch.float32:
        # fp32 sums of eight models differ from torch's reduction order in the last bit (see the merge kernel)
        assert torch.equal(got, se.merge_task_vectors(base, ts, w, backend="reference", **kw))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_merge_flags_nonfinite_anywhere(dtype):
    base, ts = _models((129, 33), 3, dtype, "cuda")
    for where, pos in [("base", 0), ("tensors[2]", 4000), ("tensors[0]", 129 * 33 - 1)]:
        b, t = base.clone(), [x.clone() for x in ts]
        (b if where == "base" else t[int(where[-2])]).view(-1)[pos] = float("nan")
        with pytest.raises(ValueError, match=rf"{re.escape(where)} contains NaN/Inf"):
            se.merge_task_vectors(b, t, [1.0, 1.0, 1.0], method="ties", density=0.5, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("shape,dtype", [((256, 4096), torch.bfloat16), ((100, 11008), torch.bfloat16),
                                         ((64, 1001), torch.float16), ((4096,), torch.bfloat16)])
def test_cuda_della_merge_real_size_matches_its_draw(shape, dtype):
    """The fused CUDA DELLA (csrc/masks_della.cu della_deltas_kernel) at LLaMA row lengths, task-vector-like
    deltas (many equal bf16 magnitudes), against the reference probabilities and the documented uniforms."""
    base, ts = _models(shape, 3, dtype, "cuda", scale=0.01)
    ts[1][::2] = base[::2]  # rows (or entries) whose deltas are all zero: ranked apart from the histogram
    kw = dict(method="della", density=[0.3, 0.5, 0.7], epsilon=0.15, backend="cuda")
    g = torch.Generator(device="cuda").manual_seed(5)
    got = se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], rescale=False, generator=g, **kw)
    expected = _della_expected(base, ts, [1.0, 0.8, 0.6], [0.3, 0.5, 0.7], 0.15, _della_seeds(3, "cuda", 5), None,
                               "sum", True)
    assert torch.equal(got, expected)
    # the l1 rescale (della's default): equal up to the order of the norm sums
    got = se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], generator=g.manual_seed(5), **kw)
    expected = _della_expected(base, ts, [1.0, 0.8, 0.6], [0.3, 0.5, 0.7], 0.15, _della_seeds(3, "cuda", 5), "l1",
                               "sum", True)
    assert_rel_close((got - base).float(), (expected - base).float(), 1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("method,rescale", [("ties", None), ("dare_ties", None), ("dare_ties", False), ("della", None),
                                            ("della", False)])
def test_cuda_merge_host_syncs_per_call(method, rescale):
    """The host waits for the GPU once per merge (the NaN/Inf flag, which DELLA's task-vector kernel and the merge
    passes share): parameters, seeds and trivial band edges go up without synchronising the stream."""
    base, ts = _models((256, 512), 3, torch.bfloat16, "cuda", scale=0.01)
    kw = dict(method=method, density=0.3, epsilon=0.1, rescale=rescale, backend="cuda")
    se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], **kw)  # compiles, fills the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as seen:
            se.merge_task_vectors(base, ts, [1.0, 0.8, 0.6], **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in seen if "synchronizing" in str(w.message)]
    assert len(waits) == 1, waits


@pytest.mark.cuda
def test_cuda_della_merge_unaligned_views_and_bad_input():
    """Inputs that are views at an odd element offset take the kernel's scalar path; NaN/Inf anywhere, or a
    task vector that overflows the dtype, raise naming the tensor."""
    store = torch.randn(4 * 64 * 129 + 1, device="cuda").to(torch.bfloat16)
    base = store[1:1 + 64 * 129].view(64, 129)
    ts = [(base.float() + 0.01 * torch.randn_like(base.float())).to(torch.bfloat16) for _ in range(2)]
    ts = [store[1 + (i + 1) * 64 * 129:1 + (i + 2) * 64 * 129].view(64, 129).copy_(t) for i, t in enumerate(ts)]
    kw = dict(method="della", density=0.5, epsilon=0.2, rescale=False)
    got = se.merge_task_vectors(base, ts, [1.0, 1.0], generator=torch.Generator(device="cuda").manual_seed(2),
                                backend="cuda", **kw)
    expected = _della_expected(base, ts, [1.0, 1.0], [0.5, 0.5], 0.2, _della_seeds(2, "cuda", 2), None, "sum", True)
    assert torch.equal(got, expected)
    for where, pos in [("base", 0), ("tensors[1]", 64 * 129 - 1), ("tensors[0]", 3000)]:
        b, t = base.clone(), [x.clone() for x in ts]
        (b if where == "base" else t[int(where[-2])]).view(-1)[pos] = float("inf")
        with pytest.raises(ValueError, match=rf"{re.escape(where)} contains NaN/Inf"):
            se.merge_task_vectors(b, t, [1.0, 1.0], backend="cuda", **kw)
    b = torch.full((8, 16), -60000.0, device="cuda", dtype=torch.float16)
    t = [torch.full_like(b, 60000.0)]
    with pytest.raises(ValueError, match=r"tensors\[0\] - base overflows float16"):
        se.merge_task_vectors(b, t, [1.0], backend="cuda", **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", RANDOM)
@pytest.mark.parametrize("shape", [(1024, 2048), (3, 5, 7), (129, 4099)])
def test_random_merges_agree_on_every_backend_and_device(dtype, method, shape):
    """One CPU generator state, the same merged bytes on the reference, Triton and CUDA backends on the GPU and
    the reference on the CPU (rescale off and linf; the l1 default: the same kept entries, values within the
    factor's rounding, since its norms are summed in another order by each)."""
    base, ts = _models(shape, 3, dtype, "cuda", scale=0.01)
    w, dens = [1.0, 0.8, -0.6], [0.3, 0.5, 0.9]
    for rescale in (False, "linf", True):
        run = lambda b, dev: se.merge_task_vectors(  # noqa: E731
            base.to(dev), [t.to(dev) for t in ts], w, method=method, density=dens, epsilon=0.1, rescale=rescale,
            generator=torch.Generator().manual_seed(13), backend=b).cpu()
        outs = {"cpu": run("reference", "cpu"), **{b: run(b, "cuda") for b in ("reference", "triton", "cuda")}}
        for b, out in outs.items():
            if rescale is True:
                assert torch.equal(out != base.cpu(), outs["cpu"] != base.cpu()), b
                assert_rel_close((out - base.cpu()).float(), (outs["cpu"] - base.cpu()).float(), RTOL[dtype], b)
            else:
                assert torch.equal(_bits(out), _bits(outs["cpu"])), (b, rescale)


@pytest.mark.cuda
def test_cuda_real_size_dare_ties():
    base, ts = _models((4096, 4096), 3, torch.float32, "cuda", scale=0.01)
    out = se.merge_task_vectors(base, ts, [1.0, 1.0, 1.0], method="dare_linear", density=0.1, rescale=False,
                                backend="triton")
    rate = ((out - base) != 0).float().mean().item()
    assert abs(rate - (1 - 0.9 ** 3)) < 0.01  # kept by at least one of three models
    base, ts = base.bfloat16(), [t.bfloat16() for t in ts]
    g = [torch.Generator(device="cuda").manual_seed(3) for _ in range(2)]
    a, b = (se.merge_task_vectors(base, ts, [1.0] * 3, method="dare_ties", density=0.2, generator=x, backend="triton")
            for x in g)
    assert torch.equal(a, b)
