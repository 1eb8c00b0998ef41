// Python bindings of the mask kernels (csrc/masks.cu); see sparsity_engine/ops/masks/cuda.py.
#include <cstdint>

#include "registry.h"

int64_t masks_nm_mask_max_m();
void masks_nm_mask(uintptr_t scores, uintptr_t out, int64_t numel, int64_t n, int64_t m, int dtype,
                   uintptr_t stream);

SE_BINDINGS(masks) {
  m.def("masks_nm_mask", &masks_nm_mask,
        "N:M keep-mask: out[numel] bytes = 1 for the n largest of every m consecutive scores (ties to the lower "
        "index); args: scores ptr, out ptr, numel, n, m, dtype code (kF32/kF16/kBF16), stream");
  m.def("masks_nm_mask_max_m", &masks_nm_mask_max_m, "largest group size m masks_nm_mask accepts");
}
