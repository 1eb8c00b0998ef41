"""The backend registry: selection, the environment variable, and errors that say why."""
import pytest
import torch

import sparsity_engine as se
from sparsity_engine import _dispatch


def test_backends_reports_every_backend_and_op():
    report = se.backends()
    assert set(report) == {"reference", "triton", "cuda"}
    assert report["reference"]["available"] is True
    assert "nm_mask" in report["reference"]["ops"]
    if not torch.cuda.is_available():
        assert report["cuda"]["available"] is False
        assert any("GPU" in r for r in report["cuda"]["reasons"])


def test_auto_uses_reference_for_cpu_tensors():
    x = torch.randn(4, 8)
    se.nm_mask(x, 2, 4)  # imports the family, which registers its backends
    assert _dispatch.choose("nm_mask", None, x, 2, 4).backend == "reference"


def test_explicit_backend_that_cannot_run_says_why():
    x = torch.randn(4, 8)
    with pytest.raises(se.BackendUnavailableError, match="cuda"):
        se.nm_mask(x, 2, 4, backend="cuda")


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be"):
        se.nm_mask(torch.randn(4, 8), 2, 4, backend="fast")


def test_env_var_selects_default(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert _dispatch.choose("nm_mask", None, x, 2, 4).backend == "reference"
    monkeypatch.setenv(_dispatch.ENV_VAR, "warp-speed")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        se.nm_mask(x, 2, 4)


def test_inputs_not_modified():
    x = torch.randn(4, 8)
    before = x.clone()
    se.nm_mask(x, 2, 4)
    assert torch.equal(x, before)
