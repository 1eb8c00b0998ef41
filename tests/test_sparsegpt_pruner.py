"""SparseGPTPruner: the layer lifecycle on nn.Linear and transformers Conv1D, for weights and task vectors."""
import pytest
import torch
from torch import nn

import sparsity_engine as se
from helpers import rel_err


def calibrate(pruner, in_features, batches=3):
    xs = [torch.randn(2, 16, in_features) @ (torch.eye(in_features) + 0.3 * torch.randn(in_features, in_features))
          for _ in range(batches)]
    for x in xs:
        pruner.add_batch(x)
    X = torch.cat([x.reshape(-1, in_features) for x in xs])
    return X


def test_linear_prune_in_place_matches_op():
    layer = nn.Linear(32, 12)
    W0 = layer.weight.detach().clone()
    p = se.SparseGPTPruner(layer)
    X = calibrate(p, 32)
    assert p.nsamples == 6  # 3 batches of 2 sequences
    H_expected = 2 / p.nsamples * X.double().T @ X.double()
    assert rel_err(p.H, H_expected) < 1e-5
    H = p.H.clone()
    res = p.prune(sparsity=0.5, blocksize=16)
    ref = se.sparsegpt_prune(W0, H, sparsity=0.5, blocksize=16)
    assert torch.equal(res.weight, ref.weight) and torch.equal(res.mask, ref.mask)
    assert torch.equal(layer.weight.data, ref.weight)
    assert res.weight.shape == (12, 32)
    p.free()
    with pytest.raises(RuntimeError, match="freed"):
        p.prune()


def test_conv1d_orientation():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    # nf=48 outputs, nx=32 inputs: weight [32, 48]. The error ratio to 2:4 magnitude below is 0.86 +- 0.016
    # over random draws with 48 outputs (+- 0.029 with 12 outputs: 1 was ~4.7 sd away, reached in ~1e-6 of draws)
    layer = Conv1D(48, 32)
    layer.weight.data.normal_()
    W0 = layer.weight.detach().clone()
    p = se.SparseGPTPruner(layer)
    X = calibrate(p, 32)
    H = p.H.clone()
    res = p.prune(prune_n=2, prune_m=4, blocksize=16)
    ref = se.sparsegpt_prune(W0.t(), H, prune_n=2, prune_m=4, blocksize=16)
    assert res.weight.shape == (48, 32)
    assert torch.equal(res.weight, ref.weight)
    assert torch.equal(layer.weight.data, ref.weight.t())
    # the layer still computes x @ W + b, and beats plain 2:4 magnitude masking on its calibration inputs
    out_err = (layer(X) - (X @ W0 + layer.bias)).norm()
    keep = W0.abs().t().reshape(48, 8, 4).argsort(-1, descending=True).argsort(-1) < 2
    W_mag = W0 * keep.reshape(48, 32).t()
    assert out_err < (X @ W_mag - X @ W0).norm()


def test_prune_task_vector_layer():
    layer = nn.Linear(24, 8).to(torch.bfloat16)
    base = layer.weight.detach().clone()
    layer.weight.data += (0.05 * torch.randn(8, 24)).to(torch.bfloat16)  # fine-tuned = base + delta
    tuned = layer.weight.detach().clone()
    p = se.SparseGPTPruner(layer)
    calibrate(p, 24)
    H = p.H.clone()
    res = p.prune_task_vector(base, density=0.25, blocksize=8)
    delta = tuned.float() - base.float()
    ref = se.prune_task_vector(delta, H, density=0.25, blocksize=8)
    assert torch.equal(res.weight, ref.weight) and res.weight.dtype == torch.float32
    assert torch.equal(layer.weight.data, (base.float() + ref.weight).to(torch.bfloat16))
    assert res.mask.float().mean() <= 0.25


def test_errors():
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D"):
        se.SparseGPTPruner(nn.Conv2d(3, 3, 3))
    p = se.SparseGPTPruner(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="add_batch"):
        p.prune()
    with pytest.raises(ValueError, match=r"inp must have shape \[\.\.\., 8\]"):
        p.add_batch(torch.randn(3, 7))
    p.add_batch(torch.randn(5, 8))
    with pytest.raises(ValueError, match="base_weight must have the layer's weight shape"):
        p.prune_task_vector(torch.zeros(8, 4), density=0.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        p.prune(sparsity=2.0)
