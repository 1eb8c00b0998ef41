"""Shared test helpers: the device kernels run on here, tolerances per dtype, poisoned outputs."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
# Kernels run on the GPU where there is one, else on the CPU under Triton's interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the accelerated backends the tests compare with the reference here: Triton (on the GPU, or its interpreter),
# and the CUDA extension where there is a GPU
KERNEL_BACKENDS = ["triton"] + (["cuda"] if HAS_CUDA else [])

# relative tolerances by dtype (DESIGN.md: fp32 ~1e-5, tf32 ~5e-4, bf16 ~1e-2)
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
TF32_RTOL = 5e-4


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def assert_rel_close(actual, expected, rtol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.double()).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like t filled with a value no kernel should produce (NaN for floats)."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    if t.dtype == torch.bool:
        return torch.ones_like(t)
    return torch.full_like(t, -7)


def kernel_backends(op: str) -> list:
    """The KERNEL_BACKENDS that implement ``op`` (every op family imported first)."""
    import sparsity_engine
    from sparsity_engine import _dispatch

    sparsity_engine.backends()
    return [b for b in KERNEL_BACKENDS if b in _dispatch.registered_ops().get(op, [])]
