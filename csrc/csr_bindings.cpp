// Python bindings of the CSR kernels (csrc/csr.cu); see sparsity_engine/ops/csr/cuda.py.
#include <cstdint>

#include "registry.h"

int64_t csr_group_size(int64_t K, int64_t tokens, int dtype);
void csr_spmm(uintptr_t sched, uintptr_t cols, uintptr_t vals,
              uintptr_t x, uintptr_t bias, uintptr_t y, int64_t N, int64_t K, int64_t tokens,
              int dtype, int index_dtype, int64_t group, uintptr_t stream);
int64_t csr_tiles_splits(int64_t N, int64_t K, int64_t tokens);
void csr_tiles_spmm(uintptr_t ent, uintptr_t ptr, uintptr_t x, uintptr_t bias, uintptr_t y, uintptr_t part,
                    int64_t N, int64_t K, int64_t tokens, int dtype, int64_t splits, uintptr_t stream);

SE_BINDINGS(csr) {
  m.def("csr_group_size", &csr_group_size,
        "largest token group (1/2/4/8/16) whose activations [K][group] fit in shared memory, 0 if none");
  m.def("csr_spmm", &csr_spmm,
        "y[tokens, N] = x[tokens, K] @ W^T (+ bias) for a padded-CSR weight; sched int64 [N, 2] = {start, len << 32 | row} in warp order");
  m.def("csr_tiles_splits", &csr_tiles_splits,
        "how many blocks split K in csr_tiles_spmm (partial sums fp32 [splits, tokens, N] needed when > 1)");
  m.def("csr_tiles_spmm", &csr_tiles_spmm,
        "y[tokens, N] = x @ W^T (+ bias) on tensor cores for a 16x128-tile-layout fp16/bf16 weight");
}
