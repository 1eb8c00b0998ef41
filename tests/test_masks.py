"""Mask ops: reference exact values and properties; kernels against the reference."""
import pytest
import torch

import sparsity_engine as se
from helpers import KERNEL_DEVICE

KERNEL_BACKENDS = ["triton"] + (["cuda"] if KERNEL_DEVICE == "cuda" else [])


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
