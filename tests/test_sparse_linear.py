"""BitmapLinear: equal to the masked Linear, state dicts validated and round-tripped, one copy of the weight,
torch.compile(fullgraph=True) without graph breaks (CPU: aot_eager; GPU: inductor) and CUDA-graph capture."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import HAS_CUDA, RTOL, assert_rel_close
from sparsity_engine.nn import BitmapLinear, CSRLinear, sparsify_linears_
from sparsity_engine.ops import bitmap as B


def prune_(linear: nn.Linear, sparsity: float) -> nn.Linear:
    """Magnitude-prune a Linear in place (exact zeros, ties broken by position)."""
    with torch.no_grad():
        w = linear.weight
        k = int(sparsity * w.numel())
        if k:
            order = w.abs().flatten().argsort()
            w.view(-1)[order[:k]] = 0
    return linear


def bitmap_layer(n, k, sparsity, dtype, bias=True, device="cpu"):
    lin = prune_(nn.Linear(k, n, bias=bias), sparsity).to(device=device, dtype=dtype)
    return lin, BitmapLinear.from_linear(lin)


def _cuda_ok():
    from sparsity_engine._dispatch import backend_reasons
    return HAS_CUDA and not backend_reasons("cuda")


# ---------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_linear_equals_linear(bias, dtype):
    lin, layer = bitmap_layer(19, 137, 0.6, dtype, bias)
    assert (layer.in_features, layer.out_features, layer.nnz) == (137, 19, int((lin.weight != 0).sum()))
    x = torch.randn(6, 137).to(dtype)
    assert torch.equal(layer(x), lin(x))
    x3 = torch.randn(2, 5, 137).to(dtype)
    assert_rel_close(layer(x3), lin(x3), 1e-6, "3-D input")
    assert torch.equal(layer.weight_dense, lin.weight.detach())
    assert (layer.bias is None) == (not bias)
    assert "nnz=" in repr(layer)


def test_layer_holds_one_copy():
    lin, layer = bitmap_layer(64, 512, 0.5, torch.bfloat16)
    bm = layer.bitmap
    held = sum(t.numel() * t.element_size() for t in list(layer.buffers()) + list(layer.parameters()))
    assert held == bm.nbytes + 64 * 2 + 16  # the format's arrays, the bias and the shape
    for tokens in (1, 8, B.MAX_TOKENS + 5):
        layer(torch.randn(tokens, 512).to(torch.bfloat16))
    tensors = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert not tensors  # nothing cached beside the buffers
    after = sum(t.numel() * t.element_size() for t in list(layer.buffers()) + list(layer.parameters()))
    assert after == held


def test_state_dict_round_trip_other_nnz(tmp_path):
    from safetensors.torch import load_file, save_file

    _, a = bitmap_layer(30, 200, 0.7, torch.float16)
    _, b = bitmap_layer(30, 200, 0.2, torch.float16)  # more nonzeros: other buffer sizes
    path = str(tmp_path / "a.safetensors")
    save_file(a.state_dict(), path)
    b.load_state_dict(load_file(path))
    x = torch.randn(4, 200).to(torch.float16)
    assert torch.equal(b(x), a(x))
    assert (b.nnz, b.max_group) == (a.nnz, a.max_group)


def test_corrupt_state_dict_rejected_and_layer_unchanged():
    _, a = bitmap_layer(30, 200, 0.5, torch.bfloat16)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    sd["offsets"][3] += 1
    before = {k: v.clone() for k, v in a.state_dict().items()}
    with pytest.raises(ValueError, match="do not match the masks"):
        a.load_state_dict(sd)
    after = a.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_input():
    _, layer = bitmap_layer(8, 32, 0.5, torch.float16)
    with pytest.raises(ValueError, match="in_features=32"):
        layer(torch.randn(3, 31, dtype=torch.float16))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 32, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        BitmapLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="BitmapMatrix"):
        BitmapLinear(torch.zeros(8, 32))


class _Block(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.up = prune_(nn.Linear(96, 160), 0.5).to(dtype)
        self.down = prune_(nn.Linear(160, 96, bias=False), 0.7).to(dtype)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def test_compile_fullgraph_cpu():
    """Dynamo traces through BitmapLinear (the registered op and its fake): fullgraph=True fails on a break."""
    model = _Block(torch.bfloat16)
    x = torch.randn(3, 96).to(torch.bfloat16)
    expected = model(x)
    assert sparsify_linears_(model, format="bitmap") == ["up", "down"]
    eager = model(x)
    assert_rel_close(eager, expected, 1e-2, "converted block")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)


# ---------------------------------------------------------------------------------------------- conversion
def test_sparsify_auto_picks_per_layer():
    rule = B.FORMAT_RULE
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)).to(torch.bfloat16)
    prune_(model[0], (rule["bitmap"] + rule["csr"]) / 2)  # bitmap
    prune_(model[1], rule["bitmap"] / 2)                 # below the bitmap threshold: stays dense
    prune_(model[2], (1 + rule["csr"]) / 2)              # very sparse: CSR
    x = torch.randn(5, 64).to(torch.bfloat16)
    expected = model(x)
    names = sparsify_linears_(model, min_sparsity=0.0)
    assert names == ["0", "2"]
    assert isinstance(model[0], BitmapLinear) and type(model[1]) is nn.Linear
    assert isinstance(model[2], CSRLinear) and model[2].one_copy and type(model[3]) is nn.Linear
    assert_rel_close(model(x), expected, 2e-2, "auto-converted model")
    fp32 = nn.Sequential(prune_(nn.Linear(16, 16), 0.5))
    assert sparsify_linears_(fp32) == ["0"] and isinstance(fp32[0], CSRLinear)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        sparsify_linears_(nn.Sequential(prune_(nn.Linear(16, 16), 0.5)), format="bitmap")
    with pytest.raises(ValueError, match="format must be"):
        sparsify_linears_(model, format="ell")


def test_sparsify_forced_formats():
    model = nn.Sequential(prune_(nn.Linear(32, 32), 0.5), prune_(nn.Linear(32, 32), 0.5)).to(torch.float16)
    m1 = copy.deepcopy(model)
    assert sparsify_linears_(m1, format="csr") == ["0", "1"] and isinstance(m1[0], CSRLinear) and not m1[0].one_copy
    m2 = copy.deepcopy(model)
    assert sparsify_linears_(m2, format="bitmap", exclude="1") == ["0"] and isinstance(m2[0], BitmapLinear)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_layer_matches_masked_dense(dtype):
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    lin, layer = bitmap_layer(3000, 1024, 0.7, dtype, device="cuda")
    for tokens in (1, 8, 16, 32, 300):
        x = torch.randn(tokens, 1024, device="cuda").to(dtype)
        expected = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert_rel_close(layer(x), expected, RTOL[dtype], f"BitmapLinear {tokens} tokens")
    moved = BitmapLinear.from_linear(lin.cpu()).to("cuda")
    x = torch.randn(4, 1024, device="cuda").to(dtype)
    assert_rel_close(moved(x), F.linear(x.double(), lin.weight.double().cuda(), lin.bias.double().cuda()),
                     RTOL[dtype], "moved with .to()")


@pytest.mark.cuda
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_eager_lean_path_matches_masked_dense(bias):
    """The eager launch path (contiguous CUDA x, 1..MAX_TOKENS tokens) and the general one around it: 2-D and 3-D
    inputs, a non-contiguous one, more than MAX_TOKENS tokens; wrong inputs still raise."""
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    dtype = torch.bfloat16
    lin, layer = bitmap_layer(200, 136, 0.6, dtype, bias=bias, device="cuda")
    b = None if lin.bias is None else lin.bias.double()
    for shape in ((1, 136), (1, 1, 136), (2, 3, 136), (B.MAX_TOKENS, 136), (3, B.MAX_TOKENS, 136)):
        x = torch.randn(*shape, device="cuda").to(dtype)
        assert_rel_close(layer(x), F.linear(x.double(), lin.weight.double(), b), RTOL[dtype], f"shape {shape}")
    x = torch.randn(136, 4, device="cuda").to(dtype).t()  # non-contiguous
    assert_rel_close(layer(x), F.linear(x.double(), lin.weight.double(), b), RTOL[dtype], "non-contiguous x")
    with pytest.raises(TypeError, match="weight dtype"):
        layer(torch.randn(1, 136, device="cuda"))
    with pytest.raises(ValueError, match="in_features=136"):
        layer(torch.randn(1, 135, device="cuda").to(dtype))
    with pytest.raises(ValueError, match="is on"):
        layer(torch.randn(1, 136).to(dtype))


@pytest.mark.cuda
def test_gpu_cuda_graph_capture():
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    model = _Block(torch.bfloat16).cuda()
    sparsify_linears_(model, format="bitmap")
    static_x = torch.randn(1, 96, device="cuda").to(torch.bfloat16)
    for _ in range(2):  # warm up on a side stream (loads the extension, sets kernel attributes)
        model(static_x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
    for _ in range(3):
        x = torch.randn(1, 96, device="cuda").to(torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, model(x))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_compile_fullgraph(mode):
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    model = _Block(torch.bfloat16).cuda()
    sparsify_linears_(model, format="bitmap")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):
        x = torch.randn(2, 96, device="cuda").to(torch.bfloat16)
        assert_rel_close(compiled(x), model(x), 1e-2, f"compiled ({mode})")


@pytest.mark.cuda
def test_gpu_csr_one_copy_keeps_no_tile_layout():
    if not _cuda_ok():
        pytest.skip("the CUDA extension is unavailable")
    model = nn.Sequential(prune_(nn.Linear(256, 512), 0.99)).to("cuda", torch.bfloat16)
    sparsify_linears_(model)
    layer = model[0]
    assert isinstance(layer, CSRLinear) and layer.one_copy
    for tokens in (1, 8, 16, 40):
        x = torch.randn(tokens, 256, device="cuda").to(torch.bfloat16)
        w = layer.weight_dense
        assert_rel_close(layer(x), F.linear(x.double(), w.double(), layer.bias.double()), 1e-2, f"{tokens} tokens")
    assert "_tile_layout" not in layer.csr.__dict__
