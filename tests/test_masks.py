"""Mask ops: reference exact values and properties; kernels against the reference."""
import pytest
import torch

import sparsity_engine as se
from helpers import KERNEL_BACKENDS, KERNEL_DEVICE



# ---------------------------------------------------------------- nm_mask

def test_nm_mask_hand_example():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, -1.0]])
    got = se.nm_mask(x, 2, 4, backend="reference")
    # group 1 keeps 2.0 and 0.5; group 2 is a three-way tie at 1.0: the two lowest indices win
    assert got.tolist() == [[False, False, True, True, True, True, False, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 16), (4, 4)])
def test_nm_mask_reference_properties(n, m):
    x = torch.randn(5, 3 * m)
    mask = se.nm_mask(x, n, m, backend="reference")
    groups, keep = x.reshape(-1, m), mask.reshape(-1, m)
    assert (keep.sum(1) == n).all()
    # every kept entry is >= every dropped entry of its group
    lowest_kept = torch.where(keep, groups, torch.inf).min(1).values
    highest_dropped = torch.where(keep, -torch.inf, groups).max(1).values
    assert (lowest_kept >= highest_dropped).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,n,m", [((7, 16), 2, 4), ((3, 5, 8), 4, 8), ((1, 4), 1, 4),
                                       ((33, 96), 3, 32), ((0, 8), 2, 4), ((129, 12), 2, 4)])
def test_nm_mask_kernel_matches_reference(backend, dtype, shape, n, m):
    x = torch.randn(shape, device=KERNEL_DEVICE).to(dtype)
    if x.numel():
        x[..., 1] = x[..., 0]  # exact ties must break the same way
    expected = se.nm_mask(x, n, m, backend="reference")
    got = se.nm_mask(x, n, m, backend=backend)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bad,err", [
    (dict(scores=torch.randn(4, 6), n=2, m=4), "must divide"),
    (dict(scores=torch.randn(4, 8), n=5, m=4), "n must be <= m"),
    (dict(scores=torch.randn(4, 8), n=0, m=4), "n must be >= 1"),
    (dict(scores=torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), n=2, m=4), "scores contains 1 NaN"),
    (dict(scores=torch.arange(8).reshape(2, 4), n=2, m=4), "scores must have dtype"),
    (dict(scores=[1.0, 2.0], n=1, m=2), "scores must be a torch.Tensor"),
])
def test_nm_mask_bad_input(bad, err):
    with pytest.raises((ValueError, TypeError), match=err):
        se.nm_mask(bad["scores"], bad["n"], bad["m"])


# ---------------------------------------------------------------- shared for the ops below

import math  # noqa: E402
import warnings  # noqa: E402

from helpers import RTOL, assert_rel_close, poison_like  # noqa: E402,F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _masks_triton():
    import sparsity_engine.ops.masks.triton as mt
    return mt


def _binomial_ok(kept: int, n: int, p: float, z: float = 6.0) -> bool:
    # within z sigma: at 6 a fair draw misses with probability ~2e-9 (at 5 it was ~6e-7, per call)
    return abs(kept - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# ---------------------------------------------------------------- topk_mask: reference

def test_topk_mask_hand_example():
    x = torch.tensor([3.0, -1.0, 2.0, 2.0, 0.5, -4.0])
    # k = int(0.5 * 6) = 3: 3.0, then the tie at 2.0 (both), ... -> 3.0, 2.0, 2.0
    assert se.topk_mask(x, 0.5, backend="reference").tolist() == [True, False, True, True, False, False]
    # k = 2: 3.0 and the lower-index 2.0
    assert se.topk_mask(x, 0.4, backend="reference").tolist() == [True, False, True, False, False, False]
    assert not se.topk_mask(x, 0.0, backend="reference").any()
    assert se.topk_mask(x, 1.0, backend="reference").all()


def test_topk_mask_hand_example_per_dim():
    x = torch.tensor([[1.0, 5.0, 5.0], [0.0, -2.0, 7.0]])
    got = se.topk_mask(x, 0.5, dim=0, backend="reference")  # k = int(0.5 * 2) = 1 per column
    assert got.tolist() == [[True, True, False], [False, False, True]]
    got = se.topk_mask(x, 0.7, dim=1, backend="reference")  # k = int(0.7 * 3) = 2 per row; 5 vs 5 tie
    assert got.tolist() == [[False, True, True], [True, False, True]]
    got = se.topk_mask(x, 0.34, dim=-1, backend="reference")  # k = 1: the first of the tied 5.0s
    assert got.tolist() == [[False, True, False], [False, False, True]]


@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 0.5, 0.99, 1.0])
def test_topk_mask_reference_properties(density):
    x = torch.randint(-3, 4, (23, 17)).float()  # many ties
    mask = se.topk_mask(x, density, backend="reference")
    k = int(density * x.numel())
    assert mask.sum().item() == k
    if 0 < k < x.numel():
        assert x[mask].min() >= x[~mask].max()
        thr = x[mask].min()
        tied = (x == thr).flatten().nonzero().flatten()
        kept = mask.flatten()[tied]
        # the kept ties are a prefix of the tied positions (lower flat index first)
        assert torch.equal(kept, torch.sort(kept.int(), descending=True, stable=True).values.bool())
    per_row = se.topk_mask(x, density, dim=1, backend="reference")
    assert (per_row.sum(1) == int(density * 17)).all()


def test_topk_mask_zero_signs_tie():
    x = torch.tensor([-0.0, 0.0, -1.0, -0.0])
    assert se.topk_mask(x, 0.5, backend="reference").tolist() == [True, True, False, False]


# ---------------------------------------------------------------- topk_mask / magnitude_prune: kernels

def _with_ties(shape, dtype):
    x = torch.randn(shape, device=KERNEL_DEVICE).to(dtype)
    if x.numel() >= 4:
        flat = x.view(-1)
        flat[: flat.numel() // 4] = flat[flat.numel() // 2]  # a block of exact ties
        flat[-1] = -0.0
    return x


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (5, 33), (3, 4, 5), (2, 0, 3)])
def test_topk_mask_kernel_matches_reference(backend, dtype, shape):
    x = _with_ties(shape, dtype)
    # the CUDA select ranks whole tensors only (per-slice selection declines to Triton, tested below)
    dims = [None] + ([] if backend == "cuda" else list(range(-1, len(shape))))
    for density in (0.0, 0.3, 1.0):
        for dim in dims:
            expected = se.topk_mask(x, density, dim=dim, backend="reference")
            got = se.topk_mask(x, density, dim=dim, backend=backend)
            assert got.dtype == torch.bool and got.shape == x.shape
            assert torch.equal(got, expected), (density, dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (1000,)])
def test_topk_mask_radix_path_matches_reference(monkeypatch, dtype, shape):
    monkeypatch.setattr(_masks_triton(), "SINGLE_PROGRAM_MAX", 64)  # force the multi-pass radix select
    x = _with_ties(shape, dtype)
    for density in (0.01, 0.25, 0.5, 0.9):
        assert torch.equal(se.topk_mask(x, density, backend="triton"),
                           se.topk_mask(x, density, backend="reference")), density
        assert torch.equal(se.magnitude_prune(x, density, backend="triton"),
                           se.magnitude_prune(x, density, backend="reference")), density


def test_topk_mask_chunked_rows_match_reference(monkeypatch):
    monkeypatch.setattr(_masks_triton(), "_ROW_BLOCK_MAX", 16)  # rows longer than one block
    x = _with_ties((3, 40), torch.float32)
    for density in (0.1, 0.6):
        assert torch.equal(se.topk_mask(x, density, dim=1, backend="triton"),
                           se.topk_mask(x, density, dim=1, backend="reference"))
        assert torch.equal(se.magnitude_prune(x[:1], density, backend="triton"),
                           se.magnitude_prune(x[:1], density, backend="reference"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [None, "l1", "l2", "linf"])
def test_magnitude_prune_kernel_matches_reference(backend, dtype, norm):
    x = _with_ties((9, 31), dtype)
    for density in (0.1, 0.5, 0.95):
        expected = se.magnitude_prune(x, density, rescale_norm=norm, backend="reference")
        got = se.magnitude_prune(x, density, rescale_norm=norm, backend=backend)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, expected)


# ---------------------------------------------------------------- magnitude_prune: reference

def test_magnitude_prune_hand_example():
    x = torch.tensor([3.0, -1.0, 2.0, 2.0, 0.5, -4.0])
    # k = 3: |-4|, |3|, then the tie |2| at index 2 wins over index 3
    assert se.magnitude_prune(x, 0.5, backend="reference").tolist() == [3.0, 0.0, 2.0, 0.0, 0.0, -4.0]
    l1 = se.magnitude_prune(x, 0.5, rescale_norm="l1", backend="reference")
    assert torch.allclose(l1, torch.tensor([3.0, 0, 2, 0, 0, -4]) * (12.5 / 9.0))
    l2 = se.magnitude_prune(x, 0.5, rescale_norm="l2", backend="reference")
    assert torch.allclose(l2, torch.tensor([3.0, 0, 2, 0, 0, -4]) * math.sqrt(34.25 / 29.0))
    linf = se.magnitude_prune(x, 0.5, rescale_norm="linf", backend="reference")
    assert torch.equal(linf, torch.tensor([3.0, 0, 2, 0, 0, -4]))


def test_magnitude_prune_density_one_returns_a_copy():
    x = torch.randn(4, 5)
    out = se.magnitude_prune(x, 1.0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    out.zero_()
    assert x.abs().sum() > 0


def test_magnitude_prune_rescale_keeps_norm():
    x = torch.randn(40, 30)
    for norm, f in [("l1", lambda t: t.abs().sum()), ("l2", torch.linalg.norm),
                    ("linf", lambda t: t.abs().max())]:
        out = se.magnitude_prune(x, 0.3, rescale_norm=norm, backend="reference")
        assert (out != 0).sum() == int(0.3 * x.numel())
        assert torch.allclose(f(out), f(x), rtol=1e-5)


def test_magnitude_prune_does_not_modify_input():
    x = torch.randn(8, 8)
    before = x.clone()
    se.magnitude_prune(x, 0.5, rescale_norm="l2")
    assert torch.equal(x, before)


def _mergekit_015_magnitude(t, density):
    """mergekit 0.1.5's magnitude (sparsify.py) re-derived: zeros at density <= 0 or for an empty tensor, else the
    max(1, int(density * n)) largest |x| (a stable descending argsort: equal magnitudes, lower index first)."""
    if density <= 0 or t.numel() == 0:
        return torch.zeros_like(t)
    k = max(1, int(density * t.numel()))
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[torch.argsort(t.abs().reshape(-1).float(), descending=True, stable=True)[:k]] = True
    return torch.where(keep.view(t.shape), t, torch.zeros_like(t))


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_prune_keeps_mergekit_015_counts(backend, dtype):
    """mergekit 0.1.5: a positive density keeps at least one entry, density 0 keeps none, an empty tensor comes
    back empty; the count is max(1, int(density * n)) on every backend (the workarounds around the op are gone)."""
    from sparsity_engine.ops.masks import magnitude_count
    x = _with_ties((7, 9), dtype)
    n = x.numel()
    for density in (0.0, 1e-9, 0.5 / n, 1.0 / n, 0.015, 0.3, 1 - 0.5 / n, 1.0):
        got = se.magnitude_prune(x, density, backend=backend)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, _mergekit_015_magnitude(x, density) if density < 1 else x), density
        assert magnitude_count(n, density) == (0 if density == 0 else n if density >= 1 else max(1, int(density * n)))
    one = torch.tensor([-2.5], device=KERNEL_DEVICE).to(dtype)
    assert torch.equal(se.magnitude_prune(one, 0.4, rescale_norm="l2", backend=backend), one)
    for shape in ((0,), (3, 0)):
        empty = torch.empty(shape, device=KERNEL_DEVICE, dtype=dtype)
        assert se.magnitude_prune(empty, 0.5, rescale_norm="linf", backend=backend).shape == shape
    zeros = se.magnitude_prune(-x.abs() - 1, 0.0, rescale_norm="l1", backend=backend)
    assert torch.equal(zeros.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       torch.zeros_like(zeros.view(torch.int16 if dtype != torch.float32 else torch.int32)))  # +0


# ---------------------------------------------------------------- DARE

def _bits(t):
    """A float tensor's bits (equal bits: equal bytes, -0.0 and +0.0 told apart)."""
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16))


def test_philox_known_answers():
    """Philox4x32-10's known-answer vectors (Random123's kat_vectors), computed in torch int64 arithmetic."""
    from sparsity_engine.ops.masks.reference import philox4x32
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        c = [torch.tensor([v], dtype=torch.int64) for v in counter]
        assert tuple(int(w) for w in philox4x32(*c, *key)) == expected


def test_philox_multiply_halves_are_exact():
    """The 32 x 32 -> 64 bit products of a Philox round, taken in 16-bit halves, equal Python's big integers (no
    int64 overflow) at the extremes and on random words."""
    from sparsity_engine.ops.masks import reference as mref
    x = torch.cat([torch.tensor([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]),
                   torch.randint(0, 2**32, (2000,), dtype=torch.int64)])
    for m in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF):
        hi, lo = mref._mul_hi_lo(x, m)
        assert hi.tolist() == [(v * m) >> 32 for v in x.tolist()]
        assert lo.tolist() == [(v * m) & 0xFFFFFFFF for v in x.tolist()]


def test_uniforms_from_words_follow_triton():
    """uint_to_uniform_float: the word as an int32 x, x < 0 -> -x - 1, times 4.6566127342e-10 in fp32."""
    from sparsity_engine.ops.masks.reference import uniform_from_words
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 123456789, 3000000000])
    as_int32 = [w - 2**32 if w >= 2**31 else w for w in words.tolist()]
    scale = torch.tensor(4.6566127342e-10, dtype=torch.float32)
    expected = torch.tensor([-x - 1 if x < 0 else x for x in as_int32], dtype=torch.float32) * scale
    got = uniform_from_words(words)
    assert torch.equal(_bits(got), _bits(expected)) and bool((got < 1).all()) and bool((got >= 0).all())


@pytest.mark.parametrize("seed", [0, 1234, 2**31 - 2])
def test_reference_uniforms_are_the_kernels(monkeypatch, seed):
    """The reference's Philox uniforms are the Triton kernel's, bit for bit, for any length (chunk edges and
    Philox groups of four cut anywhere)."""
    from sparsity_engine.ops.masks import reference as mref
    mt = _masks_triton()
    monkeypatch.setattr(mref, "PHILOX_CHUNK", 5)  # many chunks on small lengths
    for n in (0, 1, 3, 4, 21, 4097):
        ours, kernel = mref.philox_uniforms(seed, n, KERNEL_DEVICE), mt.philox_uniforms(seed, n, KERNEL_DEVICE)
        assert torch.equal(_bits(ours), _bits(kernel)), n


def test_dare_reference_is_the_philox_draw():
    """The reference keeps entry e iff philox_uniforms(seed)[e] < p, the seed drawn from the generator, p the
    density rounded to the dtype; kept entries are x * fp32(1 / density) rounded once."""
    from sparsity_engine.ops.masks.reference import philox_uniforms
    for dtype in DTYPES:
        x = torch.randn(50, 40).to(dtype)
        seed = torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(7)).item()
        u = philox_uniforms(seed, x.numel(), "cpu").view(x.shape)
        keep = u < float(torch.tensor(0.3, dtype=dtype).float())
        for rescale in (True, False):
            got = se.dare(x, 0.3, rescale=rescale, generator=torch.Generator().manual_seed(7), backend="reference")
            scale = torch.tensor(1 / 0.3 if rescale else 1.0, dtype=torch.float32)
            expected = torch.where(keep, x.float() * scale, 0.0).to(dtype)
            assert torch.equal(_bits(got), _bits(expected)), (dtype, rescale)


_DRAW_SHAPES = [(0,), (1,), (7,), (5, 33), (3, 4, 5), (2, 1, 13)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", _DRAW_SHAPES)
def test_dare_reference_equals_triton_bit_for_bit(dtype, shape):
    """Same generator state, same bytes: the reference's draw is the kernel's (every dtype, odd sizes, several
    densities and seeds, with and without the rescale)."""
    x = torch.randn(shape, device=KERNEL_DEVICE).to(dtype)
    for density, seed in ((0.1, 0), (0.5, 17), (0.93, 2**31 + 5)):
        for rescale in (True, False):
            got = [se.dare(x, density, rescale=rescale, backend=b,
                           generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(seed))
                   for b in ("reference", "triton")]
            assert torch.equal(_bits(got[0]), _bits(got[1])), (density, seed, rescale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (5, 33), (2, 1, 13), ()])
def test_della_reference_equals_triton_bit_for_bit(dtype, shape):
    """DELLA: the same probabilities (fp32 steps, no FMA) and the same uniforms on both backends: the same
    bytes, ties and single columns included, with and without a rescale."""
    x = _with_ties(shape, dtype)
    for density, eps, seed, norm in ((0.5, 0.3, 3, None), (0.8, 0.15, 2**40, "l2")):
        got = [se.della_magprune(x, density, eps, rescale_norm=norm, backend=b,
                                 generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(seed))
               for b in ("reference", "triton")]
        assert torch.equal(_bits(got[0]), _bits(got[1])), (density, eps, seed, norm)


def test_della_long_rows_reference_equals_triton(monkeypatch):
    """Rows past DELLA_SORT_MAX take the torch-ranked path and the fused draw: still the reference's bytes."""
    mt = _masks_triton()
    monkeypatch.setattr(mt, "DELLA_SORT_MAX", 8)
    for dtype in DTYPES:
        x = _with_ties((4, 21), dtype)
        got = [se.della_magprune(x, 0.4, 0.2, backend=b, generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(5))
               for b in ("reference", "triton")]
        assert torch.equal(_bits(got[0]), _bits(got[1]))


def test_a_cpu_generator_seeds_the_draw_for_any_device():
    """A CPU generator is accepted for tensors on any device (only a seed is drawn from it); another device type
    than the tensor's and the CPU is refused."""
    x = torch.randn(6, 8, device=KERNEL_DEVICE)
    a = se.dare(x, 0.5, generator=torch.Generator().manual_seed(1))
    b = se.dare(x, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(se.della_magprune(x, 0.5, 0.1, generator=torch.Generator().manual_seed(2)),
                       se.della_magprune(x, 0.5, 0.1, generator=torch.Generator().manual_seed(2)))
    if KERNEL_DEVICE == "cuda":
        with pytest.raises(ValueError, match="generator is on cuda"):
            se.dare(torch.randn(4), 0.5, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keep_rate_and_rescale(backend, density):
    x = torch.rand(64, 128, device=KERNEL_DEVICE) + 0.5  # no zeros: a zero output means dropped
    out = se.dare(x, density, backend=backend)
    kept = out != 0
    assert _binomial_ok(int(kept.sum()), x.numel(), density)
    assert torch.allclose(out[kept], x[kept] / density, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dare_expectation_is_input(backend):
    x = torch.randn(4096, device=KERNEL_DEVICE)
    g = torch.Generator(device=KERNEL_DEVICE).manual_seed(3)
    draws = torch.stack([se.dare(x, 0.4, generator=g, backend=backend) for _ in range(100)])
    # per element var = x^2 (1 - d) / d; the mean over draws and elements is within 6 sigma of x's (a fair
    # draw misses with probability ~2e-9)
    sigma = math.sqrt(float((x ** 2).sum()) * 0.6 / 0.4 / 100) / x.numel()
    assert abs(float(draws.mean(0).sum() - x.sum())) / x.numel() < 6 * sigma


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dare_reproducible_with_generator(backend):
    x = torch.randn(33, 65, device=KERNEL_DEVICE)
    a = se.dare(x, 0.5, generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(11), backend=backend)
    b = se.dare(x, 0.5, generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(11), backend=backend)
    c = se.dare(x, 0.5, generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(12), backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 1000), (7, 5, 3)])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_kernel_matches_its_uniforms(dtype, shape, rescale):
    mt = _masks_triton()
    x = torch.randn(shape, device=KERNEL_DEVICE).to(dtype)
    out = mt.dare_with_seed(x, 0.3, rescale, seed=1234)
    u = mt.philox_uniforms(1234, x.numel(), x.device).view(shape)
    p = float(torch.tensor(0.3, dtype=dtype).float())  # the density rounded to the dtype, on every device
    scale = torch.tensor(1 / 0.3 if rescale else 1.0, dtype=torch.float32, device=x.device)
    expected = torch.where(u < p, x.float() * scale, 0.0).to(dtype)  # rounded once, to nearest even
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(_bits(out), _bits(expected))


def test_dare_edge_densities():
    x = torch.randn(10)
    assert torch.equal(se.dare(x, 0.0), torch.zeros(10))
    one = se.dare(x, 1.0)
    assert torch.equal(one, x) and one.data_ptr() != x.data_ptr()


# ---------------------------------------------------------------- DELLA: reference

def test_della_probabilities_hand_example():
    from sparsity_engine.ops.masks.reference import della_probabilities
    x = torch.tensor([[0.1, -0.4, 0.3, 0.2], [1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 2.0, 0.0]])
    p = della_probabilities(x, 0.5, 0.3)
    # ranks 0..3 map linearly onto 0.2 .. 0.8; a constant row is all 0.5; the tie |1| = |-1| shares rank 1.5
    expected = torch.tensor([[0.2, 0.8, 0.6, 0.4], [0.5] * 4, [0.5, 0.5, 0.8, 0.2]])
    assert torch.allclose(p, expected, atol=1e-6)
    assert torch.allclose(della_probabilities(torch.randn(5, 1), 0.3, 0.1), torch.full((5, 1), 0.3))


def test_della_probabilities_monotone_in_magnitude():
    from sparsity_engine.ops.masks.reference import della_probabilities
    # distinct magnitudes (a random order of 1..300, random signs): tied extremes share a mean rank and miss
    # 0.2 / 0.6, and randn's two smallest magnitudes in a row of 300 tie in ~3e-6 of rows
    x = (torch.rand(8, 300).argsort(dim=1) + 1).float() * torch.where(torch.rand(8, 300) < 0.5, -1.0, 1.0)
    p = della_probabilities(x, 0.4, 0.2)
    order = x.abs().argsort(dim=1)
    assert (torch.diff(torch.gather(p, 1, order), dim=1) >= 0).all()
    assert torch.allclose(p.min(1).values, torch.full((8,), 0.2)) and torch.allclose(p.max(1).values,
                                                                                       torch.full((8,), 0.6))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_della_keep_frequency_follows_rank(backend):
    row = torch.tensor([0.1, -0.5, 0.9, 0.3, -0.7])  # ranks 0, 2, 4, 1, 3
    reps = 2000  # fp32 rows of 5 are ranked by torch: one elementwise kernel draws, quick on the interpreter too
    x = row.repeat(reps, 1).to(KERNEL_DEVICE)
    out = se.della_magprune(x, 0.5, 0.4, backend=backend)
    kept_per_column = (out != 0).sum(0).cpu()
    p = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7])
    for kept, q in zip(kept_per_column.tolist(), p.tolist()):
        assert _binomial_ok(kept, reps, q)  # 6 sigma: +-0.067 at most, against steps of 0.2
    kept = out != 0
    assert torch.equal(out[kept], x[kept])  # no 1/p factor without rescale_norm (as mergekit)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(6, 1), (1,), (), (4, 7)])
def test_della_never_nan(backend, shape):
    for x in (torch.ones(shape), torch.zeros(shape), torch.full(shape, -2.5)):
        for norm in (None, "l2"):
            out = se.della_magprune(x.to(KERNEL_DEVICE), 0.5, 0.2, rescale_norm=norm, backend=backend)
            assert out.shape == x.shape and torch.isfinite(out).all()


def test_della_epsilon_shrinks_with_warning():
    x = torch.randn(3, 50)
    with pytest.warns(RuntimeWarning, match="epsilon"):
        out = se.della_magprune(x, 0.9, 0.3)
    assert torch.isfinite(out).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        se.della_magprune(x, 0.5, 0.5)  # exactly at the edge: allowed, probabilities 0 .. 1


def test_della_rescale_norm_l1_keeps_norm():
    x = torch.randn(20, 30)
    out = se.della_magprune(x, 0.5, 0.1, rescale_norm="l1", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.abs().sum(), x.abs().sum(), rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_della_reproducible_with_generator(backend):
    x = torch.randn(5, 40, device=KERNEL_DEVICE)
    run = lambda s: se.della_magprune(x, 0.5, 0.2, backend=backend,  # noqa: E731
                                      generator=torch.Generator(device=KERNEL_DEVICE).manual_seed(s))
    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))


# ---------------------------------------------------------------- DELLA: kernel vs its uniforms

def _della_expected(x, density, eps, seed):
    from sparsity_engine.ops.masks.reference import della_probabilities
    u = _masks_triton().philox_uniforms(seed, x.numel(), x.device).view(x.shape)
    return torch.where(u < della_probabilities(x, density, eps), x, torch.zeros((), dtype=x.dtype,
                                                                                 device=x.device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 4), (3, 1), (1, 7), (5, 33), (2, 3, 9)])
def test_della_kernel_matches_probabilities(dtype, shape):
    mt = _masks_triton()
    x = _with_ties(shape, dtype)
    out = mt.della_with_seed(x, 0.5, 0.3, None, seed=99)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, _della_expected(x, 0.5, 0.3, 99))


def test_della_kernel_long_rows_path(monkeypatch):
    mt = _masks_triton()
    monkeypatch.setattr(mt, "DELLA_SORT_MAX", 8)
    x = _with_ties((4, 21), torch.bfloat16)
    assert torch.equal(mt.della_with_seed(x, 0.4, 0.2, None, seed=5), _della_expected(x, 0.4, 0.2, 5))


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_della_kernel_rescale_norm(norm):
    from sparsity_engine.ops.masks.reference import rescale_masked
    mt = _masks_triton()
    x = torch.randn(4, 16, device=KERNEL_DEVICE)
    got = mt.della_with_seed(x, 0.5, 0.2, norm, seed=3)
    assert torch.allclose(got, rescale_masked(x, _della_expected(x, 0.5, 0.2, 3), norm))


# ---------------------------------------------------------------- bad input

_NAN = torch.tensor([1.0, float("nan"), 2.0])


@pytest.mark.parametrize("call,err", [
    (lambda: se.topk_mask(_NAN, 0.5), "scores contains 1 NaN"),
    (lambda: se.topk_mask(torch.randn(4), 1.5), r"density must be in \[0, 1\]"),
    (lambda: se.topk_mask(torch.randn(4), -0.1), "density must be in"),
    (lambda: se.topk_mask(torch.arange(4), 0.5), "scores must have dtype"),
    (lambda: se.topk_mask(torch.randn(4, 4), 0.5, dim=2), "dim must be <= 1"),
    (lambda: se.topk_mask(torch.randn(4, 4), 0.5, dim=1.0), "dim must be an int"),
    (lambda: se.topk_mask(torch.tensor(1.0), 0.5, dim=0), "dim must be None"),
    (lambda: se.magnitude_prune(_NAN, 0.5), "t contains 1 NaN"),
    (lambda: se.magnitude_prune(torch.tensor([1.0, float("nan")]), 0.0), "t contains 1 NaN"),
    (lambda: se.magnitude_prune(torch.randn(4), 0.5, rescale_norm="l3"), "rescale_norm must be one of"),
    (lambda: se.magnitude_prune(torch.randn(4), float("nan")), "density must be in"),
    (lambda: se.dare(_NAN, 0.5), "t contains 1 NaN"),
    (lambda: se.dare(torch.randn(4), 2.0), "density must be in"),
    (lambda: se.dare(torch.randn(4), 0.5, rescale=1), "rescale must be a bool"),
    (lambda: se.dare(torch.randn(4), 0.5, generator=3), "generator must be a torch.Generator"),
    (lambda: se.dare(torch.randint(0, 3, (4,)), 0.5), "t must have dtype"),
    (lambda: se.della_magprune(_NAN, 0.5, 0.1), "t contains 1 NaN"),
    (lambda: se.della_magprune(torch.randn(4), 0.5, -0.1), "epsilon must be in"),
    (lambda: se.della_magprune(torch.randn(4), "0.5", 0.1), "density must be a real number"),
    (lambda: se.della_magprune(torch.randn(4), 0.5, 0.1, rescale_norm="max"), "rescale_norm must be one of"),
])
def test_mask_ops_bad_input(call, err):
    with pytest.raises((ValueError, TypeError), match=err):
        call()


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_select_ops_reject_nonfinite_on_every_backend(backend, bad):
    """The CUDA backend flags NaN/Inf in its write pass (the front end skips its own read); the others are
    checked up front. Either way: the argument's name and the count, never a mask over garbage."""
    x = torch.randn(1000, device=KERNEL_DEVICE)
    x[[0, 517, 999]] = bad
    with pytest.raises(ValueError, match="scores contains 3 NaN/Inf"):
        se.topk_mask(x, 0.5, backend=backend)
    with pytest.raises(ValueError, match="t contains 3 NaN/Inf"):
        se.magnitude_prune(x, 0.5, backend=backend)
    with pytest.raises(ValueError, match="t contains 3 NaN/Inf"):
        se.magnitude_prune(x, 1.0, backend=backend)


def test_triton_backend_says_why_for_float64():
    from sparsity_engine import BackendUnavailableError
    with pytest.raises(BackendUnavailableError, match="float64"):
        se.topk_mask(torch.randn(4, dtype=torch.float64, device=KERNEL_DEVICE), 0.5, backend="triton")


# ---------------------------------------------------------------- GPU, real sizes

@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_cuda_real_sizes(backend, dtype):
    x = _with_ties((4096, 4096), dtype)
    for density in (0.1, 0.5):
        for dim in ((None, 1, 0) if backend == "triton" else (None,)):
            got = se.topk_mask(x, density, dim=dim, backend=backend)
            assert torch.equal(got, se.topk_mask(x, density, dim=dim, backend="reference")), (density, dim)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_topk_mask_cuda_heavy_ties(backend):
    x = torch.randint(-50, 51, (4096, 4096), device="cuda").float()  # the threshold value is shared widely
    for density in (0.1, 0.5):
        for dim in ((None, 1) if backend == "triton" else (None,)):
            got = se.topk_mask(x, density, dim=dim, backend=backend)
            assert torch.equal(got, se.topk_mask(x, density, dim=dim, backend="reference")), (density, dim)
    assert torch.equal(se.magnitude_prune(x, 0.3, backend=backend), se.magnitude_prune(x, 0.3, backend="reference"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_prune_cuda_llama_size(backend, dtype):
    x = _with_ties((11008, 4096), dtype)
    for norm in (None, "l1"):
        got = se.magnitude_prune(x, 0.3, rescale_norm=norm, backend=backend)
        assert torch.equal(got, se.magnitude_prune(x, 0.3, rescale_norm=norm, backend="reference"))


@pytest.mark.cuda
def test_topk_mask_cuda_declines_per_slice():
    from sparsity_engine import BackendUnavailableError
    with pytest.raises(BackendUnavailableError, match="whole tensors"):
        se.topk_mask(torch.randn(4, 6, device="cuda"), 0.5, dim=1, backend="cuda")


def _select_keys(t, base, magnitude):
    """csrc/masks_select.cu's 32-bit keys (as int64) in torch: |t - base| bits, or the values' order bits."""
    w = 32 if t.dtype == torch.float32 else 16
    d = (t - base if base is not None else t) if magnitude else torch.where(t == 0, torch.zeros_like(t), t)
    u = d.view(torch.int32 if w == 32 else torch.int16).long() & ((1 << w) - 1)
    sign = 1 << (w - 1)
    if magnitude:
        u = u & (sign - 1)
    else:
        u = torch.where(u & sign != 0, ~u & ((1 << w) - 1), u | sign)
    return u << (32 - w)


def _first_p(keys, p, later_first):
    """Flat indices of the first p entries: key descending, equal keys by index ascending (descending)."""
    idx = torch.arange(keys.numel(), device=keys.device)
    order = torch.argsort(idx if not later_first else -idx, stable=True)
    order = order[torch.argsort(-keys[order], stable=True)]
    got = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    got[order[:p]] = True
    return got


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_edges_match_sorting(monkeypatch, backend, dtype):
    """masks.select_edges against a stable sort on every backend: several rows over several inputs in one call,
    heavy ties spread over many blocks (the selection's blocks / chunks made small), both tie orders, the
    magnitude of deltas against a base and the signed order, edges at positions 0, 1, n - 1 and n."""
    from sparsity_engine.ops import masks
    from sparsity_engine.ops.masks.reference import selection_keys
    monkeypatch.setattr(_masks_triton(), "SELECT_BLOCK", 128)
    if backend == "cuda":
        from sparsity_engine.ops.masks import cuda as mc
        monkeypatch.setattr(mc, "SELECT_CHUNK", 64)
    n = 1201
    dev = KERNEL_DEVICE if backend != "reference" else "cpu"
    base = torch.randn(n, device=dev).to(dtype)
    inputs = [(base.float() + torch.randint(-3, 4, (n,), device=dev) * 0.25).to(dtype),  # few distinct keys
              (base.float() + 0.01 * torch.randn(n, device=dev)).to(dtype),
              base.clone()]                                                              # all deltas 0
    inputs[1][::7] = -0.0
    idx = torch.arange(n, device=dev)
    for magnitude, with_base in ((True, True), (True, False), (False, False)):
        b = base if with_base else None
        for later_first in (False, True):
            rows = [(0, 1, later_first), (0, n // 3, later_first), (1, n - 1, later_first), (1, 777, later_first),
                    (2, n // 2, later_first), (0, 0, later_first), (1, n, later_first)]
            edges = masks.select_edges(inputs, b, rows, magnitude=magnitude, backend=backend)
            assert edges.dtype == torch.int32 and edges.shape == (2, len(rows))
            for slot, (m, p, lf) in enumerate(rows):
                keys = selection_keys(inputs[m], b, magnitude)
                K, J = int(edges[0, slot]), int(edges[1, slot])
                got = (keys > K) | ((keys == K) & ((idx >= J) if lf else (idx < J)))
                assert torch.equal(got, _first_p(keys, p, lf)), (magnitude, with_base, lf, m, p)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [8, 512, 16384])
def test_select_edges_cuda_matches_sorting(monkeypatch, dtype, chunk):
    """The radix select's edges (K, J) against a stable sort, for several rows over several inputs at once,
    heavy ties spread over many chunks (chunk 8 / 512: thousands of chunks), both tie orders, the magnitude
    of deltas against a base and the signed order, edges at positions 1 and n - 1."""
    from sparsity_engine.ops.masks import cuda as mc
    monkeypatch.setattr(mc, "SELECT_CHUNK", chunk)
    monkeypatch.setattr(mc, "SELECT_MAX_CHUNKS", 1 << 20)
    n = 50_001
    base = torch.randn(n, device="cuda").to(dtype)
    inputs = [(base.float() + torch.randint(-3, 4, (n,), device="cuda") * 0.25).to(dtype),  # few distinct keys
              (base.float() + 0.01 * torch.randn(n, device="cuda")).to(dtype),
              torch.zeros(n, device="cuda", dtype=dtype) + base]                            # all deltas 0
    for magnitude, with_base in ((True, True), (True, False), (False, False)):
        for later_first in (False, True):
            rows = [(0, 1, later_first, 0), (0, n // 3, later_first, 1), (1, n - 1, later_first, 2),
                    (1, 777, later_first, 3), (2, n // 2, later_first, 4)]
            out_k = torch.full((5,), -7, dtype=torch.int32, device="cuda")
            out_j = torch.full((5,), -7, dtype=torch.int32, device="cuda")
            mc.launch_select(inputs, base if with_base else None, rows, mode=mc.MAGNITUDE if magnitude else mc.ORDER,
                             out_k=out_k, out_j=out_j, k_shift=0)
            for m, p, lf, slot in rows:
                keys = _select_keys(inputs[m], base if with_base else None, magnitude)
                K, J = int(out_k[slot]) & 0xFFFFFFFF, int(out_j[slot])
                idx = torch.arange(n, device="cuda")
                got = (keys > K) | ((keys == K) & ((idx >= J) if lf else (idx < J)))
                assert torch.equal(got, _first_p(keys, p, lf)), (magnitude, with_base, lf, m, p)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_cuda_many_chunks(monkeypatch, dtype):
    from sparsity_engine.ops.masks import cuda as mc
    monkeypatch.setattr(mc, "SELECT_CHUNK", 64)
    x = torch.randint(-5, 6, (301, 77), device="cuda").to(dtype)
    x.view(-1)[::7] = -0.0
    for density in (0.001, 0.3, 0.5, 0.999):
        assert torch.equal(se.topk_mask(x, density, backend="cuda"), se.topk_mask(x, density, backend="reference"))
        assert torch.equal(se.magnitude_prune(x, density, backend="cuda"),
                           se.magnitude_prune(x, density, backend="reference"))
    unaligned = x.view(-1)[3:]  # pointers not 16-byte aligned: the scalar path
    assert torch.equal(se.topk_mask(unaligned, 0.4, backend="cuda"), se.topk_mask(unaligned, 0.4, backend="reference"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_write_flags_each_nonfinite_position(dtype):
    """The write pass's flag, entry by entry: one NaN or Inf anywhere (16-byte body, scalar tail, unaligned
    input) is reported, a finite tensor (with the dtype's largest values and -0.0) is not."""
    from sparsity_engine.ops.masks import cuda as mc
    big = torch.finfo(dtype).max
    n = 4096 + 13
    for offset in (0, 3):
        for pos in (0, 7, 2048, n - offset - 1):
            for bad in (float("nan"), float("inf"), -float("inf")):
                x = torch.randn(n, device="cuda").to(dtype)[offset:]
                x[pos] = bad
                flag = torch.zeros(1, dtype=torch.int32, device="cuda")
                mc._select_whole(x, x.numel() // 2, mode=mc.MAGNITUDE, values=True, bad=flag)
                assert int(flag.item()) == 1, (offset, pos, bad)
        x = torch.randn(n, device="cuda").to(dtype)[offset:]
        x[::5], x[1::5] = big, -0.0
        flag = torch.zeros(1, dtype=torch.int32, device="cuda")
        for mode in (mc.MAGNITUDE, mc.ORDER):
            mc._select_whole(x, x.numel() // 2, mode=mode, values=False, bad=flag)
        assert int(flag.item()) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_cuda_llama_size(dtype):
    mt = _masks_triton()
    x = torch.randn(11008, 4096, device="cuda").to(dtype)
    out = mt.dare_with_seed(x, 0.2, True, seed=77)
    u = mt.philox_uniforms(77, x.numel(), x.device).view(x.shape)
    p = float(torch.tensor(0.2, dtype=dtype).float())
    expected = torch.where(u < p, x.float() * torch.tensor(1 / 0.2, device="cuda"), 0.0).to(dtype)
    assert torch.equal(_bits(out), _bits(expected))
    assert _binomial_ok(int((out != 0).sum()), x.numel() - int((x == 0).sum()), p)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 64), (3, 5, 7), (257,), (9, 4097)])
def test_random_ops_agree_on_every_backend_and_device(dtype, shape):
    """One CPU generator state, the same bytes: DARE and DELLA on the reference, Triton and CUDA backends on the
    GPU and the reference on the CPU (the rescale's norms, summed by torch on each device, may round apart
    across devices: the l1 case compares the GPU backends only)."""
    from sparsity_engine._dispatch import explain
    x = _with_ties(shape, dtype)
    gen = lambda: torch.Generator().manual_seed(21)  # noqa: E731
    expected = _bits(se.dare(x.cpu(), 0.3, generator=gen(), backend="reference"))
    for backend in ("reference", "triton"):
        assert torch.equal(_bits(se.dare(x, 0.3, generator=gen(), backend=backend).cpu()), expected), backend
    backends = ["reference", "triton"] + (["cuda"] if not explain("della_magprune", x, 0.4, 0.2, None, None)["cuda"]
                                          else [])
    for norm in (None, "linf", "l1"):
        runs = {b: se.della_magprune(x, 0.4, 0.2, rescale_norm=norm, generator=gen(), backend=b) for b in backends}
        if norm != "l1":
            runs["cpu"] = se.della_magprune(x.cpu(), 0.4, 0.2, rescale_norm=norm, generator=gen(), backend="reference")
        first = _bits(runs["reference"].cpu())
        for b, out in runs.items():
            assert torch.equal(_bits(out.cpu()), first), (b, norm)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 4096), (256, 11008), (64, 28672)])
def test_della_cuda_real_sizes(dtype, shape):
    mt = _masks_triton()
    x = _with_ties(shape, dtype)
    got = mt.della_with_seed(x, 0.4, 0.2, None, seed=8)
    expected = _della_expected(x, 0.4, 0.2, 8)
    assert torch.equal(_bits(got), _bits(expected))  # p formed with the reference's roundings: no FMA


# ---------------------------------------------------------------- DELLA: CUDA histogram ranks (GPU only)

def _della_rows_cases():
    """Rows that stress the histogram: wide key ranges (0 next to the largest), heavy ties, one column."""
    cases = {"ties": lambda s, dt: _with_ties(s, dt)}
    cases["wide"] = lambda s, dt: (torch.randn(s, device="cuda") * torch.logspace(-7, 4, s[-1], device="cuda")
                                   ).clamp(-6e4, 6e4).to(dt)  # fp16's range; bf16's subnormals to ~1e4
    cases["few values"] = lambda s, dt: torch.randint(-3, 4, s, device="cuda").to(dt)
    return cases


_DELLA_SHAPES = [(3, 1), (1, 2), (5, 33), (2, 3, 129), (7, 2048), (4096, 4096), (9, 4097), (256, 11008),
                 (3, 16384), (64, 28672), (2, 65535)]
_DELLA_CUDA_MAX_COLS = {torch.float32: 16384, torch.float16: 65535, torch.bfloat16: 65535}  # masks.cuda's


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,shape", [(dt, sh) for dt in DTYPES for sh in _DELLA_SHAPES
                                         if sh[-1] <= _DELLA_CUDA_MAX_COLS[dt]])
@pytest.mark.parametrize("case", ["ties", "wide", "few values"])
def test_della_cuda_probabilities_match_reference(dtype, shape, case):
    from sparsity_engine.ops.masks import cuda as mc
    from sparsity_engine.ops.masks.reference import della_probabilities
    assert mc.DELLA_MAX_COLS == _DELLA_CUDA_MAX_COLS
    x = _della_rows_cases()[case](shape, dtype)
    for density, eps in ((0.4, 0.2), (0.5, 0.5), (0.9, 0.1)):
        got = mc.della_probabilities(x, density, eps)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert torch.equal(got, della_probabilities(x, density, eps)), (density, eps)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (5, 33), (4096, 4096), (11008, 4096), (4096, 11008)])
def test_della_cuda_backend_matches_its_draw(dtype, shape):
    from sparsity_engine.ops.masks.reference import draw_seed, rescale_masked
    x = _with_ties(shape, dtype)
    seed = draw_seed(torch.Generator(device="cuda").manual_seed(11))
    for norm in (None, "l1"):
        got = se.della_magprune(x, 0.3, 0.1, rescale_norm=norm, backend="cuda",
                                generator=torch.Generator(device="cuda").manual_seed(11))
        expected = rescale_masked(x, _della_expected(x, 0.3, 0.1, seed), norm)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, expected), norm


@pytest.mark.cuda
def test_della_cuda_declines_what_it_cannot_rank():
    from sparsity_engine._dispatch import choose
    from sparsity_engine.ops.masks import cuda as mc
    for dtype, limit in mc.DELLA_MAX_COLS.items():
        x = torch.randn(2, limit, device="cuda").to(dtype)
        assert choose("della_magprune", None, x, 0.5, 0.1, None, None).backend == "cuda"
        x = torch.randn(2, limit + 1, device="cuda").to(dtype)
        assert choose("della_magprune", None, x, 0.5, 0.1, None, None).backend == "triton"
    with pytest.raises(ValueError, match="n must be in"):  # the launcher's own check, should a caller skip ours
        mc.load_extension().masks_della_probs(0, 0, 1, 16385, 0.4, 0.2, 0, 0)


# ---------------------------------------------------------------- rescale past the dtype's range

@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_rescale_norm_past_fp16_range_stays_finite(backend):
    """The l1 norm of this fp16 tensor (~2e5) overflows fp16: mergekit would scale by inf / inf = NaN."""
    x = (torch.rand(100, 1000, device=KERNEL_DEVICE) * 2 + 1).half()
    if backend in ("triton", "reference"):
        out = se.magnitude_prune(x, 0.5, rescale_norm="l1", backend=backend)
        assert torch.isfinite(out).all()
        assert abs(out.float().abs().sum().item() / x.float().abs().sum().item() - 1) < 1e-2
    if x.is_cuda:  # fp16 draws in fp16 only on the GPU (mergekit's work dtype rule)
        out = se.della_magprune(x, 0.5, 0.1, rescale_norm="l1", backend=backend)
        assert torch.isfinite(out).all()
        assert abs(out.float().abs().sum().item() / x.float().abs().sum().item() - 1) < 1e-2


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_select_edges_many_rows_on_one_input(backend):
    """Any number of rows, several on one input (the CUDA kernel takes 2 per input and 16 per launch)."""
    from sparsity_engine.ops import masks
    x = torch.randint(-20, 21, (2, 500), device=KERNEL_DEVICE).float()
    rows = [(i % 2, p, bool(p % 3)) for i, p in enumerate(range(1, 500, 25))]
    assert torch.equal(masks.select_edges(list(x), None, rows, magnitude=False, backend=backend),
                       masks.select_edges(list(x), None, rows, magnitude=False, backend="reference"))


def test_select_edges_launch_groups():
    from sparsity_engine.ops.masks.cuda import _launch_groups
    rows = [(i % 3, 10 + i, False, i) for i in range(40)]
    groups = _launch_groups(rows)
    assert sorted(r for g in groups for r in g) == sorted(rows)
    for g in groups:
        assert len(g) <= 16 and all(sum(r[0] == m for r in g) <= 2 for m in range(3))
