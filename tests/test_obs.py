"""SparseGPT / OBS ops: the reference against hand values and independent identities; Triton vs reference."""
import math
import warnings

import pytest
import torch

import sparsity_engine as se
from helpers import KERNEL_DEVICE, RTOL, kernel_backends, rel_err

KERNEL_BACKENDS = kernel_backends("sparsegpt_prune")


def correlated_hessian(cols, n=256, *, dead=(), dtype=torch.float32, device="cpu", strength=0.5):
    """2/n X^T X of inputs with correlated columns (and all-zero columns at ``dead``)."""
    mix = torch.eye(cols, dtype=torch.float64) + strength * torch.randn(cols, cols, dtype=torch.float64) / math.sqrt(cols)
    X = torch.randn(n, cols, dtype=torch.float64) @ mix
    X[:, list(dead)] = 0
    return (2 / n * X.T @ X).to(dtype=dtype, device=device), X


def damped(H, percdamp=0.01):
    """The Hessian the algorithm works with: dead diagonal set to 1, then damped (float64)."""
    Hd = H.double().clone()
    d = Hd.diagonal()
    d[d == 0] = 1
    d += percdamp * d.mean()
    return Hd


def magnitude(W, sparsity):
    k = int(W.numel() * sparsity)
    thr = W.abs().flatten().kthvalue(k).values
    return torch.where(W.abs() > thr, W, torch.zeros_like(W))


def decided_draw(monkeypatch, H, draw, margin, **kw):
    """(W, reference result) for the first fresh W = draw() at whose every mask choice the reference's lowest
    kept score exceeds its highest pruned one by more than ``margin`` (relative; 0: no tie across the boundary).

    Random fp32 scores come that close now and then: about 1e-5 of draws tie at a block's threshold, and
    about 1% come within 1e-4, where the kernels' scores (their inverse factor is computed another way:
    ~1e-7 apart) may fall on the other side, one flip moving the compensation of the rest of its row
    (seen: 2 of ~80000 fp32 draws of KERNEL_CASES[0]). Such draws are redrawn; 20 in a row never are."""
    from sparsity_engine.ops.obs import reference
    gaps = []
    unstructured, nm = reference.unstructured_prune_set, reference.nm_prune_set

    def unstructured_gap(scores, sparsity):
        s, k = torch.sort(scores.flatten())[0], int(scores.numel() * sparsity)
        if 0 < sparsity < 1 and k + 1 < s.numel():
            gaps.append(float(((s[k + 1] - s[k]) / s[k + 1]).nan_to_num(0.0)))
        return unstructured(scores, sparsity)

    def nm_gap(scores, prune_n):
        s = torch.sort(scores, dim=1)[0]
        if prune_n < s.shape[1]:
            gaps.append(float(((s[:, prune_n] - s[:, prune_n - 1]) / s[:, prune_n]).nan_to_num(0.0).min()))
        return nm(scores, prune_n)

    monkeypatch.setattr(reference, "unstructured_prune_set", unstructured_gap)
    monkeypatch.setattr(reference, "nm_prune_set", nm_gap)
    for _ in range(20):
        W = draw()
        gaps.clear()
        r = se.sparsegpt_prune(W, H, backend="reference", **kw)
        if min(gaps, default=1.0) > margin:
            return W, r
    raise AssertionError(f"20 draws in a row had a mask choice within {margin:g}: the scores are not random")


# ---------------------------------------------------------------- reference: hand values

def test_hand_example_diagonal_hessian_published_threshold_rule():
    # diagonal H: no compensation, scores w^2 h_j; sorted scores [1, 4, 9, 16], sparsity 0.25 -> index 1 -> the
    # published rule prunes every score <= 4 (two entries, one more than 0.25 * 4)
    W = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    H = torch.diag(torch.tensor([1.0, 4.0]))
    r = se.sparsegpt_prune(W, H, sparsity=0.25, percdamp=0.0, backend="reference")
    assert r.weight.tolist() == [[0.0, 2.0], [3.0, 0.0]]
    assert r.mask.tolist() == [[False, True], [True, False]]
    torch.testing.assert_close(r.loss, torch.tensor([0.5, 2.0]))  # 1/2 w^2 h_j of the pruned entry
    assert r.loss.dtype == torch.float32


def test_hand_example_obs_compensation():
    # H = [[2, 1], [1, 2]]: pruning w0 moves w1 by -H10/H11 * (0 - w0) = w0/2; loss = w0^2 / (2 [H^-1]_00) = 3/4
    W = torch.tensor([[1.0, 2.0]])
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    r = se.sparsegpt_prune(W, H, sparsity=0.25, percdamp=0.0, backend="reference")
    torch.testing.assert_close(r.weight, torch.tensor([[0.0, 2.5]]))
    assert r.mask.tolist() == [[False, True]]
    torch.testing.assert_close(r.loss, torch.tensor([0.75]))


# ---------------------------------------------------------------- reference: independent identities

@pytest.mark.parametrize("kw", [dict(sparsity=0.5, blocksize=16), dict(sparsity=0.3, blocksize=7),
                                dict(prune_n=2, prune_m=4, blocksize=8), dict(prune_n=4, prune_m=8, blocksize=24)])
def test_loss_is_half_dW_H_dW(kw):
    # the update of a row is dW = -err U with U^T U = H_d^-1, so dW H_d dW^T = |err|^2 = 2 loss exactly
    H, _ = correlated_hessian(48, dead=(5,), dtype=torch.float64)
    W = torch.randn(10, 48, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        r = se.sparsegpt_prune(W.to(dtype), H.to(dtype), backend="reference", **kw)
        W0 = W.clone()
        W0[:, 5] = 0
        dW = r.weight.double() - W0
        expected = 0.5 * torch.einsum("ri,ij,rj->r", dW, damped(H), dW)
        tol = 1e-6 if dtype == torch.float64 else 1e-4  # loss is returned in float32
        assert rel_err(r.loss.double(), expected) < tol, dtype


def test_beats_magnitude_on_correlated_inputs():
    n, cols = 512, 64
    Z = torch.randn(n, cols // 4)
    X = (Z.repeat_interleave(4, 1) + 0.3 * torch.randn(n, cols)) * (2 * torch.rand(cols))
    H = 2 / n * X.T @ X
    W = torch.randn(32, cols)
    r = se.sparsegpt_prune(W, H, sparsity=0.5, backend="reference")
    err_sgpt = ((W - r.weight) @ X.T).norm()
    err_mag = ((W - magnitude(W, 0.5)) @ X.T).norm()
    assert (~r.mask).float().mean() >= 0.5
    assert err_sgpt < 0.6 * err_mag, (err_sgpt, err_mag)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_exact(n, m):
    H, _ = correlated_hessian(32)
    r = se.sparsegpt_prune(torch.randn(6, 32), H, prune_n=n, prune_m=m, blocksize=16, backend="reference")
    groups = r.mask.reshape(-1, m)
    assert (groups.sum(1) == m - n).all()  # prune_n of every prune_m are pruned (published convention)
    assert (r.weight[~r.mask] == 0).all()


def test_unstructured_mask_follows_published_rule(monkeypatch):
    cols, bs, sparsity = 40, 16, 0.4
    H, _ = correlated_hessian(cols)
    # no ties at any block's threshold (they would prune one more): such draws are redrawn
    W, r = decided_draw(monkeypatch, H, lambda: torch.randn(9, cols), 0.0, sparsity=sparsity, blocksize=bs)
    # block 0 sees the original weights: its mask is the rule applied to w^2 / U_jj^2
    from sparsity_engine.ops.obs.reference import inverse_factor
    U, _ = inverse_factor(H, 0.01)
    scores = W[:, :bs] ** 2 / torch.diagonal(U)[:bs] ** 2
    thresh = torch.sort(scores.flatten())[0][int(scores.numel() * sparsity)]
    assert torch.equal(~r.mask[:, :bs], scores <= thresh)
    for i1 in range(0, cols, bs):  # every block (ragged last one too) prunes int(numel * s) + 1 (no ties)
        blk = ~r.mask[:, i1:i1 + bs]
        assert int(blk.sum()) == int(blk.numel() * sparsity) + 1
    assert (r.weight[~r.mask] == 0).all() and (r.weight[r.mask] != 0).all()


def test_sparsity_edges_and_dead_columns():
    H, _ = correlated_hessian(24, dead=(0, 7))
    W = torch.randn(5, 24)
    none = se.sparsegpt_prune(W, H, sparsity=0.0, backend="reference")
    Wd = W.clone()
    Wd[:, [0, 7]] = 0
    assert none.mask.all() and torch.equal(none.weight, Wd) and (none.loss == 0).all()
    full = se.sparsegpt_prune(W, H, sparsity=1.0, backend="reference")
    assert not full.mask.any() and (full.weight == 0).all() and (full.loss > 0).all()
    half = se.sparsegpt_prune(W, H, sparsity=0.5, blocksize=8, backend="reference")
    assert (half.weight[:, [0, 7]] == 0).all() and not half.mask[:, [0, 7]].any()


def test_output_dtype_shape_and_inputs_untouched():
    H, _ = correlated_hessian(16)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        W = torch.randn(4, 16).to(dtype)
        W_copy, H_copy = W.clone(), H.clone()
        r = se.sparsegpt_prune(W, H, backend="reference")
        assert r.weight.dtype == dtype and r.weight.shape == W.shape and r.mask.dtype == torch.bool
        assert r.loss.shape == (4,) and r.loss.dtype == torch.float32
        assert torch.equal(W, W_copy) and torch.equal(H, H_copy)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_indefinite_hessian_retries_damping(backend):
    device = "cpu" if backend == "reference" else KERNEL_DEVICE
    H, _ = correlated_hessian(16, device=device)
    evals, evecs = torch.linalg.eigh(H.double())
    # Push the smallest eigenvalue negative: diagonal i moves by (new - old) * v_i0^2, so the step is capped at
    # half of min_i H_ii / v_i0^2, which keeps every diagonal entry above H_ii / 2 (only the eigen-structure is bad).
    diag = H.double().diagonal()
    evals[0] = max(-0.5 * evals.mean(), evals[0] - 0.5 * (diag / evecs[:, 0] ** 2).min())
    H_bad = (evecs @ torch.diag(evals) @ evecs.T).float()
    assert evals[0] < -0.05 * evals.mean() and (H_bad.diagonal() > 0).all()
    with pytest.warns(RuntimeWarning, match="used percdamp="):
        r = se.sparsegpt_prune(torch.randn(4, 16, device=device), H_bad, blocksize=8, backend=backend)
    assert torch.isfinite(r.weight).all() and torch.isfinite(r.loss).all()


def test_negative_diagonal_fails_clearly():
    H, _ = correlated_hessian(8)
    H[3, 3] = -1.0
    with pytest.raises(ValueError, match="negative diagonal"):
        se.sparsegpt_prune(torch.randn(2, 8), H)


def test_prune_task_vector():
    H, _ = correlated_hessian(32)
    delta = torch.randn(6, 32) * 0.01
    a = se.prune_task_vector(delta, H, density=0.3, blocksize=16, backend="reference")
    b = se.sparsegpt_prune(delta, H, sparsity=0.7, blocksize=16, backend="reference")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    c = se.prune_task_vector(delta, H, density=0.3, rescale=True, blocksize=16, backend="reference")
    torch.testing.assert_close(c.weight, a.weight / 0.3)
    d = se.prune_task_vector(delta, H, density=0.5, prune_n=2, prune_m=4, blocksize=16, backend="reference")
    assert (d.mask.reshape(-1, 4).sum(1) == 2).all()
    z = se.prune_task_vector(delta, H, density=0.0, rescale=True, backend="reference")
    assert (z.weight == 0).all()


def test_importance_scores():
    W = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    d = torch.tensor([0.5, 2.0, 1.0])
    expected = torch.tensor([[4.0, 1.0, 9.0], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(se.importance_scores(W, d), expected)
    with pytest.raises(ValueError, match="hinv_diag must have"):
        se.importance_scores(W, torch.ones(4))
    with pytest.raises(ValueError, match="hinv_diag must be nonzero"):
        se.importance_scores(W, torch.tensor([1.0, 0.0, 1.0]))


def _bad_cases():
    H, _ = correlated_hessian(8)
    W = torch.randn(4, 8)
    nan_w = W.clone()
    nan_w[1, 2] = float("nan")
    inf_h = H.clone()
    inf_h[0, 1] = float("inf")
    return [
        (dict(weight=nan_w, hessian=H), "weight contains 1 NaN"),
        (dict(weight=W, hessian=inf_h), "hessian contains 1 NaN/Inf"),
        (dict(weight=W, hessian=H[:4, :4]), "hessian must be \\[cols, cols\\]"),
        (dict(weight=W[0], hessian=H), "weight must be 2-D"),
        (dict(weight=W.int(), hessian=H), "weight must have dtype"),
        (dict(weight=W.tolist(), hessian=H), "weight must be a torch.Tensor"),
        (dict(weight=W, hessian=H, sparsity=1.5), "sparsity must be in"),
        (dict(weight=W, hessian=H, sparsity=-0.1), "sparsity must be in"),
        (dict(weight=W, hessian=H, prune_n=2), "prune_n and prune_m must both"),
        (dict(weight=W, hessian=H, prune_n=2, prune_m=3, blocksize=6), "prune_m=3 must divide"),
        (dict(weight=W, hessian=H, prune_n=5, prune_m=4), "prune_n must be <= prune_m"),
        (dict(weight=W, hessian=H, prune_n=2, prune_m=4, blocksize=6), "blocksize=6 must be a multiple"),
        (dict(weight=W, hessian=H, blocksize=0), "blocksize must be >= 1"),
        (dict(weight=W, hessian=H, percdamp=-1.0), "percdamp must be"),
        (dict(weight=W, hessian=H, percdamp=float("nan")), "percdamp must be"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_input(case):
    kwargs, err = _bad_cases()[case]
    with pytest.raises((ValueError, TypeError), match=err):
        se.sparsegpt_prune(kwargs.pop("weight"), kwargs.pop("hessian"), **kwargs)


def test_task_vector_bad_input():
    H, _ = correlated_hessian(8)
    d = torch.randn(4, 8)
    with pytest.raises(ValueError, match="density must be in"):
        se.prune_task_vector(d, H, density=1.2)
    with pytest.raises(ValueError, match="does not match the N:M pattern"):
        se.prune_task_vector(d, H, density=0.3, prune_n=2, prune_m=4)
    with pytest.raises(TypeError, match="rescale must be a bool"):
        se.prune_task_vector(d, H, density=0.5, rescale=1)
    with pytest.raises(ValueError, match="delta contains"):
        se.prune_task_vector(torch.full((4, 8), float("inf")), H, density=0.5)


# ---------------------------------------------------------------- Triton vs reference

def test_reversed_cholesky_factor_equals_published():
    from sparsity_engine.ops.obs import reference, triton as obs_triton
    H, _ = correlated_hessian(40, dead=(3,))
    U_ref, dead_ref = reference.inverse_factor(H, 0.01)
    U, dead = obs_triton.upper_inverse_factor(H, 0.01)
    assert torch.equal(dead, dead_ref)
    assert rel_err(U, U_ref) < 1e-5
    assert torch.equal(U.tril(-1), torch.zeros_like(U))
    Hinv = torch.linalg.inv(damped(H))
    assert rel_err(U.double().T @ U.double(), Hinv) < 1e-5


def agreement(a, b):
    return (a.mask == b.mask).float().mean().item()


# the relative margin every mask choice of a kernel test's draw clears (decided_draw): 100x the kernels' score
# differences from the reference (~1e-6 at most, measured), so the masks must agree exactly
DECIDED = 1e-4

KERNEL_CASES = [
    # (rows, cols, kwargs, dead columns): ragged last blocks, dead columns, 2:4 and 4:8
    (12, 40, dict(sparsity=0.5, blocksize=16), (3,)),
    (7, 24, dict(sparsity=0.3, blocksize=24), ()),
    (12, 40, dict(prune_n=2, prune_m=4, blocksize=16), (0, 9)),
    (5, 48, dict(prune_n=4, prune_m=8, blocksize=32), (47,)),
    (6, 36, dict(prune_n=2, prune_m=3, blocksize=12), (5,)),   # M not a power of two: the generic ranking
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
def test_kernel_matches_reference(monkeypatch, backend, dtype, case):
    rows, cols, kw, dead = KERNEL_CASES[case]
    H, _ = correlated_hessian(cols, dead=dead, device=KERNEL_DEVICE)
    W, exp = decided_draw(monkeypatch, H, lambda: torch.randn(rows, cols, device=KERNEL_DEVICE).to(dtype),
                          DECIDED, **kw)
    got = se.sparsegpt_prune(W, H, backend=backend, **kw)
    assert got.weight.dtype == dtype and got.mask.dtype == torch.bool and got.loss.dtype == torch.float32
    assert agreement(got, exp) >= 0.999
    assert abs(got.loss.sum().item() / exp.loss.sum().item() - 1) < 0.01
    assert rel_err(got.weight, exp.weight) <= max(RTOL[dtype], 1e-5)
    assert (got.weight[:, list(dead)] == 0).all()


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(prune_n=2, prune_m=4)])
def test_kernel_tf32x3_lazy_update(monkeypatch, kw):
    from sparsity_engine.ops.obs import triton as obs_triton
    monkeypatch.setattr(obs_triton, "LAZY_UPDATE", "tf32x3")
    H, _ = correlated_hessian(40, dead=(2,), device=KERNEL_DEVICE)
    W, exp = decided_draw(monkeypatch, H, lambda: torch.randn(9, 40, device=KERNEL_DEVICE), DECIDED, blocksize=16,
                          **kw)
    got = se.sparsegpt_prune(W, H, blocksize=16, backend="triton", **kw)
    assert agreement(got, exp) >= 0.999
    assert rel_err(got.weight, exp.weight) < 1e-4  # three TF32 products: about fp32 accuracy
    assert abs(got.loss.sum().item() / exp.loss.sum().item() - 1) < 1e-3


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_sparsity_edges(backend):
    H, _ = correlated_hessian(16, device=KERNEL_DEVICE)
    W = torch.randn(3, 16, device=KERNEL_DEVICE)
    for s in (0.0, 1.0):
        exp = se.sparsegpt_prune(W, H, sparsity=s, blocksize=8, backend="reference")
        got = se.sparsegpt_prune(W, H, sparsity=s, blocksize=8, backend=backend)
        assert torch.equal(got.mask, exp.mask) and rel_err(got.weight, exp.weight) < 1e-5


def test_triton_rejects_float64_by_name():
    from sparsity_engine import BackendUnavailableError
    H, _ = correlated_hessian(8, dtype=torch.float64, device=KERNEL_DEVICE)
    with pytest.raises(BackendUnavailableError, match="float64"):
        se.sparsegpt_prune(torch.randn(2, 8, dtype=torch.float64, device=KERNEL_DEVICE), H, backend="triton")


# ---------------------------------------------------------------- GPU, LLaMA sizes

def _llama_case(rows, cols, n=2048):
    # real-ish H: tokens with correlated features and a few heavy channels, as in LLM activations
    g = torch.Generator(device="cuda").manual_seed(rows * 7 + cols)
    mix = torch.randn(cols, cols, device="cuda", generator=g) / math.sqrt(cols)
    X = torch.randn(n, cols, device="cuda", generator=g) @ (torch.eye(cols, device="cuda") + mix)
    X[:, :8] *= 20
    X = X.bfloat16()
    H = 2 / n * (X.float().T @ X.float())
    W = torch.randn(rows, cols, device="cuda", generator=g) * 0.02
    return W, H


@pytest.mark.cuda
@pytest.mark.parametrize("lazy", ["cublas", "tf32x3"])
@pytest.mark.parametrize("rows,cols,kw,dtype", [
    (4096, 4096, dict(sparsity=0.5), torch.bfloat16),
    (4096, 4096, dict(prune_n=2, prune_m=4), torch.float16),
    (1024, 4000, dict(sparsity=0.5), torch.float32),   # ragged last block
])
def test_kernel_matches_reference_llama_sizes(monkeypatch, lazy, rows, cols, kw, dtype):
    # At LLaMA widths the masks are chaotic in the last bits: a 1-ulp difference flips a near-threshold
    # entry, whose compensation then moves the later columns of that row. The published loop in fp32 and
    # the same loop in fp64 already disagree on ~1-2% of 64x4096 entries (measured on the CPU). So the kernel
    # is held to: loss within 1% of the fp32 reference, and mask agreement with it no worse than the fp32
    # reference's own agreement with the fp64 one (minus 0.5%), and >= 97%.
    from sparsity_engine.ops.obs import triton as obs_triton
    monkeypatch.setattr(obs_triton, "LAZY_UPDATE", lazy)
    W, H = _llama_case(rows, cols)
    W = W.to(dtype)
    exp = se.sparsegpt_prune(W, H, backend="reference", **kw)
    exact = se.sparsegpt_prune(W.double(), H.double(), backend="reference", **kw)
    got = se.sparsegpt_prune(W, H, backend="triton", **kw)
    agree, floor = agreement(got, exp), agreement(exact, exp)
    ratio = got.loss.sum().item() / exp.loss.sum().item()
    print(f"\n{rows}x{cols} {kw} {dtype} {lazy}: agreement triton/ref32 {agree:.5f}, ref64/ref32 {floor:.5f}, "
          f"triton/ref64 {agreement(got, exact):.5f}; loss ratio {ratio:.6f}")
    assert abs(ratio - 1) < 0.01
    assert agree >= floor - 0.005 and agree >= 0.97
    assert torch.isfinite(got.weight.float()).all()


@pytest.mark.cuda
def test_inverse_factor_holds_one_square_buffer():
    """The reversed Cholesky and its inverse share one cols x cols buffer; cuSOLVER's Cholesky holds one more
    cols^2 while it runs (measured: 3 x cols^2 before the buffer was shared), plus
    O(cols x 1024) of work space."""
    from sparsity_engine.ops.obs import triton as obs_triton
    _, H = _llama_case(8, 8192)
    dead = torch.zeros(8192, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    Linv = obs_triton._reversed_factor(H, dead, 0.01 * H.diagonal().mean(), torch.float32)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    n2 = 8192 * 8192 * 4
    assert Linv is not None and extra <= 2 * n2 + 8192 * 1024 * 4 * 3, extra / n2
    U = Linv.flip((0, 1))
    assert torch.equal(U.tril(-1), torch.zeros_like(U))
    Hd = H.double() + 0.01 * H.diagonal().mean().double() * torch.eye(8192, device="cuda", dtype=torch.float64)
    probe = torch.randn(8192, 4, device="cuda", dtype=torch.float64)
    # U^T U = H_d^-1, checked on a few vectors: U^T U H_d p = p
    back = U.double().T @ (U.double() @ (Hd @ probe))
    assert rel_err(back, probe) < 1e-2  # a wrong factor is off by O(1)
