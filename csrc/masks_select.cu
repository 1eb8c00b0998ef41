// The masks family's selection (sparsity_engine/ops/masks: select_edges, whole-tensor topk_mask and
// magnitude_prune): exact top-k edges over whole tensors by most-significant-digit radix select, one edge per
// row, several rows over up to 8 inputs in the same read (the magnitude / breadcrumbs bands of a merge).
//
// Order. Every entry has a 32-bit unsigned key whose integer order is the order the op ranks by:
//   magnitude: |d| as the float's bits without the sign, d = t, or t - base rounded to t's dtype as torch
//              rounds it (fp32 difference, then round to nearest even), exactly the merge kernel's delta;
//   order:     the float's bits mapped monotonically (negatives inverted, positives with the sign bit set;
//              -0.0 counts as +0.0).
// 16-bit floats put their 16-bit key in the upper half, so two 8-bit digits decide them; fp32 takes four.
// Equal keys are ordered by flat index, ascending. A row asks for the entry at 1-based position p of the
// descending order: its key K and, among the `ties` entries equal to K, the rank `rem` (1-based) of that
// entry. The result is an edge (K, J): entry e is before the edge iff key > K, or key == K and e < J, where J
// is the flat index of the equal entry of 0-based rank rem in index order, the first one not before the edge
// (n when every equal entry is before). With later_first (equal keys ordered by index descending,
// breadcrumbs) J is the index of the equal entry of 0-based rank ties - rem and the test is e >= J.
//
// Passes. Each digit pass reads the inputs once: a block takes chunks of `chunk` entries and builds, in shared
// memory, the histogram of the next digit among the entries whose higher digits equal the row's prefix.
// Shared atomics on one address serialise, and the first digit of a magnitude key is its exponent (task
// vectors put most entries in a handful of exponents), so each lane adds into one of `copies` private copies
// of the histograms, offset by one bank from each other (the copy as the minor index, so that lanes on
// different copies never share a bank, measured slower: see BENCHMARKS.md). A block sums its copies once and
// adds the sums to the global histogram; in the last pass it also sums them after every chunk and stores each
// chunk's counts (rows x chunks x 256) so that the rank of a tie can be located without another read. A
// one-block kernel picks each row's digit on the device between passes: no host round trip anywhere; the
// caller reads nothing back.
#include <algorithm>
#include <cstdint>
#include <vector>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_scan.cuh>

#include "common.h"

namespace {

constexpr int kMaxInputs = 8;
constexpr int kMaxRows = 16;
constexpr int kBins = 256;
constexpr int kThreads = 512;
constexpr int kHistSmem = 64 * 1024;  // copies x rows x 256 counters: three blocks of 512 threads per SM
constexpr int kWriteThreads = 256;

enum Mode : int { kMagnitude = 0, kOrder = 1 };

// Everything a pass needs about the inputs and the rows, passed by value.
struct Plan {
  const void* t[kMaxInputs];
  const void* base;   // nullptr: keys of t itself
  int64_t n;
  int ninputs;
  int rows;
  int input[kMaxRows];        // the input a row ranks
  int row_of[kMaxInputs][2];  // the rows ranking an input (-1: none)
  int later_first[kMaxRows];
  int slot[kMaxRows];         // where a row's (K, J) goes in out_k / out_j
  int64_t rank[kMaxRows];     // p: the 1-based position of the edge's entry in the descending order
};

// State per row in device memory, written by the pick kernel: prefix (digits chosen so far), rem (the rank
// still to find among the entries matching the prefix), ties (how many match the prefix and the last digit).
constexpr int kPrefix = 0, kRem = 1, kTies = 2, kStateWords = 4;

template <typename T> struct Bits;
template <> struct Bits<float> { using U = uint32_t; static constexpr int kShift = 0; };
template <> struct Bits<__half> { using U = uint16_t; static constexpr int kShift = 16; };
template <> struct Bits<__nv_bfloat16> { using U = uint16_t; static constexpr int kShift = 16; };

// A value's bits as float and back (16-bit floats round to nearest even).
template <typename T> __device__ __forceinline__ float bits_to_f(typename Bits<T>::U u);
template <> __device__ __forceinline__ float bits_to_f<float>(uint32_t u) { return __uint_as_float(u); }
template <> __device__ __forceinline__ float bits_to_f<__half>(uint16_t u) { return __half2float(__ushort_as_half(u)); }
template <> __device__ __forceinline__ float bits_to_f<__nv_bfloat16>(uint16_t u) { return __uint_as_float(uint32_t(u) << 16); }
template <typename T> __device__ __forceinline__ typename Bits<T>::U f_to_bits(float v);
template <> __device__ __forceinline__ uint32_t f_to_bits<float>(float v) { return __float_as_uint(v); }
template <> __device__ __forceinline__ uint16_t f_to_bits<__half>(float v) { return __half_as_ushort(__float2half_rn(v)); }
template <> __device__ __forceinline__ uint16_t f_to_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// The 32-bit key of the value with bits x (base value bits b when has_base), as described above.
template <typename T, int MODE>
__device__ __forceinline__ uint32_t key_of(typename Bits<T>::U x, typename Bits<T>::U b, bool has_base) {
  using U = typename Bits<T>::U;
  constexpr U kSign = static_cast<U>(U(1) << (8 * sizeof(U) - 1));
  if (MODE == kMagnitude) {
    const U d = has_base ? f_to_bits<T>(__fsub_rn(bits_to_f<T>(x), bits_to_f<T>(b))) : x;
    return static_cast<uint32_t>(static_cast<U>(d & static_cast<U>(~kSign))) << Bits<T>::kShift;
  }
  U u = x;
  if (u == kSign) u = 0;
  u = (u & kSign) ? static_cast<U>(~u) : static_cast<U>(u | kSign);
  return static_cast<uint32_t>(u) << Bits<T>::kShift;
}

template <typename T>
__device__ __forceinline__ typename Bits<T>::U load_at(const void* p, int64_t i) {
  return static_cast<const typename Bits<T>::U*>(p)[i];
}

// The VEC = 16 / sizeof(T) values of one 16-byte load at p + e, as bits.
template <typename T, int VEC>
__device__ __forceinline__ void load16(const void* p, int64_t e, typename Bits<T>::U (&out)[VEC]) {
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(static_cast<const typename Bits<T>::U*>(p) + e));
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (sizeof(typename Bits<T>::U) == 4) out[v] = words[v];
    else out[v] = static_cast<typename Bits<T>::U>(words[v / 2] >> (16 * (v % 2)));
  }
}

// ------------------------------------------------------------------ one digit pass

// Add the first nv of keys[] (input m's entries) to its rows' private histograms. (Merging the lanes that
// add to one bin first, __match_any_sync, measured slower on every case: the private copies already keep equal
// bins apart.)
template <int VEC>
__device__ __forceinline__ void count(const uint32_t (&keys)[VEC], int nv, int m, int shift,
                                      const int (*row_of)[2], const uint64_t* s_prefix, uint32_t* mine) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int r = row_of[m][j];
    if (r < 0) continue;
    const uint64_t prefix = s_prefix[r];
    uint32_t* h = mine + r * kBins;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (v < nv && (static_cast<uint64_t>(keys[v]) >> (shift + 8)) == prefix) {
        atomicAdd(h + ((keys[v] >> shift) & 255u), 1u);
      }
    }
  }
}

// Histogram of the digit at bit `shift` over chunks blockIdx.x, blockIdx.x + gridDim.x, ...; VEC: 16-byte
// loads (every pointer aligned, chunk a multiple of the vector width).
template <typename T, int MODE, bool VEC16>
__global__ void __launch_bounds__(kThreads) select_hist_kernel(Plan plan, const int64_t* __restrict__ state, int shift,
                                                               int copies, int64_t chunk, int64_t nchunks,
                                                               uint32_t* __restrict__ hist,
                                                               uint32_t* __restrict__ chunk_counts) {
  using U = typename Bits<T>::U;
  constexpr int VEC = VEC16 ? 16 / sizeof(T) : 1;
  extern __shared__ uint32_t smem[];
  __shared__ uint64_t s_prefix[kMaxRows];
  __shared__ int row_of_s[kMaxInputs][2];
  const int rows = plan.rows, tid = threadIdx.x;
  if (tid < rows) s_prefix[tid] = shift == 24 ? 0ull : static_cast<uint64_t>(state[tid * kStateWords + kPrefix]);
  if (tid < 2 * kMaxInputs) row_of_s[tid / 2][tid % 2] = plan.row_of[tid / 2][tid % 2];
  __syncthreads();
  const int (*row_of)[2] = row_of_s;  // uniform reads from shared memory: fewer registers than a copy
  const int stride = rows * kBins + 1;  // copy c starts c banks further on
  uint32_t* mine = smem + (tid & 31 & (copies - 1)) * stride;
  const int cells = rows * kBins;       // <= kMaxRows * kBins = 8 * kThreads
  uint32_t total[kMaxRows * kBins / kThreads];
#pragma unroll
  for (int i = 0; i < kMaxRows * kBins / kThreads; ++i) total[i] = 0;
  const bool has_base = plan.base != nullptr;
  const int64_t n = plan.n;

  for (int i = tid; i < copies * stride; i += kThreads) smem[i] = 0;
  __syncthreads();
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const int64_t begin = c * chunk, end = min(n, begin + chunk);
    for (int64_t e = begin + static_cast<int64_t>(tid) * VEC; e < end; e += static_cast<int64_t>(kThreads) * VEC) {
      const int nv = static_cast<int>((end - e < VEC ? end - e : VEC));
      const bool full = VEC16 && nv == VEC;
      U b[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) b[v] = 0;
      if (has_base) {
        if (full) {
          load16<T, VEC>(plan.base, e, b);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) if (v < nv) b[v] = load_at<T>(plan.base, e + v);
        }
      }
#pragma unroll
      for (int m = 0; m < kMaxInputs; ++m) {
        if (m >= plan.ninputs) break;
        if (row_of[m][0] < 0 && row_of[m][1] < 0) continue;
        U x[VEC];
        if (full) {
          load16<T, VEC>(plan.t[m], e, x);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) x[v] = v < nv ? load_at<T>(plan.t[m], e + v) : U(0);
        }
        uint32_t keys[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) keys[v] = key_of<T, MODE>(x[v], b[v], has_base);
        count<VEC>(keys, nv, m, shift, row_of, s_prefix, mine);
      }
    }
    // Only the last pass needs each chunk's counts. The others keep counting across chunks and sum the copies
    // once at the end: a per-chunk reduction stops the block's loads for two barriers each chunk.
    if (chunk_counts != nullptr) {
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kMaxRows * kBins / kThreads; ++i) {
        const int cell = tid + i * kThreads;
        if (cell >= cells) break;
        uint32_t s = 0;
        for (int k = 0; k < copies; ++k) {
          s += smem[k * stride + cell];
          smem[k * stride + cell] = 0;  // the thread that sums a cell clears it: no separate clearing loop
        }
        total[i] += s;
        chunk_counts[((cell / kBins) * nchunks + c) * kBins + cell % kBins] = s;
      }
      __syncthreads();
    }
  }
  if (chunk_counts == nullptr) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMaxRows * kBins / kThreads; ++i) {
      const int cell = tid + i * kThreads;
      if (cell >= cells) break;
      for (int k = 0; k < copies; ++k) total[i] += smem[k * stride + cell];
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxRows * kBins / kThreads; ++i) {
    const int cell = tid + i * kThreads;
    if (cell < cells && total[i]) atomicAdd(hist + cell, total[i]);
  }
}

// Per row: the digit holding its rem-th largest remaining entry; the prefix grows by that digit, rem becomes
// the rank inside it, ties its count. Clears the histogram for the next pass. One block of kBins threads:
// thread t holds digit 255 - t, so an inclusive scan gives the count at or above each digit.
__global__ void __launch_bounds__(kBins) select_pick_kernel(Plan plan, int64_t* __restrict__ state,
                                                            uint32_t* __restrict__ hist, bool first) {
  using Scan = cub::BlockScan<int64_t, kBins>;
  __shared__ typename Scan::TempStorage tmp;
  const int t = threadIdx.x, d = kBins - 1 - t;
  for (int r = 0; r < plan.rows; ++r) {
    const int64_t h = hist[r * kBins + d];
    hist[r * kBins + d] = 0;
    const int64_t rem = first ? plan.rank[r] : state[r * kStateWords + kRem];
    const int64_t prefix = first ? 0 : state[r * kStateWords + kPrefix];
    int64_t at_or_above;
    Scan(tmp).InclusiveSum(h, at_or_above);
    // the digit where the count first reaches rem (digit 0 when the counts fall short: never for valid input)
    if ((at_or_above >= rem && at_or_above - h < rem) || (d == 0 && at_or_above < rem)) {
      state[r * kStateWords + kPrefix] = (prefix << 8) | d;
      state[r * kStateWords + kRem] = rem - (at_or_above - h);
      state[r * kStateWords + kTies] = h;
    }
    __syncthreads();  // state read by every thread above before the next row's write; tmp reused
  }
}

// After the last pass: per row (one block each), the flat index J of the j-th entry equal to K, found from the
// last pass's per-chunk counts (which chunk) and one scan of that chunk (where in it); writes K >> k_shift
// and J at the row's slot.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) select_locate_kernel(Plan plan, const int64_t* __restrict__ state,
                                                                 int last_shift, int k_shift,
                                                                 const uint32_t* __restrict__ chunk_counts,
                                                                 int64_t chunk, int64_t nchunks,
                                                                 int32_t* __restrict__ out_k,
                                                                 int32_t* __restrict__ out_j) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int64_t s_found, s_at;
  const int r = blockIdx.x, tid = threadIdx.x;
  const uint64_t prefix = static_cast<uint64_t>(state[r * kStateWords + kPrefix]);
  const uint32_t K = static_cast<uint32_t>(prefix << last_shift);
  const int64_t rem = state[r * kStateWords + kRem], ties = state[r * kStateWords + kTies];
  const int64_t j = plan.later_first[r] ? ties - rem : rem;
  const int64_t n = plan.n;
  int64_t J = n;
  if (j < ties) {
    const uint32_t digit = static_cast<uint32_t>(prefix & 255u);
    const uint32_t* cc = chunk_counts + static_cast<int64_t>(r) * nchunks * kBins;
    // the chunk holding the j-th equal entry, and j's rank inside it
    if (tid == 0) s_found = -1;
    __syncthreads();
    int64_t run = 0;
    for (int64_t c0 = 0; c0 < nchunks; c0 += kThreads) {
      const int64_t c = c0 + tid;
      const int64_t v = c < nchunks ? cc[c * kBins + digit] : 0;
      int64_t excl, sum;
      Scan(scan_tmp).ExclusiveSum(v, excl, sum);
      if (v > 0 && run + excl <= j && j < run + excl + v) {
        s_found = c;
        s_at = j - run - excl;
      }
      __syncthreads();
      if (s_found >= 0) break;
      run += sum;
    }
    const int64_t c = s_found, jj = s_at;
    __syncthreads();
    if (c < 0) __trap();  // the per-chunk counts disagree with the histogram: a bug, never a wrong edge
    if (tid == 0) s_found = -1;
    __syncthreads();
    const int m = plan.input[r];
    const bool has_base = plan.base != nullptr;
    const int64_t cend = min(n, (c + 1) * chunk);
    constexpr int kItems = 8;  // consecutive entries per thread: a 16384-entry chunk in 4 block scans
    run = 0;
    for (int64_t e0 = c * chunk; e0 < cend; e0 += static_cast<int64_t>(kThreads) * kItems) {
      const int64_t first = e0 + static_cast<int64_t>(tid) * kItems;
      uint32_t bits = 0;
      int64_t hits = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t e = first + i;
        if (e < cend) {
          const auto b = has_base ? load_at<T>(plan.base, e) : typename Bits<T>::U(0);
          const bool hit = key_of<T, MODE>(load_at<T>(plan.t[m], e), b, has_base) == K;
          bits |= uint32_t(hit) << i;
          hits += hit;
        }
      }
      int64_t excl, sum;
      Scan(scan_tmp).ExclusiveSum(hits, excl, sum);
      if (hits && run + excl <= jj && jj < run + excl + hits) {
        int want = static_cast<int>(jj - run - excl);
        for (int i = 0; i < kItems; ++i) {
          if (!((bits >> i) & 1u)) continue;
          if (want-- == 0) {
            s_found = first + i;
            break;
          }
        }
      }
      __syncthreads();
      if (s_found >= 0) break;
      run += sum;
    }
    if (s_found < 0) __trap();
    J = s_found;
  }
  if (tid == 0) {
    out_k[plan.slot[r]] = static_cast<int32_t>(K >> k_shift);
    out_j[plan.slot[r]] = static_cast<int32_t>(J);
  }
}

// ------------------------------------------------------------------ masks: write with one edge

// The exponent field of T: a value is NaN or Inf iff all of its bits are set.
template <typename T> struct ExpMask;
template <> struct ExpMask<float> { static constexpr uint32_t kValue = 0x7F800000u; };
template <> struct ExpMask<__half> { static constexpr uint32_t kValue = 0x7C00u; };
template <> struct ExpMask<__nv_bfloat16> { static constexpr uint32_t kValue = 0x7F80u; };

// keep = key > K, or key == K and e < J (the edge at slot 0 of edge_k / edge_j, written with k_shift 0);
// VALUES: x where kept, else 0; otherwise one byte 0/1. A thread takes VEC consecutive entries: 16-byte loads
// when VEC16 (aligned pointers), scalar ones for the tail. When `bad` is given, *bad |= 1 if any entry is NaN
// or Inf: this pass reads every entry anyway, so the op's validation costs no read of its own (the caller
// reads the flag after the write and raises; the select before it only ranks garbage, it never faults).
template <typename T, int MODE, bool VALUES, bool VEC16>
__global__ void __launch_bounds__(kWriteThreads) select_write_kernel(const T* __restrict__ x, void* __restrict__ out,
                                                                     int64_t n, const int32_t* __restrict__ edge_k,
                                                                     const int32_t* __restrict__ edge_j,
                                                                     int32_t* __restrict__ bad) {
  using U = typename Bits<T>::U;
  constexpr int VEC = 16 / sizeof(T);
  constexpr uint32_t kExp = ExpMask<T>::kValue;
  const uint32_t K = static_cast<uint32_t>(edge_k[0]);
  const int64_t J = edge_j[0];
  bool nonfinite = false;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWriteThreads * VEC;
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * kWriteThreads + threadIdx.x) * VEC; e < n; e += step) {
    const bool full = VEC16 && e + VEC <= n;
    U v[VEC];
    if (full) {
      load16<T, VEC>(x, e, v);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = e + i < n ? load_at<T>(x, e + i) : U(0);
    }
    uint32_t keep_bits[VEC / 4];  // byte i of the mask in word i / 4
    uint32_t vals[4];             // the masked values packed as the 16-byte load was
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i) keep_bits[i] = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) vals[i] = 0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const uint32_t k = key_of<T, MODE>(v[i], v[i], false);
      const bool keep = k > K || (k == K && e + i < J);
      nonfinite |= (uint32_t(v[i]) & kExp) == kExp;  // tail lanes past n hold 0
      if (!VALUES) keep_bits[i / 4] |= uint32_t(keep) << (8 * (i % 4));
      const uint32_t kept = keep ? uint32_t(v[i]) : 0u;
      if (sizeof(U) == 4) vals[i] = kept;
      else vals[i / 2] |= kept << (16 * (i % 2));
      if (!full && e + i < n) {
        if (VALUES) static_cast<U*>(out)[e + i] = static_cast<U>(kept);
        else static_cast<uint8_t*>(out)[e + i] = keep;
      }
    }
    if (full) {
      if (VALUES) {
        *reinterpret_cast<uint4*>(static_cast<U*>(out) + e) = make_uint4(vals[0], vals[1], vals[2], vals[3]);
      } else if (VEC == 8) {
        *reinterpret_cast<uint2*>(static_cast<uint8_t*>(out) + e) = make_uint2(keep_bits[0], keep_bits[VEC / 4 - 1]);
      } else {
        *reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(out) + e) = keep_bits[0];
      }
    }
  }
  // every thread of the block reaches this point: one atomic per warp, and only on the error path
  if (bad != nullptr && __any_sync(0xffffffffu, nonfinite) && (threadIdx.x & 31) == 0) atomicOr(bad, 1);
}

// Device queries cost host time on every call of a merge (a whole model makes hundreds): asked once per device.
constexpr int kMaxDevices = 64;

int current_device() {
  int dev = 0;
  SE_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

int sm_count() {
  static int cached[kMaxDevices] = {};
  const int dev = current_device();
  if (dev < kMaxDevices && cached[dev] > 0) return cached[dev];
  int sms = 0;
  SE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev < kMaxDevices) cached[dev] = sms;
  return sms;
}

template <typename T, int MODE, bool VEC16>
void launch_hist(const Plan& plan, const int64_t* state, int shift, int64_t chunk, int64_t nchunks, uint32_t* hist,
                 uint32_t* chunk_counts, cudaStream_t s) {
  int copies = 32;
  while (copies > 1 && copies * (plan.rows * kBins + 1) * 4 > kHistSmem) copies /= 2;
  const int smem = copies * (plan.rows * kBins + 1) * 4;
  auto kernel = select_hist_kernel<T, MODE, VEC16>;
  // blocks per SM for this row count, and the shared-memory opt-in, once per device and kernel instance
  static int cached[kMaxDevices][kMaxRows + 1] = {};
  const int dev = current_device();
  int per_sm = dev < kMaxDevices ? cached[dev][plan.rows] : 0;
  if (per_sm == 0) {
    SE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kHistSmem));
    SE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    per_sm = std::max(per_sm, 1);
    if (dev < kMaxDevices) cached[dev][plan.rows] = per_sm;
  }
  const int64_t grid = std::min<int64_t>(nchunks, static_cast<int64_t>(per_sm) * sm_count());
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, s>>>(plan, state, shift, copies, chunk, nchunks, hist,
                                                             chunk_counts);
  SE_CHECK_LAUNCH();
}

template <typename T, int MODE>
void run_select(const Plan& plan, int64_t* state, uint32_t* hist, uint32_t* chunk_counts, int64_t chunk,
                int32_t* out_k, int32_t* out_j, int k_shift, bool aligned, cudaStream_t s) {
  const int64_t nchunks = se::ceil_div(plan.n, chunk);
  const int last = Bits<T>::kShift;
  for (int shift = 24; shift >= last; shift -= 8) {
    uint32_t* counts = shift == last ? chunk_counts : nullptr;
    if (aligned) {
      launch_hist<T, MODE, true>(plan, state, shift, chunk, nchunks, hist, counts, s);
    } else {
      launch_hist<T, MODE, false>(plan, state, shift, chunk, nchunks, hist, counts, s);
    }
    select_pick_kernel<<<1, kBins, 0, s>>>(plan, state, hist, shift == 24);
    SE_CHECK_LAUNCH();
  }
  select_locate_kernel<T, MODE><<<plan.rows, kThreads, 0, s>>>(plan, state, last, k_shift, chunk_counts, chunk,
                                                               nchunks, out_k, out_j);
  SE_CHECK_LAUNCH();
}

template <typename T, int MODE, bool VALUES>
void launch_write(const T* x, void* out, int64_t n, const int32_t* k, const int32_t* j, int32_t* bad, bool aligned,
                  cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t grid = std::min<int64_t>(se::ceil_div(n, int64_t(kWriteThreads) * VEC), int64_t(sm_count()) * 16);
  const unsigned g = static_cast<unsigned>(std::max<int64_t>(grid, 1));
  if (aligned) select_write_kernel<T, MODE, VALUES, true><<<g, kWriteThreads, 0, s>>>(x, out, n, k, j, bad);
  else select_write_kernel<T, MODE, VALUES, false><<<g, kWriteThreads, 0, s>>>(x, out, n, k, j, bad);
  SE_CHECK_LAUNCH();
}

template <typename T>
void run_write(int mode, bool values, const T* x, void* out, int64_t n, const int32_t* k, const int32_t* j,
               int32_t* bad, cudaStream_t s) {
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (mode == kMagnitude) {
    if (values) launch_write<T, kMagnitude, true>(x, out, n, k, j, bad, aligned, s);
    else launch_write<T, kMagnitude, false>(x, out, n, k, j, bad, aligned, s);
  } else {
    if (values) launch_write<T, kOrder, true>(x, out, n, k, j, bad, aligned, s);
    else launch_write<T, kOrder, false>(x, out, n, k, j, bad, aligned, s);
  }
}

}  // namespace

// Launcher: see the header comment and sparsity_engine/ops/masks/cuda.py select_edges.
void masks_select_edges(const std::vector<uintptr_t>& inputs, uintptr_t base, int64_t n, const std::vector<int>& row_input,
                  const std::vector<int64_t>& row_rank, const std::vector<int>& row_later_first,
                  const std::vector<int>& row_slot, int mode, int dtype,
                  uintptr_t state, uintptr_t hist, uintptr_t chunk_counts, int64_t chunk, uintptr_t out_k,
                  uintptr_t out_j, int k_shift, uintptr_t stream) {
  SE_REQUIRE(!inputs.empty() && inputs.size() <= kMaxInputs, "inputs must hold 1 to 8 pointers");
  const size_t rows = row_input.size();
  SE_REQUIRE(rows >= 1 && rows <= kMaxRows, "there must be 1 to 16 rows");
  SE_REQUIRE(row_rank.size() == rows && row_later_first.size() == rows && row_slot.size() == rows,
             "row lists must have one entry per row");
  SE_REQUIRE(n >= 1 && n < (int64_t(1) << 31), "n must be in [1, 2**31)");
  SE_REQUIRE(chunk >= 1 && chunk % 8 == 0, "chunk must be a positive multiple of 8");
  SE_REQUIRE(mode == kMagnitude || mode == kOrder, "mode must be 0 (magnitude) or 1 (order)");
  SE_REQUIRE(mode == kMagnitude || base == 0, "order keys take no base");
  Plan plan{};
  for (int m = 0; m < kMaxInputs; ++m) {
    plan.t[m] = m < static_cast<int>(inputs.size()) ? reinterpret_cast<const void*>(inputs[m]) : nullptr;
    plan.row_of[m][0] = plan.row_of[m][1] = -1;
  }
  plan.base = base ? reinterpret_cast<const void*>(base) : nullptr;
  plan.n = n;
  plan.ninputs = static_cast<int>(inputs.size());
  plan.rows = static_cast<int>(rows);
  for (size_t r = 0; r < rows; ++r) {
    const int m = row_input[r];
    SE_REQUIRE(m >= 0 && m < plan.ninputs, "row_input entries must name an input");
    SE_REQUIRE(plan.row_of[m][1] < 0, "at most two rows may rank one input");
    plan.row_of[m][plan.row_of[m][0] < 0 ? 0 : 1] = static_cast<int>(r);
    plan.input[r] = m;
    plan.later_first[r] = row_later_first[r];
    plan.slot[r] = row_slot[r];
    SE_REQUIRE(row_rank[r] >= 1 && row_rank[r] < n, "row_rank entries must be in [1, n)");
    plan.rank[r] = row_rank[r];
  }
  bool aligned = true;
  for (uintptr_t p : inputs) aligned &= p % 16 == 0;
  aligned &= base % 16 == 0;
  auto* st = se::as_ptr<int64_t>(state);
  auto* h = se::as_ptr<uint32_t>(hist);
  auto* cc = se::as_ptr<uint32_t>(chunk_counts);
  auto* ok = se::as_ptr<int32_t>(out_k);
  auto* oj = se::as_ptr<int32_t>(out_j);
  const cudaStream_t s = se::as_stream(stream);
  SE_CUDA_CHECK(cudaMemsetAsync(h, 0, rows * kBins * sizeof(uint32_t), s));  // the first pass adds into it
  switch (dtype) {
    case kF32:
      if (mode == kMagnitude) run_select<float, kMagnitude>(plan, st, h, cc, chunk, ok, oj, k_shift, aligned, s);
      else run_select<float, kOrder>(plan, st, h, cc, chunk, ok, oj, k_shift, aligned, s);
      break;
    case kF16:
      if (mode == kMagnitude) run_select<__half, kMagnitude>(plan, st, h, cc, chunk, ok, oj, k_shift, aligned, s);
      else run_select<__half, kOrder>(plan, st, h, cc, chunk, ok, oj, k_shift, aligned, s);
      break;
    case kBF16:
      if (mode == kMagnitude) run_select<__nv_bfloat16, kMagnitude>(plan, st, h, cc, chunk, ok, oj, k_shift, aligned, s);
      else run_select<__nv_bfloat16, kOrder>(plan, st, h, cc, chunk, ok, oj, k_shift, aligned, s);
      break;
    default:
      SE_REQUIRE(false, "dtype must be float32, float16 or bfloat16");
  }
}

void masks_select_write(uintptr_t x, uintptr_t out, int64_t n, int mode, int values, int dtype, uintptr_t edge_k,
                  uintptr_t edge_j, uintptr_t bad_flag, uintptr_t stream) {
  SE_REQUIRE(mode == kMagnitude || mode == kOrder, "mode must be 0 (magnitude) or 1 (order)");
  if (n == 0) return;
  const auto* k = se::as_ptr<const int32_t>(edge_k);
  const auto* j = se::as_ptr<const int32_t>(edge_j);
  auto* bad = bad_flag ? se::as_ptr<int32_t>(bad_flag) : nullptr;
  void* o = reinterpret_cast<void*>(out);
  const cudaStream_t s = se::as_stream(stream);
  switch (dtype) {
    case kF32: run_write<float>(mode, values, se::as_ptr<const float>(x), o, n, k, j, bad, s); break;
    case kF16: run_write<__half>(mode, values, se::as_ptr<const __half>(x), o, n, k, j, bad, s); break;
    case kBF16:
      run_write<__nv_bfloat16>(mode, values, se::as_ptr<const __nv_bfloat16>(x), o, n, k, j, bad, s);
      break;
    default:
      SE_REQUIRE(false, "dtype must be float32, float16 or bfloat16");
  }
}
