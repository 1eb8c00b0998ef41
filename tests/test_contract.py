"""The contract every kernel backend signs: for every registered op and every backend that implements it, the
backend's function (called as dispatch calls it) gives the reference's result on fresh random inputs, with every
output allocation poisoned. Deterministic ops must agree exactly (or to the dtype's rounding where the
arithmetic is reordered); random ops (their draws differ by design) must keep the same entries' values and the
same keep rate. Each family's own tests go deeper (sizes, ties, edge cases); this file makes sure no backend of
no op is left out: an op registered without a case here fails ``test_every_registered_op_has_a_case``."""
import math

import pytest
import torch

import sparsity_engine as se
from helpers import HAS_CUDA, KERNEL_DEVICE, RTOL, assert_rel_close
from sparsity_engine import _dispatch

se.backends()  # imports every op family, so the registry is complete
DEV = KERNEL_DEVICE


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def _same(got, expected):
    assert type(got) is type(expected)
    if isinstance(got, torch.Tensor):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert torch.equal(got, expected)
    elif isinstance(got, (tuple, list)):
        for g, e in zip(got, expected):
            _same(g, e)
    else:
        assert got == expected


def _close(rtol):
    def check(got, expected):
        assert_rel_close(got.float(), expected.float(), rtol)
    return check


def _binomial_ok(kept: int, n: int, p: float) -> bool:
    return abs(kept - n * p) <= 6.0 * math.sqrt(n * p * (1 - p)) + 1  # 6 sigma: ~2e-9 per fair draw


# ---------------------------------------------------------------- cases: op -> (args, kwargs, compare)

def _nm_mask():
    return (_rand(16, 24, dtype=torch.bfloat16), 2, 4), {}, _same


def _topk_mask():
    x = _rand(20, 30)
    x.view(-1)[::7] = x.view(-1)[3]  # ties at the edge
    return (x, 217, None), {}, _same


def _magnitude_prune():
    return (_rand(20, 30, dtype=torch.float16), 250, "l2"), {}, _close(RTOL[torch.float16])


def _select_edges():
    n = 3000
    base = _rand(n, dtype=torch.bfloat16)
    inputs = [(base.float() + torch.randint(-2, 3, (n,), device=DEV) * 0.5).to(torch.bfloat16),  # many ties
              _rand(n, dtype=torch.bfloat16)]
    out = torch.empty((2, 4), dtype=torch.int32, device=DEV)
    rows = [(0, 700, False, 0), (0, 2100, True, 1), (1, 1, False, 2), (1, n - 1, True, 3)]

    def call_result(fn):  # an out-parameter op: compare what it wrote
        o = torch.empty_like(out)
        fn(inputs, base, rows, True, o)
        return o
    return call_result, None, _same


def _dare():
    x = _rand(64, 64).abs() + 0.5  # no zeros: a zero output means dropped

    def compare(got, expected):
        kept = got != 0
        assert _binomial_ok(int(kept.sum()), x.numel(), 0.3)
        assert torch.allclose(got[kept], x[kept] / 0.3, rtol=1e-6)
    return (x, 0.3, True, None), {}, compare


def _keep_with_probabilities():
    x = _rand(64, 64).abs() + 0.5
    probs = torch.rand(64, 64, device=DEV)

    def compare(got, expected):
        kept = got != 0
        assert torch.equal(got[kept], x[kept])
        assert abs(int(kept.sum()) - float(probs.sum())) <= 6.0 * math.sqrt(float((probs * (1 - probs)).sum())) + 1
    return (x, probs, 1234), {}, compare


def _della_magprune():
    x = _rand(32, 128).abs() + 0.5

    def compare(got, expected):
        kept = got != 0
        assert torch.equal(got[kept], x[kept])  # no rescale: kept entries keep their value
        assert _binomial_ok(int(kept.sum()), x.numel(), 0.4)
    return (x, 0.4, 0.1, None, None), {}, compare


def _della_deltas():
    base = _rand(16, 64, dtype=torch.bfloat16)
    ts = [(base.float() + 0.1 * torch.randn(16, 64, device=DEV) + 0.05).to(torch.bfloat16) for _ in range(3)]
    lo, span, active = [0.2, 0.4, 0.0], [0.2, 0.2, 0.0], [True, True, False]

    def compare(got, expected):
        (deltas, parts), (_, ref_parts) = got, expected
        for i in range(3):
            d, full = deltas[i], ts[i] - base
            kept = d != 0
            assert torch.equal(d[kept], full[kept])
            if not active[i]:
                assert torch.equal(d, full)
        for i in range(2):  # keep rates of the active models: probabilities lo .. lo + span by rank
            nz = int((ts[i] - base != 0).sum())
            assert _binomial_ok(int((deltas[i] != 0).sum()), nz, lo[i] + span[i] / 2)
        # norm terms (l1) before the mask equal the reference's; after the mask, those of the deltas returned
        assert_rel_close(parts[:, 0].sum(0), ref_parts[:, 0].sum(0), 1e-5)
        assert_rel_close(parts[:, 1].sum(0), deltas.float().abs().sum(dim=(1, 2)), 1e-5)
    return (base, ts, lo, span, [5, 6, 7], active, "l1"), {}, compare


def _ties_consensus():
    d = _rand(3, 17, 9, dtype=torch.float16)
    d.view(-1)[::5] = 0
    return (d, "count"), {}, _same


def _magnitude_outliers():
    return (_rand(40, 50), 0.3, 0.05, None), {}, _same


def _merge_task_vectors():
    base = _rand(30, 70, dtype=torch.bfloat16)
    ts = [(base.float() + 0.05 * torch.randn(30, 70, device=DEV)).to(torch.bfloat16) for _ in range(3)]
    kw = dict(spars="magnitude", consensus="sum", densities=[0.3, 0.5, 1.0], epsilons=[0.1] * 3, gammas=[0.01] * 3,
              lambda_=1.2, normalize=True, rescale_norm=None, generator=None)
    return (base, ts, [1.0, 0.6, -0.4]), kw, _same


def _accumulate_hessian():
    x = _rand(2, 40, 48, dtype=torch.bfloat16)
    H0 = _rand(48, 48)
    H0 = H0 @ H0.T

    def call_result(fn):  # in place: compare the updated H and the count
        H = H0.clone()
        n = fn(H, x, 3)
        return H, n

    def compare(got, expected):
        assert got[1] == expected[1]
        assert_rel_close(got[0], expected[0], RTOL[torch.float32])
    return call_result, None, compare


def _sparsegpt_prune():
    # a diagonal Hessian: no compensation, so every mask choice is decided by distinct scores w^2 h_j
    W = _rand(16, 64)
    H = torch.diag(torch.rand(64, device=DEV) + 0.5)

    def compare(got, expected):
        assert torch.equal(got.mask, expected.mask)
        assert_rel_close(got.weight, expected.weight, RTOL[torch.float32])
        assert_rel_close(got.loss, expected.loss, 1e-4)
    return (W, H, 0.5, 0, 0, 32, 0.01), {}, compare


def _csr_linear():
    from sparsity_engine.ops.csr import to_csr

    W = _rand(24, 40, dtype=torch.float16)
    W[torch.rand(24, 40, device=DEV) < 0.7] = 0
    csr = to_csr(W, backend="reference")
    return (_rand(5, 40, dtype=torch.float16), csr, _rand(24, dtype=torch.float16)), {}, _close(RTOL[torch.float16])


def _csr_to_dense():
    from sparsity_engine.ops.csr import to_csr

    W = _rand(24, 40, dtype=torch.bfloat16)
    W[torch.rand(24, 40, device=DEV) < 0.6] = 0
    W[3] = 0  # an empty row
    return (to_csr(W, backend="reference"),), {}, _same


def _to_csr():
    W = _rand(9, 20)
    W[W.abs() < 0.8] = 0

    def compare(got, expected):
        assert torch.equal(got.to_dense(), expected.to_dense())
    return (W, torch.int16), {}, compare


def _importance_scores():
    return (_rand(8, 30), torch.rand(30, device=DEV) + 0.1), {}, _close(RTOL[torch.float32])


def _penalty(name, *extra):
    def case():
        return (_rand(50, 60),) + extra + ("sum",), {}, _close(1e-5)
    return case



def _to_bitmap():
    W = _rand(40, 150, dtype=torch.bfloat16)   # N, K not multiples of the 16x16 tile
    W[torch.rand(40, 150, device=DEV) < 0.6] = 0

    def compare(got, expected):
        assert torch.equal(got.to_dense(), expected.to_dense())
        assert torch.equal(got.masks, expected.masks) and torch.equal(got.offsets, expected.offsets)
    return (W,), {}, compare


def _bitmap_linear():
    from sparsity_engine.ops.bitmap import to_bitmap

    W = _rand(40, 150, dtype=torch.float16)
    W[torch.rand(40, 150, device=DEV) < 0.7] = 0
    bm = to_bitmap(W, backend="reference")
    return (_rand(5, 150, dtype=torch.float16), bm, _rand(40, dtype=torch.float16)), {}, _close(RTOL[torch.float16])

CASES = {
    "nm_mask": _nm_mask,
    "topk_mask": _topk_mask,
    "magnitude_prune": _magnitude_prune,
    "select_edges": _select_edges,
    "dare": _dare,
    "keep_with_probabilities": _keep_with_probabilities,
    "della_magprune": _della_magprune,
    "della_deltas": _della_deltas,
    "ties_consensus": _ties_consensus,
    "magnitude_outliers": _magnitude_outliers,
    "merge_task_vectors": _merge_task_vectors,
    "accumulate_hessian": _accumulate_hessian,
    "sparsegpt_prune": _sparsegpt_prune,
    "csr_linear": _csr_linear,
    "to_csr": _to_csr,
    "to_bitmap": _to_bitmap,
    "bitmap_linear": _bitmap_linear,
    "csr_to_dense": _csr_to_dense,
    "importance_scores": _importance_scores,
    "smooth_l0_penalty": _penalty("smooth_l0_penalty", 0.5),
    "lp_penalty": _penalty("lp_penalty", 0.5, 1e-8),
}


def _pairs():
    for op, backends in _dispatch.registered_ops().items():
        for backend in backends:
            if backend == "reference":
                continue
            marks = [pytest.mark.cuda] if backend == "cuda" else []
            yield pytest.param(op, backend, marks=marks, id=f"{op}-{backend}")


def test_every_registered_op_has_a_case():
    assert set(_dispatch.registered_ops()) <= set(CASES), set(_dispatch.registered_ops()) - set(CASES)


@pytest.mark.parametrize("op,backend", list(_pairs()))
def test_backend_matches_reference(op, backend, poison_outputs):
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    args, kwargs, compare = CASES[op]()
    impl, ref = _dispatch.implementation(op, backend), _dispatch.implementation(op, "reference")
    if callable(args):  # in-place / out-parameter ops: the case calls the function and returns what it wrote
        got, expected = args(impl.fn), args(ref.fn)
    else:
        assert not impl.reasons(args, kwargs, auto=False), impl.reasons(args, kwargs, auto=False)
        got, expected = impl.fn(*args, **kwargs), ref.fn(*args, **kwargs)
    compare(got, expected)
