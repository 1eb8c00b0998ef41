"""The host-side plumbing of kernel calls: small parameter uploads and NaN/Inf flag reads (sparsity_engine._staging,
csrc/staging.cpp) and Triton launches through compiled kernels (sparsity_engine._launch.FastKernel)."""
import struct

import pytest
import torch

from sparsity_engine import _launch, _staging
from sparsity_engine._validate import deferred_device_checks, device_flag_check

cuda = pytest.mark.cuda


def _ext_loaded():
    from sparsity_engine._ext import load_extension

    return load_extension()


def test_upload_on_cpu_and_bad_sizes():
    data = struct.pack("3f2i", 1.5, -2.0, 3.25, 7, -9)
    out = _staging.upload(data, torch.device("cpu"))
    assert out.dtype == torch.int32 and out.tolist()[3:] == [7, -9]
    assert out[:3].view(torch.float32).tolist() == [1.5, -2.0, 3.25]
    for bad in (b"", b"abc"):
        with pytest.raises(ValueError, match="multiple of 4 bytes"):
            _staging.upload(bad, torch.device("cpu"))


@cuda
@pytest.mark.parametrize("count", [1, 7, 128, 129, 300])  # 128 int32 fill a pinned slot; more goes through torch
def test_upload_values_arrive(count):
    assert _ext_loaded().staging_slot_bytes() == _staging._SLOT_BYTES
    values = torch.randint(-2**31, 2**31 - 1, (count,)).tolist()
    out = _staging.upload(struct.pack(f"{count}i", *values), torch.device("cuda"))
    assert out.device.type == "cuda" and out.tolist() == values


@cuda
def test_upload_ring_wraps_without_overwriting_queued_copies():
    """More uploads than the ring has slots, queued behind a long kernel: every slot is reused only after its
    copy ran, so every tensor holds its own values."""
    _ext_loaded()
    torch.cuda._sleep(50_000_000)  # keeps the stream busy while the uploads are queued
    outs = [_staging.upload(struct.pack("3i", i, -i, 7 * i), torch.device("cuda")) for i in range(2500)]
    got = torch.stack(outs).cpu()
    want = torch.tensor([[i, -i, 7 * i] for i in range(2500)], dtype=torch.int32)
    assert torch.equal(got, want)


@cuda
def test_watch_reads_each_flag_behind_its_own_work():
    _ext_loaded()
    flags = torch.zeros(600, dtype=torch.int32, device="cuda")
    reads = []
    for i in range(600):
        if i % 3 == 0:
            flags[i] = 1
        reads.append(_staging.watch(flags[i:i + 1]))
        flags[i] = 5  # queued after the copy: the read sees the value at the watch
    assert [r() for r in reads] == [1 if i % 3 == 0 else 0 for i in range(600)]
    with pytest.raises(RuntimeError, match="read once"):
        reads[0]()
    dropped = [_staging.watch(flags[:1]) for _ in range(300)]  # never read: given back when collected
    del dropped
    assert _staging.watch(flags[1:2])() == 5


@cuda
def test_deferred_flag_check_raises_in_the_check():
    _ext_loaded()
    flag = torch.ones(1, dtype=torch.int32, device="cuda")
    with deferred_device_checks() as checks:
        device_flag_check(flag, lambda: (_ for _ in ()).throw(ValueError("flagged")))
    flag.zero_()
    assert len(checks) == 1
    with pytest.raises(ValueError, match="flagged"):
        checks[0]()


# ---------------------------------------------------------------- FastKernel

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, a, SCALE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        y = tl.load(y_ptr + offs, mask=m, other=0.0)
        tl.store(out_ptr + offs, (a * x + y) * SCALE, mask=m)
except ImportError:  # pragma: no cover
    triton = None


@cuda
@pytest.mark.skipif(triton is None, reason="needs Triton")
def test_fast_kernel_matches_every_specialization():
    """Aligned and unaligned pointers, n = 1, n divisible by 16 or not, three dtypes, repeated calls (the fast
    path) with VERIFY on: every launch runs the variant Triton's own dispatch picks and gives its result."""
    assert _launch.VERIFY
    fast = _launch.FastKernel(_axpy_kernel)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in (1, 16, 17, 1000, 4096):
            for offset in (0, 1, 8):
                x = torch.randn(n + offset, device="cuda", dtype=dtype)[offset:]
                y = torch.randn(n + offset, device="cuda", dtype=dtype)[offset:]
                for rep in range(3):
                    out = torch.empty(n + offset, device="cuda", dtype=dtype)[offset:]
                    a = 0.5 + rep
                    fast[(triton.cdiv(n, 256),)](x, y, out, n, a, SCALE=2, BLOCK=256)
                    want = ((a * x.float() + y.float()) * 2).to(dtype)
                    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
    assert len(fast._variants) >= 3 * 4


@cuda
@pytest.mark.skipif(triton is None, reason="needs Triton")
def test_fast_kernel_rejects_runtime_parameters_as_keywords():
    fast = _launch.FastKernel(_axpy_kernel)
    x = torch.randn(8, device="cuda")
    with pytest.raises(TypeError, match="'a' must be passed positionally"):
        fast[(1,)](x, x, x, 8, a=1.0, SCALE=1, BLOCK=8)


@pytest.mark.skipif(triton is None, reason="needs Triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: Triton's interpreter")
def test_fast_kernel_is_triton_itself_off_the_gpu():
    fast = _launch.FastKernel(_axpy_kernel)
    x, y = torch.randn(37), torch.randn(37)
    out = torch.empty(37)
    fast[(3,)](x, y, out, 37, 0.5, SCALE=3, BLOCK=16)
    torch.testing.assert_close(out, (0.5 * x + y) * 3)
    assert not fast._variants  # nothing cached: every launch is Triton's own


def test_fast_kernel_key_covers_what_triton_specializes():
    """The variant key: dtype and 16-byte alignment of pointers (tensors or Ptr), 32/64-bit range, divisibility
    by 16 and == 1 of integers, the type of floats and bools, None; anything else declines the fast path."""
    x = torch.empty(64, dtype=torch.float32)
    key, raw = _launch._facts((x, x[1:], _launch.Ptr(4096, torch.int32), _launch.Ptr(4100, torch.int32),
                               1, 16, 17, 2**31, 0.5, True, None))
    assert key[0] == (torch.float32, x.data_ptr() % 16 == 0)
    assert key[1] == (torch.float32, (x.data_ptr() + 4) % 16 == 0)
    assert key[2] == (torch.int32, True) and key[3] == (torch.int32, False)
    assert key[4] == (True, False, True) and key[5] == (True, True, False) and key[6] == (True, False, False)
    assert key[7] == (False, True, False)
    assert key[8] is float and key[9] is bool and key[10] is None
    assert raw[:4] == [x.data_ptr(), x.data_ptr() + 4, 4096, 4100] and raw[4:] == [1, 16, 17, 2**31, 0.5, True, None]
    assert _launch._facts((x, (1, 2))) == (None, None)


def test_fast_kernel_hook_detection():
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert not _launch._hook_active(None) and not _launch._hook_active(Chain([]))
    assert _launch._hook_active(Chain([print])) and _launch._hook_active(print)


def test_backend_availability_cache_follows_the_interpreter_setting(monkeypatch):
    from sparsity_engine import _dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = _dispatch.backend_reasons("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = _dispatch.backend_reasons("triton")
    if not torch.cuda.is_available():
        assert compiled and "no CUDA GPU" in compiled[0]
    if triton is not None:
        assert interpreted == []
