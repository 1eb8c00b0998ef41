"""CSRLinear and sparsify_linears_: equal to the Linear they replace; state dicts round-trip."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsity_engine as se
from helpers import RTOL, assert_rel_close
from sparsity_engine.nn import CSRLinear, sparsify_linears_


def prune_(linear: nn.Linear, sparsity: float) -> nn.Linear:
    """Magnitude-prune a Linear in place (exact zeros)."""
    with torch.no_grad():
        w = linear.weight
        k = int(sparsity * w.numel())
        if k:
            thresh = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= thresh] = 0
    return linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_linear_equals_linear(bias, dtype):
    lin = prune_(nn.Linear(37, 19, bias=bias), 0.6).to(dtype)
    csr_lin = CSRLinear.from_linear(lin)
    assert (csr_lin.in_features, csr_lin.out_features) == (37, 19)
    x = torch.randn(2, 5, 37).to(dtype)
    assert torch.equal(csr_lin(x), lin(x))       # CPU: the exact reference
    assert torch.equal(csr_lin.weight_dense, lin.weight.detach())
    assert (csr_lin.bias is None) == (not bias)


def test_state_dict_round_trip_with_other_nnz(tmp_path):
    from safetensors.torch import load_file, save_file

    a = CSRLinear.from_linear(prune_(nn.Linear(30, 12), 0.7))
    b = CSRLinear.from_linear(prune_(nn.Linear(30, 12), 0.2))  # more nonzeros: other buffer sizes
    path = str(tmp_path / "a.safetensors")
    save_file(a.state_dict(), path)
    b.load_state_dict(load_file(path))
    x = torch.randn(4, 30)
    assert torch.equal(b(x), a(x))
    assert b.csr.nnz == a.csr.nnz


def test_sparsify_sequential_converts_only_pruned_layers():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    prune_(model[0], 0.5)
    prune_(model[4], 0.8)
    x = torch.randn(3, 16)
    expected = model(x)
    names = sparsify_linears_(model, min_sparsity=0.3)
    assert names == ["0", "4"]
    assert isinstance(model[0], CSRLinear) and isinstance(model[2], nn.Linear) and isinstance(model[4], CSRLinear)
    assert torch.equal(model(x), expected)


def test_sparsify_include_exclude_and_tied():
    model = nn.ModuleDict({"enc": nn.ModuleDict({"query": nn.Linear(8, 8), "key": nn.Linear(8, 8)}),
                           "head": nn.Linear(8, 8), "tied": nn.Linear(8, 8)})
    model["tied"].weight = model["head"].weight  # shared: must never be converted
    for lin in (model["enc"]["query"], model["enc"]["key"], model["head"]):
        prune_(lin, 0.5)
    m1 = copy.deepcopy(model)
    assert sparsify_linears_(m1, include="enc.*") == ["enc.query", "enc.key"]
    m2 = copy.deepcopy(model)
    assert sparsify_linears_(m2, exclude=["re:query$"]) == ["enc.key"]
    m3 = copy.deepcopy(model)
    assert sparsify_linears_(m3, include=["re:^enc\\.(query|key)$"], exclude="*.key") == ["enc.query"]
    m4 = copy.deepcopy(model)
    assert sparsify_linears_(m4, min_sparsity=0.9) == []
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify_linears_(m4, min_sparsity=1.5)
    with pytest.raises(TypeError, match="model must be"):
        sparsify_linears_("model")
    with pytest.raises(TypeError, match="patterns must be strings"):
        sparsify_linears_(m4, include=[3])


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def test_sparsify_tiny_bert_outputs_and_state_dict(tmp_path):
    from safetensors.torch import load_file, save_file

    bert = _tiny_bert()
    pruned_names = []
    for name, module in bert.named_modules():
        if isinstance(module, nn.Linear) and ("intermediate" in name or name.endswith("attention.self.query")):
            prune_(module, 0.6)
            pruned_names.append(name)
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        expected = bert(input_ids=ids).last_hidden_state
        names = sparsify_linears_(bert, min_sparsity=0.5)
        assert sorted(names) == sorted(pruned_names)
        got = bert(input_ids=ids).last_hidden_state
    assert_rel_close(got, expected, 1e-5, "converted BERT")
    path = str(tmp_path / "bert.safetensors")
    save_file({k: v.contiguous() for k, v in bert.state_dict().items()}, path)
    fresh = _tiny_bert()
    for name in names:  # same structure, other weights: loading must restore the converted model exactly
        prune_(fresh.get_submodule(name), 0.9)
    sparsify_linears_(fresh, min_sparsity=0.5)
    fresh.load_state_dict(load_file(path))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).last_hidden_state, got)


def test_csrlinear_bad_input():
    lin = CSRLinear.from_linear(prune_(nn.Linear(10, 4), 0.5))
    with pytest.raises(ValueError, match="in_features=10"):
        lin(torch.randn(3, 11))
    with pytest.raises(TypeError, match="dtype"):
        lin(torch.randn(3, 10, dtype=torch.float16))
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        CSRLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="csr must be a CSRMatrix"):
        CSRLinear(torch.randn(4, 10))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 8, 64, 300])
def test_csrlinear_gpu_matches_linear(dtype, tokens):
    lin = prune_(nn.Linear(1024, 3000), 0.8).to("cuda", dtype)
    csr_lin = CSRLinear.from_linear(lin)
    x = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
    expected = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert_rel_close(csr_lin(x), expected, RTOL[dtype] * 2, f"CSRLinear {tokens} tokens")
    moved = CSRLinear.from_linear(lin.cpu()).to("cuda")
    assert_rel_close(moved(x), expected, RTOL[dtype] * 2, "moved with .to()")


def test_cli_bench_decode_checks_its_folder_first(tmp_path, capsys):
    from sparsity_engine.cli import main

    missing = tmp_path / "no_such_model"
    assert main(["bench-decode", str(missing)]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()


def test_decode_model_matches_step_by_step_reference():
    """The decode benchmark's model: one cached step equals a full causal pass over the prefix (tiny, CPU)."""
    transformers = pytest.importorskip("transformers")
    from sparsity_engine.nn import decode

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    model = decode.build_random(cfg, "cpu", torch.float32)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    model.setup_cache(8)
    model.reset(token=3)
    tokens = [3]
    for _ in range(4):
        logits = model.step()
        with torch.no_grad():
            expected = hf(torch.tensor([tokens])).logits[0, -1]
        assert_rel_close(logits.reshape(-1), expected, 1e-4, f"step {len(tokens)}")
        tokens.append(int(model.cache["token"]))


def test_decode_model_loads_a_model_folder_through_the_reader(tmp_path):
    """bench-decode's loader reads a saved LLaMA folder (sharded, through io.SafetensorsReader) into the decode
    model: its first step equals transformers' logits on the same weights."""
    transformers = pytest.importorskip("transformers")
    from sparsity_engine.nn import decode

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")      # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = decode.load_folder(str(tmp_path), device="cpu", dtype=torch.float32)
    model.setup_cache(4)
    model.reset(token=7)
    with torch.no_grad():
        expected = hf(torch.tensor([[7]])).logits[0, -1]
    assert_rel_close(model.step().reshape(-1), expected, 1e-4, "first step")
