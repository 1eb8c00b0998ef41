"""Device probe: versions, build tools, and the two ceilings (copy bandwidth, bf16 matmul rate)."""
import json
import os
import shutil
import subprocess
import sys

import torch
import triton
import triton.testing

info = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
        "gpu": torch.cuda.get_device_name(0), "nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja")}
try:
    import pybind11
    info["pybind11"] = pybind11.get_include()
except ImportError as e:
    info["pybind11"] = f"missing: {e}"
info["nvcc_version"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
b = torch.empty_like(a)
ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
info["copy_TBps"] = round(2 * n / ms / 1e9, 3)
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
ms = triton.testing.do_bench(lambda: x @ y, return_mode="median")
info["bf16_TFLOPs"] = round(2 * 8192**3 / ms / 1e9, 1)
xf, yf = x.float(), y.float()
torch.backends.cuda.matmul.allow_tf32 = False
ms = triton.testing.do_bench(lambda: xf @ yf, return_mode="median")
info["fp32_TFLOPs"] = round(2 * 8192**3 / ms / 1e9, 1)
print(json.dumps(info, indent=1))
out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump(info, f, indent=1)
