"""A plain-Python model of csrc/bitmap.cu's index arithmetic, lane by lane, run on the CPU.

It stages a group's values as the kernel's cp.async copies do (from element ``start & ~7``), computes each lane's
position with the same byte-packed scan, decodes the A fragments from the mask bits, builds the B fragments from
the relabelled columns, applies mma.sync m16n8k16's fragment layouts (PTX ISA, "Matrix Fragments for
mma.m16n8k16") and writes outputs through the C fragment mapping of the epilogue. Tests compare it with
F.linear, so a wrong index in the format, the layout or the kernel's formulas fails on a machine without a GPU.
"""
from __future__ import annotations

import torch


def _u32(v: int) -> int:
    return v & 0xFFFFFFFF


def _popc(v: int) -> int:
    return bin(_u32(v)).count("1")


def _byte_perm(x: int, y: int, s: int) -> int:
    """CUDA __byte_perm: byte k of the result is byte (s >> 4k) & 7 of the 8 bytes {y:x}."""
    src = _u32(x) | (_u32(y) << 32)
    out = 0
    for k in range(4):
        sel = (s >> (4 * k)) & 7
        out |= ((src >> (8 * sel)) & 0xFF) << (8 * k)
    return out


def _unpack(x, masks, offsets, values, n):
    """tokens, nbands, ktiles, ngroups, mask words (unsigned), offsets, values (float) as lists, y zeros."""
    nbands, ktiles = masks.shape[0], masks.shape[1]
    m32 = [[[_u32(int(w)) for w in tile] for tile in band] for band in masks.tolist()]
    y = torch.zeros(x.shape[0], n, dtype=torch.float64)
    return (x.shape[0], nbands, ktiles, ktiles // 8, m32, [int(v) for v in offsets.tolist()],
            values.double().tolist(), y)


def kernel_model(x: torch.Tensor, masks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, n: int,
                 k: int, ksplit: int = 2) -> torch.Tensor:
    """y [tokens, n] in float64, computed as the kernel does (one pass of 8 tokens per n-tile)."""
    tokens, nbands, ktiles, ngroups, m32, offs, vals, y = _unpack(x, masks, offsets, values, n)
    xd = x.double()
    nt = (tokens + 7) // 8
    for band in range(nbands):
        parts = []
        for part in range(ksplit):
            ga, gb = part * ngroups // ksplit, (part + 1) * ngroups // ksplit
            acc = torch.zeros(nt, 32, 4, dtype=torch.float64)  # [n-tile][lane][c0..c3]
            for gi in range(ga, gb):
                tile0 = band * ktiles + gi * 8
                start = offs[tile0]
                first = start & ~7
                stage = vals[first:]                      # the staged copy (starts at element `first`)
                so = offs[tile0: tile0 + 8]
                tstart = [so[i] - start for i in range(8)]
                sv0 = start & 7                           # sv = staged + (start & 7)
                # per lane: the byte-packed exclusive scan over row-pairs g
                pk = []
                for lane in range(32):
                    g = lane >> 2
                    w = [m32[band][gi * 8 + i][g] for i in range(8)]
                    words = []
                    for h in range(2):
                        lo = _byte_perm(_popc(w[4 * h]), _popc(w[4 * h + 1]), 0x0040)
                        hi = _byte_perm(_popc(w[4 * h + 2]), _popc(w[4 * h + 3]), 0x0040)
                        words.append(0 if g == 7 else _byte_perm(lo, hi, 0x5410))
                    pk.append(words)
                sc = [list(p) for p in pk]
                d = 4
                while d < 32:
                    prev = [list(s) for s in sc]
                    for lane in range(32):
                        if lane >= d:
                            sc[lane] = [_u32(prev[lane][h] + prev[lane - d][h]) for h in range(2)]
                    d <<= 1
                sc = [[_u32(sc[lane][h] - pk[lane][h]) for h in range(2)] for lane in range(32)]
                col0 = gi * 128
                for p in range(4):
                    for s in range(2):
                        i = 2 * p + s
                        a_tile = torch.zeros(16, 16, dtype=torch.float64)   # A[row][k]
                        b_tile = torch.zeros(nt, 16, 8, dtype=torch.float64)  # B[n-tile][k][n]
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            w = m32[band][gi * 8 + i][g]
                            below = _byte_perm(sc[lane][i >> 2], 0, 0x4440 | (i & 3))
                            m = (w >> (8 * t)) & 0xFF
                            idx = tstart[i] + below + _popc(w & ((1 << (8 * t)) - 1))
                            q = sv0 + idx
                            frag = []
                            for j in range(8):
                                if m & (1 << j):
                                    frag.append(stage[q])
                                    q += 1
                                else:
                                    frag.append(0.0)
                            for r in range(4):
                                for e in range(2):
                                    a_tile[g + 8 * (r & 1), 2 * t + e + 8 * (r >> 1)] = frag[2 * r + e]
                            for nn in range(nt):
                                token = 8 * nn + g
                                col = col0 + 32 * p + 8 * t
                                x8 = [float(xd[token, col + c]) if token < tokens and col + c < k else 0.0
                                      for c in range(8)]
                                b0, b1 = (x8[0], x8[1]), (x8[2], x8[3])
                                if s == 1:
                                    b0, b1 = (x8[4], x8[5]), (x8[6], x8[7])
                                b_tile[nn, 2 * t, g], b_tile[nn, 2 * t + 1, g] = b0
                                b_tile[nn, 2 * t + 8, g], b_tile[nn, 2 * t + 9, g] = b1
                        for nn in range(nt):
                            c = a_tile @ b_tile[nn]                            # [16 rows][8 tokens]
                            for lane in range(32):
                                g, t = lane >> 2, lane & 3
                                acc[nn, lane] += torch.stack([c[g, 2 * t], c[g, 2 * t + 1],
                                                              c[g + 8, 2 * t], c[g + 8, 2 * t + 1]])
            parts.append(acc)
        total = sum(parts)
        for r in range(16):
            row = band * 16 + r
            for tk in range(8 * nt):
                if row >= n or tk >= tokens:
                    continue
                ln, comp, nn = 4 * (r & 7) + ((tk & 7) >> 1), 2 * (r >> 3) + (tk & 1), tk >> 3
                y[tk, row] = total[nn, ln, comp]
    return y


def gemv_model(x: torch.Tensor, masks: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, n: int, k: int,
               ksplit: int = 2, tt: int = 4, pairs: bool = False) -> torch.Tensor:
    """y [tokens, n] in float64, computed as csrc/bitmap.cu's CUDA-core kernel (variant 3; ``pairs``: 4) does.

    Per group: the activations stored by each lane into the bit-order slots (32 per tile, slot b = bit b's column), the
    staged values (from element ``start & ~7``), each lane's word, its segmented scan over the 8 row-pairs of its
    tile, its set bits from the highest down taking values from the last one down, the slot each bit reads, the
    row (bit 1) it adds into (``pairs``: the value taken from the aligned pair of the stage loaded at its high half,
    or first); then the shuffle sums over the 4 tiles and the fixed-order sum over the warps.
    """
    tokens, nbands, ktiles, ngroups, m32, offs, vals, y = _unpack(x, masks, offsets, values, n)
    xd = x.double().tolist()
    for tok0 in range(0, tokens, tt):
        for band in range(nbands):
            red = []  # per warp of the band: [token][16 rows]
            for part in range(ksplit):
                ga, gb = part * ngroups // ksplit, (part + 1) * ngroups // ksplit
                acc = [[[0.0, 0.0] for _ in range(tt)] for _ in range(32)]  # [lane][token][h]
                for gi in range(ga, gb):
                    xs = [[None] * 256 for _ in range(tt)]
                    for lane in range(32):  # gemv_load_x + gemv_store_x
                        col = gi * 128 + 4 * lane
                        slot = (2 * (lane >> 3) + (lane & 1)) * 32 + 8 * ((lane & 7) >> 1)
                        for nn in range(tt):
                            tok = tok0 + nn
                            xr = [xd[tok][col + e] if tok < tokens and col + e < k else 0.0 for e in range(4)]
                            xs[nn][slot: slot + 8] = [xr[0], xr[1], xr[0], xr[1], xr[2], xr[3], xr[2], xr[3]]
                    tile0 = band * ktiles + gi * 8
                    vbase = offs[tile0]
                    stage = vals[vbase & ~7:]
                    sv0 = vbase & 7
                    for qd in range(2):
                        words = [m32[band][gi * 8 + 4 * qd + (lane >> 3)][lane & 7] for lane in range(32)]
                        for lane in range(32):
                            g, tl = lane & 7, lane >> 3
                            i = 4 * qd + tl
                            w = words[lane]
                            inc = sum(_popc(words[8 * tl + gg]) for gg in range(g + 1))  # the shuffle scan
                            p = sv0 + (offs[tile0 + i] - vbase) + inc
                            xt = i * 32
                            m = w
                            pair = tuple(stage[2 * ((p - 1) >> 1): 2 * ((p - 1) >> 1) + 2]) if m else None
                            while m:
                                b = m.bit_length() - 1
                                m ^= 1 << b
                                p -= 1
                                if pairs:  # p is the value's index from the 16-byte-aligned stage start
                                    if p & 1:
                                        pair = tuple(stage[p - 1: p + 1])
                                    v = pair[p & 1]
                                else:
                                    v = stage[p]
                                for nn in range(tt):
                                    xv = xs[nn][xt + b]
                                    assert xv is not None, "an activation slot read before it was written"
                                    acc[lane][nn][1 if b & 2 else 0] += v * xv
                red.append([[sum(acc[g + 8 * q][nn][h] for q in range(4)) for h in range(2) for g in range(8)]
                            for nn in range(tt)])
            for nn in range(tt):
                tok = tok0 + nn
                for r in range(16):
                    row = band * 16 + r
                    if row < n and tok < tokens:
                        y[tok, row] = sum(red[wv][nn][r] for wv in range(ksplit))
    return y
