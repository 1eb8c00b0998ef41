"""Triton kernel for Hessian accumulation: H <- alpha * H + beta * X^T X with X in fp16/bf16 on tensor cores.

One program owns one BT x BT tile (i, j) of H with i <= j (tiles wholly below the diagonal exit at once):

* it streams the tokens along K in steps of BK straight from the activations (any strides, no fp32 copy,
  no contiguous copy), ``acc += A^T B`` on tensor cores (bf16 x bf16 and fp16 x fp16 products are exact in
  fp32, and accumulate in fp32);
* every CHUNK tokens it adds the tensor-core accumulator into a second fp32 accumulator with ordinary
  round-to-nearest adds and restarts it. Tensor cores add into the fp32 accumulator with truncation, whose
  bias grows with the number of steps (~1e-4 relative after 65536 tokens); restarting every CHUNK tokens
  keeps that to the few steps of one chunk, so the result equals the fp32 path to fp32 rounding;
* the epilogue reads H once and writes it once: the upper elements (r <= c) get alpha*H[r,c] + beta*S[r,c],
  and the same tile, transposed in registers, writes the mirrored lower elements alpha*H[c,r] + beta*S[r,c].
  So only ~half of X^T X is computed, every element of H is written by exactly one program, and the result
  is exactly symmetric whenever the old H was.

float32 inputs are declined (``supports``) and run on the reference (cuBLAS fp32 GEMM, TF32 off): the exact
fp32 ``tl.dot`` (input_precision="ieee") runs on CUDA cores at a fraction of cuBLAS's fp32 rate, and TF32
would silently lose ~3 decimal digits of the Hessian.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from ..._dispatch import register

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _xt_x(x_ptr, T, T_END, T_INNER, stride_b, stride_t, a_cols, b_cols, in_m, in_n,
          FLAT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, CHUNK: tl.constexpr, UPCAST: tl.constexpr):
    """sum over the tokens t < T of x[t, rows]^T x[t, cols]: [BT, BT] fp32 (T_END >= T: the loop bound).

    One loop along K (so the software pipeline never drains); every CHUNK tokens the tensor-core
    accumulator is added into ``total`` with round-to-nearest fp32 adds and restarted.
    """
    total = tl.zeros((BT, BT), dtype=tl.float32)
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for k in range(0, T_END, BK):
        tok = k + tl.arange(0, BK)
        in_k = tok < T
        if FLAT:
            roff = tok.to(tl.int64) * stride_t
        else:  # batch rows whose stride is not T_INNER * stride_t
            roff = (tok // T_INNER).to(tl.int64) * stride_b + (tok % T_INNER).to(tl.int64) * stride_t
        a = tl.load(x_ptr + roff[:, None] + a_cols, mask=in_k[:, None] & in_m[None, :], other=0.0)
        b = tl.load(x_ptr + roff[:, None] + b_cols, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong in Triton 3.6; exact fp32 products instead
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
        if (k // BK) % (CHUNK // BK) == (CHUNK // BK) - 1:
            total += acc
            acc = tl.zeros((BT, BT), dtype=tl.float32)
    return total + acc


@triton.jit
def _hessian_kernel(x_ptr, h_ptr, T, C, T_INNER, stride_b, stride_t, stride_c, alpha, beta, T_KEY,
                    SCALE_H: tl.constexpr, FLAT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    CHUNK: tl.constexpr, GROUP: tl.constexpr, DYNAMIC: tl.constexpr = True,
                    T_STATIC: tl.constexpr = 0, UPCAST: tl.constexpr = False):
    # grouped tile order (GROUP row blocks at a time) so that the programs running together share most of
    # the X column slabs they stream through L2
    pid = tl.program_id(0)
    nb = tl.cdiv(C, BT)
    per_group = GROUP * nb
    first = (pid // per_group) * GROUP
    rows_in_group = tl.minimum(nb - first, GROUP)
    bi = first + (pid % per_group) % rows_in_group
    bj = (pid % per_group) // rows_in_group
    if bj >= bi:  # the tile holds at least one element on or above the diagonal
        rm = bi * BT + tl.arange(0, BT)
        rn = bj * BT + tl.arange(0, BT)
        in_m = rm < C
        in_n = rn < C
        a_cols = rm[None, :].to(tl.int64) * stride_c
        b_cols = rn[None, :].to(tl.int64) * stride_c
        # Triton 3.6's interpreter cannot take a runtime value as a loop bound: there the loop runs to
        # T_STATIC, a compile-time constant (unused when compiled)
        if DYNAMIC:
            total = _xt_x(x_ptr, T, T, T_INNER, stride_b, stride_t, a_cols, b_cols, in_m, in_n,
                          FLAT, BT, BK, CHUNK, UPCAST)
        else:
            total = _xt_x(x_ptr, T, T_STATIC, T_INNER, stride_b, stride_t, a_cols, b_cols, in_m, in_n,
                          FLAT, BT, BK, CHUNK, UPCAST)
        s = total * beta
        # upper elements (r <= c), row-major
        up = (rm[:, None] <= rn[None, :]) & in_n[None, :]
        p_up = h_ptr + rm[:, None].to(tl.int64) * C + rn[None, :]
        if SCALE_H:
            v_up = tl.load(p_up, mask=up, other=0.0) * alpha + s
        else:
            v_up = s
        tl.store(p_up, v_up, mask=up)
        # mirrored lower elements (c > r): H[c, r], stored row-major along r from the transposed tile
        st = tl.trans(s)
        lo = (rn[:, None] > rm[None, :]) & in_n[:, None]
        p_lo = h_ptr + rn[:, None].to(tl.int64) * C + rm[None, :]
        if SCALE_H:
            v_lo = tl.load(p_lo, mask=lo, other=0.0) * alpha + st
        else:
            v_lo = st
        tl.store(p_lo, v_lo, mask=lo)


def _config(bt, bk, chunk, warps, stages, group=8):
    return triton.Config({"BT": bt, "BK": bk, "CHUNK": chunk, "GROUP": group}, num_warps=warps, num_stages=stages)


#: GPU configurations tried by the autotuner (keyed on C, the token-count bucket and the dtype). 128 x 128
#: tiles with 8 warps hold both fp32 accumulators in registers (64 + 64 per thread); 128 x 256 would need
#: 256 accumulator registers per thread.
GPU_CONFIGS = [
    _config(128, 64, 1024, 8, 4),
    _config(128, 64, 1024, 8, 3),
    _config(128, 128, 1024, 8, 3),
]
#: below these sizes the first GPU configuration runs without tuning
AUTOTUNE_MIN_COLS, AUTOTUNE_MIN_TOKENS = 1024, 4096
#: the interpreter's configuration: small tiles, and a CHUNK that small tests cross
INTERPRETER_CONFIG = _config(32, 16, 32, 4, 1, group=2)

_tuned = triton.autotune(GPU_CONFIGS, key=["C", "T_KEY"], restore_value=["h_ptr"])(_hessian_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch(H: torch.Tensor, x: torch.Tensor, alpha: float, beta: float, *, scale_h: bool,
           config: Optional[triton.Config] = None) -> None:
    """H <- alpha * H + beta * X^T X for x [b, T, C] fp16/bf16 (any strides); H float32 [C, C] contiguous.

    ``scale_h=False`` ignores the old H (alpha is then unused). ``config`` forces one configuration
    (benchmark sweeps); by default the autotuner picks on the GPU and INTERPRETER_CONFIG runs elsewhere.
    """
    b, t_inner, C = x.shape
    T = b * t_inner
    flat = b == 1 or t_inner == 0 or x.stride(0) == t_inner * x.stride(1)
    t_key = min(triton.next_power_of_2(max(T, 1)), 1 << 16)
    args = (x, H, T, C, max(t_inner, 1), x.stride(0), x.stride(1), x.stride(2), float(alpha), float(beta), t_key)
    # no FMA contraction: the mirrored lower half must round exactly like the upper half (exact symmetry)
    meta = dict(SCALE_H=bool(scale_h), FLAT=bool(flat), enable_fp_fusion=False)
    if _interpreting() or not x.is_cuda:
        config = config or INTERPRETER_CONFIG
        meta.update(DYNAMIC=False, T_STATIC=triton.cdiv(T, config.kwargs["BK"]) * config.kwargs["BK"], UPCAST=True)
    if config is None and (C < AUTOTUNE_MIN_COLS or T < AUTOTUNE_MIN_TOKENS):
        config = GPU_CONFIGS[0]  # small problems: tuning would cost more than it could save
    if config is None:
        _tuned[lambda m: (triton.cdiv(C, m["BT"]) ** 2,)](*args, **meta)
    else:
        kw = dict(config.kwargs)
        grid = (triton.cdiv(C, kw["BT"]) ** 2,)
        _hessian_kernel[grid](*args, **meta, **kw, num_warps=config.num_warps, num_stages=config.num_stages)


def best_configs() -> Dict[tuple, triton.Config]:
    """The autotuner's choice per key (for benchmark reports)."""
    return dict(_tuned.cache)


# float32 inputs run on the reference: exact fp32 would need CUDA-core dots (slower than cuBLAS fp32) and TF32
# would lose precision
@register("accumulate_hessian", "triton", tensor="x", dtypes=KERNEL_DTYPES)
def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, nsamples: int) -> int:
    """The reference's update (see reference.accumulate_hessian) with the fused kernel; returns n + b."""
    total = nsamples + x.shape[0]
    launch(H, x, nsamples / total, 2.0 / total, scale_h=nsamples > 0)
    return total
