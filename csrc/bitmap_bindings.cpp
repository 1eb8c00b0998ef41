// Python bindings of the bitmap kernels (csrc/bitmap.cu); see sparsity_engine/ops/bitmap/cuda.py.
#include <cstdint>

#include "registry.h"

int64_t bitmap_smem_bytes(int64_t tokens, int64_t max_group, int variant);
void bitmap_linear(uintptr_t masks, uintptr_t offsets, uintptr_t values, uintptr_t x, uintptr_t bias, uintptr_t y,
                   int64_t N, int64_t K, int64_t tokens, int64_t max_group, int dtype, int vec_x, int variant,
                   uintptr_t stream);
void bitmap_to_dense(uintptr_t masks, uintptr_t offsets, uintptr_t values, uintptr_t out, int64_t N, int64_t K,
                     int dtype, uintptr_t stream);

SE_BINDINGS(bitmap) {
  m.def("bitmap_smem_bytes", &bitmap_smem_bytes,
        "shared memory per block of bitmap_linear (tokens, max_group = values per group, variant)");
  m.def("bitmap_linear", &bitmap_linear,
        "y[tokens, N] = x[tokens, K] @ W^T (+ bias) for a bitmap-format fp16/bf16 weight, on tensor cores; variant 0/1/2 = cp.async ring / bulk copies 3 stages / bulk copies 2 stages");
  m.def("bitmap_to_dense", &bitmap_to_dense, "out[N, K] = the dense weight of a bitmap-format fp16/bf16 matrix");
}
