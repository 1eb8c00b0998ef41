// CSR sparse linear for decode: y[t, r] = sum_j W[r, j] * x[t, j] (+ bias[r]) for 1..16 tokens per pass.
//
// Layout (sparsity_engine/ops/csr/format.py): row r owns slots crow[r] .. crow[r+1] (crow[r] a multiple of
// 8), the first row_len[r] of them real, the rest padding. Values in T (fp32/fp16/bf16), column indices int16
// or int32, so 8 slots are one (fp16/bf16 + int16) or two (fp32 / int32) 16-byte loads.
//
// One warp per row, rows taken in row_order (longest first). Each lane reads 8 slots per step, two steps in
// flight (2 x 16-byte loads of values and of indices per lane before any use) to keep enough bytes in flight
// for HBM. The activations of a group of BP tokens are staged once per block in shared memory, transposed to
// [K][BP], so one gather fetches all BP tokens of a column with one 2..16-byte (or 2 x 16-byte) load. When
// even one token does not fit in shared memory, x is read through L1 (__ldg) instead. Blocks are persistent
// (as many as fit on the GPU): a block stages x once and its warps stride over the rows.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace {

// Warps per block: 16, or 32 when a block stages 8+ tokens (a large shared-memory tile: one block per SM,
// so the block itself must bring enough warps to keep loads in flight).
template <int BP, bool SMEM>
struct Shape {
  static constexpr int kWarps = (SMEM && BP >= 8) ? 32 : 16;
  static constexpr int kThreads = kWarps * 32;
};
constexpr int kSlots = 8;           // slots per lane per step (one 16-byte load of bf16 values)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 8 consecutive elements of type E (16 or 32 bytes) with 16-byte loads; p is 16-byte aligned.
template <typename E>
struct Eight {
  static constexpr int kVec = (8 * sizeof(E) + 15) / 16;
  uint4 raw[kVec];
  __device__ __forceinline__ void load(const E* p) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < kVec; ++i) raw[i] = __ldg(q + i);
  }
  __device__ __forceinline__ E operator[](int i) const { return reinterpret_cast<const E*>(raw)[i]; }
};

// BP token values of one column from shared memory ([K][BP] layout), widest loads that alignment allows.
template <typename T, int BP>
__device__ __forceinline__ void load_col(const T* p, float (&xv)[BP]) {
  constexpr int kBytes = BP * sizeof(T);
  if constexpr (kBytes >= 16) {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) {
      uint4 u = reinterpret_cast<const uint4*>(p)[i];
      const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < 16 / (int)sizeof(T); ++j) xv[i * (16 / sizeof(T)) + j] = to_f(t[j]);
    }
  } else if constexpr (kBytes == 8) {
    uint2 u = *reinterpret_cast<const uint2*>(p);
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < BP; ++j) xv[j] = to_f(t[j]);
  } else if constexpr (kBytes == 4) {
    uint32_t u = *reinterpret_cast<const uint32_t*>(p);
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < BP; ++j) xv[j] = to_f(t[j]);
  } else {
    xv[0] = to_f(p[0]);
  }
}

template <typename T, typename I, int BP, bool SMEM>
__device__ __forceinline__ void accumulate(const Eight<T>& v, const Eight<I>& c, int valid, const T* sx,
                                           const T* __restrict__ x, int64_t K, int nb, float (&acc)[BP]) {
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    if (j < valid) {
      const float w = to_f(v[j]);
      const int64_t col = static_cast<int64_t>(c[j]);
      float xv[BP];
      if constexpr (SMEM) {
        load_col<T, BP>(sx + col * BP, xv);
      } else {
#pragma unroll
        for (int b = 0; b < BP; ++b) xv[b] = b < nb ? to_f(__ldg(x + b * K + col)) : 0.f;
      }
#pragma unroll
      for (int b = 0; b < BP; ++b) acc[b] = fmaf(w, xv[b], acc[b]);
    }
  }
}

// Copy the token group x[0..nb) [nb, K] into shared memory as [K][BP] (tokens nb..BP zero). 16-byte loads,
// four in flight per thread: this runs once per block before any row, so its latency is on the critical path.
// Consecutive threads take consecutive tokens of one 8-column chunk, so their 2-byte shared stores are
// contiguous (at most 2-way bank conflicts) rather than BP*16 bytes apart.
template <typename T, int BP, int kThreads>
__device__ __forceinline__ void stage_x(T* sx, const T* __restrict__ xg, int64_t K, int nb) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = (K % kVec == 0) && (reinterpret_cast<uintptr_t>(xg) % 16 == 0);
  if (!vec_ok) {
    for (int64_t i = threadIdx.x; i < K * BP; i += kThreads) {
      const int b = static_cast<int>(i % BP);
      sx[i] = b < nb ? xg[b * K + i / BP] : from_f<T>(0.f);
    }
    return;
  }
  const uint4* x4 = reinterpret_cast<const uint4*>(xg);
  const int64_t chunks = K / kVec;
  if constexpr (BP == 1) {
    uint4* s4 = reinterpret_cast<uint4*>(sx);
    for (int64_t i0 = threadIdx.x; i0 < chunks; i0 += 4 * kThreads) {
      uint4 u[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t i = i0 + static_cast<int64_t>(q) * kThreads;
        if (i < chunks) u[q] = __ldg(x4 + i);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t i = i0 + static_cast<int64_t>(q) * kThreads;
        if (i < chunks) s4[i] = u[q];
      }
    }
  } else {
    const int64_t total = chunks * BP;
    for (int64_t i0 = threadIdx.x; i0 < total; i0 += 4 * kThreads) {
      uint4 u[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t i = i0 + static_cast<int64_t>(q) * kThreads;
        const int b = static_cast<int>(i % BP);
        u[q] = make_uint4(0u, 0u, 0u, 0u);
        if (i < total && b < nb) u[q] = __ldg(x4 + b * chunks + i / BP);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t i = i0 + static_cast<int64_t>(q) * kThreads;
        if (i < total) {
          const int b = static_cast<int>(i % BP);
          const int64_t c = i / BP;
          const T* t = reinterpret_cast<const T*>(&u[q]);
#pragma unroll
          for (int j = 0; j < kVec; ++j) sx[(c * kVec + j) * BP + b] = t[j];
        }
      }
    }
  }
}

// The schedule entry of the w-th row a warp takes: {start slot, (length << 32) | row}, one 16-byte load
// (instead of order[w] then crow[r] and row_len[r]: two dependent round trips).
__device__ __forceinline__ void unpack(longlong2 s, int64_t& r, int64_t& start, int64_t& end) {
  start = s.x;
  end = start + (static_cast<unsigned long long>(s.y) >> 32);
  r = s.y & 0xffffffffLL;
}

template <typename T, typename I, int BP, bool SMEM>
__global__ void __launch_bounds__(Shape<BP, SMEM>::kThreads)
csr_spmm_kernel(const longlong2* __restrict__ sched, const I* __restrict__ cols, const T* __restrict__ vals,
                const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                int64_t N, int64_t K, int64_t tokens) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw);
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * BP;
  const int nb = static_cast<int>(tokens - tok0 < BP ? tokens - tok0 : BP);
  const T* xg = x + tok0 * K;

  const int lane = threadIdx.x & 31;
  constexpr int kWarps = Shape<BP, SMEM>::kWarps;
  const int64_t warp0 = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;

  // The first row's metadata and first 2 x 8 slots per lane are requested before x is staged, so their
  // HBM latency overlaps the staging (at decode sizes a warp often has one row, and this chain is the time).
  int64_t r = 0, start = 0, end = 0;
  Eight<T> v0, v1;
  Eight<I> c0, c1;
  if (warp0 < N) {
    unpack(__ldg(sched + warp0), r, start, end);
    const int64_t p = start + lane * kSlots;
    if (p < end) {
      v0.load(vals + p);
      c0.load(cols + p);
      if (p + 32 * kSlots < end) {
        v1.load(vals + p + 32 * kSlots);
        c1.load(cols + p + 32 * kSlots);
      }
    }
  }
  if constexpr (SMEM) {
    stage_x<T, BP, Shape<BP, SMEM>::kThreads>(sx, xg, K, nb);
    __syncthreads();
  }

  bool preloaded = true;
  for (int64_t w = warp0; w < N; w += warp_stride) {
    if (w != warp0) unpack(__ldg(sched + w), r, start, end);
    float acc[BP];
#pragma unroll
    for (int b = 0; b < BP; ++b) acc[b] = 0.f;
    // two steps of 32 lanes x 8 slots in flight
    for (int64_t p = start + lane * kSlots; p < end; p += 2 * 32 * kSlots) {
      const int64_t p2 = p + 32 * kSlots;
      const bool second = p2 < end;
      if (!preloaded) {
        v0.load(vals + p);
        c0.load(cols + p);
        if (second) {
          v1.load(vals + p2);
          c1.load(cols + p2);
        }
      }
      preloaded = false;
      accumulate<T, I, BP, SMEM>(v0, c0, static_cast<int>(end - p < kSlots ? end - p : kSlots), sx, xg, K, nb, acc);
      if (second)
        accumulate<T, I, BP, SMEM>(v1, c1, static_cast<int>(end - p2 < kSlots ? end - p2 : kSlots), sx, xg, K, nb, acc);
    }
    preloaded = false;
#pragma unroll
    for (int b = 0; b < BP; ++b) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], off);
    }
    // lane b writes token b (after the butterfly every lane holds every sum)
#pragma unroll
    for (int b = 0; b < BP; ++b) {
      if (lane == (b & 31) && b < nb) {
        float out = acc[b];
        if (bias != nullptr) out += to_f(bias[r]);
        y[(tok0 + b) * N + r] = from_f<T>(out);
      }
    }
  }
}

struct Args {
  const longlong2* sched; const void* cols; const void* vals;
  const void* x; const void* bias; void* y; int64_t N, K, tokens; cudaStream_t stream;
};

template <typename T, typename I, int BP, bool SMEM>
void launch(const Args& a) {
  auto kernel = csr_spmm_kernel<T, I, BP, SMEM>;
  const size_t smem = SMEM ? static_cast<size_t>(a.K) * BP * sizeof(T) : 0;
  int device = 0;
  SE_CUDA_CHECK(cudaGetDevice(&device));
  // the attribute and the occupancy query are per kernel and device; cache them (host cost matters at decode)
  static int set_device[64] = {};
  static size_t set_smem[64] = {};
  static int sms[64] = {};
  const int slot = device & 63;
  if (sms[slot] == 0) SE_CUDA_CHECK(cudaDeviceGetAttribute(&sms[slot], cudaDevAttrMultiProcessorCount, device));
  if (smem > 48 * 1024 && (set_device[slot] == 0 || set_smem[slot] < smem)) {
    SE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    set_device[slot] = 1;
    set_smem[slot] = smem;
  }
  int per_sm = 0;
  constexpr int kWarps = Shape<BP, SMEM>::kWarps, kThreads = Shape<BP, SMEM>::kThreads;
  SE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  if (per_sm < 1) per_sm = 1;
  const int64_t needed = (a.N + kWarps - 1) / kWarps;
  const int64_t blocks = needed < static_cast<int64_t>(per_sm) * sms[slot] ? needed : static_cast<int64_t>(per_sm) * sms[slot];
  const int64_t groups = (a.tokens + BP - 1) / BP;
  dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(groups));
  kernel<<<grid, kThreads, smem, a.stream>>>(a.sched, static_cast<const I*>(a.cols),
                                             static_cast<const T*>(a.vals), static_cast<const T*>(a.x),
                                             static_cast<const T*>(a.bias), static_cast<T*>(a.y), a.N, a.K, a.tokens);
  SE_CHECK_LAUNCH();
}

template <typename T, typename I, bool SMEM>
void launch_bp(const Args& a, int bp) {
  switch (bp) {
    case 1: launch<T, I, 1, SMEM>(a); break;
    case 2: launch<T, I, 2, SMEM>(a); break;
    case 4: launch<T, I, 4, SMEM>(a); break;
    case 8: launch<T, I, 8, SMEM>(a); break;
    default: launch<T, I, 16, SMEM>(a); break;
  }
}

template <typename T, typename I>
void launch_dtype(const Args& a, int bp, bool use_smem) {
  if (use_smem) launch_bp<T, I, true>(a, bp);
  else launch_bp<T, I, false>(a, bp);
}

template <typename T>
void launch_index(const Args& a, int index_dtype, int bp, bool use_smem) {
  if (index_dtype == kI16) launch_dtype<T, int16_t>(a, bp, use_smem);
  else if (index_dtype == kI32) launch_dtype<T, int32_t>(a, bp, use_smem);
  else throw std::runtime_error("csr_spmm: index dtype must be int16 or int32");
}

}  // namespace

// Largest token group (1, 2, 4, 8 or 16) whose activations fit in shared memory; 0 when not even one does.
int64_t csr_group_size(int64_t K, int64_t tokens, int dtype) {
  const int64_t elem = dtype == kF32 ? 4 : 2;
  int device = 0;
  SE_CUDA_CHECK(cudaGetDevice(&device));
  int limit = 0;
  SE_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  int64_t want = 1;
  while (want < tokens && want < 16) want *= 2;
  for (int64_t bp = want; bp >= 1; bp /= 2)
    if (K * bp * elem <= limit) return bp;
  return 0;
}

// y [tokens, N] = x [tokens, K] @ W^T (+ bias [N]); all pointers device pointers, bias 0 for none.
// sched: int64 [N, 2] in the order warps take rows: {crow[r], (row_len[r] << 32) | r} (16-byte aligned).
// group: tokens per pass (1/2/4/8/16) from csr_group_size, or 0 to read x from global memory (BP = 16 or less).
void csr_spmm(uintptr_t sched, uintptr_t cols, uintptr_t vals,
              uintptr_t x, uintptr_t bias, uintptr_t y, int64_t N, int64_t K, int64_t tokens,
              int dtype, int index_dtype, int64_t group, uintptr_t stream) {
  if (N <= 0 || tokens <= 0) return;
  const bool use_smem = group > 0;
  int bp = static_cast<int>(group);
  if (!use_smem) {
    bp = 1;
    while (bp < tokens && bp < 16) bp *= 2;
  }
  Args a{reinterpret_cast<const longlong2*>(sched), reinterpret_cast<const void*>(cols),
         reinterpret_cast<const void*>(vals), reinterpret_cast<const void*>(x),
         reinterpret_cast<const void*>(bias), reinterpret_cast<void*>(y), N, K, tokens,
         reinterpret_cast<cudaStream_t>(stream)};
  switch (dtype) {
    case kF32: launch_index<float>(a, index_dtype, bp, use_smem); break;
    case kF16: launch_index<__half>(a, index_dtype, bp, use_smem); break;
    case kBF16: launch_index<__nv_bfloat16>(a, index_dtype, bp, use_smem); break;
    default: throw std::runtime_error("csr_spmm: dtype must be float32, float16 or bfloat16");
  }
}
