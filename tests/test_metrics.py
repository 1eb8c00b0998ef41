"""metrics: sizes, sparsity, compute ratio, top-1 agreement and the Dense / Masked / CSR rows."""
import copy

import pytest
import torch
from torch import nn

import sparsity_engine as se
from sparsity_engine import metrics
from sparsity_engine.nn import sparsify_linears_


def test_size_mb_counts_bytes_once():
    a = torch.zeros(1000, dtype=torch.float32)
    b = torch.zeros(500, dtype=torch.bfloat16)
    assert metrics.size_mb([a, b]) == pytest.approx((4000 + 1000) / 1e6)
    assert metrics.size_mb({"a": a, "view": a}) == pytest.approx(4000 / 1e6)
    lin = nn.Linear(10, 20)
    assert metrics.size_mb(lin) == pytest.approx((200 + 20) * 4 / 1e6)
    csr = se.to_csr(torch.eye(16))
    assert metrics.size_mb(csr) == pytest.approx(csr.nbytes / 1e6)
    with pytest.raises(TypeError, match="model_or_tensors"):
        metrics.size_mb(3)


def test_sparsity_and_compute_ratio():
    w = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    assert metrics.sparsity(w) == pytest.approx(4 / 6)
    assert metrics.sparsity(se.to_csr(w)) == pytest.approx(4 / 6)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    with torch.no_grad():
        model[0].weight.copy_(w)       # 2 of 6 nonzero
        model[1].weight.fill_(1.0)      # 12 of 12
    assert metrics.sparsity(model) == pytest.approx(4 / 18)
    assert metrics.compute_ratio(model) == pytest.approx(14 / 18)
    sparsify_linears_(model, min_sparsity=0.5)
    assert metrics.sparsity(model) == pytest.approx(4 / 18)
    assert metrics.compute_ratio(model) == pytest.approx(14 / 18)
    bf = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4)).to(torch.bfloat16)   # bitmap layers count too
    with torch.no_grad():
        bf[0].weight.copy_(w)
        bf[1].weight.fill_(1.0)
    assert sparsify_linears_(bf, min_sparsity=0.5, format="bitmap") == ["0"]
    assert type(bf[0]).__name__ == "BitmapLinear"
    assert metrics.sparsity(bf) == pytest.approx(4 / 18)
    assert metrics.compute_ratio(bf) == pytest.approx(14 / 18)
    with pytest.raises(TypeError, match="model must be"):
        metrics.compute_ratio(w)


def test_top1_match_hand_example():
    a = torch.tensor([[1.0, 2.0, 0.0], [5.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    b = torch.tensor([[0.0, 9.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]])
    assert metrics.top1_match(a, b) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        metrics.top1_match(a, b[:2])


def test_compare_dense_masked_csr_rows(tmp_path):
    dense = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 10))
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for lin in (masked[0], masked[2]):
            lin.weight[lin.weight.abs() < lin.weight.abs().median()] = 0
    x = torch.randn(64, 24)
    rows = metrics.compare_dense_masked_csr(dense, masked, x, reps=2, warmup=1)
    assert [r["model"] for r in rows] == ["dense", "masked", "csr"]
    d, m, c = rows
    assert d["top1_match"] == 1.0 and d["sparsity"] == 0.0 and d["compute_ratio"] == 1.0
    assert m["sparsity"] == pytest.approx(c["sparsity"]) and 0.45 < c["sparsity"] < 0.55
    assert c["top1_match"] == m["top1_match"] and c["rel_err"] == pytest.approx(m["rel_err"], rel=1e-5)
    assert all(r["ms_per_forward"] > 0 for r in rows)
    assert "| csr |" in metrics.format_table(rows)
    png = metrics.plot_comparison(rows, str(tmp_path / "cmp.png"))
    assert (tmp_path / "cmp.png").stat().st_size > 0 and png.endswith("cmp.png")


def _rows(names):
    return [dict(model=n, size_mb=10.0 / (i + 1), sparsity=0.5, compute_ratio=0.5, cosine=0.99,
                 ms_per_forward=1.5 * (i + 1)) for i, n in enumerate(names)]


def test_comparison_plot_labels_do_not_overlap():
    pytest.importorskip("matplotlib")
    names = ["dense", "masked (sparsegpt 50%)", "csr (sparsegpt 50%)", "masked (magnitude 50%)",
             "csr (magnitude 50%)"]
    fig = metrics.comparison_figure(_rows(names), "MiniLM-L6: Dense / Masked / CSR (cosine of mean-pooled embeddings)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels() + [ax.title] + ax.texts
             if t.get_visible() and t.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    for i, (a, ba) in enumerate(boxes):
        for b, bb in boxes[i + 1:]:
            assert not ba.overlaps(bb), f"labels {a!r} and {b!r} overlap"
    ylabels = [t for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert [t.get_text() for t in ylabels] == names[::-1] or sorted(t.get_text() for t in ylabels) == sorted(names)
    for ax in fig.axes:                        # no model name runs into a panel, no value leaves its panel
        box = ax.get_window_extent(renderer)
        for t in ylabels:
            assert not t.get_window_extent(renderer).overlaps(box)
        for t in ax.texts:
            assert t.get_window_extent(renderer).x1 <= box.x1


def test_forward_timing_uses_enough_repetitions():
    lin = nn.Linear(8, 8)
    ms, reps = metrics._time_forward(lin, torch.randn(2, 8), reps=2, warmup=1, min_seconds=0.05)
    assert reps > 2 and ms > 0            # a forward of microseconds is repeated until 50 ms were timed
    rows = metrics.compare_dense_masked_csr(lin, copy.deepcopy(lin), torch.randn(2, 8), reps=3, min_seconds=0.02)
    assert all(r["timed_reps"] >= 3 for r in rows)
