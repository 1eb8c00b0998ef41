// The fused pass of a generalized task-arithmetic merge (mergekit's ties / breadcrumbs / task_arithmetic /
// della after its own masks), one read of base + N fine-tuned tensors and one write of the merged tensor.
//
// Per entry, with b = base (0 without one) and x_i = model i's value, all arithmetic in fp32 rounded to the
// storage dtype wherever mergekit's torch code stores an intermediate (so the result is mergekit's to the
// bit, the same arithmetic as sparsity_engine/ops/merge/triton.py's _merge_kernel):
//   d_i  = rnd(x_i - b)                  (x_i itself for pre-sparsified deltas)
//   keep = band test of |d_i| against the model's edges (K, J): before the upper edge and not before the
//          lower one, where an entry is before (K, J) iff key > K, or key == K and index < J (>= J when
//          later_first); every entry when there is no band
//   s_i  = keep ? d_i : 0, times the rescale factor (rounded) when asked; wd_i = rnd(s_i * w_i)
//   consensus 'sum' / 'count': elected = sign of sum_i wd_i (or of sum_i sign(wd_i)), +1 on a tie; the entries
//   agreeing with it are summed (mixed) with their weights (divisor); no consensus: all of them
//   normalize: mixed = rnd(mixed / rnd(divisor)), a zero divisor (|divisor| < 1e-8 without consensus) as 1
//   lambda: mixed = rnd(mixed * lambda); out = rnd(b + mixed)
// Sums run in model order and nothing is contracted into an FMA (__fadd_rn / __fmul_rn), as torch computes.
// Any NaN / Inf in base or an input sets *flag (one atomic per warp, on the error path only).
//
// Why CUDA next to the Triton kernel: the same pass took 0.25 ms in Triton at 11008x4096 bf16 with 3 models
// (ncu: 77% issue slots busy, ~200 instructions per entry, 26% of DRAM peak): compute bound. Here 16-byte
// loads and stores, integer band tests and no masking of full vectors.
#include <algorithm>
#include <cstdint>
#include <vector>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace {

constexpr int kMaxModels = 8;
constexpr int kThreads = 256;

enum Spars : int { kNone = 0, kBand = 1, kPresparse = 3 };
enum Consensus : int { kNoConsensus = 0, kSum = 1, kCount = 2 };

struct Args {
  const void* t[kMaxModels];
  const void* base;  // nullptr: no base (one tensor's breadcrumbs band)
  void* out;
  int64_t n;
  int nmodels, spars, consensus, normalize, has_lo, later_first, rescale, apply_lambda;
  float lam;
  const float* w;      // [N] weights, rounded to the dtype
  const float* scale;  // [N] rescale factors (read when rescale)
  const int32_t* K;    // [2N] band edges: 2i lower, 2i + 1 upper
  const int32_t* J;
  int32_t* flag;
};

template <typename T> struct Traits;
template <> struct Traits<float> {
  using U = uint32_t;
  static constexpr uint32_t kAbs = 0x7FFFFFFFu, kExp = 0x7F800000u;
};
template <> struct Traits<__half> {
  using U = uint16_t;
  static constexpr uint32_t kAbs = 0x7FFFu, kExp = 0x7C00u;
};
template <> struct Traits<__nv_bfloat16> {
  using U = uint16_t;
  static constexpr uint32_t kAbs = 0x7FFFu, kExp = 0x7F80u;
};

template <typename T> __device__ __forceinline__ float to_f(typename Traits<T>::U u);
template <> __device__ __forceinline__ float to_f<float>(uint32_t u) { return __uint_as_float(u); }
template <> __device__ __forceinline__ float to_f<__half>(uint16_t u) { return __half2float(__ushort_as_half(u)); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(uint16_t u) { return __uint_as_float(uint32_t(u) << 16); }

// v rounded to T (nearest even), as bits
template <typename T> __device__ __forceinline__ typename Traits<T>::U to_bits(float v);
template <> __device__ __forceinline__ uint32_t to_bits<float>(float v) { return __float_as_uint(v); }
template <> __device__ __forceinline__ uint16_t to_bits<__half>(float v) { return __half_as_ushort(__float2half_rn(v)); }
template <> __device__ __forceinline__ uint16_t to_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

template <typename T> __device__ __forceinline__ float rnd(float v) { return to_f<T>(to_bits<T>(v)); }

__device__ __forceinline__ float sign_of(float v) { return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f); }

// The VEC = 16 / sizeof(T) values at p + e as one 16-byte word group: one load when full, else the first nv
// one by one (0 after). Unpacked with value_at.
template <typename T, int VEC>
__device__ __forceinline__ uint4 load_words(const void* p, int64_t e, bool full, int nv) {
  using U = typename Traits<T>::U;
  const U* q = static_cast<const U*>(p) + e;
  if (full) return __ldg(reinterpret_cast<const uint4*>(q));
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (v < nv) {
      if (sizeof(U) == 4) w[v] = uint32_t(q[v]);
      else w[v / 2] |= uint32_t(q[v]) << (16 * (v % 2));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__device__ __forceinline__ typename Traits<T>::U value_at(const uint4& w, int v) {
  using U = typename Traits<T>::U;
  const uint32_t word = (sizeof(U) == 4 ? v : v / 2) == 0 ? w.x
                        : (sizeof(U) == 4 ? v : v / 2) == 1 ? w.y
                        : (sizeof(U) == 4 ? v : v / 2) == 2 ? w.z : w.w;
  return sizeof(U) == 4 ? static_cast<U>(word) : static_cast<U>(word >> (16 * (v % 2)));
}

// Entry before band edge r of the (|d| descending, index ascending / descending) order: one compare, as
// key > K - [index before J] (J is 0 or n whenever K is INT_MAX, so K - 1 never wraps into a false match).
__device__ __forceinline__ bool before(int32_t key, int64_t idx, int32_t K, int32_t J, bool later_first) {
  const bool later = later_first ? idx >= J : idx < J;
  return key > K - static_cast<int32_t>(later);
}

template <typename T, int NMAX, bool VEC16>
__global__ void __launch_bounds__(kThreads) merge_fused_kernel(Args a) {
  using U = typename Traits<T>::U;
  constexpr int VEC = 16 / sizeof(T);
  const int N = a.nmodels;
  const bool has_base = a.base != nullptr;
  // per-model parameters in shared memory (uniform reads): in registers they cost 6 per model
  __shared__ float w[kMaxModels], sc[kMaxModels];
  __shared__ int32_t K[2 * kMaxModels], J[2 * kMaxModels];
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < N) {
    w[tid] = a.w[tid];
    sc[tid] = a.rescale ? a.scale[tid] : 1.f;
  }
  if (tid < 2 * N) {
    K[tid] = a.K[tid];
    J[tid] = a.J[tid];
  }
  __syncthreads();
  const bool band = a.spars == kBand, later_first = a.later_first != 0, has_lo = a.has_lo != 0;
  const bool delta_of_base = has_base && a.spars != kPresparse;
  bool bad = false;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * VEC;
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC; e < a.n; e += step) {
    const int nv = static_cast<int>(a.n - e < VEC ? a.n - e : VEC);
    const bool full = VEC16 && nv == VEC;
    // every load of this vector issued before any arithmetic: the loads are what keeps DRAM busy
    const uint4 rb = has_base ? load_words<T, VEC>(a.base, e, full, nv) : make_uint4(0, 0, 0, 0);
    uint4 rx[NMAX];
#pragma unroll
    for (int m = 0; m < NMAX; ++m) rx[m] = m < N ? load_words<T, VEC>(a.t[m], e, full, nv) : make_uint4(0, 0, 0, 0);
    float b[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const U bb = value_at<T>(rb, v);
      b[v] = to_f<T>(bb);
      bad |= (uint32_t(bb) & Traits<T>::kExp) == Traits<T>::kExp;
    }
    float vote[VEC], mixed[VEC], divisor[VEC];
    // the weighted deltas (dtype values) for the consensus loop, packed as the 16-byte vectors are
    uint32_t wd[NMAX][4];
#pragma unroll
    for (int v = 0; v < VEC; ++v) vote[v] = mixed[v] = divisor[v] = 0.f;
#pragma unroll
    for (int m = 0; m < NMAX; ++m) {
      if (m >= N) break;
      const float wm = w[m], scm = sc[m];
      const int32_t Klo = K[2 * m], Khi = K[2 * m + 1], Jlo = J[2 * m], Jhi = J[2 * m + 1];
#pragma unroll
      for (int i = 0; i < 4; ++i) wd[m][i] = 0;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const U x = value_at<T>(rx[m], v);
        bad |= (uint32_t(x) & Traits<T>::kExp) == Traits<T>::kExp;
        const U d = delta_of_base ? to_bits<T>(__fsub_rn(to_f<T>(x), b[v])) : x;
        bool keep = true;
        if (band) {
          const int32_t key = static_cast<int32_t>(uint32_t(d) & Traits<T>::kAbs);
          const int64_t idx = e + v;
          keep = before(key, idx, Khi, Jhi, later_first);
          if (has_lo) keep = keep && !before(key, idx, Klo, Jlo, later_first);
        }
        float s = keep ? to_f<T>(d) : 0.f;
        if (a.rescale) s = rnd<T>(__fmul_rn(s, scm));
        const U wb = to_bits<T>(__fmul_rn(s, wm));
        const float wf = to_f<T>(wb);
        if (sizeof(U) == 4) wd[m][v] = uint32_t(wb);
        else wd[m][v / 2] |= uint32_t(wb) << (16 * (v % 2));
        if (a.consensus == kNoConsensus) {
          mixed[v] = __fadd_rn(mixed[v], wf);
          divisor[v] = __fadd_rn(divisor[v], wm);
        } else {
          vote[v] = __fadd_rn(vote[v], a.consensus == kSum ? wf : sign_of(wf));
        }
      }
    }
    if (a.consensus != kNoConsensus) {
#pragma unroll
      for (int m = 0; m < NMAX; ++m) {
        if (m >= N) break;
        const float wm = w[m];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const U wb = sizeof(U) == 4 ? U(wd[m][v]) : U(wd[m][v / 2] >> (16 * (v % 2)));
          const float wf = to_f<T>(wb);
          const float elected = vote[v] >= 0.f ? 1.f : -1.f;
          const bool agree = __fmul_rn(wf, elected) > 0.f;  // sign(wd) == elected: a 0 never agrees
          mixed[v] = __fadd_rn(mixed[v], agree ? wf : 0.f);
          divisor[v] = __fadd_rn(divisor[v], agree ? wm : 0.f);
        }
      }
    }
    U res[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float mv = rnd<T>(mixed[v]);
      if (a.normalize) {
        float dv = rnd<T>(divisor[v]);
        if (a.consensus != kNoConsensus) dv = dv == 0.f ? 1.f : dv;
        else dv = fabsf(dv) < 1e-8f ? 1.f : dv;
        mv = rnd<T>(__fdiv_rn(mv, dv));
      }
      if (a.apply_lambda) mv = rnd<T>(__fmul_rn(mv, a.lam));
      res[v] = to_bits<T>(__fadd_rn(b[v], mv));
    }
    U* o = static_cast<U*>(a.out) + e;
    if (full) {
      uint32_t words[4] = {0, 0, 0, 0};
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        if (sizeof(U) == 4) words[v] = uint32_t(res[v]);
        else words[v / 2] |= uint32_t(res[v]) << (16 * (v % 2));
      }
      *reinterpret_cast<uint4*>(o) = make_uint4(words[0], words[1], words[2], words[3]);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) if (v < nv) o[v] = res[v];
    }
  }
  // every thread of the block reaches this point
  if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) atomicOr(a.flag, 1);
}

int sm_count_of_current_device() {
  static int cached[64] = {};
  int dev = 0;
  SE_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cached[dev] > 0) return cached[dev];
  int sms = 0;
  SE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cached[dev] = sms;
  return sms;
}

template <typename T, int NMAX>
void launch(const Args& a, bool aligned, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  // a grid-stride loop over a few waves of blocks: each thread keeps the per-model parameters in registers
  const int64_t grid = std::min<int64_t>(se::ceil_div(a.n, int64_t(kThreads) * VEC),
                                         int64_t(sm_count_of_current_device()) * 8);
  const unsigned g = static_cast<unsigned>(std::max<int64_t>(grid, 1));
  if (aligned) merge_fused_kernel<T, NMAX, true><<<g, kThreads, 0, s>>>(a);
  else merge_fused_kernel<T, NMAX, false><<<g, kThreads, 0, s>>>(a);
  SE_CHECK_LAUNCH();
}

template <typename T>
void launch_models(const Args& a, bool aligned, cudaStream_t s) {
  if (a.nmodels <= 2) launch<T, 2>(a, aligned, s);
  else if (a.nmodels <= 4) launch<T, 4>(a, aligned, s);
  else launch<T, 8>(a, aligned, s);
}

}  // namespace

// Launcher: see the header comment and sparsity_engine/ops/merge/cuda.py.
void merge_fused(const std::vector<uintptr_t>& inputs, uintptr_t base, uintptr_t out, int64_t n, int spars,
                 int consensus, int normalize, int has_lo, int later_first, int rescale, int apply_lambda, double lam,
                 uintptr_t weights, uintptr_t scale, uintptr_t edge_k, uintptr_t edge_j, uintptr_t flag, int dtype,
                 uintptr_t stream) {
  SE_REQUIRE(!inputs.empty() && inputs.size() <= kMaxModels, "inputs must hold 1 to 8 pointers");
  SE_REQUIRE(n >= 0 && n < (int64_t(1) << 31), "n must be in [0, 2**31)");
  SE_REQUIRE(spars == kNone || spars == kBand || spars == kPresparse, "spars must be 0 (none), 1 (band) or 3 (presparse)");
  SE_REQUIRE(consensus == kNoConsensus || consensus == kSum || consensus == kCount, "consensus must be 0, 1 or 2");
  SE_REQUIRE(weights && edge_k && edge_j && flag && (scale || !rescale), "parameter pointers must be given");
  if (n == 0) return;
  Args a{};
  bool aligned = out % 16 == 0 && base % 16 == 0;
  for (size_t m = 0; m < kMaxModels; ++m) {
    a.t[m] = m < inputs.size() ? reinterpret_cast<const void*>(inputs[m]) : nullptr;
    if (m < inputs.size()) aligned &= inputs[m] % 16 == 0;
  }
  a.base = base ? reinterpret_cast<const void*>(base) : nullptr;
  a.out = reinterpret_cast<void*>(out);
  a.n = n;
  a.nmodels = static_cast<int>(inputs.size());
  a.spars = spars;
  a.consensus = consensus;
  a.normalize = normalize;
  a.has_lo = has_lo;
  a.later_first = later_first;
  a.rescale = rescale;
  a.apply_lambda = apply_lambda;
  a.lam = static_cast<float>(lam);
  a.w = se::as_ptr<const float>(weights);
  a.scale = se::as_ptr<const float>(scale);
  a.K = se::as_ptr<const int32_t>(edge_k);
  a.J = se::as_ptr<const int32_t>(edge_j);
  a.flag = se::as_ptr<int32_t>(flag);
  const cudaStream_t s = se::as_stream(stream);
  switch (dtype) {
    case kF32: launch_models<float>(a, aligned, s); break;
    case kF16: launch_models<__half>(a, aligned, s); break;
    case kBF16: launch_models<__nv_bfloat16>(a, aligned, s); break;
    default: SE_REQUIRE(false, "dtype must be float32, float16 or bfloat16");
  }
}
