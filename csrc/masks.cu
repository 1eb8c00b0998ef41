// N:M mask: for every group of m consecutive scores keep the n largest, ties to the lower index.
//
// Entry i of a group is kept iff rank_i < n, where rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}: the
// position of i in a stable descending sort (exactly sparsity_engine/ops/masks/reference.py nm_mask). Scores
// are compared in fp32 (fp16/bf16 widen exactly), so -0.0 == +0.0 ties like in torch.sort. Inputs are finite
// (the Python front end checks). The output is one byte (0/1) per element: a torch.bool tensor.
//
// Fast path (m in {2, 4, 8, 16, 32}, 16-byte aligned pointers): each thread owns E = max(m, 16 / sizeof(T))
// consecutive scores, read with 16-byte loads (2:4 fp32: one float4 = one group; bf16: one 16-byte load =
// two groups), ranks its groups in registers and writes its E mask bytes with one 4/8/16-byte store. Adjacent
// threads own adjacent chunks, so a warp's loads and stores are contiguous. Whatever the fast path does not
// cover (a tail shorter than E, other m, unaligned pointers) goes to the generic kernel: one thread per
// element, reading its group's m scores through the read-only cache (neighbouring threads share the lines).
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxM = 256;  // the generic kernel reads m scores per element; beyond this use another op

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// Mask bytes of E elements, stored with the widest aligned store (E in {4, 8, 16, 32}).
template <int E>
__device__ __forceinline__ void store_bytes(uint8_t* out, const uint8_t (&b)[E]) {
  if constexpr (E == 4) {
    *reinterpret_cast<uint32_t*>(out) = *reinterpret_cast<const uint32_t*>(b);
  } else if constexpr (E == 8) {
    *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(b);
  } else {
#pragma unroll
    for (int i = 0; i < E / 16; ++i) reinterpret_cast<uint4*>(out)[i] = reinterpret_cast<const uint4*>(b)[i];
  }
}

template <typename T, int M>
__global__ void __launch_bounds__(kThreads) nm_mask_vec_kernel(const T* __restrict__ scores,
                                                               uint8_t* __restrict__ out, int64_t chunks,
                                                               int n) {
  constexpr int kVec = 16 / sizeof(T);        // elements per 16-byte load
  constexpr int E = M > kVec ? M : kVec;      // elements per thread: whole groups, whole 16-byte loads
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= chunks) return;
  const T* src = scores + c * E;

  float v[E];
#pragma unroll
  for (int l = 0; l < E / kVec; ++l) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(src) + l);
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[l * kVec + k] = to_f(t[k]);
  }

  alignas(16) uint8_t keep[E];
#pragma unroll
  for (int g = 0; g < E / M; ++g) {
#pragma unroll
    for (int i = 0; i < M; ++i) {
      const float x = v[g * M + i];
      int rank = 0;
#pragma unroll
      for (int j = 0; j < M; ++j) {
        const float y = v[g * M + j];
        rank += (j < i) ? (y >= x) : (y > x);
      }
      keep[g * M + i] = rank < n;
    }
  }
  store_bytes<E>(out + c * E, keep);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nm_mask_generic_kernel(const T* __restrict__ scores,
                                                                   uint8_t* __restrict__ out, int64_t begin,
                                                                   int64_t numel, int n, int m) {
  const int64_t e = begin + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= numel) return;
  const int64_t base = e - e % m;
  const int i = static_cast<int>(e - base);
  const float x = to_f(__ldg(scores + e));
  int rank = 0;
  for (int j = 0; j < m; ++j) {
    const float y = to_f(__ldg(scores + base + j));
    rank += (j < i) ? (y >= x) : (y > x);
  }
  out[e] = rank < n;
}

template <typename T>
void launch_generic(const T* scores, uint8_t* out, int64_t begin, int64_t numel, int n, int m,
                    cudaStream_t stream) {
  if (begin >= numel) return;
  const int64_t blocks = se::ceil_div(numel - begin, kThreads);
  nm_mask_generic_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(scores, out, begin, numel,
                                                                                     n, m);
  SE_CHECK_LAUNCH();
}

// Fast path over the largest prefix made of whole E-element chunks; returns how many elements it covered.
template <typename T, int M>
int64_t launch_vec(const T* scores, uint8_t* out, int64_t numel, int n, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int E = M > kVec ? M : kVec;
  const int64_t chunks = numel / E;
  if (chunks == 0) return 0;
  const int64_t blocks = se::ceil_div(chunks, kThreads);
  nm_mask_vec_kernel<T, M><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(scores, out, chunks, n);
  SE_CHECK_LAUNCH();
  return chunks * E;
}

template <typename T>
void nm_mask_typed(const T* scores, uint8_t* out, int64_t numel, int n, int m, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(scores) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  int64_t done = 0;
  if (aligned) {
    switch (m) {
      case 2: done = launch_vec<T, 2>(scores, out, numel, n, stream); break;
      case 4: done = launch_vec<T, 4>(scores, out, numel, n, stream); break;
      case 8: done = launch_vec<T, 8>(scores, out, numel, n, stream); break;
      case 16: done = launch_vec<T, 16>(scores, out, numel, n, stream); break;
      case 32: done = launch_vec<T, 32>(scores, out, numel, n, stream); break;
      default: break;
    }
  }
  launch_generic<T>(scores, out, done, numel, n, m, stream);
}

}  // namespace

int64_t masks_nm_mask_max_m() { return kMaxM; }

// scores: numel contiguous fp32/fp16/bf16 values (numel a multiple of m), out: numel bytes (torch.bool).
void masks_nm_mask(uintptr_t scores, uintptr_t out, int64_t numel, int64_t n, int64_t m, int dtype,
                   uintptr_t stream) {
  SE_REQUIRE(m >= 1 && m <= kMaxM, "m must be in [1, " + std::to_string(kMaxM) + "], got " + std::to_string(m));
  SE_REQUIRE(n >= 1 && n <= m, "n must be in [1, m], got n=" + std::to_string(n) + ", m=" + std::to_string(m));
  SE_REQUIRE(numel >= 0 && numel % m == 0, "numel must be a multiple of m, got numel=" + std::to_string(numel));
  if (numel == 0) return;
  uint8_t* o = se::as_ptr<uint8_t>(out);
  cudaStream_t s = se::as_stream(stream);
  const int ni = static_cast<int>(n), mi = static_cast<int>(m);
  switch (dtype) {
    case kF32: nm_mask_typed(se::as_ptr<const float>(scores), o, numel, ni, mi, s); break;
    case kF16: nm_mask_typed(se::as_ptr<const __half>(scores), o, numel, ni, mi, s); break;
    case kBF16: nm_mask_typed(se::as_ptr<const __nv_bfloat16>(scores), o, numel, ni, mi, s); break;
    default: SE_REQUIRE(false, "dtype code must be kF32, kF16 or kBF16, got " + std::to_string(dtype));
  }
}
