"""The bitmap format and bitmap_linear: exact round trips and reference on the CPU, a lane-by-lane model of the
CUDA kernel's index arithmetic on the CPU, rejection of corrupt arrays, and the CUDA kernels against the
reference on a GPU (edge sizes, 1..64 tokens, fp16/bf16, 0..100% sparsity, poisoned outputs)."""

import pytest
import torch
import torch.nn.functional as F

from bitmap_kernel_model import kernel_model
from helpers import HAS_CUDA, RTOL, assert_rel_close, poison_like, rel_err
from sparsity_engine.ops import bitmap as B
from sparsity_engine.ops.bitmap.format import (BitmapMatrix, from_bit_order, pack_bits, padded_shape,
                                               to_bit_order, unpack_bits)

DTYPES = [torch.float16, torch.bfloat16]


def pruned(n, k, sparsity, dtype, device="cpu", generator=None):
    """A random weight with about `sparsity` exact zeros (values drawn away from 0, so none vanish by rounding)."""
    w = torch.randn(n, k, generator=generator, device=device)
    w = w.sign() * (w.abs() + 0.05)
    keep = torch.rand(n, k, generator=generator, device=device) >= sparsity
    return (w * keep).to(dtype)


def bits_by_formula(n, k, w):
    """(mask words, values) built element by element from the layout's documented formula (format.py)."""
    nbands, ktiles = padded_shape(n, k)
    words = torch.zeros(nbands, ktiles, 8, dtype=torch.int64)
    values = []
    for b in range(nbands):
        for tile in range(ktiles):
            pair, s = divmod(tile, 2)
            for g in range(8):
                for bit in range(32):
                    t, j = divmod(bit, 8)
                    h, q, e = (j >> 1) & 1, j >> 2, j & 1
                    row, col = 16 * b + 8 * h + g, 32 * pair + 8 * t + 4 * s + 2 * q + e
                    if row < n and col < k and w[row, col] != 0:
                        words[b, tile, g] |= 1 << bit
                        values.append(w[row, col])
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words, torch.stack(values) if values else torch.zeros(0, dtype=w.dtype)


# ---------------------------------------------------------------------------------------------- format (CPU)
def test_layout_matches_documented_formula():
    n, k = 21, 150  # a partial band and a partial group
    w = pruned(n, k, 0.5, torch.bfloat16)
    bm = B.to_bitmap(w)
    words, values = bits_by_formula(n, k, w)
    assert torch.equal(bm.masks, words)
    assert torch.equal(bm.values[: bm.nnz], values)
    assert bm.nnz == int((w != 0).sum())
    assert torch.equal(bm.values[bm.nnz:], torch.zeros_like(bm.values[bm.nnz:]))
    assert bm.values.numel() % 8 == 0


def test_bit_order_helpers_invert():
    x = torch.arange(48 * 256).reshape(48, 256)
    assert torch.equal(from_bit_order(to_bit_order(x)), x)
    bits = torch.rand(3, 5, 32) < 0.5
    assert torch.equal(unpack_bits(pack_bits(bits)), bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (16, 128), (37, 300), (50, 264), (130, 129)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_round_trip_exact(dtype, shape, sparsity):
    w = pruned(*shape, sparsity, dtype)
    bm = B.to_bitmap(w)
    assert bm.shape == shape and bm.dtype == dtype
    assert torch.equal(bm.to_dense(), w)
    assert bm.nnz == int((w != 0).sum())
    counts = (w != 0).sum()
    assert bm.density == pytest.approx(float(counts) / w.numel())
    nbands, ktiles = padded_shape(*shape)
    expect = 4 * nbands * ktiles * 8 + 4 * (nbands * ktiles + 1) + 2 * max(8, -(-bm.nnz // 8) * 8)
    assert bm.nbytes == expect


def test_bytes_at_llm_shape():
    """0.57x dense bytes at 50%, 0.37x at 70% (4096 x 4096: no padding)."""
    for sparsity, bound in ((0.5, 0.575), (0.7, 0.375)):
        w = pruned(4096, 1024, sparsity, torch.bfloat16)
        bm = B.to_bitmap(w)
        assert bm.nbytes / (w.numel() * 2) < bound


def test_max_group_is_the_fullest_group():
    w = pruned(40, 400, 0.6, torch.float16)
    w[3, :128] = 1.0  # band 0, group 0 gets more
    bm = B.to_bitmap(w)
    nbands, ktiles = padded_shape(40, 400)
    groups = torch.zeros(nbands, ktiles // 8, dtype=torch.int64)
    for b in range(nbands):
        for gi in range(ktiles // 8):
            rows, cols = slice(16 * b, 16 * b + 16), slice(128 * gi, 128 * gi + 128)
            groups[b, gi] = int((w[rows, cols] != 0).sum())
    assert bm.max_group == int(groups.max())


def test_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    w = pruned(45, 333, 0.7, torch.bfloat16)
    bm = B.to_bitmap(w)
    path = str(tmp_path / "w.safetensors")
    save_file(bm.to_state_dict("layer."), path)
    back = BitmapMatrix.from_state_dict(load_file(path), "layer.")
    assert torch.equal(back.to_dense(), w)
    assert (back.nnz, back.max_group, back.shape) == (bm.nnz, bm.max_group, bm.shape)


def _corrupt(bm, **changes):
    sd = bm.to_state_dict()
    sd = {k: v.clone() for k, v in sd.items()}
    for key, fn in changes.items():
        sd[key] = fn(sd[key])
    return sd


def _set(t, index, value):
    t[index] = value
    return t


@pytest.mark.parametrize("case, match", [
    (dict(offsets=lambda o: o + 1), "start at 0"),
    (dict(offsets=lambda o: _set(o, 5, o[5] + 1)), "do not match the masks"),
    (dict(offsets=lambda o: _set(o, -1, o[-1] + 8)), "do not match the masks"),
    (dict(masks=lambda m: _set(m, (0, 0, 0), m[0, 0, 0] ^ 1)), "do not match the masks"),
    (dict(values=lambda v: v[:8]), "fewer than"),
    (dict(values=lambda v: _set(v, 3, float("nan"))), "NaN/Inf"),
    (dict(values=lambda v: v.float()), "float16 or bfloat16"),
    (dict(values=lambda v: v[:-1]), "multiple of 8"),
    (dict(masks=lambda m: m[:, :8]), "masks must be int32 of shape"),
    (dict(masks=lambda m: m.long()), "masks must be int32"),
    (dict(offsets=lambda o: o[:-1]), "offsets must be int32 of shape"),
    (dict(shape=lambda s: torch.tensor([s[0] + 16, s[1]])), "masks must be int32 of shape"),
    (dict(shape=lambda s: torch.tensor([1.5, 2.0])), "integer tensor"),
])
def test_corrupt_arrays_rejected(case, match):
    w = pruned(40, 300, 0.5, torch.float16)
    w[0, :8] = 1.0  # tile (0, 0) is not empty
    bm = B.to_bitmap(w)
    with pytest.raises((ValueError, TypeError), match=match):
        BitmapMatrix.from_state_dict(_corrupt(bm, **case))


def test_padding_bits_rejected():
    w = pruned(20, 130, 0.5, torch.bfloat16)  # rows 20..31 and columns 130..255 are padding
    bm = B.to_bitmap(w)
    dense_bits = torch.zeros(32, 256, dtype=torch.bool)
    dense_bits[25, 3] = True  # a padding row
    extra = pack_bits(to_bit_order(dense_bits))
    masks = bm.masks | extra
    counts = B.format.tile_counts(masks).reshape(-1)
    offsets = torch.zeros_like(bm.offsets)
    offsets[1:] = counts.cumsum(0)
    values = torch.zeros(B.format.values_length(int(offsets[-1])), dtype=bm.dtype)
    with pytest.raises(ValueError, match="beyond the shape"):
        BitmapMatrix.from_arrays(masks, offsets, values, bm.shape)
    with pytest.raises(ValueError, match="missing bitmap keys"):
        BitmapMatrix.from_state_dict({"masks": bm.masks})


def test_to_bitmap_bad_input():
    with pytest.raises(TypeError, match="weight must have dtype"):
        B.to_bitmap(torch.randn(4, 4))
    w = torch.randn(4, 4, dtype=torch.float16)
    w[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        B.to_bitmap(w)
    with pytest.raises(ValueError, match="2-D"):
        B.to_bitmap(torch.randn(4, dtype=torch.float16))


# ---------------------------------------------------------------------------------------------- reference (CPU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_linear_equals_masked_dense(dtype, bias):
    w = pruned(37, 300, 0.6, dtype)
    b = torch.randn(37).to(dtype) if bias else None
    bm = B.to_bitmap(w)
    x = torch.randn(7, 300).to(dtype)
    assert torch.equal(B.bitmap_linear(x, bm, b, backend="reference"), F.linear(x, w, b))
    x3 = torch.randn(2, 3, 300).to(dtype)
    assert_rel_close(B.bitmap_linear(x3, bm, b), F.linear(x3, w, b), 1e-6, "3-D input")
    empty = B.bitmap_linear(torch.zeros(0, 300, dtype=dtype), bm, b)
    assert empty.shape == (0, 37)


def test_bitmap_linear_bad_input():
    bm = B.to_bitmap(pruned(8, 32, 0.5, torch.float16))
    with pytest.raises(ValueError, match="in_features=32"):
        B.bitmap_linear(torch.randn(3, 31, dtype=torch.float16), bm)
    with pytest.raises(TypeError, match="weight dtype"):
        B.bitmap_linear(torch.randn(3, 32, dtype=torch.bfloat16), bm)
    with pytest.raises(ValueError, match="bias must have shape"):
        B.bitmap_linear(torch.randn(3, 32, dtype=torch.float16), bm, torch.zeros(9, dtype=torch.float16))
    with pytest.raises(TypeError, match="BitmapMatrix"):
        B.bitmap_linear(torch.randn(3, 32, dtype=torch.float16), torch.zeros(8, 32))


def test_op_on_cpu_and_opcheck():
    w = pruned(40, 200, 0.5, torch.bfloat16)
    bm = B.to_bitmap(w)
    b = torch.randn(40).to(torch.bfloat16)
    x = torch.randn(5, 200).to(torch.bfloat16)
    args = (x, bm.masks, bm.offsets, bm.values, b, 40, 200, bm.max_group)
    assert torch.equal(torch.ops.sparsity_engine.bitmap_linear(*args), F.linear(x, w, b))
    torch.library.opcheck(torch.ops.sparsity_engine.bitmap_linear.default, args)


def test_choose_format_rule():
    rule = B.FORMAT_RULE
    assert B.choose_format(torch.float32, 0.9) == "csr"
    assert B.choose_format(torch.bfloat16, rule["bitmap"] - 0.01) == "dense"
    assert B.choose_format(torch.float16, rule["bitmap"]) == "bitmap"
    assert B.choose_format(torch.bfloat16, min(1.0, rule["csr"])) == "csr"


# ---------------------------------------------------------------------------------------------- kernel model (CPU)
@pytest.mark.parametrize("n, k, tokens, sparsity, ksplit", [
    (37, 300, 11, 0.6, 2), (16, 128, 1, 0.0, 1), (50, 264, 8, 0.9, 2), (33, 130, 3, 1.0, 1),
    (20, 700, 17, 0.5, 4), (18, 520, 26, 0.3, 4),
])
def test_kernel_index_model_matches_dense(n, k, tokens, sparsity, ksplit):
    """The kernel's staging, byte-packed scan, fragment decode and C mapping, modelled lane by lane."""
    w = pruned(n, k, sparsity, torch.bfloat16)
    bm = B.to_bitmap(w)
    x = torch.randn(tokens, k).to(torch.bfloat16)
    y = kernel_model(x, bm.masks, bm.offsets, bm.values, n, k, ksplit=ksplit)
    ref = x.double() @ w.double().t()
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("n, k, tokens, sparsity, ksplit", [
    (37, 300, 5, 0.6, 2), (16, 128, 1, 0.0, 1), (1, 129, 2, 0.5, 1), (17, 264, 3, 0.9, 2), (33, 130, 1, 1.0, 1),
    (20, 520, 4, 0.3, 4),
])
@pytest.mark.parametrize("pairs", [False, True])
def test_gemv_index_model_matches_dense(n, k, tokens, sparsity, ksplit, pairs):
    """The CUDA-core kernels' (variants 3, 4) activation slots, scan, bit walk and sums, modelled lane by lane."""
    from bitmap_kernel_model import gemv_model

    w = pruned(n, k, sparsity, torch.bfloat16)
    bm = B.to_bitmap(w)
    x = torch.randn(tokens, k).to(torch.bfloat16)
    y = gemv_model(x, bm.masks, bm.offsets, bm.values, n, k, ksplit=ksplit, tt=4 if tokens > 2 else tokens,
                   pairs=pairs)
    ref = x.double() @ w.double().t()
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------------------------------------- CUDA
def _cuda_ok():
    from sparsity_engine._dispatch import backend_reasons
    return HAS_CUDA and not backend_reasons("cuda")


def _variants():
    """The default variant, or those named by SE_BITMAP_VARIANTS (ops/bitmap/cuda.py: requested_variants)."""
    from sparsity_engine.ops.bitmap import cuda as bcuda

    return bcuda.requested_variants()


def _check_kernel(w, x, bias, what, bm=None, variants=None):
    """The kernel (each variant asked for) against fp64 and against the masked dense F.linear (cuBLAS)."""
    from sparsity_engine.ops.bitmap import cuda as bcuda

    bm = bm if bm is not None else B.to_bitmap(w)
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    dense = F.linear(x, w, bias)  # the masked dense model (cuBLAS)
    first = {}  # per family of variants that compute the same sums: the first one's output
    for variant in variants or _variants():
        out = poison_like(torch.empty(x.shape[0], w.shape[0], dtype=w.dtype, device=w.device))
        y = bcuda.linear(x, bm.masks, bm.offsets, bm.values, bias, w.shape[0], w.shape[1], bm.max_group, out=out,
                         variant=variant)
        assert torch.isfinite(y).all(), f"{what} variant {variant}: unwritten or non-finite outputs"
        family = next(f for f in bcuda.SAME_SUMS if variant in f)
        if family not in first:
            first[family] = y
        else:  # variants of one family only stage or load differently: same sums in the same order
            assert torch.equal(y, first[family]), f"{what}: variant {variant} differs from the first one"
        if ref.norm() == 0:
            assert torch.equal(y, torch.zeros_like(y)), f"{what}: nonzero output for an all-zero product"
            continue
        err, dense_err = rel_err(y, ref), rel_err(dense, ref)
        # fp32 accumulation in both; only the order of the sums and the final rounding differ
        assert err <= max(2 * dense_err, 1e-3) and err <= RTOL[w.dtype], \
            f"{what} variant {variant}: rel err {err:.2e} (dense {dense_err:.2e})"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 129), (17, 128), (17, 300), (40, 129), (257, 2056), (1000, 1000), (96, 4099)])
def test_cuda_gemv_variant_matches_reference(dtype, shape):
    """Variants 3 and 4 (CUDA cores, work per nonzero) against fp64 and cuBLAS: edge sizes, 0..100% sparsity, 1..33
    tokens (4 a pass), bias or not, poisoned outputs."""
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    gen = torch.Generator(device="cuda").manual_seed(torch.randint(0, 2**31, ()).item())
    n, k = shape
    for sparsity in (0.0, 0.5, 0.9, 1.0):
        w = pruned(n, k, sparsity, dtype, "cuda", gen)
        bm = B.to_bitmap(w)
        for tokens in (1, 2, 3, 4, 5, 8, 17, 32, 33):
            x = torch.randn(tokens, k, device="cuda", generator=gen).to(dtype)
            bias = torch.randn(n, device="cuda", generator=gen).to(dtype) if tokens % 2 else None
            _check_kernel(w, x, bias, f"{shape} {dtype} sparsity {sparsity} tokens {tokens}", bm, variants=(3, 4))


@pytest.mark.cuda
def test_cuda_gemv_variant_misaligned_x_and_large_k():
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    gen = torch.Generator(device="cuda").manual_seed(torch.randint(0, 2**31, ()).item())
    for dtype in DTYPES:
        w = pruned(512, 11008, 0.7, dtype, "cuda", gen)
        buf = torch.randn(3 * 11008 + 1, device="cuda", generator=gen).to(dtype)
        x = buf[1:].view(3, 11008)  # 2 bytes off 16-byte alignment: the element-wise activation loads
        _check_kernel(w, x, None, "misaligned x", variants=(3, 4))
        _check_kernel(w, x[:1].contiguous(), None, "aligned x, 1 token", variants=(3, 4))


def test_pick_variant_follows_the_rule(monkeypatch):
    from sparsity_engine.ops.bitmap import cuda as bcuda

    monkeypatch.setitem(bcuda.GEMV_RULE, "max_tokens", 0)
    assert bcuda.pick_variant(1, 100) == bcuda.VARIANT
    monkeypatch.setitem(bcuda.GEMV_RULE, "max_tokens", 2)
    monkeypatch.setitem(bcuda.GEMV_RULE, "max_group_density", 0.5)
    assert bcuda.pick_variant(1, 1024) == bcuda.pick_variant(2, 10) == bcuda.GEMV_RULE["variant"]
    assert bcuda.pick_variant(3, 10) == bcuda.pick_variant(1, 1025) == bcuda.VARIANT


def test_requested_variants(monkeypatch):
    from sparsity_engine.ops.bitmap import cuda as bcuda

    monkeypatch.delenv("SE_BITMAP_VARIANTS", raising=False)
    assert bcuda.requested_variants() == (bcuda.VARIANT,)
    monkeypatch.setenv("SE_BITMAP_VARIANTS", "0,3")
    assert bcuda.requested_variants() == (0, 3)
    monkeypatch.setenv("SE_BITMAP_VARIANTS", "all")
    assert bcuda.requested_variants() == bcuda.VARIANTS
    assert sorted(v for family in bcuda.SAME_SUMS for v in family) == list(bcuda.VARIANTS)
    for bad in ("7", "x", "0,"):
        monkeypatch.setenv("SE_BITMAP_VARIANTS", bad)
        with pytest.raises(ValueError, match="SE_BITMAP_VARIANTS"):
            bcuda.requested_variants()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 128), (40, 300), (100, 264), (257, 2056), (1000, 1000), (96, 4099)])
def test_cuda_kernel_matches_reference(dtype, shape):
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    gen = torch.Generator(device="cuda").manual_seed(torch.randint(0, 2**31, ()).item())
    n, k = shape
    for sparsity in (0.0, 0.5, 0.7, 0.9, 1.0):
        w = pruned(n, k, sparsity, dtype, "cuda", gen)
        bm = B.to_bitmap(w)
        for tokens in (1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 64):
            x = torch.randn(tokens, k, device="cuda", generator=gen).to(dtype)
            bias = torch.randn(n, device="cuda", generator=gen).to(dtype) if tokens % 2 else None
            _check_kernel(w, x, bias, f"{shape} {dtype} sparsity {sparsity} tokens {tokens}", bm)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_large_k_and_misaligned_x(dtype):
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    gen = torch.Generator(device="cuda").manual_seed(torch.randint(0, 2**31, ()).item())
    w = pruned(4096, 11008, 0.5, dtype, "cuda", gen)  # 86 groups per band over 8 warps
    buf = torch.randn(5 * 11008 + 1, device="cuda", generator=gen).to(dtype)
    x = buf[1:].view(5, 11008)  # 2 bytes off 16-byte alignment: the element-wise activation loads
    assert x.data_ptr() % 16
    _check_kernel(w, x, None, "misaligned x")
    _check_kernel(w, x.contiguous(), None, "aligned x")
    w2 = pruned(11008, 4096, 0.7, dtype, "cuda", gen)
    _check_kernel(w2, torch.randn(16, 4096, device="cuda", generator=gen).to(dtype), None, "11008x4096 16 tokens")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_densify_and_dispatch(dtype):
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    from sparsity_engine.ops.bitmap import cuda as bcuda

    for shape in ((40, 300), (257, 2056), (33, 128)):
        w = pruned(*shape, 0.6, dtype, "cuda")
        bm = B.to_bitmap(w)
        out = poison_like(torch.empty(shape, dtype=dtype, device="cuda"))
        assert torch.equal(bcuda.to_dense(bm, out=out), w)
        assert torch.equal(B.densify(bm), w)
        cpu = B.to_bitmap(w.cpu())
        assert torch.equal(cpu.masks, bm.masks.cpu()) and torch.equal(cpu.values, bm.values.cpu())
        for tokens in (3, B.MAX_TOKENS + 1):  # kernel, then rebuilt dense + F.linear
            x = torch.randn(tokens, shape[1], device="cuda").to(dtype)
            ref = F.linear(x.double(), w.double())
            assert_rel_close(B.bitmap_linear(x, bm), ref, RTOL[dtype], f"{shape} {tokens} tokens")
        x = torch.randn(4, shape[1], device="cuda").to(dtype)
        assert_rel_close(B.bitmap_linear(x, bm, backend="cuda"), F.linear(x.double(), w.double()), RTOL[dtype],
                         "backend='cuda'")
