// DELLA keep-probabilities of 16-bit float rows by counting, not sorting.
//
// For one row of n entries, p_i = clamp(lo + span * r_i / (n - 1), 0, 1), r_i the mean 0-based rank of |x_i|
// among its row's magnitudes: r_i = below_i + (equal_i - 1) / 2 (exactly
// sparsity_engine/ops/masks/reference.py della_probabilities). The magnitude of an fp16 / bf16 value is its
// bit pattern without the sign: a 15-bit key whose integer order is the order of |x| (inputs are finite; the
// Python front end checks), so below_i and equal_i come from a histogram of the row's keys and its exclusive
// prefix sum. One block per row:
//   1. the row's range of nonzero keys [kmin, kmax] and its count of zeros (block min / max / sum): only those
//      bins are cleared and scanned, zeros rank below them (RowHist);
//   2. a shared-memory histogram, two 16-bit counters per 32-bit word (n <= 65535, so a counter never carries
//      into its neighbour), built with shared atomics (warp-aggregating lanes of equal keys with
//      __match_any_sync was tried: much slower on random rows, barely faster on bf16 task vectors);
//   3. an exclusive prefix sum over the bins (each thread a contiguous run of words, conflict free), so
//      bin b holds below(b) and bin b + 1 holds below(b) + equal(b);
//   4. p from the two prefixes, written as fp32.
// fp32 magnitudes have 31-bit keys, too many bins for a histogram: a row of up to kMaxColsF32 entries is sorted
// as (key, column) pairs by a block radix sort (cub), the runs of equal keys are found by a max-scan of their
// start positions (each run's last entry records its end at the run's start), and p is written at the column.
// The arithmetic is the reference's as torch runs it on the GPU: mean rank exact in fp32, times the fp32
// reciprocal of n - 1 (torch divides by a scalar that way), times span, plus lo, each rounded (no FMA).
// della_deltas_kernel (below) is the merge's fused form for 16-bit task vectors: t - base, the same ranks,
// the Bernoulli draw and the masked delta in one kernel.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
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

// Block-wide min and max of lo / hi and sum of cnt (every thread gets all three).
__device__ __forceinline__ void block_min_max_sum(int& lo, int& hi, int& cnt, int* s_lo, int* s_hi, int* s_cnt) {
  for (int o = 16; o > 0; o >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, o));
    hi = max(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, o));
    cnt += __shfl_xor_sync(0xFFFFFFFFu, cnt, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
    s_cnt[warp] = cnt;
  }
  __syncthreads();
  lo = s_lo[0];
  hi = s_hi[0];
  cnt = s_cnt[0];
  for (int w = 1; w < kWarps; ++w) {
    lo = min(lo, s_lo[w]);
    hi = max(hi, s_hi[w]);
    cnt += s_cnt[w];
  }
}

// A row's ranks: zero magnitudes (key 0; common in 16-bit task vectors, where a fine-tune left a weight unchanged)
// are counted apart, so the histogram spans only the nonzero keys [kmin, kmax] (a quarter to an eighth of the
// bins on bf16 task vectors: clearing and scanning them cost more than the row's entries).
struct RowHist {
  int kmin, kmax, zeros, nwords;
};

// Clears the words of [kmin, kmax] and returns the row's histogram shape (a __syncthreads follows).
__device__ __forceinline__ RowHist row_hist_begin(int kmin, int kmax, int zeros, uint32_t* words, int* s_lo,
                                                  int* s_hi, int* s_cnt) {
  block_min_max_sum(kmin, kmax, zeros, s_lo, s_hi, s_cnt);
  RowHist h{kmin, kmax, zeros, kmin <= kmax ? (kmax - kmin + 1) / 2 + 1 : 0};  // bins kmin .. kmax + 1
  for (int i = threadIdx.x; i < h.nwords; i += kThreads) words[i] = 0;
  __syncthreads();
  return h;
}

__device__ __forceinline__ void row_hist_add(const RowHist& h, int key, uint32_t* words) {
  if (key == 0) return;
  const int b = key - h.kmin;
  atomicAdd(&words[b >> 1], 1u << ((b & 1) * 16));
}

// below + upto - 1 of an entry with this key (below: entries of smaller magnitude, upto: of smaller or equal)
// once the words hold their exclusive prefix sums.
__device__ __forceinline__ int row_rank2(const RowHist& h, int key, const uint32_t* words) {
  if (key == 0) return h.zeros - 1;
  const int b = key - h.kmin;
  return 2 * h.zeros + static_cast<int>(prefix_at(words, b) + prefix_at(words, b + 1)) - 1;
}

// Exclusive prefix sum over the packed 16-bit counters of words[0 .. nwords): each thread adds up a contiguous
// run of words (an odd run length keeps the 32 lanes of a warp on 32 banks), one block scan of the run totals,
// then each thread rewrites its run: ~4 * nwords / kThreads + 40 instructions per thread. (A warp-striped scan
// with a shuffle ladder per 32 words cost ~10x that on task vectors, whose 15-bit keys span ~8K words.)
__device__ void exclusive_scan_counts(uint32_t* words, int nwords, uint32_t* s_warp) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int run = ((nwords + kThreads - 1) / kThreads) | 1;
  const int begin = min(static_cast<int>(threadIdx.x) * run, nwords), end = min(begin + run, nwords);
  uint32_t total = 0;
  for (int i = begin; i < end; ++i) {
    const uint32_t w = words[i];
    total += (w & 0xFFFF) + (w >> 16);
  }
  uint32_t incl = total;
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t up = __shfl_up_sync(0xFFFFFFFFu, incl, o);
    if (lane >= o) incl += up;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  uint32_t prefix = incl - total;
  for (int w = 0; w < warp; ++w) prefix += s_warp[w];
  for (int i = begin; i < end; ++i) {
    const uint32_t w = words[i], c0 = w & 0xFFFF;
    words[i] = prefix | ((prefix + c0) << 16);
    prefix += c0 + (w >> 16);
  }
}

__device__ __forceinline__ float della_p(int below_plus_upto_minus_1, int n, float lo, float span,
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
  __shared__ int s_lo[kWarps], s_hi[kWarps], s_cnt[kWarps];
  __shared__ uint32_t s_warp[kWarps];
  const int64_t row = blockIdx.x;
  const uint16_t* xr = x + row * n;
  float* pr = probs + row * n;

  int kmin = kBins, kmax = 0, zeros = 0;
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const int k = magnitude_key(xr[j]);
    kmin = k ? min(kmin, k) : kmin;
    kmax = max(kmax, k);
    zeros += k == 0;
  }
  const RowHist h = row_hist_begin(kmin, kmax, zeros, words, s_lo, s_hi, s_cnt);
  for (int j = threadIdx.x; j < n; j += kThreads) row_hist_add(h, magnitude_key(xr[j]), words);
  __syncthreads();
  exclusive_scan_counts(words, h.nwords, s_warp);
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += kThreads)
    pr[j] = della_p(row_rank2(h, magnitude_key(xr[j]), words), n, lo, span, inv_nm1);
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
    if (pos < n) pr[cols[i]] = della_p(start[i] + run_end[start[i]], n, lo, span, inv_nm1);
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


// ---------------------------------------------------------------------------------------------------------------
// DELLA task vectors of a merge, fused: per (row, model) block, d = t - base rounded to the dtype (as torch), the
// row's mean ranks of |d| from the histogram above, p = clamp(lo + span * rank / (n - 1), 0, 1), keep iff
// u < p with u the uniform Triton's masks kernels draw for this flat index (lane e % 4 of Philox4x32-10(seed,
// e / 4), see philox_uniform4), and the masked delta written out. The block also sums its row's norm terms
// before and after the mask (for the rescale) and flags NaN/Inf in d. Models with bit clear in `active` are
// written unmasked. No probability or delta tensor goes through memory.

struct DellaDeltas {
  const uint16_t* t[8];
  uint16_t* out[8];
  const uint16_t* base;
  float lo[8], span[8];
  uint32_t seed[8];
  int active;            // bit i: model i is sparsified
  int models;            // N
  int n;                 // row length
  float inv_nm1;
  int norm;              // 0 none, 1 l1, 2 l2, 3 linf
  int np;                // stride of parts' model axis
  float* parts;          // [rows, 2, np]: per row, model i's norm terms before / after the mask
  int32_t* bad;          // set to 1 when some d is NaN/Inf
};

// Triton's tl.randint4x(seed, g) for a 31-bit seed and g < 2**32: Philox4x32 with 10 rounds, counter (g, 0, 0, 0),
// key (seed, 0); then tl.rand4x's uint_to_uniform_float of each word.
__device__ __forceinline__ void philox_uniform4(uint32_t seed, uint32_t g, float u[4]) {
  uint32_t c0 = g, c1 = 0, c2 = 0, c3 = 0, k0 = seed, k1 = 0;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t a = c0, b = c2;
    c0 = __umulhi(0xCD9E8D57u, b) ^ c1 ^ k0;
    c2 = __umulhi(0xD2511F53u, a) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * b;
    c3 = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const uint32_t w[4] = {c0, c1, c2, c3};
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    int x = static_cast<int>(w[l]);
    x = x < 0 ? -x - 1 : x;
    u[l] = __fmul_rn(__int2float_rn(x), 4.6566127342e-10f);
  }
}

template <bool BF16>
__device__ __forceinline__ float widen(uint16_t bits) {
  if constexpr (BF16) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  else return __half2float(__ushort_as_half(bits));
}

// t - base in fp32, rounded to nearest even in the dtype: torch's 16-bit subtraction.
template <bool BF16>
__device__ __forceinline__ uint16_t delta_bits(uint16_t t, uint16_t b) {
  const float d = widen<BF16>(t) - widen<BF16>(b);
  if constexpr (BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(d));
  else return __half_as_ushort(__float2half_rn(d));
}

template <bool BF16>
__device__ __forceinline__ float norm_term(uint16_t d, int norm) {
  const float a = fabsf(widen<BF16>(d));
  return norm == 2 ? __fmul_rn(a, a) : a;
}

// The four deltas of the group at flat index e0 = 4g, whose first entry is column c0 of the row (c0 in [-3, n));
// entries outside the row are 0 and not loaded.
template <bool BF16, bool ALIGNED>
__device__ __forceinline__ void load_group(const uint16_t* t, const uint16_t* base, int64_t e0, int c0, int n,
                                           uint16_t d[4]) {
  if (ALIGNED && c0 >= 0 && c0 + 4 <= n) {
    const uint2 tv = *reinterpret_cast<const uint2*>(t + e0);
    const uint2 bv = *reinterpret_cast<const uint2*>(base + e0);
    const uint32_t tw[2] = {tv.x, tv.y}, bw[2] = {bv.x, bv.y};
#pragma unroll
    for (int l = 0; l < 4; ++l)
      d[l] = delta_bits<BF16>(static_cast<uint16_t>(tw[l >> 1] >> (16 * (l & 1))),
                              static_cast<uint16_t>(bw[l >> 1] >> (16 * (l & 1))));
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) d[l] = (c0 + l >= 0 && c0 + l < n) ? delta_bits<BF16>(t[e0 + l], base[e0 + l]) : 0;
}

// Sum (or max, linf) of v over the block; the result is valid in thread 0.
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* s_red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xFFFFFFFFu, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // s_red may still be read by a previous reduction
  if (lane == 0) s_red[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    v = s_red[0];
    for (int w = 1; w < kWarps; ++w) v = is_max ? fmaxf(v, s_red[w]) : v + s_red[w];
  }
  return v;
}

// Calls f(e0, c0, d) for every group of the row starting at flat index lo that this thread owns (groups g_first +
// threadIdx.x + k * kThreads): e0 = 4g, c0 = e0 - lo its first column, d its four deltas. The first kCached groups
// of each thread stay in registers between the passes (FILL: compute and keep them), so rows up to
// 4 * kCached * kThreads entries read t and base once; later groups are reloaded.
constexpr int kCached = 6;

template <bool BF16, bool ALIGNED, bool FILL, typename F>
__device__ __forceinline__ void each_group(const uint16_t* t, const uint16_t* base, int64_t lo, int n,
                                           uint2 (&cache)[kCached], F&& f) {
  const int64_t g_first = lo / 4;
  const int groups = static_cast<int>((lo + n + 3) / 4 - g_first);
#pragma unroll
  for (int k = 0; k < kCached; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i < groups) {
      const int64_t e0 = 4 * (g_first + i);
      const int c0 = static_cast<int>(e0 - lo);
      uint16_t d[4];
      if (FILL) {
        load_group<BF16, ALIGNED>(t, base, e0, c0, n, d);
        cache[k] = make_uint2(d[0] | (static_cast<uint32_t>(d[1]) << 16), d[2] | (static_cast<uint32_t>(d[3]) << 16));
      } else {
        d[0] = cache[k].x & 0xFFFF;
        d[1] = cache[k].x >> 16;
        d[2] = cache[k].y & 0xFFFF;
        d[3] = cache[k].y >> 16;
      }
      f(e0, c0, d);
    }
  }
  for (int i = threadIdx.x + kCached * kThreads; i < groups; i += kThreads) {
    const int64_t e0 = 4 * (g_first + i);
    const int c0 = static_cast<int>(e0 - lo);
    uint16_t d[4];
    load_group<BF16, ALIGNED>(t, base, e0, c0, n, d);
    f(e0, c0, d);
  }
}

template <bool BF16, bool ALIGNED>
__global__ void __launch_bounds__(kThreads, 2) della_deltas_kernel(DellaDeltas a) {
  extern __shared__ uint32_t words[];
  __shared__ int s_lo[kWarps], s_hi[kWarps], s_cnt[kWarps];
  __shared__ uint32_t s_warp[kWarps];
  __shared__ float s_red[kWarps];
  const int64_t row = blockIdx.x / a.models;
  const int model = blockIdx.x % a.models;
  const uint16_t* t = a.t[model];
  uint16_t* out = a.out[model];
  const int n = a.n;
  const int64_t lo = row * n;
  const bool active = (a.active >> model) & 1;
  const int norm = a.norm;
  const uint16_t inf_key = BF16 ? 0x7F80 : 0x7C00;
  uint2 cache[kCached];

  // pass 1: key range, zeros, norm terms before the mask, NaN/Inf
  int kmin = kBins, kmax = 0, zeros = 0;
  float before = 0.0f;
  bool bad = false;
  each_group<BF16, ALIGNED, true>(t, a.base, lo, n, cache, [&](int64_t, int c0, const uint16_t* d) {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (c0 + l < 0 || c0 + l >= n) continue;
      const int k = magnitude_key(d[l]);
      kmin = k ? min(kmin, k) : kmin;
      kmax = max(kmax, k);
      zeros += k == 0;
      bad |= k >= inf_key;
      const float v = norm_term<BF16>(d[l], norm);
      before = norm == 3 ? fmaxf(before, v) : before + v;
    }
  });
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(a.bad, 1);
  RowHist h{};
  if (active) {
    h = row_hist_begin(kmin, kmax, zeros, words, s_lo, s_hi, s_cnt);
    each_group<BF16, ALIGNED, false>(t, a.base, lo, n, cache, [&](int64_t, int c0, const uint16_t* d) {
#pragma unroll
      for (int l = 0; l < 4; ++l)
        if (c0 + l >= 0 && c0 + l < n) row_hist_add(h, magnitude_key(d[l]), words);
    });
    __syncthreads();
    exclusive_scan_counts(words, h.nwords, s_warp);
    __syncthreads();
  }
  // pass 3: draw, mask, write; norm terms after the mask
  const float plo = a.lo[model], pspan = a.span[model], inv_nm1 = a.inv_nm1;
  const uint32_t seed = a.seed[model];
  float after = 0.0f;
  each_group<BF16, ALIGNED, false>(t, a.base, lo, n, cache, [&](int64_t e0, int c0, const uint16_t* dg) {
    uint16_t d[4] = {dg[0], dg[1], dg[2], dg[3]};
    float u[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (active) philox_uniform4(seed, static_cast<uint32_t>(e0 / 4), u);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (c0 + l < 0 || c0 + l >= n) continue;
      if (active && !(u[l] < della_p(row_rank2(h, magnitude_key(d[l]), words), n, plo, pspan, inv_nm1))) d[l] = 0;
      const float v = norm_term<BF16>(d[l], norm);
      after = norm == 3 ? fmaxf(after, v) : after + v;
    }
    if (ALIGNED && c0 >= 0 && c0 + 4 <= n) {
      *reinterpret_cast<uint2*>(out + e0) =
          make_uint2(d[0] | (static_cast<uint32_t>(d[1]) << 16), d[2] | (static_cast<uint32_t>(d[3]) << 16));
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l)
        if (c0 + l >= 0 && c0 + l < n) out[e0 + l] = d[l];
    }
  });
  if (norm == 0) return;
  before = block_reduce(before, norm == 3, s_red);
  after = block_reduce(after, norm == 3, s_red);
  if (threadIdx.x == 0) {
    a.parts[(row * 2) * a.np + model] = before;
    a.parts[(row * 2 + 1) * a.np + model] = after;
  }
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


// Fused DELLA task vectors of a merge (della_deltas_kernel): inputs / outs are N <= 8 contiguous fp16 / bf16
// tensors of rows x n entries (n <= kMaxCols), base like them; lo_i = density_i - epsilon_i and span_i =
// 2 * epsilon_i as doubles (rounded to fp32 as torch rounds a Python scalar), seeds 31-bit; parts: fp32
// [rows, 2, np] (written when norm != 0); bad: int32 flag set to 1 where t - base is NaN/Inf.
void masks_della_deltas(const std::vector<uintptr_t>& inputs, const std::vector<uintptr_t>& outs, uintptr_t base,
                        int64_t rows, int64_t n, const std::vector<double>& lo, const std::vector<double>& span,
                        const std::vector<int64_t>& seeds, int active, int norm, uintptr_t parts, int np,
                        uintptr_t bad, int dtype, uintptr_t stream) {
  const size_t models = inputs.size();
  SE_REQUIRE(dtype == kF16 || dtype == kBF16, "dtype must be float16 or bfloat16, got code " + std::to_string(dtype));
  SE_REQUIRE(models >= 1 && models <= 8, "inputs must hold 1 to 8 tensors, got " + std::to_string(models));
  SE_REQUIRE(outs.size() == models && lo.size() == models && span.size() == models && seeds.size() == models,
             "outs, lo, span and seeds must have one entry per input");
  SE_REQUIRE(n >= 1 && n <= kMaxCols, "n must be in [1, " + std::to_string(kMaxCols) + "], got " + std::to_string(n));
  SE_REQUIRE(rows >= 0 && rows * static_cast<int64_t>(models) < (int64_t{1} << 31) && rows * n < (int64_t{1} << 34),
             "rows * models must be below 2**31 and rows * n below 2**34");
  SE_REQUIRE(norm >= 0 && norm <= 3, "norm must be 0 (none), 1 (l1), 2 (l2) or 3 (linf)");
  SE_REQUIRE(norm == 0 || (parts != 0 && np >= static_cast<int>(models)), "parts must hold np >= models columns");
  SE_REQUIRE(bad != 0 && base != 0, "base and bad must be device pointers");
  if (rows == 0) return;
  DellaDeltas a{};
  bool aligned = base % 8 == 0;
  for (size_t i = 0; i < models; ++i) {
    SE_REQUIRE(seeds[i] >= 0 && seeds[i] < (int64_t{1} << 31), "seeds must be in [0, 2**31)");
    a.t[i] = se::as_ptr<const uint16_t>(inputs[i]);
    a.out[i] = se::as_ptr<uint16_t>(outs[i]);
    a.lo[i] = static_cast<float>(lo[i]);
    a.span[i] = static_cast<float>(span[i]);
    a.seed[i] = static_cast<uint32_t>(seeds[i]);
    aligned = aligned && inputs[i] % 8 == 0 && outs[i] % 8 == 0;
  }
  a.base = se::as_ptr<const uint16_t>(base);
  a.active = active;
  a.models = static_cast<int>(models);
  a.n = static_cast<int>(n);
  a.inv_nm1 = n > 1 ? 1.0f / static_cast<float>(n - 1) : 0.0f;
  a.norm = norm;
  a.np = np;
  a.parts = se::as_ptr<float>(parts);
  a.bad = se::as_ptr<int32_t>(bad);
  const bool bf16 = dtype == kBF16;
  auto kernel = bf16 ? (aligned ? della_deltas_kernel<true, true> : della_deltas_kernel<true, false>)
                     : (aligned ? della_deltas_kernel<false, true> : della_deltas_kernel<false, false>);
  constexpr size_t smem = kWords * sizeof(uint32_t);
  SE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(rows * static_cast<int64_t>(models)), kThreads, smem, se::as_stream(stream)>>>(a);
  SE_CHECK_LAUNCH();
}
