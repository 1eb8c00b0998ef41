// Tensor-core CSR SpMM for fp16/bf16: y[t, r] = sum_k W[r, k] * x[t, k] (+ bias[r]) for any number of tokens.
//
// Weight layout (sparsity_engine/ops/csr/format.py, `tile_layout`): W is cut into tiles of 16 rows (a band)
// x 128 columns. Tile (b, t) owns entries ptr[b * nt + t] .. ptr[b * nt + t + 1] of `ent`, each one uint32 =
// (value bits << 16) | (row_in_band * 128 + col_in_tile). Every tile holds a multiple of 4 entries (the padding
// repeats one of the tile's real entries: storing it twice is harmless), so tiles start 16-byte aligned and a
// lane reads 4 entries with one load. Bytes per nonzero: 4, as the CSR arrays with int16 indices.
//
// The loaded-sparse, computed-dense scheme (Flash-LLM, VLDB 2024): a warp owns one band; per tile it zeroes a
// 16 x 128 tile in shared memory, scatters the entries into it and runs 8 k-steps of mma.m16n8k16 (fp32
// accumulators) against the activations. The tensor cores do the dense tile's FLOPs, which at decode sizes
// cost far less than the bytes; what is paid per tile is the zeroing, the scatter and the ldmatrix reads.
// The next tile's entries are requested before the current tile's MMAs, so one load is in flight per warp
// while it computes, with 24 warps per SM.
//
// What bounds it (ncu): shared memory. Per tile the zeroing, the A and B ldmatrix reads and
// the scatter cost ~140 shared-memory wavefronts whatever the sparsity (L1/shared throughput 65-77%); the
// time is nearly flat from 90% to 70% sparsity. A variant that streamed each band's entries through a
// cp.async ring in shared memory (more bytes in flight, 2 blocks per SM) measured slower: more shared
// traffic, fewer warps. So was one with two bands per warp (each B fragment feeding two MMAs: a quarter less
// shared traffic, but 2 blocks per SM instead of 3). Four blocks per SM (64 registers, 256-column slices of
// x) was no better on average (BENCHMARKS.md, CSR linear).
//
// A block is 8 warps = 8 consecutive bands over one range of K; its tokens' activations are staged in
// shared memory one slice of K (512/256/128 columns for 8-16/32/64 tokens) at a time with cp.async, double
// buffered. When the K range is split over several blocks (grid.y > 1, chosen so the launch fills the GPU),
// each writes fp32 partial sums and a second kernel adds them in split order (deterministic), adds the bias
// and converts to T.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace {

constexpr int kBand = 16;             // rows per band = the MMA's M
constexpr int kTileK = 128;           // columns per tile
constexpr int kTileStride = kTileK + 8;  // shared row stride (elements): 272 bytes, ldmatrix conflict-free
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 4;             // 16-byte loads per lane per request: up to 512 entries
constexpr int kTileWords = kTileK * kBand;  // locations per tile (11 bits)

// Tokens per pass = 8 * NT (NT MMA n-tiles); tiles per staged slice of x, so that the double-buffered
// slice stays ~33 KB and three blocks fit per SM.
template <int NT>
struct Cfg {
  static constexpr int kTok = 8 * NT;
  static constexpr int kSliceTiles = NT <= 2 ? 4 : (NT == 4 ? 2 : 1);
  static constexpr int kSliceK = kSliceTiles * kTileK;
  static constexpr int kXStride = kSliceK + 8;  // elements; 16 bytes off a multiple of 128: conflict-free
  static constexpr size_t kSmemX = 2ull * kTok * kXStride * 2;
  static constexpr size_t kSmemW = static_cast<size_t>(kWarps) * kBand * kTileStride * 2;
  static constexpr size_t kSmem = kSmemX + kSmemW;
};

template <typename T> struct Mma;
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(smem_addr(p)));
}

// 16 bytes global -> shared, zero-filled when !valid (no bytes read then).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// x[tok0 .. tok0 + kTok, col0 .. col0 + kSliceK) -> xs [kTok][kXStride]; rows past `tokens` and columns past K
// are zero (K is a multiple of 8, so a 16-byte chunk is wholly inside or outside).
template <typename T, int NT>
__device__ __forceinline__ void stage_slice(T* xs, const T* __restrict__ x, int64_t K, int64_t tokens,
                                            int64_t tok0, int64_t col0) {
  using C = Cfg<NT>;
  constexpr int kRowChunks = C::kSliceK / 8;
  for (int i = threadIdx.x; i < C::kTok * kRowChunks; i += kThreads) {
    const int row = i / kRowChunks, chunk = i % kRowChunks;
    const int64_t col = col0 + chunk * 8;
    const bool valid = tok0 + row < tokens && col < K;
    const T* src = valid ? x + (tok0 + row) * K + col : x;
    cp_async16(xs + row * C::kXStride + chunk * 8, src, valid);
  }
}

// Entries [q, end) of one tile, up to 32 x kChunk x 4 of them: lane l takes the 16-byte groups l, l+32, ...
__device__ __forceinline__ void load_entries(uint4 (&buf)[kChunk], const uint4* __restrict__ ent4, int64_t q,
                                             int64_t end, int lane) {
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const int64_t idx = q + static_cast<int64_t>(j * 32 + lane) * 4;
    if (idx < end) buf[j] = __ldg(ent4 + (idx >> 2));
  }
}

__device__ __forceinline__ void scatter_word(uint16_t* wt, uint32_t w) {
  const uint32_t loc = w & (kTileWords - 1);
  wt[(loc / kTileK) * kTileStride + (loc % kTileK)] = static_cast<uint16_t>(w >> 16);
}

__device__ __forceinline__ void scatter_entries(uint16_t* wt, const uint4 (&buf)[kChunk], int64_t q, int64_t end,
                                                int lane) {
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const int64_t idx = q + static_cast<int64_t>(j * 32 + lane) * 4;
    if (idx < end) {
      scatter_word(wt, buf[j].x);
      scatter_word(wt, buf[j].y);
      scatter_word(wt, buf[j].z);
      scatter_word(wt, buf[j].w);
    }
  }
}

__device__ __forceinline__ void zero_tile(uint16_t* wt, int lane) {
  constexpr int kVecPerRow = kTileK / 8;
#pragma unroll
  for (int i = 0; i < kBand * kVecPerRow / 32; ++i) {
    const int u = i * 32 + lane;
    *reinterpret_cast<uint4*>(wt + (u / kVecPerRow) * kTileStride + (u % kVecPerRow) * 8) = make_uint4(0, 0, 0, 0);
  }
}

// acc[n] += W_tile [16 x 128] @ xs[n-tile n][col0 .. col0 + 128)^T, for the NT n-tiles of 8 tokens.
template <typename T, int NT>
__device__ __forceinline__ void mma_tile(float (&acc)[NT][4], const uint16_t* wt, const T* xs, int col0, int lane) {
  using C = Cfg<NT>;
#pragma unroll
  for (int ks = 0; ks < kTileK / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, wt + (lane & 15) * kTileStride + ks * 16 + (lane >> 4) * 8);
    const int col = col0 + ks * 16;
    if constexpr (NT == 1) {
      uint32_t b0, b1;
      ldmatrix_x2(b0, b1, xs + (lane & 7) * C::kXStride + col + ((lane >> 3) & 1) * 8);
      Mma<T>::run(acc[0], a, b0, b1);
    } else {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        const int m = lane >> 3;
        ldmatrix_x4(b, xs + (np * 16 + (m >> 1) * 8 + (lane & 7)) * C::kXStride + col + (m & 1) * 8);
        Mma<T>::run(acc[2 * np], a, b[0], b[1]);
        Mma<T>::run(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
}

// Tile boundaries ptr[base + i] for i < 32, one per lane, read with a shuffle: the scheduling reads of a
// warp then cost one load per 31 tiles instead of a dependent load before every tile's entries.
struct PtrWindow {
  const int64_t* __restrict__ ptr;
  int64_t base = 0;
  int64_t last = 0;  // highest valid index
  int64_t mine = 0;
  __device__ __forceinline__ void load(int64_t b, int lane) {
    base = b;
    mine = base + lane <= last ? __ldg(ptr + base + lane) : 0;
  }
  __device__ __forceinline__ int64_t at(int64_t i, int lane) {
    if (i - base >= 32) load(i, lane);
    return __shfl_sync(0xffffffffu, mine, static_cast<int>(i - base));
  }
};

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, NT >= 8 ? 2 : 3)  // 3 x 8 warps per SM; NT = 8 would spill at 80 registers
csr_tiles_kernel(const uint4* __restrict__ ent4, const int64_t* __restrict__ ptr, const T* __restrict__ x,
                 const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ part, int64_t N, int64_t K,
                 int64_t tokens, int64_t nbands, int64_t nt, int64_t tiles_per_block) {
  using C = Cfg<NT>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint16_t* wt = reinterpret_cast<uint16_t*>(smem_raw + C::kSmemX) + warp * kBand * kTileStride;

  const int64_t band = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool active = band < nbands;
  const int64_t tb = static_cast<int64_t>(blockIdx.y) * tiles_per_block;
  const int64_t te = tb + tiles_per_block < nt ? tb + tiles_per_block : nt;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.z) * C::kTok;
  const int nslices = static_cast<int>((te - tb + C::kSliceTiles - 1) / C::kSliceTiles);

  PtrWindow win{ptr};
  win.last = nbands * nt;
  uint4 buf[kChunk];
  int64_t p0 = 0, p1 = 0;
  if (active) {
    win.load(band * nt + tb, lane);
    p0 = win.at(band * nt + tb, lane);
    p1 = win.at(band * nt + tb + 1, lane);
    load_entries(buf, ent4, p0, p1 < p0 + 32 * kChunk * 4 ? p1 : p0 + 32 * kChunk * 4, lane);
  }
  stage_slice<T, NT>(xs, x, K, tokens, tok0, tb * kTileK);
  cp_async_commit();

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;

  for (int s = 0; s < nslices; ++s) {
    T* xcur = xs + (s & 1) * C::kTok * C::kXStride;
    if (s + 1 < nslices) {
      stage_slice<T, NT>(xs + ((s + 1) & 1) * C::kTok * C::kXStride, x, K, tokens, tok0,
                         (tb + static_cast<int64_t>(s + 1) * C::kSliceTiles) * kTileK);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (active) {
      for (int sp = 0; sp < C::kSliceTiles; ++sp) {
        const int64_t t = tb + static_cast<int64_t>(s) * C::kSliceTiles + sp;
        if (t >= te) break;
        const int64_t q0 = p0, q1 = p1;
        if (q1 > q0) {
          __syncwarp();  // the previous tile's ldmatrix reads are done before it is overwritten
          zero_tile(wt, lane);
          __syncwarp();
          int64_t q = q0;
          const int64_t first_end = q1 < q0 + 32 * kChunk * 4 ? q1 : q0 + 32 * kChunk * 4;
          scatter_entries(wt, buf, q, first_end, lane);
          for (q = first_end; q < q1; q += 32 * kChunk * 4) {  // tiles denser than one request (> 50%)
            const int64_t e = q1 < q + 32 * kChunk * 4 ? q1 : q + 32 * kChunk * 4;
            load_entries(buf, ent4, q, e, lane);
            scatter_entries(wt, buf, q, e, lane);
          }
        }
        if (t + 1 < te) {  // request the next tile before computing this one
          p0 = q1;
          p1 = win.at(band * nt + t + 2, lane);
          load_entries(buf, ent4, p0, p1 < p0 + 32 * kChunk * 4 ? p1 : p0 + 32 * kChunk * 4, lane);
        }
        if (q1 > q0) {
          __syncwarp();
          mma_tile<T, NT>(acc, wt, xcur, sp * kTileK, lane);
        }
      }
    }
    __syncthreads();  // every warp is done with xcur before the slice after next is staged into it
  }

  if (!active) return;
  const int64_t r0 = band * kBand + (lane >> 2);
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = r0 + (i >> 1) * 8;
      const int64_t tok = tok0 + n * 8 + (lane & 3) * 2 + (i & 1);
      if (r >= N || tok >= tokens) continue;
      if (gridDim.y == 1) {
        float out = acc[n][i];
        if (bias != nullptr) out += to_f(bias[r]);
        y[tok * N + r] = from_f<T>(out);
      } else {
        part[(static_cast<int64_t>(blockIdx.y) * tokens + tok) * N + r] = acc[n][i];
      }
    }
  }
}

// y[i] = sum_s part[s][i] (+ bias[i % N]) in split order; i over tokens x N.
template <typename T>
__global__ void csr_tiles_reduce_kernel(const float* __restrict__ part, const T* __restrict__ bias,
                                        T* __restrict__ y, int64_t total, int64_t N, int splits) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int g = 0; g < splits; ++g) s += part[g * total + i];
    if (bias != nullptr) s += to_f(bias[i % N]);
    y[i] = from_f<T>(s);
  }
}

int nt_for_tokens(int64_t tokens) { return tokens <= 8 ? 1 : tokens <= 16 ? 2 : tokens <= 32 ? 4 : 8; }

int slice_tiles(int nt) {
  switch (nt) {
    case 1: return Cfg<1>::kSliceTiles;
    case 2: return Cfg<2>::kSliceTiles;
    case 4: return Cfg<4>::kSliceTiles;
    default: return Cfg<8>::kSliceTiles;
  }
}

// Resident blocks per SM of the kernel for NT n-tiles (registers and shared memory), and the SM count.
template <int NT>
int64_t blocks_per_sm() {
  int per_sm = 0;
  auto kernel = csr_tiles_kernel<__nv_bfloat16, NT>;
  SE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Cfg<NT>::kSmem)));
  SE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, Cfg<NT>::kSmem));
  return per_sm < 1 ? 1 : per_sm;
}

int64_t blocks_per_sm(int nt) {
  switch (nt) {
    case 1: return blocks_per_sm<1>();
    case 2: return blocks_per_sm<2>();
    case 4: return blocks_per_sm<4>();
    default: return blocks_per_sm<8>();
  }
}

int sm_count() {
  int device = 0, sms = 0;
  SE_CUDA_CHECK(cudaGetDevice(&device));
  SE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename T, int NT>
void launch(const uint4* ent4, const int64_t* ptr, const T* x, const T* bias, T* y, float* part, int64_t N,
            int64_t K, int64_t tokens, int64_t splits, cudaStream_t stream) {
  using C = Cfg<NT>;
  auto kernel = csr_tiles_kernel<T, NT>;
  static bool attr_set[64] = {};
  int device = 0;
  SE_CUDA_CHECK(cudaGetDevice(&device));
  if (!attr_set[device & 63]) {
    SE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(C::kSmem)));
    attr_set[device & 63] = true;
  }
  const int64_t nbands = se::ceil_div(N, kBand), nt = se::ceil_div(K, kTileK);
  // whole slices per block; grid.y <= splits, so the caller's partial-sum buffer is large enough
  const int64_t tiles_per_block = se::ceil_div(se::ceil_div(nt, C::kSliceTiles), splits) * C::kSliceTiles;
  dim3 grid(static_cast<unsigned>(se::ceil_div(nbands, kWarps)), static_cast<unsigned>(se::ceil_div(nt, tiles_per_block)),
            static_cast<unsigned>(se::ceil_div(tokens, C::kTok)));
  kernel<<<grid, kThreads, C::kSmem, stream>>>(ent4, ptr, x, bias, y, part, N, K, tokens, nbands, nt, tiles_per_block);
  SE_CHECK_LAUNCH();
  if (grid.y > 1) {
    const int64_t total = tokens * N;
    const int64_t blocks = se::ceil_div(total, 256) < 4096 ? se::ceil_div(total, 256) : 4096;
    csr_tiles_reduce_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, bias, y, total, N,
                                                                                    static_cast<int>(grid.y));
    SE_CHECK_LAUNCH();
  }
}

template <typename T>
void launch_nt(int nt, const uint4* ent4, const int64_t* ptr, const T* x, const T* bias, T* y, float* part,
               int64_t N, int64_t K, int64_t tokens, int64_t splits, cudaStream_t stream) {
  switch (nt) {
    case 1: launch<T, 1>(ent4, ptr, x, bias, y, part, N, K, tokens, splits, stream); break;
    case 2: launch<T, 2>(ent4, ptr, x, bias, y, part, N, K, tokens, splits, stream); break;
    case 4: launch<T, 4>(ent4, ptr, x, bias, y, part, N, K, tokens, splits, stream); break;
    default: launch<T, 8>(ent4, ptr, x, bias, y, part, N, K, tokens, splits, stream); break;
  }
}

}  // namespace

// How many blocks split K (grid.y) for this problem: enough blocks to fill every SM once (8 bands a block),
// in whole slices of x. The caller allocates splits x tokens x N fp32 partial sums when this is > 1.
int64_t csr_tiles_splits(int64_t N, int64_t K, int64_t tokens) {
  SE_REQUIRE(N > 0 && K > 0 && tokens > 0, "N, K and tokens must be positive");
  const int ntiles = nt_for_tokens(tokens);
  const int64_t per_sm = blocks_per_sm(ntiles);
  const int64_t groups = se::ceil_div(se::ceil_div(N, kBand), kWarps) * se::ceil_div(tokens, 8 * ntiles);
  const int64_t st = slice_tiles(ntiles);
  const int64_t slices = se::ceil_div(se::ceil_div(K, kTileK), st);
  int64_t want = se::ceil_div(per_sm * sm_count(), groups);
  if (want > slices) want = slices;
  if (want < 1) want = 1;
  const int64_t per_block = se::ceil_div(slices, want);  // slices per block, then the splits that takes
  return se::ceil_div(slices, per_block);
}

// y [tokens, N] = x [tokens, K] @ W^T (+ bias [N]) for a tile-layout weight (ent uint32 [E], ptr int64
// [ceil(N/16) * ceil(K/128) + 1]); x, y in dtype (fp16/bf16), K a multiple of 8, x 16-byte aligned;
// part: fp32 [splits, tokens, N] when splits > 1 (from csr_tiles_splits), else 0.
void csr_tiles_spmm(uintptr_t ent, uintptr_t ptr, uintptr_t x, uintptr_t bias, uintptr_t y, uintptr_t part,
                    int64_t N, int64_t K, int64_t tokens, int dtype, int64_t splits, uintptr_t stream) {
  if (N <= 0 || tokens <= 0) return;
  SE_REQUIRE(K > 0 && K % 8 == 0, "K must be a positive multiple of 8");
  SE_REQUIRE(ent % 16 == 0 && x % 16 == 0, "ent and x must be 16-byte aligned");
  SE_REQUIRE(splits >= 1 && (splits == 1 || part != 0), "splits > 1 needs the partial-sum buffer");
  const int ntiles = nt_for_tokens(tokens);
  auto e4 = reinterpret_cast<const uint4*>(ent);
  auto p = reinterpret_cast<const int64_t*>(ptr);
  auto ws = reinterpret_cast<float*>(part);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == kF16) {
    launch_nt<__half>(ntiles, e4, p, reinterpret_cast<const __half*>(x), reinterpret_cast<const __half*>(bias),
                      reinterpret_cast<__half*>(y), ws, N, K, tokens, splits, s);
  } else if (dtype == kBF16) {
    launch_nt<__nv_bfloat16>(ntiles, e4, p, reinterpret_cast<const __nv_bfloat16*>(x),
                             reinterpret_cast<const __nv_bfloat16*>(bias), reinterpret_cast<__nv_bfloat16*>(y), ws,
                             N, K, tokens, splits, s);
  } else {
    throw std::invalid_argument("csr_tiles_spmm: dtype must be float16 or bfloat16");
  }
}
