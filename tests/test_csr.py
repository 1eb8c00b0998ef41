"""CSR format and csr_linear: conversion round trips, reference exactness, kernels against the reference."""
import os

import pytest
import torch
import torch.nn.functional as F

import sparsity_engine as se
from helpers import HAS_CUDA, KERNEL_DEVICE, RTOL, assert_rel_close, poison_like
from sparsity_engine.ops.csr import ALIGN, CSRMatrix, prefer_dense
from sparsity_engine.ops.csr import tiles as tiles_mod
from sparsity_engine.ops.csr.tiles import TILE_COLS, TILE_ROWS, tile_layout, tiles_to_dense

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# kernels accumulate in fp32 but the reference (F.linear) rounds per its own order: fp32 gets a little slack
KTOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def pruned(n, k, density, dtype=torch.float32, device="cpu", empty_rows=(), dense_rows=()):
    """Random weight [n, k] with about ``density`` nonzeros; chosen rows all zero or all nonzero."""
    w = torch.randn(n, k, device=device)
    w = torch.where(torch.rand(n, k, device=device) < density, w, torch.zeros((), device=device))
    for r in empty_rows:
        w[r] = 0
    for r in dense_rows:
        w[r] = torch.randn(k, device=device) + 3.0  # never exactly zero
    return w.to(dtype)


SHAPES = [  # (n, k, density, empty rows, dense rows)
    (17, 23, 0.4, (0, 5), (3,)),
    (1, 40, 0.3, (), ()),
    (40, 1, 0.5, (2,), (7,)),
    (33, 70, 0.1, (32,), (0,)),
    (8, 16, 1.0, (), ()),
]


# ---------------------------------------------------------------- format and conversion

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,density,empty,dense", SHAPES)
def test_to_csr_round_trip_and_layout(dtype, n, k, density, empty, dense):
    w = pruned(n, k, density, dtype, empty_rows=empty, dense_rows=dense)
    csr = se.to_csr(w)
    assert torch.equal(csr.to_dense(), w)
    assert csr.values.dtype == dtype and csr.col_indices.dtype == torch.int16
    assert csr.nnz == int((w != 0).sum()) and csr.shape == (n, k)
    crow = csr.crow_indices
    assert (crow % ALIGN == 0).all() and (crow.diff() >= csr.row_lengths.long()).all()
    assert (crow.diff() - csr.row_lengths.long() < ALIGN).all()
    assert torch.equal(csr.row_lengths.long(), (w != 0).sum(1))
    lengths_in_order = csr.row_lengths[csr.row_order.long()]
    assert (lengths_in_order[:-1] >= lengths_in_order[1:]).all()
    assert sorted(csr.row_order.tolist()) == list(range(n))
    assert torch.equal(csr.to_torch_sparse().to_dense(), w)
    # columns ascending inside each row, values exactly the nonzeros
    for r in range(n):
        s, length = int(crow[r]), int(csr.row_lengths[r])
        cols = csr.col_indices[s:s + length].long()
        assert torch.equal(cols, (w[r] != 0).nonzero().flatten())
        assert torch.equal(csr.values[s:s + length], w[r, cols])


def test_to_csr_index_dtype_choice():
    wide = pruned(2, 40000, 0.01)
    assert se.to_csr(wide).col_indices.dtype == torch.int32
    assert torch.equal(se.to_csr(wide).to_dense(), wide)
    assert se.to_csr(pruned(2, 32767, 0.01)).col_indices.dtype == torch.int16
    assert se.to_csr(pruned(3, 9, 0.5), index_dtype=torch.int32).col_indices.dtype == torch.int32
    with pytest.raises(ValueError, match="index_dtype int16"):
        se.to_csr(wide, index_dtype=torch.int16)


def test_to_csr_all_zero_and_does_not_modify_input():
    w = torch.zeros(5, 9)
    csr = se.to_csr(w)
    assert csr.nnz == 0 and csr.values.numel() == 0 and torch.equal(csr.to_dense(), w)
    w2 = pruned(6, 10, 0.5)
    before = w2.clone()
    se.to_csr(w2)
    assert torch.equal(w2, before)


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    w = pruned(21, 37, 0.3, torch.bfloat16, empty_rows=(4,))
    csr = se.to_csr(w)
    path = str(tmp_path / "w.safetensors")
    save_file(csr.to_state_dict("layer."), path)
    back = CSRMatrix.from_state_dict(load_file(path), "layer.")
    assert back.shape == csr.shape and torch.equal(back.to_dense(), w)
    for key in ("crow_indices", "col_indices", "values", "row_lengths", "row_order"):
        assert torch.equal(getattr(back, key), getattr(csr, key))
    with pytest.raises(ValueError, match="missing CSR keys"):
        CSRMatrix.from_state_dict({"values": csr.values})


# ---------------------------------------------------------------- indices checked once, when built or loaded

def _corrupt(csr, key, edit):
    arrays = {k: getattr(csr, k).clone() for k in ("crow_indices", "col_indices", "values", "row_lengths", "row_order")}
    edit(arrays[key])
    return arrays


def _valid_slot(csr):
    """A slot holding a real entry (not row padding)."""
    return int(torch.nonzero(csr.valid_slots())[0, 0])


CORRUPTIONS = [
    ("col_indices", lambda c, csr: c.__setitem__(_valid_slot(csr), -1), "col_indices must lie in"),
    ("col_indices", lambda c, csr: c.__setitem__(_valid_slot(csr), csr.shape[1]), "col_indices must lie in"),
    ("crow_indices", lambda c, csr: c.__setitem__(-1, c[-1] + ALIGN), "crow_indices must"),        # past the end
    ("crow_indices", lambda c, csr: c.__setitem__(2, c[3] + ALIGN), "crow_indices must"),         # decreasing
    ("crow_indices", lambda c, csr: c.__setitem__(1, c[1] + 1), "crow_indices must"),              # unaligned
    ("row_lengths", lambda c, csr: c.__setitem__(0, c[0] + ALIGN), "row_lengths must"),            # past its row
    ("row_lengths", lambda c, csr: c.__setitem__(1, -1), "row_lengths must"),
    ("row_order", lambda c, csr: c.__setitem__(0, c[1]), "row_order must be a permutation"),       # a repeat
    ("row_order", lambda c, csr: c.__setitem__(0, csr.shape[0]), "row_order must be a permutation"),
]


@pytest.mark.parametrize("key,edit,err", CORRUPTIONS)
def test_bad_indices_are_refused_when_built_or_loaded(key, edit, err):
    """Indices the kernels would read out of bounds with (or the reference would scatter wrongly) are refused
    by CSRMatrix itself, by from_state_dict and by CSRLinear.load_state_dict, never at call time."""
    w = pruned(8, 40, 0.5, torch.float16)
    csr = se.to_csr(w)
    arrays = _corrupt(csr, key, lambda t: edit(t, csr))
    with pytest.raises(ValueError, match=err):
        CSRMatrix(shape=csr.shape, **arrays)
    sd = dict(arrays, shape=torch.tensor(csr.shape))
    with pytest.raises(ValueError, match=err):
        CSRMatrix.from_state_dict(sd)
    from sparsity_engine.nn import CSRLinear

    layer = CSRLinear(csr)
    with pytest.raises(ValueError, match=err):
        layer.load_state_dict(sd)


# ---------------------------------------------------------------- reference

@pytest.mark.parametrize("n,k,density,empty,dense", SHAPES)
def test_reference_is_exactly_dense_linear_fp32(n, k, density, empty, dense):
    w = pruned(n, k, density, empty_rows=empty, dense_rows=dense)
    b = torch.randn(n)
    x = torch.randn(2, 3, k)
    got = se.csr_linear(x, se.to_csr(w), b, backend="reference")
    assert torch.equal(got, F.linear(x, w, b))


def test_reference_hand_example():
    w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, -1.0]])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    got = se.csr_linear(x, se.to_csr(w), torch.tensor([0.5, 0.0]), backend="reference")
    assert got.tolist() == [[4.5, -2.0]]


# ---------------------------------------------------------------- kernels against the reference

def _check_kernel(backend, w, tokens, dtype, bias=True, lead=None):
    n, k = w.shape
    csr = se.to_csr(w)
    b = torch.randn(n, device=w.device).to(dtype) if bias else None
    shape = (lead, tokens // lead, k) if lead else (tokens, k)
    x = torch.randn(shape, device=w.device).to(dtype)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    poison = poison_like(expected.to(dtype))  # the allocator hands this block to the kernel's output next
    del poison
    got = se.csr_linear(x, csr, b, backend=backend)
    assert got.dtype == dtype and got.shape == (*shape[:-1], n)
    assert_linear_close(got, expected, x, w, b, KTOL[dtype], f"{backend} {tuple(w.shape)} {dtype} tokens={tokens}")


def assert_linear_close(got, expected, x, w, b, rtol, what):
    """|got - expected| <= rtol |expected| (norms), plus 8 fp32 roundings of the norm of the outputs' sums of
    term magnitudes: a lone output (one row, one token) that nearly cancels is off by more than rtol of itself
    from the fp32 sum alone (fp32 (1, 40) with one token failed ~1e-3 of draws). That sum's error measured 2.3
    such roundings at most (20000 draws); a wrong or missing term is off by far more than 8."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    magnitudes = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    err, size = (got.double() - expected).norm().item(), expected.norm().item()
    assert err <= rtol * size + 8 * 2.0 ** -24 * magnitudes.norm().item(), \
        f"{what}: error {err:.3e} against an output of norm {size:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 16, 64])
@pytest.mark.parametrize("n,k,density,empty,dense", SHAPES[:4])
def test_triton_matches_dense(dtype, tokens, n, k, density, empty, dense):
    w = pruned(n, k, density, dtype, KERNEL_DEVICE, empty_rows=empty, dense_rows=dense)
    _check_kernel("triton", w, tokens, dtype, bias=tokens != 3, lead=2 if tokens == 16 else None)


GPU_SHAPES = [(4096, 4096, 0.3), (1000, 3001, 0.1), (2048, 11008, 0.3), (257, 40000, 0.05),
              (3, 130001, 0.02), (1, 4096, 0.5), (4096, 1, 0.5)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 13, 16, 64])
@pytest.mark.parametrize("n,k,density", GPU_SHAPES)
def test_gpu_kernels_match_dense(backend, dtype, tokens, n, k, density):
    if backend == "triton" and tokens not in (1, 3, 16, 64):
        pytest.skip("Triton: one token count per BLOCK_T specialisation is enough")
    w = pruned(n, k, density, dtype, "cuda", empty_rows=(0,) if n > 2 else (), dense_rows=(n - 1,) if n > 2 else ())
    if backend == "cuda" and tokens > 16 and (dtype == torch.float32 or k % 8):
        # neither CUDA kernel takes these: the backend declines by name (auto dispatch picks Triton)
        with pytest.raises(se.BackendUnavailableError, match="more than 16 tokens"):
            se.csr_linear(torch.randn(tokens, k, device="cuda").to(dtype), se.to_csr(w), backend="cuda")
        return
    _check_kernel(backend, w, tokens, dtype)


@pytest.mark.cuda
def test_cuda_rejects_large_batch_and_auto_dispatch_is_right():
    w = pruned(300, 500, 0.2, torch.bfloat16, "cuda")  # 500 columns: not a multiple of 8, no tiles kernel
    csr = se.to_csr(w)
    with pytest.raises(se.BackendUnavailableError, match="more than 16 tokens"):
        se.csr_linear(torch.randn(64, 500, device="cuda", dtype=torch.bfloat16), csr, backend="cuda")
    for tokens in (1, 8, 16, 64, 129, 300):
        for fallback in (None, True, False):
            x = torch.randn(tokens, 500, device="cuda", dtype=torch.bfloat16)
            got = se.csr_linear(x, csr, dense_fallback=fallback)
            assert_rel_close(got, F.linear(x.double(), w.double()), KTOL[torch.bfloat16], f"auto {tokens}")


@pytest.mark.cuda
def test_cuda_misaligned_views_are_handled():
    w = pruned(64, 256, 0.3, torch.float16, "cuda")
    csr = se.to_csr(w)
    shifted = CSRMatrix(csr.crow_indices, torch.cat([csr.col_indices[:1], csr.col_indices])[1:],
                        torch.cat([csr.values[:1], csr.values])[1:], csr.row_lengths, csr.row_order, csr.shape)
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    assert_rel_close(se.csr_linear(x, shifted, backend="cuda"), F.linear(x.double(), w.double()), 5e-3)


# ---------------------------------------------------------------- tile layout and the tensor-core kernel

TILE_SHAPES = [(1, 8, 1.0), (17, 129, 0.4), (40, 256, 0.0), (33, 1000, 0.05), (300, 520, 0.3), (16, 128, 1.0)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,density", TILE_SHAPES)
def test_tile_layout_round_trip(dtype, n, k, density):
    w = pruned(n, k, density, dtype, empty_rows=(0,) if n > 2 else (), dense_rows=(n - 1,) if n > 2 else ())
    w[n // 2, -1] = -0.0 if n > 2 else w[n // 2, -1]  # a negative zero is dropped like any zero
    csr = se.to_csr(w)
    ptr, entries = tile_layout(csr)
    nt = -(-k // TILE_COLS)
    assert ptr.dtype == torch.int64 and entries.dtype == torch.int32
    assert ptr.shape == (-(-n // TILE_ROWS) * nt + 1,) and int(ptr[0]) == 0 and int(ptr[-1]) == entries.numel()
    sizes = ptr.diff()
    assert bool((sizes >= 0).all()) and bool((sizes % 4 == 0).all())
    bands = -(-n // TILE_ROWS)
    padded = torch.zeros(bands * TILE_ROWS, nt * TILE_COLS, dtype=torch.bool)
    padded[:n, :k] = w != 0
    counts = padded.view(bands, TILE_ROWS, nt, TILE_COLS).sum((1, 3)).flatten()
    assert torch.equal(sizes, (counts + 3) // 4 * 4)  # each tile: its nonzeros, padded to a multiple of 4
    assert torch.equal(tiles_to_dense(ptr, entries, (n, k), dtype).view(torch.int16), w.view(torch.int16)
                       .masked_fill(w == 0, 0))
    assert tile_layout(csr)[1] is entries  # cached


def test_tile_layout_is_built_in_chunks_identically(monkeypatch):
    w = pruned(100, 300, 0.3, torch.bfloat16, empty_rows=(20,))
    whole = tile_layout(se.to_csr(w))
    monkeypatch.setattr(tiles_mod, "_BUILD_SLOTS", 2000)  # ~20 rows of ~96 slots: steps of 16 rows
    chunked = tile_layout(se.to_csr(w))
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_tile_layout_rejects_fp32():
    with pytest.raises(TypeError, match="float16/bfloat16"):
        tile_layout(se.to_csr(pruned(4, 8, 0.5)))


def test_use_tiles_crossover():
    from sparsity_engine.ops.csr.cuda import use_tiles
    small, big = (11008, 4096), (28672, 8192)
    assert not use_tiles(2, small, 1.0) and use_tiles(16, big, 0.01) and use_tiles(300, small, 0.01)
    assert use_tiles(8, small, 0.1) and not use_tiles(4, small, 0.1) and use_tiles(4, small, 0.5)
    assert not use_tiles(8, big, 0.3) and use_tiles(8, big, 0.5)


TILES_GPU_SHAPES = [(4096, 4096, 0.2), (1000, 3000, 0.1), (2048, 11008, 0.3), (257, 40000, 0.05),
                    (4096, 8, 0.5), (1, 4096, 0.5), (33, 136, 1.0), (16384, 256, 0.3), (64, 1024, 0.0)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 9, 16, 17, 33, 64, 65, 130])
@pytest.mark.parametrize("n,k,density", TILES_GPU_SHAPES)
def test_tiles_kernel_matches_dense(dtype, tokens, n, k, density):
    from sparsity_engine.ops.csr.cuda import csr_linear_tiles
    w = pruned(n, k, density, dtype, "cuda", empty_rows=(0,) if n > 2 else (), dense_rows=(n - 1,) if n > 2 else ())
    csr = se.to_csr(w)
    b = torch.randn(n, device="cuda").to(dtype) if tokens % 2 else None
    x = torch.randn(tokens, k, device="cuda").to(dtype)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    poison = poison_like(expected.to(dtype))
    del poison
    got = csr_linear_tiles(x, csr, b)
    assert got.dtype == dtype and got.shape == (tokens, n)
    assert_linear_close(got, expected, x, w, b, KTOL[dtype], f"tiles {n}x{k} {dtype} tokens={tokens}")
    assert torch.equal(csr_linear_tiles(x, csr, b), got)  # deterministic (split sums added in a fixed order)


@pytest.mark.cuda
def test_tiles_kernel_declines_and_cuda_backend_picks_it():
    from sparsity_engine.ops.csr import cuda as csr_cuda
    w = pruned(64, 100, 0.3, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="multiple of 8"):
        csr_cuda.csr_linear_tiles(torch.randn(4, 100, device="cuda", dtype=torch.bfloat16), se.to_csr(w), None)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        csr_cuda.csr_linear_tiles(torch.randn(4, 96, device="cuda"), se.to_csr(pruned(64, 96, 0.3, device="cuda")),
                                  None)
    w = pruned(300, 512, 0.2, torch.float16, "cuda")
    for tokens in (1, 4, 8, 16, 300):  # tokens x density: 0.2 .. 3.2, then above 16 tokens
        csr = se.to_csr(w)
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.float16)
        got = se.csr_linear(x, csr, backend="cuda")
        assert_rel_close(got, F.linear(x.double(), w.double()), KTOL[torch.float16], f"cuda {tokens}")
        tiles = csr_cuda.use_tiles(tokens, csr.shape, csr.density)
        assert ("_tile_layout" in csr.__dict__) == tiles, tokens  # the layout is built by the tiles kernel


# ---------------------------------------------------------------- dispatch rule

def test_prefer_dense_rule_and_overrides(monkeypatch):
    monkeypatch.delenv("SPARSITY_ENGINE_CSR_DENSE", raising=False)
    assert not prefer_dense(1, 0.1) and prefer_dense(1, 0.9)
    assert prefer_dense(256, 0.1) and prefer_dense(1000, 0.01)
    # without a dense copy at hand, rebuilding it costs more than the sparse kernels lose: up to 128 tokens
    # with the tensor-core tiles kernel, up to 16 without it
    assert not prefer_dense(128, 0.9, dense_at_hand=False) and prefer_dense(129, 0.01, dense_at_hand=False)
    assert not prefer_dense(16, 0.9, dense_at_hand=False, tiles_kernel=False)
    assert prefer_dense(17, 0.01, dense_at_hand=False, tiles_kernel=False)
    assert not prefer_dense(256, 0.9, dense_fallback=False) and prefer_dense(1, 0.1, dense_fallback=True)
    monkeypatch.setenv("SPARSITY_ENGINE_CSR_DENSE", "never")
    assert not prefer_dense(4096, 1.0)
    monkeypatch.setenv("SPARSITY_ENGINE_CSR_DENSE", "always")
    assert prefer_dense(1, 0.01)
    monkeypatch.setenv("SPARSITY_ENGINE_CSR_DENSE", "sometimes")
    with pytest.raises(ValueError, match="SPARSITY_ENGINE_CSR_DENSE"):
        prefer_dense(1, 0.1)


def test_empty_batch_and_leading_dims():
    w = pruned(7, 5, 0.5)
    b = torch.randn(7)
    csr = se.to_csr(w)
    out = se.csr_linear(torch.randn(0, 3, 5), csr, b)
    assert out.shape == (0, 3, 7)
    x = torch.randn(2, 2, 2, 5)
    assert torch.equal(se.csr_linear(x, csr, b), F.linear(x, w, b))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("weight,err", [
    (torch.randn(3, 4, 5), "weight must be 2-D"),
    (torch.randn(8), "weight must be 2-D"),
    (torch.arange(12).reshape(3, 4), "weight must have dtype"),
    (torch.tensor([[1.0, float("nan")]]), "weight contains 1 NaN"),
    ([[1.0, 2.0]], "weight must be a torch.Tensor"),
])
def test_to_csr_bad_input(weight, err):
    with pytest.raises((ValueError, TypeError), match=err):
        se.to_csr(weight)


def test_csr_linear_bad_input():
    csr = se.to_csr(pruned(6, 10, 0.5))
    with pytest.raises(ValueError, match="in_features=10"):
        se.csr_linear(torch.randn(2, 9), csr)
    with pytest.raises(TypeError, match="x must have the weight dtype"):
        se.csr_linear(torch.randn(2, 10, dtype=torch.float16), csr)
    with pytest.raises(TypeError, match="x must have dtype"):
        se.csr_linear(torch.ones(2, 10, dtype=torch.int32), csr)
    with pytest.raises(ValueError, match="bias must have shape"):
        se.csr_linear(torch.randn(2, 10), csr, torch.randn(5))
    with pytest.raises(TypeError, match="csr must be a CSRMatrix"):
        se.csr_linear(torch.randn(2, 10), torch.randn(6, 10))
    with pytest.raises(TypeError, match="index_dtype"):
        se.to_csr(torch.randn(2, 2), index_dtype=torch.int64)
    with pytest.raises(ValueError, match="backend"):
        se.csr_linear(torch.randn(2, 10), csr, backend="cusparse")


@pytest.mark.parametrize("n,k,density,empty,dense", SHAPES)
def test_triton_densify_matches(n, k, density, empty, dense):
    from sparsity_engine.ops.csr.triton import csr_to_dense

    w = pruned(n, k, density, torch.bfloat16, KERNEL_DEVICE, empty_rows=empty, dense_rows=dense)
    assert torch.equal(csr_to_dense(se.to_csr(w)), w)
