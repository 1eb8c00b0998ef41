"""One bitmap_linear kernel under Nsight Compute: a 28672x8192 bf16 weight, batch 1 (default 70% sparse).

    ncu --kernel-name regex:bitmap_linear --launch-skip 3 --launch-count 1 --section WarpStateStats \\
        --section SchedulerStats --section SpeedOfLight python3 scripts/profile_bitmap.py [SPARSITY] [VARIANT]
"""
import sys

import torch

from sparsity_engine.ops import bitmap as B
from sparsity_engine.ops.bitmap import cuda as bcuda

sparsity = float(sys.argv[1]) if len(sys.argv) > 1 else 0.7
variant = int(sys.argv[2]) if len(sys.argv) > 2 else None
n, k = 28672, 8192
w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
w = w * (torch.rand(n, k, device="cuda") >= sparsity)
bm = B.to_bitmap(w)
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
for _ in range(5):
    bcuda.linear(x, bm.masks, bm.offsets, bm.values, None, n, k, bm.max_group, variant=variant)
torch.cuda.synchronize()
print("profiled", sparsity, variant if variant is not None else bcuda.VARIANT)
