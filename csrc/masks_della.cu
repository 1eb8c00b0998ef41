// DELLA keep-probabilities of 16-bit float rows by counting, not sorting.
//
// For one row of n entries, p_i = clamp(lo + span * r_i / (n - 1), 0, 1), r_i the mean 0-based rank of |x_i|
// among its row's magnitudes: r_i = below_i + (equal_i - 1) / 2 (exactly
// sparsity_engine/ops/masks/reference.py della_probabilities). The magnitude of an fp16 / bf16 value is its
// bit pattern without the sign: a 15-bit key whose integer order is the order of |x| (inputs are finite; the
// Python front end checks), so below_i and equal_i come from a histogram of the row's keys and its exclusive
// prefix sum. One block per row:
//   1. the row's key range [kmin, kmax] (block min / max): only those bins are cleared and scanned;
//   2. a shared-memory histogram, two 16-bit counters per 32-bit word (n <= 65535, so a counter never carries
//      into its neighbour), built with shared atomics (warp-aggregating lanes of equal keys with
//      __match_any_sync was tried: 1.7x slower on random rows, 3% faster on bf16 task vectors, H200 2026-12-02);
//   3. an exclusive prefix sum over the bins (each warp scans a contiguous run of words, conflict free), so
//      bin b holds below(b) and bin b + 1 holds below(b) + equal(b);
//   4. p from the two prefixes, written as fp32.
// fp32 magnitudes have 31-bit keys, too many bins for a histogram: a row of up to kMaxColsF32 entries is sorted
// as (key, column) pairs by a block radix sort (cub), the runs of equal keys are found by a max-scan of their
// start positions (each run's last entry records its end at the run's start), and p is written at the column.
// The arithmetic is the reference's as torch runs it on the GPU: mean rank exact in fp32, times the fp32
// reciprocal of n - 1 (torch divides by a scalar that way), times span, plus lo, each rounded (no FMA).
#include <algorithm>
#include <cstdint>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "common.h"

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 1 << 15;                  // 15-bit magnitude keys
constexpr int kWords = kBins / 2 + 1;           // bins 0 .. kBins (the one past the last holds n)
constexpr int64_t kMaxCols = 65535;             // 16-bit counters and prefixes
constexpr int64_t kMaxColsF32 = 16384;          // the largest block radix sort below (512 threads x 32 keys)

__device__ __forceinline__ int magnitude_key(uint16_t bits) { return bits & 0x7FFF; }

__device__ __forceinline__ uint32_t half_of(uint32_t word, int b) { return (b & 1) ? word >> 16 : word & 0xFFFF; }

__device__ __forceinline__ uint32_t prefix_at(const uint32_t* words, int b) { return half_of(words[b >> 1], b); }

// Block-wide min and max of v (every thread gets both).
__device__ __forceinline__ void block_min_max(int& lo, int& hi, int* s_lo, int* s_hi) {
  for (int o = 16; o > 0; o >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, o));
    hi = max(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  lo = s_lo[0];
  hi = s_hi[0];
  for (int w = 1; w < kWarps; ++w) {
    lo = min(lo, s_lo[w]);
    hi = max(hi, s_hi[w]);
  }
}

// Exclusive prefix sum over the packed 16-bit counters of words[0 .. nwords).
__device__ void exclusive_scan_counts(uint32_t* words, int nwords, uint32_t* s_warp) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunk = (((nwords + kWarps - 1) / kWarps) + 31) / 32 * 32;
  const int begin = warp * chunk, end = min(nwords, begin + chunk);
  uint32_t total = 0;
  for (int i = begin + lane; i < end; i += 32) {
    const uint32_t w = words[i];
    total += (w & 0xFFFF) + (w >> 16);
  }
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xFFFFFFFFu, total, o);
  if (lane == 0) s_warp[warp] = total;
  __syncthreads();
  uint32_t carry = 0;
  for (int w = 0; w < warp; ++w) carry += s_warp[w];
  for (int base = begin; base < end; base += 32) {
    const int i = base + lane;
    const uint32_t w = i < end ? words[i] : 0;
    const uint32_t c0 = w & 0xFFFF, t = c0 + (w >> 16);
    uint32_t incl = t;
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t up = __shfl_up_sync(0xFFFFFFFFu, incl, o);
      if (lane >= o) incl += up;
    }
    const uint32_t excl = carry + incl - t;
    if (i < end) words[i] = excl | ((excl + c0) << 16);
    carry += __shfl_sync(0xFFFFFFFFu, incl, 31);
  }
}

__device__ __forceinline__ float della_p(int64_t below_plus_upto_minus_1, int n, float lo, float span,
                                         float inv_nm1) {
  // the reference's operations and roundings: (below + upto - 1) * 0.5 exact, * (1 / (n - 1)), * span, + lo
  const float mean_rank = static_cast<float>(below_plus_upto_minus_1) * 0.5f;
  const float frac = n > 1 ? __fmul_rn(mean_rank, inv_nm1) : 0.5f;
  return fminf(fmaxf(__fadd_rn(__fmul_rn(span, frac), lo), 0.0f), 1.0f);
}

__global__ void __launch_bounds__(kThreads) della_probs_kernel(const uint16_t* __restrict__ x,
                                                                float* __restrict__ probs, int n, float lo,
                                                                float span, float inv_nm1) {
  extern __shared__ uint32_t words[];
  __shared__ int s_lo[kWarps], s_hi[kWarps];
  __shared__ uint32_t s_warp[kWarps];
  const int64_t row = blockIdx.x;
  const uint16_t* xr = x + row * n;
  float* pr = probs + row * n;

  int kmin = kBins, kmax = 0;
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const int k = magnitude_key(xr[j]);
    kmin = min(kmin, k);
    kmax = max(kmax, k);
  }
  block_min_max(kmin, kmax, s_lo, s_hi);
  const int nbins = kmax - kmin + 1;
  const int nwords = nbins / 2 + 1;  // bins 0 .. nbins: the one past the range ends with n
  for (int i = threadIdx.x; i < nwords; i += kThreads) words[i] = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const int b = magnitude_key(xr[j]) - kmin;
    atomicAdd(&words[b >> 1], 1u << ((b & 1) * 16));
  }
  __syncthreads();
  exclusive_scan_counts(words, nwords, s_warp);
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const int b = magnitude_key(xr[j]) - kmin;
    const uint32_t below = prefix_at(words, b), upto = prefix_at(words, b + 1);
    pr[j] = della_p(static_cast<int64_t>(below) + upto - 1, n, lo, span, inv_nm1);
  }
}

// fp32 rows of n <= THREADS * ITEMS entries, one block per row.
template <int THREADS, int ITEMS>
struct F32Rows {
  static constexpr int kPad = THREADS * ITEMS;
  using Sort = cub::BlockRadixSort<uint32_t, THREADS, ITEMS, uint16_t>;
  using Scan = cub::BlockScan<int, THREADS>;
  // the sort's storage, later reused for the sorted keys and each run's end; the scan's storage after it
  static constexpr size_t kMain = std::max(sizeof(typename Sort::TempStorage), size_t{2} * kPad * sizeof(uint32_t));
  static constexpr size_t kSmem = (kMain + 15) / 16 * 16 + sizeof(typename Scan::TempStorage);
};

template <int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS) della_probs_f32_kernel(const uint32_t* __restrict__ x,
                                                                   float* __restrict__ probs, int n, float lo,
                                                                   float span, float inv_nm1) {
  using Cfg = F32Rows<THREADS, ITEMS>;
  extern __shared__ __align__(16) unsigned char smem[];
  auto& sort_tmp = *reinterpret_cast<typename Cfg::Sort::TempStorage*>(smem);
  auto& scan_tmp = *reinterpret_cast<typename Cfg::Scan::TempStorage*>(smem + (Cfg::kMain + 15) / 16 * 16);
  uint32_t* skey = reinterpret_cast<uint32_t*>(smem);
  int* run_end = reinterpret_cast<int*>(skey + Cfg::kPad);
  const int64_t row = blockIdx.x;
  const uint32_t* xr = x + row * n;

  // Loaded striped (coalesced): a sort does not care which arrangement its input is in. Padding sorts last.
  uint32_t keys[ITEMS];
  uint16_t cols[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int j = i * THREADS + threadIdx.x;
    keys[i] = j < n ? (xr[j] & 0x7FFFFFFFu) : 0xFFFFFFFFu;
    cols[i] = static_cast<uint16_t>(j);
  }
  typename Cfg::Sort(sort_tmp).Sort(keys, cols);  // now blocked: thread t holds positions t * ITEMS + i
  __syncthreads();
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) skey[threadIdx.x * ITEMS + i] = keys[i];
  __syncthreads();
  int start[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int pos = threadIdx.x * ITEMS + i;
    start[i] = (pos == 0 || skey[pos - 1] != keys[i]) ? pos : 0;
  }
  typename Cfg::Scan(scan_tmp).InclusiveScan(start, start, cuda::maximum<>{});  // each position's run start
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int pos = threadIdx.x * ITEMS + i;
    if (pos == Cfg::kPad - 1 || skey[pos + 1] != keys[i]) run_end[start[i]] = pos;
  }
  __syncthreads();
  float* pr = probs + row * n;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int pos = threadIdx.x * ITEMS + i;
    if (pos < n) pr[cols[i]] = della_p(static_cast<int64_t>(start[i]) + run_end[start[i]], n, lo, span, inv_nm1);
  }
}

template <int THREADS, int ITEMS>
void launch_f32(const uint32_t* x, float* probs, int64_t rows, int n, float lo, float span, float inv_nm1,
                cudaStream_t stream) {
  constexpr size_t smem = F32Rows<THREADS, ITEMS>::kSmem;
  auto kernel = della_probs_f32_kernel<THREADS, ITEMS>;
  SE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(rows), THREADS, smem, stream>>>(x, probs, n, lo, span, inv_nm1);
  SE_CHECK_LAUNCH();
}

}  // namespace

int64_t masks_della_max_cols(int dtype) { return dtype == kF32 ? kMaxColsF32 : kMaxCols; }

// x: rows x n contiguous fp32/fp16/bf16 values (finite), probs: rows x n fp32. lo = density - epsilon and
// span = 2 * epsilon arrive as doubles and are rounded to fp32 as torch rounds a Python scalar.
void masks_della_probs(uintptr_t x, uintptr_t probs, int64_t rows, int64_t n, double lo, double span, int dtype,
                       uintptr_t stream) {
  SE_REQUIRE(dtype == kF32 || dtype == kF16 || dtype == kBF16,
             "dtype must be float32, float16 or bfloat16, got code " + std::to_string(dtype));
  const int64_t max_cols = masks_della_max_cols(dtype);
  SE_REQUIRE(n >= 1 && n <= max_cols, "n must be in [1, " + std::to_string(max_cols) + "], got " + std::to_string(n));
  SE_REQUIRE(rows >= 0 && rows < (int64_t{1} << 31), "rows must be in [0, 2**31), got " + std::to_string(rows));
  if (rows == 0) return;
  if (dtype == kF32) {
    const float inv = n > 1 ? 1.0f / static_cast<float>(n - 1) : 0.0f;
    const auto* xp = se::as_ptr<const uint32_t>(x);
    float* pp = se::as_ptr<float>(probs);
    const float l = static_cast<float>(lo), sp = static_cast<float>(span);
    cudaStream_t s = se::as_stream(stream);
    const int ni = static_cast<int>(n);
    if (n <= 2048) launch_f32<256, 8>(xp, pp, rows, ni, l, sp, inv, s);
    else if (n <= 4096) launch_f32<256, 16>(xp, pp, rows, ni, l, sp, inv, s);
    else if (n <= 8192) launch_f32<512, 16>(xp, pp, rows, ni, l, sp, inv, s);
    else launch_f32<512, 32>(xp, pp, rows, ni, l, sp, inv, s);
    return;
  }
  constexpr size_t smem = kWords * sizeof(uint32_t);
  // above the 48 KB default: opt in (per device, so on every call; it costs no GPU time)
  SE_CUDA_CHECK(cudaFuncSetAttribute(della_probs_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  const float inv_nm1 = n > 1 ? 1.0f / static_cast<float>(n - 1) : 0.0f;
  della_probs_kernel<<<static_cast<unsigned>(rows), kThreads, smem, se::as_stream(stream)>>>(
      se::as_ptr<const uint16_t>(x), se::as_ptr<float>(probs), static_cast<int>(n), static_cast<float>(lo),
      static_cast<float>(span), inv_nm1);
  SE_CHECK_LAUNCH();
}
