"""The CSR weight format used by the CSR kernels (inference layout, not torch's sparse CSR).

A weight W [N, K] (N = out_features rows, K = in_features columns) is stored as:

* ``values``      [S] in the weight dtype: the nonzeros of each row, column-ascending;
* ``col_indices`` [S] int16 when K <= 32767 (half the bytes of int32), else int32;
* ``crow_indices`` [N+1] int64: row r owns slots ``crow[r] .. crow[r+1]``; every ``crow[r]`` is a multiple of
  ``ALIGN`` (= 8), so that a row starts on a 16-byte boundary for both bf16 values and int16 indices and the
  kernels read 8 entries with one 16-byte load. The tail slots of a row (beyond its length) are padding:
  value 0, column 0, and the kernels mask them out;
* ``row_lengths`` [N] int32: the true number of nonzeros of each row (nnz = row_lengths.sum());
* ``row_order`` [N] int32: the rows by descending length, the order in which warps pick rows up, so that
  long rows start first and the tail of the launch is short rows (longest-processing-time-first);
* ``shape`` (N, K).

Padding costs at most 7 slots per row (< 2% at LLM sizes and >= 50% sparsity).

The kernels index x and the arrays with these numbers and check nothing, so a CSRMatrix checks them once,
when it is built (also by ``from_state_dict`` and by ``nn.CSRLinear`` after a load): every column index in
[0, K), row offsets from 0, multiples of ALIGN, non-decreasing, ending at the number of slots, row lengths
that fit their rows, row_order a permutation (:func:`check_csr_indices`: a few reductions on the arrays'
device and one host read).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

ALIGN = 8
_KEYS = ("crow_indices", "col_indices", "values", "row_lengths", "row_order")


def row_starts_padded(lengths: torch.Tensor) -> torch.Tensor:
    """crow [N+1] int64 from per-row lengths, each row rounded up to ALIGN slots."""
    padded = (lengths.to(torch.int64) + (ALIGN - 1)) // ALIGN * ALIGN
    crow = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(padded, 0, out=crow[1:])
    return crow


@dataclass(eq=False)
class CSRMatrix:
    """A pruned weight [N, K] in the padded CSR layout described in this module's docstring."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    row_lengths: torch.Tensor
    row_order: torch.Tensor
    shape: Tuple[int, int]

    def __post_init__(self):
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        validate_csr(self)
        check_csr_indices(self)

    # ------------------------------------------------------------------ facts
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        """Number of stored nonzeros (padding excluded); computed once (a GPU sync), then cached."""
        nnz = self.__dict__.get("_nnz")
        if nnz is None:
            nnz = int(self.row_lengths.sum()) if self.row_lengths.numel() else 0
            self.__dict__["_nnz"] = nnz
        return nnz

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / (n * k) if n * k else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of every array, padding included."""
        return sum(getattr(self, key).numel() * getattr(self, key).element_size() for key in _KEYS)

    def __repr__(self) -> str:
        return (f"CSRMatrix(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, "
                f"index_dtype={self.col_indices.dtype}, device={self.device})")

    # ------------------------------------------------------------------ conversions
    def valid_slots(self) -> torch.Tensor:
        """Bool [S]: True for slots holding a real entry, False for row padding."""
        total = self.values.numel()
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.device),
                                       self.crow_indices.diff(), output_size=total)
        pos = torch.arange(total, device=self.device) - self.crow_indices[rows]
        return pos < self.row_lengths[rows].to(torch.int64)

    def to_dense(self) -> torch.Tensor:
        """The dense weight [N, K] (exact: every stored value written once, zeros elsewhere)."""
        n, k = self.shape
        dense = torch.zeros(n, k, dtype=self.dtype, device=self.device)
        if self.values.numel() == 0:
            return dense
        valid = self.valid_slots()
        rows = torch.repeat_interleave(torch.arange(n, device=self.device), self.crow_indices.diff(),
                                       output_size=self.values.numel())
        dense[rows[valid], self.col_indices[valid].to(torch.int64)] = self.values[valid]
        return dense

    def to_torch_sparse(self) -> torch.Tensor:
        """The same matrix as a standard torch sparse CSR tensor (no padding), e.g. for cuSPARSE."""
        valid = self.valid_slots()
        crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(self.row_lengths.to(torch.int64), 0, out=crow[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(crow, self.col_indices[valid].to(torch.int64), self.values[valid],
                                           size=self.shape, check_invariants=False)

    def to(self, *args, **kwargs) -> "CSRMatrix":
        """Move to a device (indices keep their dtype; values follow a floating dtype if one is given)."""
        moved = {key: getattr(self, key).to(*args, **kwargs) if key == "values"
                 else getattr(self, key).to(device=_device_of(args, kwargs, self.device)) for key in _KEYS}
        return CSRMatrix(shape=self.shape, **moved)

    # ------------------------------------------------------------------ safetensors
    def to_state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """Flat dict of tensors (safetensors-ready): the five arrays plus ``shape`` as int64 [2]."""
        sd = {prefix + key: getattr(self, key).contiguous() for key in _KEYS}
        sd[prefix + "shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor], prefix: str = "") -> "CSRMatrix":
        missing = [prefix + k for k in _KEYS + ("shape",) if prefix + k not in sd]
        if missing:
            raise ValueError(f"state dict is missing CSR keys {missing}")
        shape = tuple(int(v) for v in sd[prefix + "shape"].tolist())
        return cls(shape=shape, **{k: sd[prefix + k] for k in _KEYS})


def _device_of(args, kwargs, default):
    for a in list(args) + [kwargs.get("device")]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
    return default


def validate_csr(csr: CSRMatrix, name: str = "csr") -> None:
    """Structural checks (cheap, no full read): dtypes, sizes, devices."""
    if not isinstance(csr, CSRMatrix):
        raise TypeError(f"{name} must be a CSRMatrix (from to_csr), got {type(csr).__name__}")
    n, k = csr.shape
    if n < 0 or k < 0:
        raise ValueError(f"{name}.shape must be non-negative, got {csr.shape}")
    if csr.values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}.values must be float32/float16/bfloat16, got {csr.values.dtype}")
    if csr.col_indices.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"{name}.col_indices must be int16 or int32, got {csr.col_indices.dtype}")
    if csr.col_indices.dtype == torch.int16 and k > 32767:
        raise ValueError(f"{name}.col_indices is int16 but in_features={k} > 32767 needs int32")
    if csr.crow_indices.dtype != torch.int64 or csr.crow_indices.shape != (n + 1,):
        raise ValueError(f"{name}.crow_indices must be int64 of shape ({n + 1},), got "
                         f"{csr.crow_indices.dtype} {tuple(csr.crow_indices.shape)}")
    for key in ("row_lengths", "row_order"):
        t = getattr(csr, key)
        if t.dtype != torch.int32 or t.shape != (n,):
            raise ValueError(f"{name}.{key} must be int32 of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    if csr.values.dim() != 1 or csr.col_indices.shape != csr.values.shape:
        raise ValueError(f"{name}.values and {name}.col_indices must be 1-D of one length, got "
                         f"{tuple(csr.values.shape)} and {tuple(csr.col_indices.shape)}")
    if len({getattr(csr, key).device for key in _KEYS}) > 1:
        raise ValueError(f"{name}'s arrays must be on one device")


def check_csr_indices(csr: CSRMatrix, name: str = "csr") -> None:
    """The index checks the kernels rely on (see the module docstring); ValueError naming the array. The
    conditions are reduced on the arrays' device and read back once."""
    n, k = csr.shape
    slots = csr.values.numel()
    crow, cols = csr.crow_indices, csr.col_indices
    lengths, order = csr.row_lengths.to(torch.int64), csr.row_order.to(torch.int64)
    dev = crow.device
    ok = []
    # every slot's column (padding included: the kernels may load it) inside [0, K)
    ok.append(((cols >= 0) & (cols < k)).all() if slots else torch.ones((), dtype=torch.bool, device=dev))
    spans = crow.diff()
    ok.append((crow[0] == 0) & (crow[-1] == slots) & (crow % ALIGN == 0).all() & (spans >= 0).all())
    ok.append(((lengths >= 0) & (lengths <= spans)).all() if n else torch.ones((), dtype=torch.bool, device=dev))
    if n:
        seen = torch.zeros(n, dtype=torch.int64, device=dev)
        inside = (order >= 0) & (order < n)
        seen.index_add_(0, order.clamp(0, n - 1), inside.to(torch.int64))
        ok.append(inside.all() & (seen == 1).all())
    else:
        ok.append(torch.ones((), dtype=torch.bool, device=dev))
    cols_ok, crow_ok, len_ok, order_ok = torch.stack(ok).tolist()
    if not cols_ok:
        raise ValueError(f"{name}.col_indices must lie in [0, in_features={k}); got values in "
                         f"[{int(cols.min())}, {int(cols.max())}]")
    if not crow_ok:
        raise ValueError(f"{name}.crow_indices must start at 0, be multiples of {ALIGN}, never decrease and end at "
                         f"the number of slots ({slots}); got first {int(crow[0])}, last {int(crow[-1])}")
    if not len_ok:
        raise ValueError(f"{name}.row_lengths must lie in [0, crow_indices[r + 1] - crow_indices[r]] for every row r")
    if not order_ok:
        raise ValueError(f"{name}.row_order must be a permutation of 0 .. {n - 1}")
