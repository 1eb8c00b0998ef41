"""Triton device functions shared by the op families' Triton backends (imported only by those modules).

* :func:`round_to`: an fp32 value rounded to a storage dtype as torch rounds it (the merge reproduces mergekit's
  roundings, the selection ranks t - base as torch computes it).
* :func:`magnitude_key` / :func:`order_key`: int32 keys whose integer order is the order of |d| / of d, in the
  dtype's own width (fp32: 31 / 32 bits; fp16 and bf16: 15 / 16 bits). These are the keys of the masks
  family's selection (``select_edges``) and of every kernel that compares against its edges.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter truncates on a float32 -> bfloat16 cast; the GPU rounds to nearest even
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_to(v, DT: tl.constexpr):
    """fp32 v rounded to the storage dtype DT (round to nearest even), kept as fp32. bf16 is rounded on the
    bits under the interpreter, so that it agrees with the GPU and torch."""
    if DT == tl.bfloat16:
        if INTERPRETING:
            bits = v.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
            r = bits.to(tl.float32, bitcast=True)
        else:
            r = v.to(DT).to(tl.float32)  # cvt.rn: round to nearest even on the GPU
    elif DT == tl.float32:
        r = v
    else:
        r = v.to(DT).to(tl.float32)
    return r


@triton.jit
def _signed_bits(d):
    """The bits of d (fp32, fp16 or bf16) as a sign-extended int32."""
    if d.dtype == tl.float32:
        bits = d.to(tl.int32, bitcast=True)
    else:
        bits = d.to(tl.int16, bitcast=True).to(tl.int32)
    return bits


@triton.jit
def magnitude_key(d):
    """|d| as an order-preserving int32: the float's bits without the sign (fp32: 31 bits, 16-bit: 15)."""
    if d.dtype == tl.float32:
        key = _signed_bits(d) & 0x7FFFFFFF
    else:
        key = _signed_bits(d) & 0x7FFF
    return key


@triton.jit
def order_key(d):
    """d as an order-preserving int32: the magnitude key, negated for negative values (so -0.0 and +0.0 share
    the key 0)."""
    mag = magnitude_key(d)
    return tl.where(_signed_bits(d) < 0, -mag, mag)
