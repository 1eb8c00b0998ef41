// Python bindings of the fused merge pass (csrc/merge.cu); see sparsity_engine/ops/merge/cuda.py.
#include <cstdint>
#include <vector>

#include <pybind11/stl.h>

#include "registry.h"

void merge_fused(const std::vector<uintptr_t>& inputs, uintptr_t base, uintptr_t out, int64_t n, int spars,
                 int consensus, int normalize, int has_lo, int later_first, int rescale, int apply_lambda, double lam,
                 uintptr_t weights, uintptr_t scale, uintptr_t edge_k, uintptr_t edge_j, uintptr_t flag, int dtype,
                 uintptr_t stream);

SE_BINDINGS(merge) {
  m.def("merge_fused", &merge_fused,
        "The fused pass of a generalized task-arithmetic merge: out = base + merged deltas of the inputs (see "
        "csrc/merge.cu). args: input ptrs (1-8), base ptr (0: none), out ptr, n, spars (0 none, 1 band, 3 "
        "pre-sparsified deltas), consensus (0 none, 1 sum, 2 count), normalize, has_lo, later_first, rescale, "
        "apply_lambda, lambda, weights ptr (fp32 [N]), scale ptr (fp32 [N]), K ptr, J ptr (int32 [2N] band edges), "
        "flag ptr (int32, set to 1 on NaN/Inf), dtype code, stream");
}
