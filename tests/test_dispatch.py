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


def test_device_reasons_by_placement(monkeypatch):
    """Placement rules without a GPU: only the tensors' .device is read, so stand-ins on 'cuda' devices will do."""
    from types import SimpleNamespace

    def on(*devices):
        return [SimpleNamespace(device=torch.device(d)) for d in devices]

    for backend in ("triton", "cuda"):
        assert _dispatch._device_reasons(backend, on("cuda:0", "cuda:0", "cuda:0"), auto=True) == []
        assert _dispatch._device_reasons(backend, on("cuda:0", "cuda:1"), auto=True) == [
            "the tensors are on different CUDA devices"]
        mixed = _dispatch._device_reasons(backend, on("cuda:0", "cpu"), auto=False)
        assert len(mixed) == 1 and "cpu and cuda" in mixed[0]
    assert _dispatch._device_reasons("reference", on("cuda:0", "cpu"), auto=True) == []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch._device_reasons("triton", on("cpu", "cpu"), auto=False) == []
    assert "only for CUDA tensors" in _dispatch._device_reasons("triton", on("cpu"), auto=True)[0]
    assert "CUDA extension" in _dispatch._device_reasons("cuda", on("cpu"), auto=False)[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _dispatch._device_reasons("triton", on("cpu"), auto=False)[0]


@pytest.mark.parametrize("value", [True, "0.5", None, 1j])
def test_fractions_and_weights_reject_non_numbers(value):
    with pytest.raises(TypeError, match="density must be a real number"):
        se.merge_task_vectors(torch.zeros(4), [torch.zeros(4)], [1.0], method="ties", density=value)
    with pytest.raises(TypeError, match=r"weights\[0\] must be a real number"):
        se.merge_task_vectors(torch.zeros(4), [torch.zeros(4)], [value], method="ties")
