"""The bitmap weight format: a bit per weight plus the packed nonzero values, laid out for tensor cores.

A weight W [N, K] (fp16/bf16; N = out_features, K = in_features) is cut into **bands** of 16 rows and
**tiles** of 16 x 16 (one mma.sync m16n8k16 A operand); 8 consecutive tiles of a band form a **group** (128
columns). N is padded to a multiple of 16 and K to a multiple of 128 with zeros, which cost a bit each and no
values. Arrays:

* ``masks``   int32 [nbands, ktiles, 8]: one bit per weight. Word ``masks[b, k, g]`` holds the 32 weights that
  lane ``4g + t`` (t = 0..3) of a warp holds in its A fragment of tile (b, k): bit ``8t + j``, j = 0..7 the
  fragment element (register j // 2, half j % 2). So byte t of word g is exactly lane 4g + t's 8 elements.
* ``values``  [>= ceil8(nnz)] in the weight dtype: the nonzeros in the order of the set bits of ``masks`` read
  as one bit string (word by word, bit 0 first), zero-padded to a multiple of 8 (the kernels copy 16-byte
  chunks); a tile's values are contiguous, ordered by lane then fragment element.
* ``offsets`` int32 [nbands * ktiles + 1]: index in ``values`` of each tile's first value (tile (b, k) is entry
  ``b * ktiles + k``); offsets[0] = 0, differences = popcounts of the tiles, offsets[-1] = nnz.
* ``shape``   (N, K).

Which weight a bit stands for. With h = (j >> 1) & 1, q = j >> 2, e = j & 1, and tile k = 2P + s (P the pair of
tiles, s = 0 / 1 its step), bit 8t + j of masks[b, k, g] is

    row = 16 b + 8 h + g,   col = 32 P + 8 t + 4 s + 2 q + e.

Rows follow the A fragment (element j sits in row g + 8h). Columns are a relabelling of the fragment's k
index (k = 2t + e + 8q -> 8t + 4s + 2q + e) applied to W and, in the kernel, to x alike, so the product is
unchanged; it puts the activations a lane multiplies in one pair of tiles (its B fragments) in 8 consecutive
columns, one 16-byte load per token instead of four 4-byte loads.

Bytes: 1/8 per weight (masks) + 2 per nonzero + 4 per 256 weights (offsets): 0.57x dense at 50% sparsity,
0.37x at 70%, 0.17x at 90%. Nothing else is stored; the kernels derive every position from popcounts.

Indices read by kernels are validated when a BitmapMatrix is built from arrays (:func:`validate_bitmap`):
shapes, dtypes and devices always; with ``full=True`` (state dicts, constructors from user arrays) also that
offsets start at 0 and step by each tile's popcount, fit ``values``, padding bits are zero and the values are
finite, so a kernel never reads outside its arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

BAND = 16          # rows per band (the MMA's M)
TILE = 16          # columns per tile (the MMA's K)
GROUP_TILES = 8    # tiles per group: K is padded to a multiple of 128
GROUP_COLS = TILE * GROUP_TILES
VALUE_ALIGN = 8    # values are padded to a multiple of 8 elements (16 bytes)
DTYPES = (torch.float16, torch.bfloat16)
_KEYS = ("masks", "offsets", "values")
_MAX_NNZ = 2**31 - 1  # offsets are int32


def padded_shape(n: int, k: int) -> Tuple[int, int]:
    """(nbands, ktiles): bands of 16 rows, tiles of 16 columns, ktiles a multiple of GROUP_TILES."""
    nbands = -(-n // BAND)
    ktiles = -(-k // GROUP_COLS) * GROUP_TILES
    return nbands, ktiles


def values_length(nnz: int) -> int:
    """Length of the values array for nnz nonzeros: a multiple of VALUE_ALIGN, at least VALUE_ALIGN."""
    return max(VALUE_ALIGN, -(-nnz // VALUE_ALIGN) * VALUE_ALIGN)


# ---------------------------------------------------------------------------------------------- bit layout
def to_bit_order(w: torch.Tensor) -> torch.Tensor:
    """A padded [16 nbands, 128 ngroups] tensor -> [nbands, ktiles, 8, 32] in bit order (a permuted copy)."""
    np_, kp = w.shape
    nb, kpairs = np_ // BAND, kp // 32
    # dims (band, h, g, P, t, s, q, e) -> (band, P, s, g, t, q, h, e)
    v = w.reshape(nb, 2, 8, kpairs, 4, 2, 2, 2).permute(0, 3, 5, 2, 4, 6, 1, 7)
    return v.reshape(nb, 2 * kpairs, 8, 32)


def from_bit_order(b: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_bit_order`: [nbands, ktiles, 8, 32] -> [16 nbands, 16 ktiles]."""
    nb, kt = b.shape[0], b.shape[1]
    # dims (band, P, s, g, t, q, h, e) -> (band, h, g, P, t, s, q, e)
    v = b.reshape(nb, kt // 2, 2, 8, 4, 2, 2, 2).permute(0, 6, 3, 1, 4, 2, 5, 7)
    return v.reshape(nb * BAND, kt * TILE)


_SHIFTS8 = {}


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., 32] -> int32 [...]: bit i of the word = bits[..., i] (byte t = bits 8t .. 8t+7)."""
    shifts = _SHIFTS8.get(bits.device)
    if shifts is None:
        shifts = _SHIFTS8[bits.device] = torch.arange(8, dtype=torch.uint8, device=bits.device)
    by = (bits.reshape(*bits.shape[:-1], 4, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)
    return by.contiguous().view(torch.int32).reshape(bits.shape[:-1])


def unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> bool [..., 32] (the inverse of :func:`pack_bits`)."""
    shifts = _SHIFTS8.get(words.device)
    if shifts is None:
        shifts = _SHIFTS8[words.device] = torch.arange(8, dtype=torch.uint8, device=words.device)
    by = words.contiguous().view(torch.uint8).reshape(*words.shape, 4, 1)
    return ((by >> shifts) & 1).bool().reshape(*words.shape, 32)


_POPCOUNT8 = {}


def tile_counts(masks: torch.Tensor) -> torch.Tensor:
    """int64 [nbands, ktiles]: the number of set bits of each tile (popcount by a byte table)."""
    table = _POPCOUNT8.get(masks.device)
    if table is None:
        table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)
        table = _POPCOUNT8[masks.device] = table.to(masks.device)
    by = masks.contiguous().view(torch.uint8).reshape(masks.shape[0], masks.shape[1], 32).long()
    return table[by].sum(-1, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- the matrix
@dataclass(eq=False)
class BitmapMatrix:
    """A pruned fp16/bf16 weight [N, K] in the bitmap layout described in this module's docstring.

    Build one with ``sparsity_engine.ops.bitmap.to_bitmap(weight)``, from a state dict with
    :meth:`from_state_dict`, or from arrays with :meth:`from_arrays` (both validate everything).
    ``max_group`` (values in the fullest group of 8 tiles) sizes the kernels' shared-memory buffers; it is
    derived from ``offsets`` when the matrix is built, so a call never reads it back from the GPU.
    """

    masks: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor
    shape: Tuple[int, int]
    nnz: int
    max_group: int

    def __post_init__(self):
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.nnz = int(self.nnz)
        self.max_group = int(self.max_group)

    @classmethod
    def from_arrays(cls, masks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
                    shape) -> "BitmapMatrix":
        """Build from the three arrays, checking everything a kernel relies on (one GPU sync)."""
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
            raise ValueError(f"shape must be a pair (N, K), got {shape!r}")
        shape = (int(shape[0]), int(shape[1]))
        validate_arrays(masks, offsets, values, shape)
        nnz, max_group = check_contents(masks, offsets, values, shape)
        return cls(masks, offsets, values, shape, nnz, max_group)

    # ------------------------------------------------------------------ facts
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / (n * k) if n * k else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays (padding included)."""
        return sum(getattr(self, key).numel() * getattr(self, key).element_size() for key in _KEYS)

    def __repr__(self) -> str:
        return (f"BitmapMatrix(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes})")

    # ------------------------------------------------------------------ conversions
    def to_dense(self) -> torch.Tensor:
        """The dense weight [N, K] with torch ops (exact: each stored value written once, zeros elsewhere)."""
        n, k = self.shape
        bits = unpack_bits(self.masks)
        perm = torch.zeros(bits.shape, dtype=self.dtype, device=self.device)
        perm[bits] = self.values[: self.nnz]
        return from_bit_order(perm)[:n, :k].contiguous()

    def to(self, *args, **kwargs) -> "BitmapMatrix":
        """Move to a device (a floating dtype given must be float16/bfloat16; the index arrays keep theirs)."""
        values = self.values.to(*args, **kwargs)
        if values.dtype not in DTYPES:
            raise TypeError(f"a BitmapMatrix holds float16/bfloat16 values, not {values.dtype}")
        device = values.device
        return BitmapMatrix(self.masks.to(device), self.offsets.to(device), values, self.shape, self.nnz,
                            self.max_group)

    # ------------------------------------------------------------------ safetensors
    def to_state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """Flat dict of tensors (safetensors-ready): the three arrays plus ``shape`` as int64 [2]."""
        sd = {prefix + key: getattr(self, key).contiguous() for key in _KEYS}
        sd[prefix + "shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor], prefix: str = "") -> "BitmapMatrix":
        """Read back :meth:`to_state_dict`'s tensors, validating them fully (corrupt arrays raise ValueError)."""
        missing = [prefix + k for k in _KEYS + ("shape",) if prefix + k not in sd]
        if missing:
            raise ValueError(f"state dict is missing bitmap keys {missing}")
        shape_t = sd[prefix + "shape"]
        if not isinstance(shape_t, torch.Tensor) or shape_t.numel() != 2 or shape_t.is_floating_point():
            raise ValueError(f"{prefix}shape must be an integer tensor of 2 entries, got {shape_t!r}")
        return cls.from_arrays(*(sd[prefix + k] for k in _KEYS), tuple(int(v) for v in shape_t.tolist()))


def validate_arrays(masks, offsets, values, shape, name: str = "bitmap") -> None:
    """Structural checks, no pass over the data: types, dtypes, shapes, devices, contiguity."""
    n, k = shape
    if n < 0 or k < 0:
        raise ValueError(f"{name}.shape must be non-negative, got {shape}")
    for key, t in (("masks", masks), ("offsets", offsets), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.{key} must be a torch.Tensor, got {type(t).__name__}")
    nbands, ktiles = padded_shape(n, k)
    if masks.dtype != torch.int32 or tuple(masks.shape) != (nbands, ktiles, 8):
        raise ValueError(f"{name}.masks must be int32 of shape ({nbands}, {ktiles}, 8) for shape {shape}, got "
                         f"{masks.dtype} {tuple(masks.shape)}")
    if offsets.dtype != torch.int32 or tuple(offsets.shape) != (nbands * ktiles + 1,):
        raise ValueError(f"{name}.offsets must be int32 of shape ({nbands * ktiles + 1},), got "
                         f"{offsets.dtype} {tuple(offsets.shape)}")
    if values.dtype not in DTYPES:
        raise TypeError(f"{name}.values must be float16 or bfloat16, got {values.dtype}")
    if values.dim() != 1 or values.numel() < VALUE_ALIGN or values.numel() % VALUE_ALIGN:
        raise ValueError(f"{name}.values must be 1-D with a length that is a positive multiple of {VALUE_ALIGN}, "
                         f"got shape {tuple(values.shape)}")
    for key, t in (("masks", masks), ("offsets", offsets), ("values", values)):
        if not t.is_contiguous():
            raise ValueError(f"{name}.{key} must be contiguous")
    if len({masks.device, offsets.device, values.device}) > 1:
        raise ValueError(f"{name}'s arrays must be on one device, got masks on {masks.device}, offsets on "
                         f"{offsets.device}, values on {values.device}")


def check_contents(masks, offsets, values, shape, name: str = "bitmap") -> Tuple[int, int]:
    """Full checks (reads every array once, one sync): returns (nnz, max_group).

    offsets[0] == 0 and offsets[i+1] - offsets[i] == popcount of tile i (so they are monotone and consistent
    with the bits the kernels decode), nnz = offsets[-1] <= len(values) - padding, bits beyond N rows / K
    columns are zero, and the stored values are finite.
    """
    n, k = shape
    nbands, ktiles = padded_shape(n, k)
    counts = tile_counts(masks).reshape(-1)
    steps = offsets[1:].long() - offsets[:-1].long()
    checks = [offsets[0] == 0, (steps == counts).all()]
    pad_ok = _padding_is_zero(masks, n, k)
    if pad_ok is not None:
        checks.append(pad_ok)
    ok = torch.stack([c.reshape(()) for c in checks]).tolist()
    if not ok[0]:
        raise ValueError(f"{name}.offsets must start at 0, got {int(offsets[0])}")
    if not ok[1]:
        bad = int((steps != counts).nonzero()[0, 0])
        raise ValueError(f"{name}.offsets do not match the masks: tile {bad} has {int(counts[bad])} set bits but "
                         f"offsets step by {int(steps[bad])} there (offsets must be the running popcount)")
    if len(ok) > 2 and not ok[2]:
        raise ValueError(f"{name}.masks has bits set beyond the shape {shape} (in the padding rows/columns)")
    nnz = int(offsets[-1])
    if nnz > values.numel() or values_length(nnz) > values.numel():
        raise ValueError(f"{name}.values holds {values.numel()} entries, fewer than the {values_length(nnz)} that "
                         f"nnz={nnz} needs (padded to a multiple of {VALUE_ALIGN})")
    stored = values[:nnz]
    if nnz and not bool(torch.isfinite(stored).all()):
        raise ValueError(f"{name}.values contains NaN/Inf among its {nnz} stored values; they must be finite")
    max_group = int(counts.reshape(nbands, ktiles // GROUP_TILES, GROUP_TILES).sum(-1).max()) if counts.numel() else 0
    return nnz, max_group


def _padding_is_zero(masks: torch.Tensor, n: int, k: int) -> Optional[torch.Tensor]:
    """A bool scalar tensor: no bit is set for a row >= n or a column >= k (None when there is no padding).

    Only the last band (rows) and the last group of every band (columns) can hold padding, so only those
    are unpacked.
    """
    checks = []
    if n % BAND:
        last = from_bit_order(unpack_bits(masks[-1:]))           # [16, Kp]
        checks.append(~last[n % BAND:].any())
    if k % GROUP_COLS:
        tail = from_bit_order(unpack_bits(masks[:, -GROUP_TILES:]))  # [Np, 128]
        checks.append(~tail[:, k % GROUP_COLS:].any())
    if not checks:
        return None
    return torch.stack(checks).all()


def validate_bitmap(bm, name: str = "bitmap") -> None:
    """Cheap structural checks of a BitmapMatrix before a kernel call (the contents were checked when built)."""
    if not isinstance(bm, BitmapMatrix):
        raise TypeError(f"{name} must be a BitmapMatrix (from to_bitmap), got {type(bm).__name__}")
    validate_arrays(bm.masks, bm.offsets, bm.values, bm.shape, name)
