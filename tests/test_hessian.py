"""Hessian accumulation: reference exact values, kernel vs reference, bad input, GPU accuracy at LLM sizes."""
import pytest
import torch

import sparsity_engine as se
from helpers import KERNEL_DEVICE, assert_rel_close, poison_like, rel_err
from sparsity_engine import _dispatch
from sparsity_engine.ops.hessian import batch_rows

KERNEL_DTYPES = [torch.float16, torch.bfloat16]


def _float64_hessian(batches):
    """2/N * sum over batches of X^T X in float64, N = batch rows: the running average written out."""
    total = sum(batch_rows(x) for x in batches)
    cols = batches[0].shape[-1]
    H = torch.zeros(cols, cols, dtype=torch.float64, device=batches[0].device)
    for x in batches:
        X = x.reshape(-1, cols).double()
        H += X.t() @ X
    return H * (2.0 / total), total


def _sym(cols, device="cpu"):
    A = torch.randn(cols, cols, device=device)
    return A + A.t()


# ---------------------------------------------------------------- reference: exact values

def test_reference_hand_example():
    H = torch.zeros(2, 2)
    # batch 1: one batch row (2-D) of two tokens; X^T X = [[10, 14], [14, 20]]; n: 0 -> 1
    n = se.accumulate_hessian_(H, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0, backend="reference")
    assert n == 1
    assert torch.equal(H, torch.tensor([[20.0, 28.0], [28.0, 40.0]]))
    # batch 2: two batch rows of one token each; X^T X = I; H = H * 1/3 + 2/3 * I; n: 1 -> 3
    n = se.accumulate_hessian_(H, torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), n, backend="reference")
    assert n == 3
    expected = torch.tensor([[22.0 / 3, 28.0 / 3], [28.0 / 3, 14.0]])
    torch.testing.assert_close(H, expected, rtol=1e-6, atol=0)


def test_reference_matches_sparsegpt_add_batch_sequence():
    # SparseGPT's add_batch written out in float64: H *= n/(n+b); n += b; X = sqrt(2/n) X; H += X^T X
    batches = [torch.randn(2, 7, 5), torch.randn(7, 5), torch.randn(3, 4, 5)]
    H, n = torch.zeros(5, 5), 0
    H64, n64 = torch.zeros(5, 5, dtype=torch.float64), 0
    for x in batches:
        n = se.accumulate_hessian_(H, x, n, backend="reference")
        b = 1 if x.dim() == 2 else x.shape[0]
        H64 *= n64 / (n64 + b)
        n64 += b
        X = (2.0 / n64) ** 0.5 * x.reshape(-1, 5).double()
        H64 += X.t() @ X
    assert n == n64 == 6
    assert_rel_close(H, H64, 1e-6, "reference vs SparseGPT's sequence")


def test_running_average_equals_explicit_formula():
    acc = se.HessianAccumulator(6, backend="reference")
    batches = [torch.randn(4, 3, 6), torch.randn(9, 6), torch.randn(2, 2, 5, 6)]
    for x in batches:
        acc.add_batch(x)
    expected, total = _float64_hessian(batches)
    assert acc.nsamples == total == 4 + 1 + 4
    assert_rel_close(acc.H, expected, 1e-6, "running average")


def test_batch_rows_convention():
    assert batch_rows(torch.empty(5, 3)) == 1
    assert batch_rows(torch.empty(4, 5, 3)) == 4
    assert batch_rows(torch.empty(2, 3, 5, 3)) == 6


def test_empty_batches():
    H = _sym(4)
    before = H.clone()
    # no batch rows: nothing changes
    assert se.accumulate_hessian_(H, torch.randn(0, 3, 4), 5) == 5
    assert torch.equal(H, before)
    # batch rows without tokens: SparseGPT rescales H and still counts the rows
    assert se.accumulate_hessian_(H, torch.randn(3, 0, 4), 5) == 8
    torch.testing.assert_close(H, before * (5 / 8), rtol=1e-6, atol=0)


def test_fresh_buffer_is_not_read_when_nsamples_is_zero():
    H = torch.full((3, 3), float("nan"))
    x = torch.randn(2, 4, 3)
    assert se.accumulate_hessian_(H, x, 0, backend="reference") == 2
    assert_rel_close(H, _float64_hessian([x])[0], 1e-6, "fresh buffer")


def test_input_not_modified_and_grad_inputs_accepted():
    x = torch.randn(2, 5, 4, requires_grad=True)
    keep = x.detach().clone()
    acc = se.HessianAccumulator(4)
    acc.add_batch(x)
    assert torch.equal(x.detach(), keep)
    assert not acc.H.requires_grad


# ---------------------------------------------------------------- kernel vs reference (interpreter on CPU)

def _compare(x, nsamples, H0, what):
    """Run the reference and the Triton kernel from the same H0; return both results."""
    Hr, Ht = H0.clone(), H0.clone()
    nr = se.accumulate_hessian_(Hr, x, nsamples, backend="reference")
    nt = se.accumulate_hessian_(Ht, x, nsamples, backend="triton")
    assert nr == nt == nsamples + batch_rows(x), what
    assert torch.isfinite(Ht).all(), f"{what}: elements left unwritten"
    assert_rel_close(Ht, Hr, 1e-5, what)
    return Hr, Ht


@pytest.mark.parametrize("cols,tokens,batch,dtype", [
    (1, 1, 1, torch.bfloat16),
    (1, 33, 3, torch.float16),
    (17, 1, 2, torch.float16),
    (17, 33, 2, torch.bfloat16),
    (64, 33, 1, torch.bfloat16),
    (64, 1, 3, torch.float16),
    (130, 33, 1, torch.float16),
    (130, 33, 3, torch.bfloat16),
])
@pytest.mark.parametrize("nsamples", [0, 3])
def test_kernel_matches_reference(cols, tokens, batch, dtype, nsamples):
    x = torch.randn(batch, tokens, cols, device=KERNEL_DEVICE).to(dtype)
    # nsamples == 0: H is poisoned (never read, every element must be written); else a symmetric H
    H0 = poison_like(torch.empty(cols, cols, device=KERNEL_DEVICE)) if nsamples == 0 else _sym(cols, KERNEL_DEVICE)
    _, Ht = _compare(x, nsamples, H0, f"cols={cols} tokens={tokens} batch={batch} {dtype}")
    assert torch.equal(Ht, Ht.t()), "H must be exactly symmetric"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_several_batches_in_a_row(dtype):
    batches = [torch.randn(2, 33, 40, device=KERNEL_DEVICE).to(dtype) + 1.0,  # 3-D, mean-shifted
               torch.randn(17, 40, device=KERNEL_DEVICE).to(dtype),  # 2-D: one batch row
               torch.randn(3, 5, 40, device=KERNEL_DEVICE).to(dtype)]
    ref = se.HessianAccumulator(40, device=KERNEL_DEVICE, backend="reference")
    ker = se.HessianAccumulator(40, device=KERNEL_DEVICE, backend="triton")
    for x in batches:
        ref.add_batch(x)
        ker.add_batch(x)
        assert ker.nsamples == ref.nsamples
        assert_rel_close(ker.H, ref.H, 1e-5, f"after {ker.nsamples} batch rows")
        assert torch.equal(ker.H, ker.H.t())
    assert_rel_close(ker.H, _float64_hessian(batches)[0], 1e-5, "vs float64")


@pytest.mark.parametrize("layout", ["token_stride", "batch_gap", "column_stride", "4d_copy"])
def test_kernel_strided_inputs(layout):
    base = torch.randn(3, 40, 2 * 24, device=KERNEL_DEVICE).to(torch.bfloat16)
    if layout == "token_stride":  # every other token: stride_t = 2 * row
        x = base[:1, ::2, :24]
    elif layout == "batch_gap":  # batch rows that are not back to back: the kernel's non-flat path
        x = base[:, :33, :24]
    elif layout == "column_stride":  # every other column
        x = base[:, :7, ::2]
    else:  # [2, 3, T, C] built from a transpose: flattening the leading dims needs a copy
        x = base[:2, :18, :24].reshape(2, 3, 6, 24).transpose(0, 1)
    assert not x.is_contiguous()
    _compare(x, 2, _sym(24, KERNEL_DEVICE), layout)


def test_float32_inputs_run_the_reference():
    H = torch.zeros(8, 8, device=KERNEL_DEVICE)
    x = torch.randn(2, 5, 8, device=KERNEL_DEVICE)
    with pytest.raises(se.BackendUnavailableError, match="float32"):
        se.accumulate_hessian_(H, x, 0, backend="triton")
    impl = _dispatch.choose("accumulate_hessian", None, H, x, 0)
    assert impl.backend == "reference"
    x16 = x.to(torch.bfloat16)
    expected = "triton" if KERNEL_DEVICE == "cuda" else "reference"  # auto picks Triton only on CUDA
    assert _dispatch.choose("accumulate_hessian", None, H, x16, 0).backend == expected


def test_triton_empty_token_batch_rescales():
    H = _sym(20, KERNEL_DEVICE)
    before = H.clone()
    n = se.accumulate_hessian_(H, torch.randn(2, 0, 20, device=KERNEL_DEVICE).to(torch.bfloat16), 6,
                               backend="triton")
    assert n == 8
    torch.testing.assert_close(H, before * (6 / 8), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- accumulator lifecycle

def test_accumulator_reset_and_free():
    acc = se.HessianAccumulator(5)
    x = torch.randn(3, 4, 5)
    acc.add_batch(x)
    acc.reset()
    assert acc.nsamples == 0 and torch.count_nonzero(acc.H) == 0
    acc.add_batch(x)
    assert_rel_close(acc.H, _float64_hessian([x])[0], 1e-6, "after reset")
    acc.free()
    with pytest.raises(RuntimeError, match="free"):
        acc.add_batch(x)
    with pytest.raises(RuntimeError, match="free"):
        acc.H  # noqa: B018
    acc.reset()
    acc.add_batch(x)
    assert acc.nsamples == 3 and acc.H.shape == (5, 5) and acc.H.dtype == torch.float32


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("H,inp,n,err", [
    (torch.zeros(4, 4, dtype=torch.float64), torch.randn(3, 4), 0, "H must have dtype"),
    (torch.zeros(4, 5), torch.randn(3, 4), 0, "H must be a non-empty square"),
    (torch.zeros(0, 0), torch.randn(3, 0), 0, "H must be a non-empty square"),
    (torch.zeros(8, 8)[::2, ::2], torch.randn(3, 4), 0, "H must be contiguous"),
    (torch.zeros(4), torch.randn(3, 4), 0, "H must be 2-D"),
    ([[0.0]], torch.randn(3, 1), 0, "H must be a torch.Tensor"),
    (torch.zeros(4, 4), torch.randn(3, 5), 0, "inp must have 4 columns"),
    (torch.zeros(4, 4), torch.randn(4), 0, "inp must have at least 2"),
    (torch.zeros(4, 4), torch.ones(3, 4, dtype=torch.int32), 0, "inp must have dtype"),
    (torch.zeros(4, 4), torch.tensor([[1.0, float("nan"), 0.0, 1.0]]), 0, "inp contains 1 NaN"),
    (torch.zeros(4, 4), torch.tensor([[[1.0, 2.0, float("inf"), 1.0]]]).to(torch.bfloat16), 0, "inp contains 1 NaN/Inf"),
    (torch.full((4, 4), float("nan")), torch.randn(3, 4), 2, "H contains 16 NaN"),
    (torch.zeros(4, 4), torch.randn(3, 4), -1, "nsamples must be >= 0"),
    (torch.zeros(4, 4), torch.randn(3, 4), 1.0, "nsamples must be an int"),
])
def test_bad_input(H, inp, n, err):
    with pytest.raises((ValueError, TypeError), match=err):
        se.accumulate_hessian_(H, inp, n)


def test_accumulator_bad_input():
    with pytest.raises(ValueError, match="columns must be >= 1"):
        se.HessianAccumulator(0)
    with pytest.raises(TypeError, match="columns must be an int"):
        se.HessianAccumulator(4.0)
    acc = se.HessianAccumulator(4)
    with pytest.raises(ValueError, match="inp must have 4 columns"):
        acc.add_batch(torch.randn(2, 3))
    x = torch.randn(2, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="inp contains"):
        acc.add_batch(x)
    assert acc.nsamples == 0 and torch.count_nonzero(acc.H) == 0  # a rejected batch changes nothing


# ---------------------------------------------------------------- GPU: LLM sizes, accuracy vs float64

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shift", [0.0, 2.0])
def test_cuda_llm_size_matches_float64(dtype, shift):
    x = (torch.randn(4, 512, 4096, device="cuda") + shift).to(dtype)
    acc = se.HessianAccumulator(4096, device="cuda")
    acc.add_batch(x)
    assert acc.nsamples == 4
    expected, _ = _float64_hessian([x])
    assert_rel_close(acc.H, expected, 1e-5, f"{dtype} shift={shift}")
    assert torch.equal(acc.H, acc.H.t())


@pytest.mark.cuda
def test_cuda_long_token_stream_stays_fp32_accurate():
    # 65536 tokens: tensor-core accumulation alone drifts here; the chunked fp32 promotion must hold 1e-5
    x = (torch.randn(32, 2048, 512, device="cuda") + 1.0).to(torch.bfloat16)
    H = torch.empty(512, 512, device="cuda")
    assert se.accumulate_hessian_(H, x, 0, backend="triton") == 32
    assert_rel_close(H, _float64_hessian([x])[0], 1e-5, "65536 tokens")
    assert rel_err(torch.diagonal(H), torch.diagonal(_float64_hessian([x])[0])) <= 1e-5


@pytest.mark.cuda
def test_cuda_sequence_ragged_cols_and_strides():
    cols = 1000  # not a multiple of the tile
    base = torch.randn(3, 700, cols + 24, device="cuda").to(torch.bfloat16)
    batches = [base[:, :650, :cols], base[0, :, :cols], base[1:, ::3, 24:]]
    ref = se.HessianAccumulator(cols, device="cuda", backend="reference")
    ker = se.HessianAccumulator(cols, device="cuda", backend="triton")
    for x in batches:
        ref.add_batch(x)
        ker.add_batch(x)
        assert_rel_close(ker.H, ref.H, 1e-5, f"after {ker.nsamples} rows")
    assert_rel_close(ker.H, _float64_hessian(batches)[0], 1e-5, "vs float64")
    assert torch.equal(ker.H, ker.H.t())


@pytest.mark.cuda
def test_cuda_float32_stays_exact_with_tf32_switched_on():
    x = torch.randn(2, 2048, 1024, device="cuda")
    H = torch.zeros(1024, 1024, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        se.accumulate_hessian_(H, x, 0)
        assert torch.backends.cuda.matmul.allow_tf32  # the user's setting is restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_rel_close(H, _float64_hessian([x])[0], 1e-5, "fp32 with TF32 on globally")


@pytest.mark.cuda
def test_cuda_device_mismatch():
    with pytest.raises(ValueError, match="one device"):
        se.accumulate_hessian_(torch.zeros(4, 4), torch.randn(3, 4, device="cuda"), 0)
