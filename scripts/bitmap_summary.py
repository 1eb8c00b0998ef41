"""Compact summary of benchmarks/bench_bitmap.py's JSON: per shape and sparsity, dense us and the ratios."""
import json
import sys

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
