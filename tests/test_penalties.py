"""Penalties: reference exact values and gradient properties; fused Triton forward/backward vs the reference."""
import math

import pytest
import torch

import sparsity_engine as se
from helpers import KERNEL_DEVICE, RTOL, assert_rel_close

PENALTIES = {
    "smooth_l0": lambda c, **kw: se.smooth_l0_penalty(c, 0.3, **kw),
    "lp_0.5": lambda c, **kw: se.lp_penalty(c, 0.5, eps=1e-6, **kw),
    "lp_1.3": lambda c, **kw: se.lp_penalty(c, 1.3, **kw),
    "lp_2": lambda c, **kw: se.lp_penalty(c, 2.0, **kw),
}


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every float tensor allocated with torch.empty / empty_like starts as NaN, so unwritten outputs fail."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))


# ---------------------------------------------------------------- reference: exact values, gradients

def test_smooth_l0_hand_values():
    c = torch.tensor([0.0, 0.5, -1.0, 1.5])
    got = se.smooth_l0_penalty(c, 0.5, reduction="none", backend="reference")
    assert torch.allclose(got, torch.tensor([0.0, 0.5, 0.8, 0.9]), rtol=0, atol=1e-7)
    assert se.smooth_l0_penalty(c, 0.5, backend="reference").item() == pytest.approx(2.2, abs=1e-6)
    assert se.smooth_l0_penalty(c, 0.5, reduction="mean", backend="reference").item() == pytest.approx(0.55, abs=1e-7)


def test_smooth_l0_gradient_zero_at_zero_and_bounded_peak():
    gamma = 0.25
    c = torch.linspace(-3, 3, 600001, dtype=torch.float64, requires_grad=True)
    se.smooth_l0_penalty(c, gamma, backend="reference").backward()
    g = c.grad
    peak = 3 * math.sqrt(3) / (8 * gamma)  # max of 2 c g^2 / (c^2 + g^2)^2, at c = gamma / sqrt(3)
    assert g.abs().max().item() == pytest.approx(peak, rel=1e-8)
    assert c[g.argmax()].item() == pytest.approx(gamma / math.sqrt(3), abs=2e-5)
    assert peak * gamma == pytest.approx(0.6495, abs=1e-4)
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    se.smooth_l0_penalty(z, gamma, backend="reference").backward()
    assert z.grad.item() == 0.0


def test_lp_values_and_finite_gradient_at_zero():
    c = torch.tensor([0.0, 2.0, -3.0], dtype=torch.float64, requires_grad=True)
    v = se.lp_penalty(c, 2.0, reduction="none", backend="reference")
    assert torch.allclose(v, c.detach() ** 2, atol=1e-12)  # p = 2 is exactly c^2
    v1 = se.lp_penalty(c, 1.0, eps=1e-12, reduction="none", backend="reference")
    assert torch.allclose(v1, c.detach().abs(), atol=1e-6)  # ~|c| for |c| >> sqrt(eps)
    for p in (0.1, 0.5, 1.0, 1.7):
        c.grad = None
        se.lp_penalty(c, p, backend="reference").backward()
        assert torch.isfinite(c.grad).all() and c.grad[0].item() == 0.0
        assert c.grad[1].item() == pytest.approx(p * 2.0 ** (p - 1), rel=1e-6)
    # near zero the gradient is large but finite (|c|^p's would be infinite)
    t = torch.tensor([1e-7], dtype=torch.float64, requires_grad=True)
    se.lp_penalty(t, 0.5, eps=1e-8, backend="reference").backward()
    assert math.isfinite(t.grad.item()) and 0 < t.grad.item() < 0.5 * 1e-8 ** -0.25


@pytest.mark.parametrize("name", list(PENALTIES))
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reference_gradcheck_float64(name, reduction):
    c = (torch.randn(13, dtype=torch.float64) * 0.7).requires_grad_()
    fn = lambda x: PENALTIES[name](x, reduction=reduction, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (c,))


# ---------------------------------------------------------------- kernels vs reference

def _fwd_bwd(name, c, reduction, backend):
    x = c.detach().clone().requires_grad_()
    y = PENALTIES[name](x, reduction=reduction, backend=backend)
    g = torch.randn(y.shape, dtype=y.dtype, device=y.device) if reduction == "none" else torch.tensor(
        1.7, dtype=y.dtype, device=y.device)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("name", list(PENALTIES))
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (4097,), (2, 4099)])
def test_triton_matches_reference(name, reduction, dtype, shape, poisoned_allocations):
    c = (torch.randn(shape, device=KERNEL_DEVICE) * 0.5).to(dtype)
    before = c.clone()
    torch.manual_seed(1)
    y_ref, g_ref = _fwd_bwd(name, c, reduction, "reference")
    torch.manual_seed(1)
    y, g = _fwd_bwd(name, c, reduction, "triton")
    assert torch.equal(c, before)  # input untouched
    assert y.dtype == y_ref.dtype and g.dtype == dtype
    # sums of fp32 values: fp32 tolerance even for half inputs (both compute in fp32 from the same values)
    rtol_y = RTOL[torch.float32] * 10 if reduction != "none" else RTOL[dtype]
    assert_rel_close(y, y_ref, rtol_y, "forward")
    assert_rel_close(g, g_ref, RTOL[dtype], "gradient")


@pytest.mark.parametrize("name", list(PENALTIES))
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_triton_gradcheck_float64(name, reduction):
    c = (torch.randn(9, dtype=torch.float64, device=KERNEL_DEVICE) * 0.7).requires_grad_()
    fn = lambda x: PENALTIES[name](x, reduction=reduction, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (c,))
    # and the kernel's float64 values equal the reference's
    torch.manual_seed(2)
    y_ref, g_ref = _fwd_bwd(name, c, reduction, "reference")
    torch.manual_seed(2)
    y, g = _fwd_bwd(name, c, reduction, "triton")
    assert_rel_close(y, y_ref, 1e-12, "forward")
    assert_rel_close(g, g_ref, 1e-10, "gradient")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_and_noncontiguous(backend):
    e = torch.empty(0, 3, device=KERNEL_DEVICE, requires_grad=True)
    y = se.smooth_l0_penalty(e, 1.0, backend=backend)
    assert y.item() == 0.0
    y.backward()
    assert e.grad.shape == (0, 3)
    assert se.lp_penalty(e, 1.0, reduction="none", backend=backend).shape == (0, 3)
    with pytest.raises(ValueError, match="mean"):
        se.lp_penalty(e, 1.0, reduction="mean", backend=backend)
    base = torch.randn(6, 10, device=KERNEL_DEVICE)
    nc = base.t()[::2].requires_grad_()  # non-contiguous, transposed
    got = se.lp_penalty(nc, 0.8, reduction="none", backend=backend)
    assert_rel_close(got, se.lp_penalty(nc.detach().contiguous(), 0.8, reduction="none", backend="reference"),
                     1e-5, "non-contiguous")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_small_gamma_and_large_values_stay_finite(backend):
    # gamma at its lower bound: gamma^2 = 1e-18, (c^2 + gamma^2)^2 close to float32's smallest normal number
    vals = [0.0, 1e-10, -3e-10, 1e-3, 2.0]
    c = torch.tensor(vals, device=KERNEL_DEVICE, requires_grad=True)
    y = se.smooth_l0_penalty(c, 1e-9, backend=backend)
    y.backward()
    assert torch.isfinite(c.grad).all() and c.grad[0].item() == 0.0
    assert y.item() == pytest.approx(sum(v * v / (v * v + 1e-18) for v in vals), rel=1e-5)
    g = [2 * v * 1e-18 / (v * v + 1e-18) ** 2 for v in vals]
    g = torch.tensor(g, dtype=torch.float64)
    assert_rel_close(c.grad.double().cpu(), g, 1e-5, "gradient")
    if backend == "triton":  # the fused formula is accurate elementwise (autograd's cancels to 0 at c = 1e-3)
        assert torch.allclose(c.grad.double().cpu(), g, rtol=1e-5, atol=0)
    big = torch.tensor([1e15, -1e15], device=KERNEL_DEVICE)
    assert se.smooth_l0_penalty(big, 1.0, backend=backend).item() == pytest.approx(2.0)


def test_auto_backend_runs_everywhere():
    c = torch.randn(33, device=KERNEL_DEVICE)
    expected = se.smooth_l0_penalty(c, 0.2, backend="reference")
    assert_rel_close(se.smooth_l0_penalty(c, 0.2), expected, 1e-5, "auto")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bad_input(backend):
    c = torch.randn(5, device=KERNEL_DEVICE)
    for gamma in (0, -1.0, float("nan"), float("inf"), 1e-10):
        with pytest.raises(ValueError, match="gamma"):
            se.smooth_l0_penalty(c, gamma, backend=backend)
    with pytest.raises(TypeError, match="gamma"):
        se.smooth_l0_penalty(c, "1", backend=backend)
    for p in (0, -0.5, 2.0001, float("nan")):
        with pytest.raises(ValueError, match="p must"):
            se.lp_penalty(c, p, backend=backend)
    for eps in (0, -1e-8, 1e-40):
        with pytest.raises(ValueError, match="eps"):
            se.lp_penalty(c, 1.0, eps=eps, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        se.lp_penalty(c, 1.0, reduction="max", backend=backend)
    with pytest.raises(TypeError, match="c must"):
        se.smooth_l0_penalty(torch.ones(3, dtype=torch.int64), 1.0, backend=backend)
    with pytest.raises(TypeError, match="c must"):
        se.smooth_l0_penalty([1.0], 1.0, backend=backend)
    for bad in (float("nan"), float("inf")):
        d = c.clone()
        d[2] = bad
        for reduction in ("sum", "mean", "none"):
            with pytest.raises(ValueError, match="c .*NaN/Inf|NaN/Inf.*c must be finite"):
                se.smooth_l0_penalty(d, 1.0, reduction=reduction, backend=backend)
            with pytest.raises(ValueError, match="NaN/Inf"):
                se.lp_penalty(d, 0.5, reduction=reduction, backend=backend)


# ---------------------------------------------------------------- annealing

def test_anneal_schedule_values():
    for kind in ("linear", "cosine", "exponential"):
        assert se.anneal_schedule(0, 10, 1.0, 0.01, kind=kind) == 1.0
        assert se.anneal_schedule(10, 10, 1.0, 0.01, kind=kind) == 0.01
        assert se.anneal_schedule(25, 10, 1.0, 0.01, kind=kind) == 0.01  # past the end holds `end`
        vals = [se.anneal_schedule(s, 10, 1.0, 0.01, kind=kind) for s in range(11)]
        assert all(a > b for a, b in zip(vals, vals[1:]))  # monotone
    assert se.anneal_schedule(5, 10, 2.0, 1.0) == pytest.approx(1.5)
    assert se.anneal_schedule(5, 10, 2.0, 1.0, kind="cosine") == pytest.approx(1.5)
    assert se.anneal_schedule(2, 10, 2.0, 1.0, kind="cosine") == pytest.approx(1 + 0.5 * (1 + math.cos(0.2 * math.pi)))
    assert se.anneal_schedule(5, 10, 1.0, 0.01, kind="exponential") == pytest.approx(0.1)
    assert se.anneal_schedule(3, 4, 0.5, 2.0) == pytest.approx(1.625)  # increasing works too (p annealing)


def test_anneal_schedule_validation():
    with pytest.raises(ValueError, match="step"):
        se.anneal_schedule(-1, 10, 1.0, 0.1)
    with pytest.raises(ValueError, match="total_steps"):
        se.anneal_schedule(0, 0, 1.0, 0.1)
    with pytest.raises(TypeError, match="step"):
        se.anneal_schedule(1.5, 10, 1.0, 0.1)
    with pytest.raises(ValueError, match="kind"):
        se.anneal_schedule(1, 10, 1.0, 0.1, kind="step")
    with pytest.raises(ValueError, match="start"):
        se.anneal_schedule(1, 10, float("nan"), 0.1)
    with pytest.raises(ValueError, match="exponential"):
        se.anneal_schedule(1, 10, 1.0, 0.0, kind="exponential")
    with pytest.raises(ValueError, match="exponential"):
        se.anneal_schedule(1, 10, -1.0, 1.0, kind="exponential")


# ---------------------------------------------------------------- GPU, real size

@pytest.mark.cuda
@pytest.mark.parametrize("name", list(PENALTIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_large(name, dtype, reduction, poisoned_allocations):
    c = (torch.randn(4096 * 1024 + 17, device="cuda") * 0.5).to(dtype)
    torch.manual_seed(3)
    y_ref, g_ref = _fwd_bwd(name, c, reduction, "reference")
    torch.manual_seed(3)
    y, g = _fwd_bwd(name, c, reduction, "triton")
    assert_rel_close(y, y_ref, RTOL[torch.float32] * 10 if reduction == "sum" else RTOL[dtype], "forward")
    assert_rel_close(g, g_ref, RTOL[dtype], "gradient")


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(PENALTIES))
def test_cuda_gradcheck_float64(name):
    c = (torch.randn(4100, dtype=torch.float64, device="cuda") * 0.7).requires_grad_()
    y_ref, g_ref = _fwd_bwd(name, c, "sum", "reference")
    y, g = _fwd_bwd(name, c, "sum", "triton")
    assert_rel_close(y, y_ref, 1e-12, "forward")
    assert_rel_close(g, g_ref, 1e-10, "gradient")
    small = c.detach()[:7].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: PENALTIES[name](x, reduction="mean", backend="triton"), (small,))


def test_triton_double_backward_refuses_clearly():
    c = torch.randn(5, device=KERNEL_DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(se.smooth_l0_penalty(c, 0.5, backend="triton"), c, create_graph=True)
    # the fused backward is first-order only: a second derivative is refused, never silently zero
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()
