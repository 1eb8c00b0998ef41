"""No silent overflow: scores are computed where they cannot overflow, and an op whose result would overflow its
dtype raises a ValueError naming the op (never an Inf in an output, never a mask chosen from Inf scores)."""
import pytest
import torch

import sparsity_engine as se
from helpers import KERNEL_DEVICE, kernel_backends
from test_obs import correlated_hessian

PRUNE_BACKENDS = ["reference"] + kernel_backends("sparsegpt_prune")


def _weight_and_hessian():
    W = torch.randn(16, 64)
    H, _ = correlated_hessian(64)
    return W, H


@pytest.mark.parametrize("backend", PRUNE_BACKENDS)
@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(prune_n=2, prune_m=4)])
def test_sparsegpt_scores_of_huge_weights_do_not_overflow(backend, pattern):
    """w = 2**65 w0 with H = 2**-40 H0: w^2 overflows float32, the scores w^2 / d^2 and the loss do not. The
    result is exactly the one for (w0, H0), scaled (powers of two), instead of everything pruned."""
    W0, H0 = _weight_and_hessian()
    dev = KERNEL_DEVICE if backend != "reference" else "cpu"
    W0, H0 = W0.to(dev), H0.to(dev)
    small = se.sparsegpt_prune(W0, H0, backend=backend, **pattern)
    big = se.sparsegpt_prune(W0 * 2.0 ** 65, H0 * 2.0 ** -40, backend=backend, **pattern)
    assert torch.equal(big.mask, small.mask)
    assert 0.3 < big.mask.float().mean() < 0.7
    assert torch.equal(big.weight, small.weight * 2.0 ** 65)
    assert torch.equal(big.loss, small.loss * 2.0 ** 90)


@pytest.mark.parametrize("backend", PRUNE_BACKENDS)
def test_sparsegpt_refuses_a_loss_beyond_float32(backend):
    """Weights of 1e30: every score and the loss exceed float32 (the published code prunes 100% of them)."""
    W, H = _weight_and_hessian()
    dev = KERNEL_DEVICE if backend != "reference" else "cpu"
    with pytest.raises(ValueError, match="sparsegpt_prune: the per-row loss overflows float32"):
        se.sparsegpt_prune((W * 1e30).to(dev), H.to(dev), backend=backend)
    with pytest.raises(ValueError, match="prune_task_vector: the per-row loss overflows float32"):
        se.prune_task_vector((W * 1e30).to(dev), H.to(dev), density=0.5, backend=backend)


def test_prune_task_vector_rescale_overflow_is_refused():
    W, H = _weight_and_hessian()
    W = (W / W.abs().max() * 60000).half()
    with pytest.raises(ValueError, match="prune_task_vector: the result overflows float16"):
        se.prune_task_vector(W, H, density=0.1, rescale=True, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dare_rescale_overflow_is_refused(backend, dtype):
    dev = KERNEL_DEVICE if backend != "reference" else "cpu"
    t = torch.full((50, 40), torch.finfo(dtype).max / 1.5, dtype=dtype, device=dev)
    with pytest.raises(ValueError, match="dare: rescale=True divides the kept entries by density=0.5"):
        se.dare(t, 0.5, backend=backend)
    assert torch.isfinite(se.dare(t, 0.5, rescale=False, backend=backend)).all()
    assert torch.isfinite(se.dare(t, 0.8, backend=backend)).all()  # 1.5 / 0.8 < 2: fits


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_magnitude_and_della_rescale_overflow_is_refused(backend):
    """The l1 rescale multiplies the kept 60000s by (60000 + 30000) / 60000 = 1.5: past float16's 65504."""
    dev = KERNEL_DEVICE if backend != "reference" else "cpu"
    t = torch.cat([torch.full((100,), 60000.0), torch.full((100,), 30000.0)]).half().to(dev)
    with pytest.raises(ValueError, match="magnitude_prune: the result overflows float16"):
        se.magnitude_prune(t, 0.5, rescale_norm="l1", backend=backend)
    with pytest.raises(ValueError, match="della_magprune: the result overflows float16"):
        se.della_magprune(t.view(2, 100), 0.5, 0.1, rescale_norm="l1", backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kw", [dict(method="task_arithmetic"), dict(method="task_arithmetic", lambda_=3.0,
                                                                     normalize=True),
                                dict(method="ties", density=0.5, rescale="l1")])
def test_merge_overflow_is_refused(backend, kw):
    """Sums, lambda and rescales whose fp16 result passes 65504 (the inputs themselves are finite)."""
    dev = KERNEL_DEVICE if backend != "reference" else "cpu"
    base = torch.zeros(8, 16, dtype=torch.float16, device=dev)
    ts = [torch.full_like(base, 40000.0), torch.full_like(base, 30000.0)]
    ts[1].view(-1)[::2] = 20000.0
    with pytest.raises(ValueError, match="merge_task_vectors: the result overflows float16"):
        se.merge_task_vectors(base, ts, [1.0, 1.0], backend=backend, **kw)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_breadcrumbs_rescale_overflow_is_refused(backend):
    dev = KERNEL_DEVICE if backend != "reference" else "cpu"
    t = torch.cat([torch.full((10,), 1.0), torch.full((100,), 60000.0), torch.full((90,), 30000.0)]).half().to(dev)
    with pytest.raises(ValueError, match="magnitude_outliers: the result overflows float16"):
        se.magnitude_outliers(t, 0.5, 0.01, rescale_norm="l1", backend=backend)


def test_importance_scores_where_w_squared_overflows():
    w = torch.tensor([[1e20, -3e19, 1.0]])
    d = torch.tensor([1e3, 1e2, 1e-3])
    got = se.importance_scores(w, d)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), (w.double() / d.double()) ** 2, rtol=1e-6)
    with pytest.raises(ValueError, match="importance_scores: the result overflows float32"):
        se.importance_scores(torch.tensor([[1e30, 1.0]]), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends("accumulate_hessian"))
def test_hessian_of_huge_inputs_is_refused_and_h_kept(backend):
    dev = KERNEL_DEVICE if backend != "reference" else "cpu"
    H = torch.eye(16, device=dev)
    dtype = torch.float32 if backend == "reference" else torch.bfloat16
    x = (torch.randn(2, 8, 16, device=dev) * 1e20).to(dtype)
    with pytest.raises(ValueError, match="accumulate_hessian_: the result overflows float32"):
        se.accumulate_hessian_(H, x, 3, backend=backend)
    assert torch.equal(H, torch.eye(16, device=dev))  # untouched
    acc = se.HessianAccumulator(16, device=dev, backend=backend)
    with pytest.raises(ValueError, match="overflows float32"):
        acc.add_batch(x)
    # large but representable (16 tokens x (2**59 randn)^2 passes the up-front bound): the update runs on a
    # checked copy of H, and equals the update of the input scaled down by a power of two, scaled back
    scale = 2.0 ** 59
    small = torch.randn(2, 8, 16, device=dev).clamp(-3, 3).to(dtype)
    H1, H2 = torch.eye(16, device=dev) * scale ** 2, torch.eye(16, device=dev)
    assert se.accumulate_hessian_(H1, small * scale, 3, backend=backend) == 5
    se.accumulate_hessian_(H2, small, 3, backend=backend)
    assert torch.isfinite(H1).all() and torch.equal(H1, H2 * scale ** 2)
