"""The small host <-> device transfers of a kernel call: a parameter block going up, a NaN/Inf flag coming back.

Both are queued on torch's current stream and never wait for the GPU. Through csrc/staging.cpp (a ring of
pinned slots, pinned flag cells with events: a few microseconds) when the CUDA extension is already loaded,
else through torch (a pinned tensor from its caching host allocator and an async copy: 20-120 us on the lent
H200 hosts, which a whole-model merge pays twice per tensor).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import _ext

_SLOT_BYTES = 512  # csrc/staging.cpp kSlotBytes


def upload(data: bytes, device: torch.device) -> torch.Tensor:
    """``data`` (a multiple of 4 bytes) as a new int32 device tensor; the copy is queued on the current stream.
    Reinterpret slices with ``.view(torch.float32)`` for packed fp32 values."""
    if len(data) % 4 or not data:
        raise ValueError(f"data must be a non-empty multiple of 4 bytes, got {len(data)}")
    ext = _ext.loaded_extension() if device.type == "cuda" else None
    if ext is not None and len(data) <= _SLOT_BYTES:
        out = torch.empty(len(data) // 4, dtype=torch.int32, device=device)
        ext.staging_upload(data, out.data_ptr(), out.device.index, _ext.stream_ptr(out))
        return out
    host = torch.frombuffer(bytearray(data), dtype=torch.int32)
    if device.type != "cuda":
        return host.to(device)
    # a plain host-to-GPU copy waits for the whole stream; a pinned one is queued (torch keeps it alive)
    return host.pin_memory().to(device, non_blocking=True)


class _Ticket:
    """A flag's pending copy in csrc/staging.cpp; given back when read or dropped."""
    __slots__ = ("ext", "ticket")

    def __init__(self, ext, flag: torch.Tensor):
        self.ext = ext
        self.ticket = ext.staging_watch(flag.data_ptr(), flag.device.index, _ext.stream_ptr(flag))

    def __call__(self) -> int:
        ticket, self.ticket = self.ticket, -1
        if ticket < 0:
            raise RuntimeError("a watched flag can be read once")
        return int(self.ext.staging_wait(ticket))

    def __del__(self):
        if self.ticket >= 0:
            try:
                self.ext.staging_release(self.ticket)
            except Exception:  # interpreter shutdown: the process is giving everything back anyway
                pass


def watch(flag: torch.Tensor) -> Callable[[], int]:
    """Copy a one-element int32 CUDA flag to the host behind the work queued so far; the returned function
    waits for that copy only (not for work queued later) and returns the flag's value."""
    ext = _ext.loaded_extension()
    if ext is not None:
        return _Ticket(ext, flag)
    host = torch.empty(1, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(flag.device))

    def read() -> int:
        done.synchronize()
        return int(host.item())

    return read
