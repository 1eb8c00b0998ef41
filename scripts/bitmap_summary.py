"""Compact summary of benchmarks/bench_bitmap.py's JSON: per shape and sparsity, dense us and the ratios.

    python3 scripts/bitmap_summary.py results/bitmap_linear.json             # the format-rule table
    python3 scripts/bitmap_summary.py results/bitmap2.json --variants        # kernel variants vs dense, per batch
"""
import json
import sys


def variants_table(report: dict) -> None:
    """Per shape, sparsity and batch: dense us, then each variant's us and ratio to dense (and CSR's), worst error."""
    rows = report["rows"]
    names = sorted({key[1:-3] for r in rows for key in r if key.startswith("v") and key.endswith("_us")}, key=int)
    print("shape sp batch dense_us | " + " | ".join(f"v{v} us (x dense)" for v in names) + " | csr us (x dense) | max err")
    for r in rows:
        cells = []
        for v in names:
            us = r.get(f"v{v}_us")
            cells.append("-" if us is None else f"{us:.1f} ({r['dense_us'] / us:.2f})")
        csr = "-" if r.get("csr_us") is None else f"{r['csr_us']:.1f} ({r['dense_us'] / r['csr_us']:.2f})"
        errs = [r[f"v{v}_err"] for v in names if r.get(f"v{v}_err") is not None]
        err = f"{max(errs):.1e}" if errs else "-"
        print(f"{r['shape']} {r['sparsity']:.2f} {r['batch']} {r['dense_us']:.1f} | " + " | ".join(cells)
              + f" | {csr} | {err}")
    host = report.get("env", {}).get("host_overhead")
    if host:
        print("host us per eager call:", {k: round(v, 2) for k, v in host.items()})


if len(sys.argv) > 2 and sys.argv[2] == "--variants":
    variants_table(json.load(open(sys.argv[1])))
    sys.exit(0)
rows = json.load(open(sys.argv[1]))["rows"]
keys = sorted({(r["shape"], r["dtype"], round(r["sparsity"], 2)) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
print("shape dtype sp | b1: dense ours v0 v1 v2 csr (x dense: auto csr) | b8 auto csr | b16 auto csr | b32 ours rebuild | b64 ours rebuild | b128 ours rebuild (us)")
for shape, dtype, sp in keys:
    sel = {r["batch"]: r for r in rows if (r["shape"], r["dtype"], round(r["sparsity"], 2)) == (shape, dtype, sp)}

    def f(b, key, fmt="{:.2f}"):
        r = sel.get(b)
        return "-" if r is None or r.get(key) is None else fmt.format(r[key])

    print(f"{shape} {dtype[:4]} {sp:.2f} | {f(1, 'dense_us', '{:.1f}')} {f(1, 'ours_us', '{:.1f}')} "
          f"{f(1, 'v0_us', '{:.1f}')} {f(1, 'v1_us', '{:.1f}')} {f(1, 'v2_us', '{:.1f}')} {f(1, 'csr_us', '{:.1f}')} "
          f"({f(1, 'auto_vs_dense')} {f(1, 'csr_vs_dense')}) | {f(8, 'auto_vs_dense')} {f(8, 'csr_vs_dense')} | "
          f"{f(16, 'auto_vs_dense')} {f(16, 'csr_vs_dense')} | {f(32, 'ours_us', '{:.0f}')} {f(32, 'rebuild_us', '{:.0f}')} | "
          f"{f(64, 'ours_us', '{:.0f}')} {f(64, 'rebuild_us', '{:.0f}')} | {f(128, 'ours_us', '{:.0f}')} "
          f"{f(128, 'rebuild_us', '{:.0f}')}")
