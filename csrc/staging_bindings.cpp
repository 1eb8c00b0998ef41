// Python bindings of the small host <-> device transfers (csrc/staging.cpp); see sparsity_engine/_staging.py.
#include <cstdint>
#include <string>

#include "registry.h"

int64_t staging_slot_bytes();
void staging_upload(const std::string& data, uintptr_t dst, int device, uintptr_t stream);
int64_t staging_watch(uintptr_t flag, int device, uintptr_t stream);
int32_t staging_wait(int64_t ticket);
void staging_release(int64_t ticket);

SE_BINDINGS(staging) {
  m.def("staging_slot_bytes", &staging_slot_bytes, "The largest upload staging_upload takes, in bytes.");
  m.def("staging_upload", &staging_upload,
        "Copy bytes (at most staging_slot_bytes()) to device memory asynchronously on the stream, through a "
        "ring of pinned slots; args: data (bytes), dst ptr, device index, stream");
  m.def("staging_watch", &staging_watch,
        "Queue a copy of an int32 device flag into pinned memory behind the work on the stream; returns a "
        "ticket for staging_wait / staging_release; args: flag ptr, device index, stream");
  m.def("staging_wait", &staging_wait,
        "Wait for a watched flag's copy and return its value; the ticket is used up; args: ticket");
  m.def("staging_release", &staging_release, "Give back a ticket that will not be waited on; args: ticket");
}
