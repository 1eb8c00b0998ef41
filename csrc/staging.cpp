// Small host <-> device transfers that cost microseconds of host time, for the per-merge parameters going up
// and the per-merge NaN/Inf flags coming back (see sparsity_engine/_staging.py).
//
// torch's way (a pinned tensor from its caching host allocator, an async copy, an event) costs 35-120 us of
// Python per transfer on the lent H200 hosts; a whole-model merge makes two per tensor. Here:
//
// * uploads: a ring of pinned slots per device. A slot's bytes are copied in, an async copy and an event are
//   queued on the caller's stream; the slot is written again only after its event has completed (the ring is
//   large enough that this wait happens only when more than kSlots uploads are still queued);
// * flags: a pinned int32 cell per watched flag, copied behind the kernel that sets it, with an event. The
//   caller gets a ticket; waiting on it returns the value and gives the cell back (so does releasing it).
//
// Host-only code: no kernels. Events belong to the device that was current when they were made, so every
// pool is per device, and the device is made current (then restored) where an event is created.
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

namespace {

constexpr int kMaxDevices = 64;
constexpr int kSlotBytes = 512;
constexpr int kSlots = 1024;
constexpr int kCellsPerBlock = 256;

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    SE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) SE_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
};

cudaEvent_t new_event(int device) {
  DeviceGuard guard(device);
  cudaEvent_t ev = nullptr;
  SE_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  return ev;
}

struct Ring {
  char* host = nullptr;
  cudaEvent_t events[kSlots] = {};
  int next = 0;
};

struct Cell {
  int32_t* host = nullptr;
  cudaEvent_t event = nullptr;
  int device = -1;
  bool busy = false;
};

std::mutex g_mutex;
Ring g_rings[kMaxDevices];
std::vector<Cell> g_cells;
std::vector<int64_t> g_free_cells[kMaxDevices];

void check_device(int device) {
  SE_REQUIRE(device >= 0 && device < kMaxDevices, "device must be a CUDA device index in [0, 64)");
}

// Grows the cell table by one pinned block for ``device`` (called with g_mutex held).
void add_cells(int device) {
  int32_t* block = nullptr;
  SE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&block), kCellsPerBlock * sizeof(int32_t),
                              cudaHostAllocPortable));
  for (int i = 0; i < kCellsPerBlock; ++i) {
    Cell cell;
    cell.host = block + i;
    cell.device = device;
    g_free_cells[device].push_back(static_cast<int64_t>(g_cells.size()));
    g_cells.push_back(cell);
  }
}

Cell& cell_of(int64_t ticket) {
  SE_REQUIRE(ticket >= 0 && ticket < static_cast<int64_t>(g_cells.size()) && g_cells[ticket].busy,
             "ticket must be one staging_watch returned and not yet waited on or released");
  return g_cells[ticket];
}

void free_cell(int64_t ticket) {
  Cell& cell = g_cells[ticket];
  cell.busy = false;
  g_free_cells[cell.device].push_back(ticket);
}

}  // namespace

int64_t staging_slot_bytes() { return kSlotBytes; }

void staging_upload(const std::string& data, uintptr_t dst, int device, uintptr_t stream) {
  check_device(device);
  SE_REQUIRE(!data.empty() && data.size() <= static_cast<size_t>(kSlotBytes), "data must hold 1 to 512 bytes");
  SE_REQUIRE(dst != 0, "dst must be a device pointer");
  std::lock_guard<std::mutex> lock(g_mutex);
  Ring& ring = g_rings[device];
  if (ring.host == nullptr) {
    SE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&ring.host), size_t(kSlots) * kSlotBytes,
                                cudaHostAllocPortable));
  }
  const int slot = ring.next;
  ring.next = (slot + 1) % kSlots;
  cudaEvent_t& ev = ring.events[slot];
  if (ev == nullptr) {
    ev = new_event(device);
  } else {
    SE_CUDA_CHECK(cudaEventSynchronize(ev));  // the slot's previous copy has been read by the device
  }
  char* host = ring.host + size_t(slot) * kSlotBytes;
  std::memcpy(host, data.data(), data.size());
  const cudaStream_t s = se::as_stream(stream);
  SE_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dst), host, data.size(), cudaMemcpyHostToDevice, s));
  SE_CUDA_CHECK(cudaEventRecord(ev, s));
}

int64_t staging_watch(uintptr_t flag, int device, uintptr_t stream) {
  check_device(device);
  SE_REQUIRE(flag != 0, "flag must be a device pointer to an int32");
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_free_cells[device].empty()) add_cells(device);
  const int64_t ticket = g_free_cells[device].back();
  g_free_cells[device].pop_back();
  Cell& cell = g_cells[ticket];
  if (cell.event == nullptr) cell.event = new_event(device);
  const cudaStream_t s = se::as_stream(stream);
  try {
    SE_CUDA_CHECK(cudaMemcpyAsync(cell.host, reinterpret_cast<const void*>(flag), sizeof(int32_t),
                                  cudaMemcpyDeviceToHost, s));
    SE_CUDA_CHECK(cudaEventRecord(cell.event, s));
  } catch (...) {
    g_free_cells[device].push_back(ticket);
    throw;
  }
  cell.busy = true;
  return ticket;
}

int32_t staging_wait(int64_t ticket) {
  cudaEvent_t ev = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    ev = cell_of(ticket).event;
  }
  // outside the lock: other threads may stage while this one waits for its kernel
  const cudaError_t err = cudaEventSynchronize(ev);
  std::lock_guard<std::mutex> lock(g_mutex);
  const int32_t value = *g_cells[ticket].host;
  free_cell(ticket);
  if (err != cudaSuccess) se::throw_cuda(err, "cudaEventSynchronize(flag event)", __FILE__, __LINE__);
  return value;
}

void staging_release(int64_t ticket) {
  std::lock_guard<std::mutex> lock(g_mutex);
  Cell& cell = cell_of(ticket);
  // the queued copy may still write the cell: wait for it before the cell can be handed out again
  cudaEventSynchronize(cell.event);
  free_cell(ticket);
}
