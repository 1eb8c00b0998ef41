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
//
// Latency is what limits such a kernel (a first version that requested one tile ahead ran at 20-30% of the
// bytes floor, the same time at 80% and 90% sparsity): a band's entries over the block's K range are one
// contiguous stream, so each warp streams it through a ring of kRing chunks of 512 entries in shared memory
// with cp.async, kRing - 1 chunks ahead of the tile it scatters, independent of tile boundaries.
//
// A block is 8 warps = 8 consecutive bands over one range of K; the tokens' activations are staged in shared
// memory one slice of K (256 or 128 columns) at a time, double buffered through registers (the next slice
// is loaded while the current one is used). When the K range is split over several blocks (grid.y > 1,
// chosen so the launch fills the GPU), each writes fp32 partial sums and a second kernel adds them in split
// order (deterministic), adds the bias and converts to T.
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
constexpr int kChunkWords = 512;      // entries per ring chunk: 16 bytes x 4 per lane
constexpr int kTileWords = kTileK * kBand;  // locations per tile (11 bits)

// Tokens per pass = 8 * NT (NT MMA n-tiles). Sized so that two blocks fit per SM (~100 KB each).
template <int NT>
struct Cfg {
  static constexpr int kTok = 8 * NT;
  static constexpr int kSliceTiles = NT <= 2 ? 2 : 1;
  static constexpr int kSliceK = kSliceTiles * kTileK;
  static constexpr int kXStride = kSliceK + 8;  // elements; 16 bytes off a multiple of 128: conflict-free
  static constexpr int kXVec = kTok * kSliceK / 8 / kThreads;  // 16-byte pieces of a slice per thread
  static constexpr int kRing = NT >= 8 ? 2 : 3;
  static constexpr size_t kSmemX = 2ull * kTok * kXStride * 2;
  static constexpr size_t kSmemW = static_cast<size_t>(kWarps) * kBand * kTileStride * 2;
  static constexpr size_t kSmemRing = static_cast<size_t>(kWarps) * kRing * kChunkWords * 4;
  static constexpr size_t kSmem = kSmemX + kSmemW + kSmemRing;
  static_assert(kXVec * 8 * kThreads == kTok * kSliceK, "a slice splits evenly over the threads");
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

// x[tok0 .. tok0 + kTok, col0 .. col0 + kSliceK) into registers (16-byte pieces); rows past `tokens` and
// columns past K are zero (K is a multiple of 8, so a piece is wholly inside or outside).
template <typename T, int NT>
__device__ __forceinline__ void load_slice(uint4 (&xr)[Cfg<NT>::kXVec], const T* __restrict__ x, int64_t K,
                                           int64_t tokens, int64_t tok0, int64_t col0) {
  constexpr int kRowPieces = Cfg<NT>::kSliceK / 8;
#pragma unroll
  for (int v = 0; v < Cfg<NT>::kXVec; ++v) {
    const int i = threadIdx.x + v * kThreads;
    const int row = i / kRowPieces;
    const int64_t col = col0 + (i % kRowPieces) * 8;
    xr[v] = make_uint4(0, 0, 0, 0);
    if (tok0 + row < tokens && col < K) xr[v] = __ldg(reinterpret_cast<const uint4*>(x + (tok0 + row) * K + col));
  }
}

template <int NT>
__device__ __forceinline__ void store_slice(uint16_t* xs, const uint4 (&xr)[Cfg<NT>::kXVec]) {
  constexpr int kRowPieces = Cfg<NT>::kSliceK / 8;
#pragma unroll
  for (int v = 0; v < Cfg<NT>::kXVec; ++v) {
    const int i = threadIdx.x + v * kThreads;
    *reinterpret_cast<uint4*>(xs + (i / kRowPieces) * Cfg<NT>::kXStride + (i % kRowPieces) * 8) = xr[v];
  }
}

__device__ __forceinline__ void scatter_word(uint16_t* wt, uint32_t w) {
  const uint32_t loc = w & (kTileWords - 1);
  wt[(loc / kTileK) * kTileStride + (loc % kTileK)] = static_cast<uint16_t>(w >> 16);
}

// One warp's entry stream [e0, e1) through a ring of R chunks of kChunkWords entries in shared memory.
// Chunk c (stream entries e0 + c * kChunkWords ...) lives in slot c % R; it is requested R - 1 chunks ahead
// of the one being read (one cp.async group per chunk and lane, so wait_group counts chunks).
template <int R>
struct EntryRing {
  uint32_t* ring;  // this warp's R * kChunkWords words
  const uint32_t* __restrict__ ent;
  int64_t e0, e1;
  int nchunks, issued, ready;

  __device__ __forceinline__ void init(uint32_t* r, const uint32_t* e, int64_t begin, int64_t end, int lane) {
    ring = r;
    ent = e;
    e0 = begin;
    e1 = end;
    nchunks = static_cast<int>((end - begin + kChunkWords - 1) / kChunkWords);
    issued = ready = 0;
    while (issued < R && issued < nchunks) issue(lane);
  }
  __device__ __forceinline__ void issue(int lane) {
    const int64_t base = e0 + static_cast<int64_t>(issued) * kChunkWords;
    uint32_t* slot = ring + (issued % R) * kChunkWords;
#pragma unroll
    for (int j = 0; j < kChunkWords / 128; ++j) {
      const int off = (j * 32 + lane) * 4;
      if (base + off < e1) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(slot + off)), "l"(ent + base + off));
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
    ++issued;
  }
  // Chunk c has landed for every lane of the warp.
  __device__ __forceinline__ void wait_for(int c) {
    if (ready > c) return;
    const int pending = issued - c - 1;  // groups allowed to stay in flight
    if (pending >= 2) asm volatile("cp.async.wait_group 2;\n" ::);
    else if (pending == 1) asm volatile("cp.async.wait_group 1;\n" ::);
    else asm volatile("cp.async.wait_group 0;\n" ::);
    ready = c + 1;
    __syncwarp();
  }
  // Scatter stream entries [p, p1) (one tile) into wt; frees and refills every chunk it finishes.
  __device__ __forceinline__ void scatter(uint16_t* wt, int64_t p, int64_t p1, int lane) {
    while (p < p1) {
      const int c = static_cast<int>((p - e0) / kChunkWords);
      wait_for(c);
      const int64_t cbase = e0 + static_cast<int64_t>(c) * kChunkWords;
      const int64_t cend = p1 < cbase + kChunkWords ? p1 : cbase + kChunkWords;
      const uint32_t* slot = ring + (c % R) * kChunkWords;
#pragma unroll
      for (int j = 0; j < kChunkWords / 128; ++j) {
        const int64_t q = p + (j * 32 + lane) * 4;
        if (q < cend) {
          const uint4 w = *reinterpret_cast<const uint4*>(slot + (q - cbase));
          scatter_word(wt, w.x);
          scatter_word(wt, w.y);
          scatter_word(wt, w.z);
          scatter_word(wt, w.w);
        }
      }
      p = cend;
      if (p == cbase + kChunkWords && c + R < nchunks) {
        __syncwarp();  // every lane is done reading the slot before it is refilled
        issue(lane);
      }
    }
  }
};

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
__global__ void __launch_bounds__(kThreads, 2)
csr_tiles_kernel(const uint32_t* __restrict__ ent, const int64_t* __restrict__ ptr, const T* __restrict__ x,
                 const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ part, int64_t N, int64_t K,
                 int64_t tokens, int64_t nbands, int64_t nt, int64_t tiles_per_block) {
  using C = Cfg<NT>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* xs = reinterpret_cast<uint16_t*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint16_t* wt = reinterpret_cast<uint16_t*>(smem_raw + C::kSmemX) + warp * kBand * kTileStride;
  uint32_t* ring = reinterpret_cast<uint32_t*>(smem_raw + C::kSmemX + C::kSmemW) + warp * C::kRing * kChunkWords;

  const int64_t band = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool active = band < nbands;
  const int64_t tb = static_cast<int64_t>(blockIdx.y) * tiles_per_block;
  const int64_t te = tb + tiles_per_block < nt ? tb + tiles_per_block : nt;
  const int64_t tok0 = static_cast<int64_t>(blockIdx.z) * C::kTok;
  const int nslices = static_cast<int>((te - tb + C::kSliceTiles - 1) / C::kSliceTiles);

  PtrWindow win{ptr};
  win.last = nbands * nt;
  EntryRing<C::kRing> stream;
  int64_t p0 = 0;
  if (active) {
    win.load(band * nt + tb, lane);
    p0 = win.at(band * nt + tb, lane);
    const int64_t pe = __ldg(ptr + band * nt + te);
    stream.init(ring, ent, p0, pe, lane);
  }
  uint4 xr[C::kXVec];
  load_slice<T, NT>(xr, x, K, tokens, tok0, tb * kTileK);
  store_slice<NT>(xs, xr);
  if (nslices > 1) load_slice<T, NT>(xr, x, K, tokens, tok0, (tb + C::kSliceTiles) * kTileK);
  __syncthreads();

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;

  for (int s = 0; s < nslices; ++s) {
    const T* xcur = reinterpret_cast<const T*>(xs + (s & 1) * C::kTok * C::kXStride);
    if (active) {
      for (int sp = 0; sp < C::kSliceTiles; ++sp) {
        const int64_t t = tb + static_cast<int64_t>(s) * C::kSliceTiles + sp;
        if (t >= te) break;
        const int64_t p1 = win.at(band * nt + t + 1, lane);
        if (p1 > p0) {
          __syncwarp();  // the previous tile's ldmatrix reads are done before it is overwritten
          zero_tile(wt, lane);
          __syncwarp();
          stream.scatter(wt, p0, p1, lane);
          __syncwarp();
          mma_tile<T, NT>(acc, wt, xcur, sp * kTileK, lane);
        }
        p0 = p1;
      }
    }
    if (s + 1 < nslices) {
      store_slice<NT>(xs + ((s + 1) & 1) * C::kTok * C::kXStride, xr);  // its buffer was freed by the last barrier
      if (s + 2 < nslices)
        load_slice<T, NT>(xr, x, K, tokens, tok0, (tb + static_cast<int64_t>(s + 2) * C::kSliceTiles) * kTileK);
    }
    __syncthreads();
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
void launch(const uint32_t* ent4, const int64_t* ptr, const T* x, const T* bias, T* y, float* part, int64_t N,
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
void launch_nt(int nt, const uint32_t* ent4, const int64_t* ptr, const T* x, const T* bias, T* y, float* part,
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
  auto e4 = reinterpret_cast<const uint32_t*>(ent);
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
