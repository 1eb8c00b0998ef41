// Bitmap sparse linear on tensor cores: y[t, r] = sum_k W[r, k] * x[t, k] (+ bias[r]) for fp16/bf16, any number
// of tokens (8, 16 or 32 per pass), fp32 accumulation; and the bitmap -> dense conversion.
//
// Weight layout (sparsity_engine/ops/bitmap/format.py): bands of 16 rows, tiles of 16 x 16 (one m16n8k16 A
// operand), groups of 8 tiles. masks[b][k][g] (uint32) holds the 32 elements lanes 4g..4g+3 hold in their A
// fragment of tile (b, k): byte t = lane 4g+t, bit j = fragment element j (register j/2, half j%2). The values
// are the nonzeros in the order of the set bits; offsets[b * ktiles + k] = index of tile (b, k)'s first value.
// Columns inside a pair of tiles are relabelled (k = 2t + e + 8q of step s -> column 8t + 4s + 2q + e) so that a
// lane's B fragments for the two tiles of a pair are 8 consecutive activations: one 16-byte load per token.
//
// The linear kernel. A block has 8 warps; each warp owns one band (16 output rows) and a contiguous range of
// its groups (the band's groups are split over `ksplit` warps of the block, 8 / ksplit bands per block). A warp
// streams its groups through a private 3-stage ring in shared memory with cp.async (masks 256 B + the 8 tile
// offsets 32 B + the group's values, as one contiguous 16-byte-aligned range of the values array), so its next
// two groups are in flight while it decodes the current one. Per tile a lane builds its A fragment in
// registers: its 8 mask bits select which of its 8 elements are nonzero, its values are consecutive in shared
// memory from (tile start + values of lower row-pairs of the tile + values of lower lanes of its row-pair),
// and each set bit takes the next one; absent elements are zero. Then one mma.sync per 8 tokens. No shared
// memory is zeroed or scattered into; what is read from shared memory is only the packed values.
// The position of a lane's values needs, per tile, the number of values of the lower row-pairs (groups g'
// < g): an exclusive scan over the 8 row-pairs of the popcounts of their words, done for the 8 tiles of a
// group at once on byte-packed counts (each <= 224, so bytes never carry) with 3 shuffles per 4 tiles.
// Partial sums of the warps that split a band are added in a fixed order through shared memory (deterministic),
// the bias added and the result converted to T: one launch, no atomics, no workspace.
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 3;
constexpr int kGroupTiles = 8;
constexpr int kMaskBytes = kGroupTiles * 8 * 4;      // 256: 8 tiles x 8 words
constexpr int kHeadBytes = kMaskBytes + kGroupTiles * 4;  // + the 8 tile offsets (int32)

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

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// A lane's A fragment of one tile: element j (register j/2, half j%2) is the next packed value if bit j of m is
// set, else 0. `p` points at the lane's first value in shared memory. Elements 4..7 start from their own
// pointer (p + the count of elements 0..3), so the two chains of dependent pointer increments are 4 long.
__device__ __forceinline__ void decode_fragment(const uint16_t* p, uint32_t m, uint32_t (&a)[4]) {
  uint32_t v[8];
  const uint16_t* q = p + __popc(m & 0xfu);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[j] = 0;
    if (m & (1u << j)) {
      v[j] = *p;
      ++p;
    }
    v[j + 4] = 0;
    if (m & (16u << j)) {
      v[j + 4] = *q;
      ++q;
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) a[r] = __byte_perm(v[2 * r], v[2 * r + 1], 0x5410);
}

// The 8 activations x[token, col .. col+8) as 4 words (B fragments of a pair of tiles), zeros past K or past
// the last token. VEC: K % 8 == 0 and x 16-byte aligned, so one 16-byte load.
template <typename T, bool VEC>
__device__ __forceinline__ uint4 load_x8(const T* __restrict__ x, int64_t K, int64_t tokens, int64_t token,
                                         int64_t col) {
  uint4 b = make_uint4(0u, 0u, 0u, 0u);
  if (token >= tokens) return b;
  const T* row = x + token * K;
  if constexpr (VEC) {
    if (col < K) b = __ldg(reinterpret_cast<const uint4*>(row + col));
  } else {
    uint16_t h[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) h[e] = col + e < K ? __ldg(reinterpret_cast<const uint16_t*>(row) + col + e) : 0;
    b.x = h[0] | (static_cast<uint32_t>(h[1]) << 16);
    b.y = h[2] | (static_cast<uint32_t>(h[3]) << 16);
    b.z = h[4] | (static_cast<uint32_t>(h[5]) << 16);
    b.w = h[6] | (static_cast<uint32_t>(h[7]) << 16);
  }
  return b;
}

// The value index of the first value of group i (i = 0 .. ngroups) of one band, 32 groups per window load:
// lane l holds group (base + l)'s start; a shuffle reads any of them.
struct GroupStarts {
  const int32_t* __restrict__ offsets;
  int64_t tile0;    // band * ktiles
  int64_t ngroups;
  int64_t base = -64;
  int mine = 0;
  __device__ __forceinline__ void load(int64_t b, int lane) {
    base = b;
    const int64_t i = b + lane;
    mine = i <= ngroups ? __ldg(offsets + tile0 + i * kGroupTiles) : 0;
  }
  // groups i and i + 1 (i increasing from call to call)
  __device__ __forceinline__ void range(int64_t i, int lane, int& start, int& end) {
    if (i < base || i + 1 > base + 31) load(i, lane);
    start = __shfl_sync(0xffffffffu, mine, static_cast<int>(i - base));
    end = __shfl_sync(0xffffffffu, mine, static_cast<int>(i + 1 - base));
  }
};

// Copy group `gi` of the warp's band into one stage: masks (256 B), tile offsets (32 B), values (16-byte chunks
// covering [start, end) elements). Always commits one cp.async group.
__device__ __forceinline__ void issue_group(unsigned char* buf, const unsigned char* __restrict__ gmasks,
                                            const unsigned char* __restrict__ goffs,
                                            const unsigned char* __restrict__ gvals, GroupStarts& starts,
                                            int64_t gi, int vbytes, int lane) {
  const int64_t tile = starts.tile0 + gi * kGroupTiles;
  if (lane < 16) {
    cp_async16(buf + lane * 16, gmasks + tile * 32 + lane * 16);
  } else if (lane < 18) {
    cp_async16(buf + kMaskBytes + (lane - 16) * 16, goffs + tile * 4 + (lane - 16) * 16);
  }
  int start, end;
  starts.range(gi, lane, start, end);
  // 16-byte chunks from the one holding element `start` to the one holding element `end - 1`
  const int64_t first = start & ~7;
  const int64_t span = ((static_cast<int64_t>(end) + 7) & ~static_cast<int64_t>(7)) * 2 - first * 2;
  const int nbytes = span < vbytes ? static_cast<int>(span) : vbytes;  // max_group bounds it already
  const unsigned char* src = gvals + first * 2;
  unsigned char* dst = buf + kHeadBytes;
  for (int o = lane * 16; o < nbytes; o += 32 * 16) cp_async16(dst + o, src + o);
  cp_async_commit();
}

// Decode one staged group (8 tiles of a band) and multiply it with the activations: acc += W_group x^T.
// buf: masks [8 tiles][8 words] (256 B), the 8 tile offsets (32 B), then the values from element
// (tile offset 0) & ~7 on.
template <typename T, int NT, bool VEC>
__device__ __forceinline__ void process_group(const unsigned char* buf, const T* __restrict__ x, int64_t K,
                                              int64_t tokens, int64_t tok0, int64_t gi, int lane,
                                              float (&acc)[NT][4]) {
  const int g = lane >> 2, t = lane & 3;
  const uint32_t lowmask = (1u << (8 * t)) - 1u;  // bytes of the lower lanes of this lane's word
  const uint32_t* sm = reinterpret_cast<const uint32_t*>(buf);
  const int4 oa = *reinterpret_cast<const int4*>(buf + kMaskBytes);
  const int4 ob = *reinterpret_cast<const int4*>(buf + kMaskBytes + 16);
  // the stage holds values from element (oa.x & ~7) on: value oa.x + idx is at sv[idx]
  const uint16_t* sv = reinterpret_cast<const uint16_t*>(buf + kHeadBytes) + (oa.x & 7);
  const int vbase = oa.x;
  const int tstart[8] = {0, oa.y - vbase, oa.z - vbase, oa.w - vbase, ob.x - vbase, ob.y - vbase,
                         ob.z - vbase, ob.w - vbase};
  uint32_t w[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) w[i] = sm[i * 8 + g];
  // exclusive scan over the row-pairs g of each tile's popcounts, byte-packed (row-pair 7 adds nothing)
  uint32_t pk[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t lo = __byte_perm(__popc(w[4 * h]), __popc(w[4 * h + 1]), 0x0040);
    const uint32_t hi = __byte_perm(__popc(w[4 * h + 2]), __popc(w[4 * h + 3]), 0x0040);
    pk[h] = g == 7 ? 0u : __byte_perm(lo, hi, 0x5410);
  }
  uint32_t sc[2] = {pk[0], pk[1]};
#pragma unroll
  for (int d = 4; d < 32; d <<= 1) {
    const uint32_t u0 = __shfl_up_sync(0xffffffffu, sc[0], d);
    const uint32_t u1 = __shfl_up_sync(0xffffffffu, sc[1], d);
    if (lane >= d) {
      sc[0] += u0;
      sc[1] += u1;
    }
  }
  sc[0] -= pk[0];
  sc[1] -= pk[1];
  const int64_t col0 = gi * (kGroupTiles * 16);
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    uint4 xb[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) xb[n] = load_x8<T, VEC>(x, K, tokens, tok0 + 8 * n + g, col0 + 32 * p + 8 * t);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int i = 2 * p + s;
      const uint32_t below = __byte_perm(sc[i >> 2], 0, 0x4440 | (i & 3));
      const uint32_t m = (w[i] >> (8 * t)) & 0xffu;
      const int idx = tstart[i] + static_cast<int>(below) + __popc(w[i] & lowmask);
      uint32_t a[4];
      decode_fragment(sv + idx, m, a);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (s == 0) Mma<T>::run(acc[n], a, xb[n].x, xb[n].y);
        else Mma<T>::run(acc[n], a, xb[n].z, xb[n].w);
      }
    }
  }
}

// The warps that split a band add their partial sums in a fixed order through shared memory (`red`, free by
// now), add the bias and write y. Every thread of the block calls it.
template <typename T, int NT>
__device__ __forceinline__ void reduce_and_store(unsigned char* smem_red, const float (&acc)[NT][4],
                                                 const T* __restrict__ bias, T* __restrict__ y, int64_t N,
                                                 int64_t tokens, int64_t tok0, int ksplit) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bands_per_block = kWarps / ksplit;
  float4* red = reinterpret_cast<float4*>(smem_red);
#pragma unroll
  for (int n = 0; n < NT; ++n) red[(warp * NT + n) * 32 + lane] = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
  __syncthreads();
  const int per_band = 8 * NT * 16;
  for (int o = threadIdx.x; o < bands_per_block * per_band; o += kThreads) {
    const int r = o & 15, tk = (o >> 4) % (8 * NT), bl = o / per_band;
    const int64_t row = (static_cast<int64_t>(blockIdx.x) * bands_per_block + bl) * 16 + r;
    const int64_t tok = tok0 + tk;
    if (row >= N || tok >= tokens) continue;
    // C fragment: lane 4*(r%8) + (tk%8)/2, component 2*(r/8) + tk%2 of n-tile tk/8
    const int ln = 4 * (r & 7) + ((tk & 7) >> 1), comp = 2 * (r >> 3) + (tk & 1), n = tk >> 3;
    float sum = 0.f;
    for (int wv = bl * ksplit; wv < (bl + 1) * ksplit; ++wv)
      sum += reinterpret_cast<const float*>(&red[(wv * NT + n) * 32 + ln])[comp];
    if (bias != nullptr) sum += to_f(bias[row]);
    y[tok * N + row] = from_f<T>(sum);
  }
}

// The warp's band and group range [ga, gb) (empty for a warp past the last band).
struct WarpWork {
  int64_t band, ga, gb;
};

__device__ __forceinline__ WarpWork warp_work(int64_t nbands, int64_t ktiles, int ksplit) {
  const int warp = threadIdx.x >> 5;
  const int bands_per_block = kWarps / ksplit;
  WarpWork ww;
  ww.band = static_cast<int64_t>(blockIdx.x) * bands_per_block + warp / ksplit;
  const int part = warp % ksplit;
  const int64_t ngroups = ktiles / kGroupTiles;
  ww.ga = ww.band < nbands ? part * ngroups / ksplit : 0;
  ww.gb = ww.band < nbands ? (part + 1) * ngroups / ksplit : 0;
  return ww;
}

// A warp's cp.async ring of kStages stages (`ring`, each `stage_bytes`) over its groups [ga, gb) of one band:
// ring_start asks for the first kStages - 1 groups; ring_wait(gi) waits for group gi, refills the stage group
// gi - 1 used (every lane is done with it: the __syncwarp) with group gi + kStages - 1 and advances `st` (the stage
// of group gi on entry). One cp.async group is committed per call either way, so the wait counts stay right.
__device__ __forceinline__ void ring_start(unsigned char* ring, int stage_bytes, GroupStarts& starts,
                                           const void* masks, const void* offsets, const void* values, int64_t ga,
                                           int64_t gb, int lane) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (ga + s < gb) {
      issue_group(ring + s * stage_bytes, static_cast<const unsigned char*>(masks),
                  static_cast<const unsigned char*>(offsets), static_cast<const unsigned char*>(values), starts,
                  ga + s, stage_bytes - kHeadBytes, lane);
    } else {
      cp_async_commit();
    }
  }
}

__device__ __forceinline__ void ring_wait(unsigned char* ring, int stage_bytes, GroupStarts& starts,
                                          const void* masks, const void* offsets, const void* values, int64_t gi,
                                          int64_t gb, int st, int lane) {
  cp_async_wait<kStages - 2>();
  __syncwarp();  // every lane's copies of group gi are visible; every lane is done with group gi - 1
  const int64_t next = gi + kStages - 1;
  const int nst = st == 0 ? kStages - 1 : st - 1;
  if (next < gb) {
    issue_group(ring + nst * stage_bytes, static_cast<const unsigned char*>(masks),
                static_cast<const unsigned char*>(offsets), static_cast<const unsigned char*>(values), starts, next,
                stage_bytes - kHeadBytes, lane);
  } else {
    cp_async_commit();
  }
}

// Variant 0: each warp streams its groups through a 3-stage ring with cp.async (16 bytes a lane at a time).
template <typename T, int NT, bool VEC>
__global__ void __launch_bounds__(kThreads, NT == 1 ? 3 : 2)  // <= 85 / 128 registers: 24 / 16 warps per SM
bitmap_linear_kernel(const uint32_t* __restrict__ masks, const int32_t* __restrict__ offsets,
                     const uint16_t* __restrict__ values, const T* __restrict__ x, const T* __restrict__ bias,
                     T* __restrict__ y, int64_t N, int64_t K, int64_t tokens, int64_t nbands, int64_t ktiles,
                     int ksplit, int stage_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const WarpWork ww = warp_work(nbands, ktiles, ksplit);
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * 8 * NT;

  float acc[NT][4] = {};

  if (ww.ga < ww.gb) {
    unsigned char* ring = smem + static_cast<size_t>(warp) * kStages * stage_bytes;
    GroupStarts starts{offsets, ww.band * ktiles, ktiles / kGroupTiles};
    ring_start(ring, stage_bytes, starts, masks, offsets, values, ww.ga, ww.gb, lane);
    int st = 0;  // stage of group gi
    for (int64_t gi = ww.ga; gi < ww.gb; ++gi) {
      ring_wait(ring, stage_bytes, starts, masks, offsets, values, gi, ww.gb, st, lane);
      process_group<T, NT, VEC>(ring + st * stage_bytes, x, K, tokens, tok0, gi, lane, acc);
      st = st == kStages - 1 ? 0 : st + 1;
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the rings are free: reuse them for the partial sums
  reduce_and_store<T, NT>(smem, acc, bias, y, N, tokens, tok0, ksplit);
}

// ---- variant 1 / 2: the bulk-copy engine (cp.async.bulk) fills each stage, completing on an mbarrier.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "BITMAP_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra BITMAP_DONE;\n"
      "bra BITMAP_WAIT;\n"
      "BITMAP_DONE:\n"
      "}\n" ::"r"(bar), "r"(parity) : "memory");
}

constexpr int kBarBytes = 256;  // kWarps x up to 4 stages x 8-byte mbarriers, in front of the rings

// Lane 0 asks the copy engine for group gi (masks, tile offsets, values) into `buf`; every lane takes part in
// reading the group's value range from the window of group starts.
__device__ __forceinline__ void bulk_issue(unsigned char* buf, uint32_t bar, const unsigned char* __restrict__ gmasks,
                                           const unsigned char* __restrict__ goffs,
                                           const unsigned char* __restrict__ gvals, GroupStarts& starts, int64_t gi,
                                           int vbytes, int lane) {
  int start, end;
  starts.range(gi, lane, start, end);
  if (lane == 0) {
    const int64_t tile = starts.tile0 + gi * kGroupTiles;
    const int64_t first = start & ~7;
    const int64_t span = ((static_cast<int64_t>(end) + 7) & ~static_cast<int64_t>(7)) * 2 - first * 2;
    const uint32_t nbytes = static_cast<uint32_t>(span < vbytes ? span : vbytes);
    mbar_expect_tx(bar, kHeadBytes + nbytes);
    const uint32_t dst = smem_addr(buf);
    bulk_g2s(dst, gmasks + tile * 32, kMaskBytes, bar);
    bulk_g2s(dst + kMaskBytes, goffs + tile * 4, kHeadBytes - kMaskBytes, bar);
    if (nbytes) bulk_g2s(dst + kHeadBytes, gvals + first * 2, nbytes, bar);
  }
}

template <typename T, int NT, bool VEC, int STAGES, int MINB>
__global__ void __launch_bounds__(kThreads, MINB)
bitmap_linear_bulk_kernel(const uint32_t* __restrict__ masks, const int32_t* __restrict__ offsets,
                          const uint16_t* __restrict__ values, const T* __restrict__ x, const T* __restrict__ bias,
                          T* __restrict__ y, int64_t N, int64_t K, int64_t tokens, int64_t nbands, int64_t ktiles,
                          int ksplit, int stage_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];  // bulk copies need 16-byte alignment
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const WarpWork ww = warp_work(nbands, ktiles, ksplit);
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * 8 * NT;
  const int vbytes = stage_bytes - kHeadBytes;
  unsigned char* ring = smem + kBarBytes + static_cast<size_t>(warp) * STAGES * stage_bytes;
  const uint32_t bar0 = smem_addr(smem) + warp * STAGES * 8;

  float acc[NT][4] = {};

  if (ww.ga < ww.gb) {
    if (lane == 0) {
#pragma unroll
      for (int s = 0; s < STAGES; ++s) mbar_init(bar0 + 8 * s, 1);
      mbar_fence_init();
    }
    __syncwarp();
    GroupStarts starts{offsets, ww.band * ktiles, ktiles / kGroupTiles};
    const auto* gm = reinterpret_cast<const unsigned char*>(masks);
    const auto* go = reinterpret_cast<const unsigned char*>(offsets);
    const auto* gv = reinterpret_cast<const unsigned char*>(values);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
      if (ww.ga + s < ww.gb) bulk_issue(ring + s * stage_bytes, bar0 + 8 * s, gm, go, gv, starts, ww.ga + s, vbytes, lane);
    int st = 0;
    uint32_t phases = 0;  // bit s: the parity of stage s's next completion
    for (int64_t gi = ww.ga; gi < ww.gb; ++gi) {
      __syncwarp();  // every lane is done with group gi - 1: its stage can be refilled
      const int64_t next = gi + STAGES - 1;
      const int nst = st == 0 ? STAGES - 1 : st - 1;
      if (next < ww.gb) bulk_issue(ring + nst * stage_bytes, bar0 + 8 * nst, gm, go, gv, starts, next, vbytes, lane);
      mbar_wait(bar0 + 8 * st, (phases >> st) & 1u);
      phases ^= 1u << st;
      process_group<T, NT, VEC>(ring + st * stage_bytes, x, K, tokens, tok0, gi, lane, acc);
      st = st == STAGES - 1 ? 0 : st + 1;
    }
  }
  __syncthreads();  // every stage was waited for: the rings are free for the partial sums
  reduce_and_store<T, NT>(smem + kBarBytes, acc, bias, y, N, tokens, tok0, ksplit);
}

// ---- variant 3: CUDA cores, work per nonzero (1..4 tokens a pass). Same warp work split and cp.async ring as
// variant 0, but no tensor cores: a lane owns two mask words of each group (row-pair g = lane % 8 of tiles
// lane / 8 and lane / 8 + 4) and walks their set bits, word by word (find the highest, clear it): per set bit one
// packed value (the previous one in shared memory: a lane's values of a word are consecutive, taken from the last
// one down), one activation per token and an fp32 multiply-add into row g (bit 1 of the bit index clear) or row
// g + 8 (set). The warp's activations for its group sit in shared memory as fp32 in bit order, 32 slots per tile:
// slot b holds the activation of bit b's column (b and b ^ 2 share one), so the address is base + 4b. Lane
// partials are added over the 4 tiles of a quad by shuffles and over the warps that split a band through shared
// memory in a fixed order.
constexpr int kGemvTokens = 4;                  // tokens per pass at most
constexpr int kGemvXFloats = kGroupTiles * 32;  // activation slots per token per warp (1 KB)

// Activations of group `gi` (128 columns) for tokens tok0 .. tok0 + TT: lane l takes columns col0 + 4l .. +3
// (zeros past K or past the last token).
template <typename T, int TT, bool VEC>
__device__ __forceinline__ void gemv_load_x(const T* __restrict__ x, int64_t K, int64_t tokens, int64_t tok0,
                                            int64_t gi, int lane, float (&xr)[TT][4]) {
  const int64_t col = gi * (kGroupTiles * 16) + 4 * lane;
#pragma unroll
  for (int n = 0; n < TT; ++n) {
    const int64_t tok = tok0 + n;
#pragma unroll
    for (int e = 0; e < 4; ++e) xr[n][e] = 0.f;
    if (tok >= tokens) continue;
    const T* row = x + tok * K;
    if constexpr (VEC) {  // K % 8 == 0: col < K means the 4 columns are inside
      if (col < K) {
        const uint2 u = __ldg(reinterpret_cast<const uint2*>(row + col));
        const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int e = 0; e < 4; ++e) xr[n][e] = to_f(h[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (col + e < K) xr[n][e] = to_f(row[col + e]);
    }
  }
}

// Lane l's 4 columns (c = 32P + 8t + 4s + 2q + e with P = l / 8, t = (l % 8) / 2, s = l % 2) are those of bits
// 8t + 4q + 2h + e of tile 2P + s: slots 8t .. 8t + 7 of that tile hold x0 x1 x0 x1 x2 x3 x2 x3.
template <int TT>
__device__ __forceinline__ void gemv_store_x(float* xs, int lane, const float (&xr)[TT][4]) {
  const int slot = (2 * (lane >> 3) + (lane & 1)) * 32 + 8 * ((lane & 7) >> 1);
#pragma unroll
  for (int n = 0; n < TT; ++n) {
    float4* d = reinterpret_cast<float4*>(xs + n * kGemvXFloats + slot);
    d[0] = make_float4(xr[n][0], xr[n][1], xr[n][0], xr[n][1]);
    d[1] = make_float4(xr[n][2], xr[n][3], xr[n][2], xr[n][3]);
  }
}

__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// One nonzero of bit b with value v: acc[n][bit 1 of b] += v * (token n's activation in slot b, at byte xa).
template <int TT>
__device__ __forceinline__ void gemv_fma(float (&acc)[TT][2], float v, uint32_t xa, uint32_t b) {
#pragma unroll
  for (int n = 0; n < TT; ++n) {
    const float xv = lds_f32(xa + n * kGemvXFloats * 4);
    if (b & 2u) acc[n][1] = fmaf(v, xv, acc[n][1]);
    else acc[n][0] = fmaf(v, xv, acc[n][0]);
  }
}

// acc[n][h] += row g + 8h of tiles lane / 8 and lane / 8 + 4 of the staged group times token n. (One loop over
// both words, switching word inside it, measured no better in instructions: the switch costs a branch per bit.)
// PAIRS (variant 4): a lane reads its values as aligned 32-bit pairs, one shared load per two values (every other
// bit reuses the pair already loaded), trading two ALU instructions per value for half the shared loads.
template <typename T, int TT, bool PAIRS>
__device__ __forceinline__ void gemv_group(const unsigned char* buf, const float* xs, int lane,
                                           float (&acc)[TT][2]) {
  const uint32_t* sm = reinterpret_cast<const uint32_t*>(buf);
  const int32_t* so = reinterpret_cast<const int32_t*>(buf + kMaskBytes);
  const int vbase = so[0];
  const uint16_t* sv = reinterpret_cast<const uint16_t*>(buf + kHeadBytes) + (vbase & 7);
  const int g = lane & 7, tl = lane >> 3;
#pragma unroll
  for (int qd = 0; qd < 2; ++qd) {
    const int i = 4 * qd + tl;
    const uint32_t w = sm[i * 8 + g];
    int inc = __popc(w);  // inclusive scan of the popcounts over the row-pairs of the tile (8 lanes)
#pragma unroll
    for (int d = 1; d < 8; d <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, inc, d);
      if (g >= d) inc += u;
    }
    const int last = (so[i] - vbase) + inc;         // one past the lane's last value, from sv
    const uint32_t xt = smem_addr(xs + i * 32);     // shared-space byte address of the tile's slots
    uint32_t m = w;
    if constexpr (PAIRS) {
      // byte address of the lane's value j in shared memory, from one past the last value down
      uint32_t a = smem_addr(sv + last);
      uint32_t pair = m ? lds_u32((a - 2u) & ~3u) : 0u;  // the pair holding the last value
      while (m) {
        const uint32_t b = 31u - static_cast<uint32_t>(__clz(m));
        m ^= 1u << b;
        a -= 2u;
        if (a & 2u) pair = lds_u32(a & ~3u);  // the high half: a new pair (the low one was loaded with it)
        float v;
        if constexpr (std::is_same<T, __nv_bfloat16>::value) {  // the half into the high bits: the fp32 value
          v = __uint_as_float(__byte_perm(pair, 0u, (a & 2u) ? 0x3244u : 0x1044u));
        } else {
          uint16_t raw = static_cast<uint16_t>(__byte_perm(pair, 0u, (a & 2u) ? 0x4432u : 0x4410u));
          v = to_f(*reinterpret_cast<const T*>(&raw));
        }
        gemv_fma<TT>(acc, v, xt + 4 * b, b);
      }
    } else {
      const uint16_t* p = sv + last;
      while (m) {
        const uint32_t b = 31u - static_cast<uint32_t>(__clz(m));
        m ^= 1u << b;
        uint16_t raw = *--p;
        const float v = to_f(*reinterpret_cast<const T*>(&raw));
        gemv_fma<TT>(acc, v, xt + 4 * b, b);
      }
    }
  }
}

template <typename T, int TT, bool VEC, bool PAIRS>
__global__ void __launch_bounds__(kThreads, 3)
bitmap_gemv_kernel(const uint32_t* __restrict__ masks, const int32_t* __restrict__ offsets,
                   const uint16_t* __restrict__ values, const T* __restrict__ x, const T* __restrict__ bias,
                   T* __restrict__ y, int64_t N, int64_t K, int64_t tokens, int64_t nbands, int64_t ktiles,
                   int ksplit, int stage_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const WarpWork ww = warp_work(nbands, ktiles, ksplit);
  const int64_t tok0 = static_cast<int64_t>(blockIdx.y) * TT;
  float* xs = reinterpret_cast<float*>(smem) + static_cast<size_t>(warp) * TT * kGemvXFloats;

  float acc[TT][2] = {};

  if (ww.ga < ww.gb) {
    unsigned char* ring = smem + static_cast<size_t>(kWarps) * TT * kGemvXFloats * 4 +
                          static_cast<size_t>(warp) * kStages * stage_bytes;
    GroupStarts starts{offsets, ww.band * ktiles, ktiles / kGroupTiles};
    ring_start(ring, stage_bytes, starts, masks, offsets, values, ww.ga, ww.gb, lane);
    float xr[TT][4];
    gemv_load_x<T, TT, VEC>(x, K, tokens, tok0, ww.ga, lane, xr);
    int st = 0;  // stage of group gi
    for (int64_t gi = ww.ga; gi < ww.gb; ++gi) {
      ring_wait(ring, stage_bytes, starts, masks, offsets, values, gi, ww.gb, st, lane);  // also: every lane is
      gemv_store_x<TT>(xs, lane, xr);                                                    // done with x of gi - 1
      __syncwarp();
      if (gi + 1 < ww.gb) gemv_load_x<T, TT, VEC>(x, K, tokens, tok0, gi + 1, lane, xr);
      gemv_group<T, TT, PAIRS>(ring + st * stage_bytes, xs, lane, acc);
      st = st == kStages - 1 ? 0 : st + 1;
    }
  }
  cp_async_wait<0>();
  // rows g and g + 8 of the band: add the 4 tiles' lanes (lane g, g + 8, g + 16, g + 24)
#pragma unroll
  for (int n = 0; n < TT; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      acc[n][h] += __shfl_xor_sync(0xffffffffu, acc[n][h], 8);
      acc[n][h] += __shfl_xor_sync(0xffffffffu, acc[n][h], 16);
    }
  __syncthreads();  // every warp is done with its ring and activations: reuse the front for the partial sums
  float* red = reinterpret_cast<float*>(smem);  // [warp][token][16 rows]
  if (lane < 8) {
#pragma unroll
    for (int n = 0; n < TT; ++n) {
      red[(warp * TT + n) * 16 + lane] = acc[n][0];
      red[(warp * TT + n) * 16 + lane + 8] = acc[n][1];
    }
  }
  __syncthreads();
  const int bands_per_block = kWarps / ksplit;
  for (int o = threadIdx.x; o < bands_per_block * TT * 16; o += kThreads) {
    const int r = o & 15, n = (o >> 4) % TT, bl = o / (TT * 16);
    const int64_t row = (static_cast<int64_t>(blockIdx.x) * bands_per_block + bl) * 16 + r;
    const int64_t tok = tok0 + n;
    if (row >= N || tok >= tokens) continue;
    float sum = 0.f;
    for (int wv = bl * ksplit; wv < (bl + 1) * ksplit; ++wv) sum += red[(wv * TT + n) * 16 + r];
    if (bias != nullptr) sum += to_f(bias[row]);
    y[tok * N + row] = from_f<T>(sum);
  }
}

// Dense W [N, K] from the bitmap: one warp per pair of tiles; lane (g, t) decodes its elements of both tiles
// and writes columns 8t .. 8t+7 of the pair in rows g and g+8 of the band.
template <typename T>
__global__ void __launch_bounds__(kThreads)
bitmap_to_dense_kernel(const uint32_t* __restrict__ masks, const int32_t* __restrict__ offsets,
                       const uint16_t* __restrict__ values, T* __restrict__ out, int64_t N, int64_t K,
                       int64_t nbands, int64_t ktiles) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t npairs = ktiles / 2;
  if (pair >= nbands * npairs) return;
  const int64_t band = pair / npairs, p = pair % npairs;
  uint16_t rows[2][8];  // [h][column 8t + c]
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int64_t tile = band * ktiles + 2 * p + s;
    const uint32_t w = __ldg(masks + tile * 8 + g);
    const uint32_t cnt = __popc(w);
    uint32_t inc = g == 7 ? 0u : cnt;  // inclusive scan of the row-pair counts (g < 7)
#pragma unroll
    for (int d = 4; d < 32; d <<= 1) {
      const uint32_t u = __shfl_up_sync(0xffffffffu, inc, d);
      if (lane >= d) inc += u;
    }
    const int64_t below = static_cast<int64_t>(inc) - (g == 7 ? 0 : cnt);
    const uint16_t* pv = values + __ldg(offsets + tile) + below + __popc(w & ((1u << (8 * t)) - 1u));
    const uint32_t m = (w >> (8 * t)) & 0xffu;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      uint16_t v = 0;
      if (m & (1u << j)) v = __ldg(pv++);
      // element j: row g + 8 * ((j >> 1) & 1), column 8t + 4s + 2 (j >> 2) + (j & 1)
      rows[(j >> 1) & 1][4 * s + 2 * (j >> 2) + (j & 1)] = v;
    }
  }
  const int64_t col = 32 * p + 8 * t;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = band * 16 + g + 8 * h;
    if (row >= N) continue;
    uint16_t* dst = reinterpret_cast<uint16_t*>(out) + row * K + col;
    if (K % 8 == 0 && col + 8 <= K && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
      uint4 v;
      v.x = rows[h][0] | (static_cast<uint32_t>(rows[h][1]) << 16);
      v.y = rows[h][2] | (static_cast<uint32_t>(rows[h][3]) << 16);
      v.z = rows[h][4] | (static_cast<uint32_t>(rows[h][5]) << 16);
      v.w = rows[h][6] | (static_cast<uint32_t>(rows[h][7]) << 16);
      *reinterpret_cast<uint4*>(dst) = v;
    } else {
#pragma unroll
      for (int c = 0; c < 8; ++c)
        if (col + c < K) dst[c] = rows[h][c];
    }
  }
}

struct Geometry {
  int64_t nbands, ktiles, ngroups;
};

Geometry geometry(int64_t N, int64_t K) {
  Geometry geo;
  geo.nbands = se::ceil_div(N, 16);
  geo.ngroups = se::ceil_div(K, kGroupTiles * 16);
  geo.ktiles = geo.ngroups * kGroupTiles;
  return geo;
}

// Warps per band: 8, halved while a warp would get fewer than 2 groups on average.
int ksplit_for(int64_t ngroups) {
  int ks = kWarps;
  while (ks > 1 && ngroups < 2 * ks) ks /= 2;
  return ks;
}

int nt_for_tokens(int64_t tokens) { return tokens <= 8 ? 1 : tokens <= 16 ? 2 : 4; }

int stage_bytes_for(int64_t max_group) {
  return kHeadBytes + static_cast<int>(se::ceil_div(2 * max_group + 32, 16) * 16);
}

int gemv_tokens_for(int64_t tokens) { return tokens <= 1 ? 1 : tokens <= 2 ? 2 : kGemvTokens; }

// Shared memory per block of variant v (0: cp.async ring of 3 stages; 1: bulk copies, 3 stages; 2: bulk
// copies, 2 stages; 3, 4: CUDA cores, the ring of 0 plus the activations) for `tokens` tokens.
int64_t smem_for(int variant, int64_t tokens, int64_t max_group) {
  const int stages = variant == 2 ? 2 : 3;
  int64_t smem = static_cast<int64_t>(kWarps) * stages * stage_bytes_for(max_group);
  if (variant >= 3) return smem + static_cast<int64_t>(kWarps) * gemv_tokens_for(tokens) * kGemvXFloats * 4;
  const int64_t red = static_cast<int64_t>(kWarps) * nt_for_tokens(tokens) * 32 * 16;
  if (smem < red) smem = red;
  return variant == 0 ? smem : smem + kBarBytes;
}

template <typename T, typename Kernel>
void launch_kernel(Kernel kernel, size_t smem, size_t* set_smem, dim3 grid, cudaStream_t stream,
                   const uint32_t* masks, const int32_t* offsets, const uint16_t* values, const T* x, const T* bias,
                   T* y, int64_t N, int64_t K, int64_t tokens, int64_t nbands, int64_t ktiles, int ksplit, int stage) {
  int device = 0;
  SE_CUDA_CHECK(cudaGetDevice(&device));
  const int slot = device & 63;
  if (smem > 48 * 1024 && set_smem[slot] < smem) {  // the attribute is per kernel and device: set it once
    SE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    set_smem[slot] = smem;
  }
  kernel<<<grid, kThreads, smem, stream>>>(masks, offsets, values, x, bias, y, N, K, tokens, nbands, ktiles, ksplit,
                                           stage);
  SE_CHECK_LAUNCH();
}

template <typename T, int NT, bool VEC>
void launch(int variant, const uint32_t* masks, const int32_t* offsets, const uint16_t* values, const T* x,
            const T* bias, T* y, int64_t N, int64_t K, int64_t tokens, int64_t max_group, cudaStream_t stream) {
  const Geometry geo = geometry(N, K);
  const int ksplit = ksplit_for(geo.ngroups);
  const int stage = stage_bytes_for(max_group);
  const size_t smem = static_cast<size_t>(smem_for(variant, tokens, max_group));
  const int bands_per_block = kWarps / ksplit;
  const dim3 grid(static_cast<unsigned>(se::ceil_div(geo.nbands, bands_per_block)),
                  static_cast<unsigned>(se::ceil_div(tokens, 8 * NT)));
  static size_t set0[64] = {}, set1[64] = {}, set2[64] = {};  // per device: the shared-memory limit set so far
  if (variant == 1) {
    launch_kernel(bitmap_linear_bulk_kernel<T, NT, VEC, 3, NT == 1 ? 3 : 2>, smem, set1, grid, stream, masks, offsets,
                  values, x, bias, y, N, K, tokens, geo.nbands, geo.ktiles, ksplit, stage);
  } else if (variant == 2) {
    launch_kernel(bitmap_linear_bulk_kernel<T, NT, VEC, 2, NT == 1 ? 4 : 2>, smem, set2, grid, stream, masks, offsets,
                  values, x, bias, y, N, K, tokens, geo.nbands, geo.ktiles, ksplit, stage);
  } else {
    launch_kernel(bitmap_linear_kernel<T, NT, VEC>, smem, set0, grid, stream, masks, offsets, values, x, bias, y, N, K,
                  tokens, geo.nbands, geo.ktiles, ksplit, stage);
  }
}

template <typename T, int TT, bool VEC>
void launch_gemv(bool pairs, const uint32_t* masks, const int32_t* offsets, const uint16_t* values, const T* x, const T* bias,
                 T* y, int64_t N, int64_t K, int64_t tokens, int64_t max_group, cudaStream_t stream) {
  const Geometry geo = geometry(N, K);
  const int ksplit = ksplit_for(geo.ngroups);
  const int stage = stage_bytes_for(max_group);
  const size_t smem = static_cast<size_t>(smem_for(3, tokens, max_group));
  const int bands_per_block = kWarps / ksplit;
  const dim3 grid(static_cast<unsigned>(se::ceil_div(geo.nbands, bands_per_block)),
                  static_cast<unsigned>(se::ceil_div(tokens, TT)));
  static size_t set3[64] = {}, set4[64] = {};
  if (pairs) {
    launch_kernel(bitmap_gemv_kernel<T, TT, VEC, true>, smem, set4, grid, stream, masks, offsets, values, x, bias, y,
                  N, K, tokens, geo.nbands, geo.ktiles, ksplit, stage);
  } else {
    launch_kernel(bitmap_gemv_kernel<T, TT, VEC, false>, smem, set3, grid, stream, masks, offsets, values, x, bias, y,
                  N, K, tokens, geo.nbands, geo.ktiles, ksplit, stage);
  }
}

template <typename T, bool VEC>
void launch_nt(int variant, int nt, const uint32_t* masks, const int32_t* offsets, const uint16_t* values,
               const T* x, const T* bias, T* y, int64_t N, int64_t K, int64_t tokens, int64_t max_group,
               cudaStream_t stream) {
  if (variant >= 3) {
    const bool pairs = variant == 4;
    switch (gemv_tokens_for(tokens)) {
      case 1: launch_gemv<T, 1, VEC>(pairs, masks, offsets, values, x, bias, y, N, K, tokens, max_group, stream); break;
      case 2: launch_gemv<T, 2, VEC>(pairs, masks, offsets, values, x, bias, y, N, K, tokens, max_group, stream); break;
      default:
        launch_gemv<T, kGemvTokens, VEC>(pairs, masks, offsets, values, x, bias, y, N, K, tokens, max_group, stream);
    }
    return;
  }
  switch (nt) {
    case 1: launch<T, 1, VEC>(variant, masks, offsets, values, x, bias, y, N, K, tokens, max_group, stream); break;
    case 2: launch<T, 2, VEC>(variant, masks, offsets, values, x, bias, y, N, K, tokens, max_group, stream); break;
    default: launch<T, 4, VEC>(variant, masks, offsets, values, x, bias, y, N, K, tokens, max_group, stream); break;
  }
}

template <typename T>
void launch_dtype(int variant, bool vec, int nt, const uint32_t* masks, const int32_t* offsets,
                  const uint16_t* values, uintptr_t x, uintptr_t bias, uintptr_t y, int64_t N, int64_t K,
                  int64_t tokens, int64_t max_group, cudaStream_t stream) {
  auto xp = reinterpret_cast<const T*>(x);
  auto bp = reinterpret_cast<const T*>(bias);
  auto yp = reinterpret_cast<T*>(y);
  if (vec) launch_nt<T, true>(variant, nt, masks, offsets, values, xp, bp, yp, N, K, tokens, max_group, stream);
  else launch_nt<T, false>(variant, nt, masks, offsets, values, xp, bp, yp, N, K, tokens, max_group, stream);
}

}  // namespace

// Shared memory bytes per block that bitmap_linear uses for this problem (for reports and tests).
int64_t bitmap_smem_bytes(int64_t tokens, int64_t max_group, int variant) {
  SE_REQUIRE(tokens > 0 && max_group >= 0, "tokens must be positive and max_group non-negative");
  SE_REQUIRE(variant >= 0 && variant <= 4, "variant must be 0 .. 4");
  return smem_for(variant, tokens, max_group);
}

// y [tokens, N] = x [tokens, K] @ W^T (+ bias [N]) for a bitmap weight (masks int32 [nbands, ktiles, 8], offsets
// int32 [nbands * ktiles + 1], values [>= ceil8(nnz)] all 16-byte aligned; the arrays validated by the caller);
// max_group: the most values in one group of 8 tiles (sizes the shared-memory stages); vec_x: K % 8 == 0 and x
// 16-byte aligned (16-byte activation loads); bias 0 for none; variant: how groups are staged (0: cp.async
// ring, 1: bulk copies with 3 stages, 2: bulk copies with 2 stages and more blocks per SM; 3: CUDA cores, work per
// nonzero, 4 tokens a pass; 4: 3 reading values in pairs).
void bitmap_linear(uintptr_t masks, uintptr_t offsets, uintptr_t values, uintptr_t x, uintptr_t bias, uintptr_t y,
                   int64_t N, int64_t K, int64_t tokens, int64_t max_group, int dtype, int vec_x, int variant,
                   uintptr_t stream) {
  if (N <= 0 || tokens <= 0) return;
  SE_REQUIRE(K > 0, "K must be positive");
  SE_REQUIRE(max_group >= 0 && max_group <= kGroupTiles * 256, "max_group must be in [0, 2048]");
  SE_REQUIRE(variant >= 0 && variant <= 4, "variant must be 0 .. 4");
  SE_REQUIRE(masks % 16 == 0 && offsets % 16 == 0 && values % 16 == 0, "masks, offsets and values must be 16-byte aligned");
  SE_REQUIRE(!vec_x || (x % 16 == 0 && K % 8 == 0), "vec_x needs x 16-byte aligned and K a multiple of 8");
  const int nt = nt_for_tokens(tokens);
  auto m = reinterpret_cast<const uint32_t*>(masks);
  auto o = reinterpret_cast<const int32_t*>(offsets);
  auto v = reinterpret_cast<const uint16_t*>(values);
  auto s = se::as_stream(stream);
  if (dtype == kF16) launch_dtype<__half>(variant, vec_x != 0, nt, m, o, v, x, bias, y, N, K, tokens, max_group, s);
  else if (dtype == kBF16) launch_dtype<__nv_bfloat16>(variant, vec_x != 0, nt, m, o, v, x, bias, y, N, K, tokens, max_group, s);
  else throw std::invalid_argument("bitmap_linear: dtype must be float16 or bfloat16");
}

// out [N, K] (dense, row-major, dtype) = the bitmap weight; every element written.
void bitmap_to_dense(uintptr_t masks, uintptr_t offsets, uintptr_t values, uintptr_t out, int64_t N, int64_t K,
                     int dtype, uintptr_t stream) {
  if (N <= 0 || K <= 0) return;
  const Geometry geo = geometry(N, K);
  const int64_t warps = geo.nbands * (geo.ktiles / 2);
  const dim3 grid(static_cast<unsigned>(se::ceil_div(warps, kWarps)));
  auto m = reinterpret_cast<const uint32_t*>(masks);
  auto o = reinterpret_cast<const int32_t*>(offsets);
  auto v = reinterpret_cast<const uint16_t*>(values);
  auto s = se::as_stream(stream);
  if (dtype == kF16) {
    bitmap_to_dense_kernel<__half><<<grid, kThreads, 0, s>>>(m, o, v, reinterpret_cast<__half*>(out), N, K,
                                                             geo.nbands, geo.ktiles);
  } else if (dtype == kBF16) {
    bitmap_to_dense_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(m, o, v, reinterpret_cast<__nv_bfloat16*>(out),
                                                                    N, K, geo.nbands, geo.ktiles);
  } else {
    throw std::invalid_argument("bitmap_to_dense: dtype must be float16 or bfloat16");
  }
  SE_CHECK_LAUNCH();
}
