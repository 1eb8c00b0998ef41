// Python bindings of the radix select (csrc/select.cu); see sparsity_engine/ops/masks/cuda.py select_edges.
#include <cstdint>
#include <vector>

#include <pybind11/stl.h>

#include "registry.h"

void select_edges(const std::vector<uintptr_t>& inputs, uintptr_t base, int64_t n, const std::vector<int>& row_input,
                  const std::vector<int64_t>& row_rank, const std::vector<int>& row_later_first,
                  const std::vector<int>& row_slot, int mode, int dtype,
                  uintptr_t state, uintptr_t hist, uintptr_t chunk_counts, int64_t chunk, uintptr_t out_k,
                  uintptr_t out_j, int k_shift, uintptr_t stream);
void select_write(uintptr_t x, uintptr_t out, int64_t n, int mode, int values, int dtype, uintptr_t edge_k,
                  uintptr_t edge_j, uintptr_t bad_flag, uintptr_t stream);

SE_BINDINGS(select) {
  m.def("select_edges", &select_edges,
        "Radix select of band edges over whole tensors: per row, the key K of the entry at 1-based position p "
        "(row_rank) of the descending key order and the flat index J that splits its ties; writes K >> k_shift "
        "and J to out_k / out_j (int32) at the row's slot. args: input ptrs, base ptr (0: none), n, row_input, "
        "row_rank, row_later_first, row_slot, mode (0 magnitude, 1 order), dtype code, state ptr (int64 "
        "[rows, 4], scratch), hist ptr (uint32 [rows, 256], scratch: zeroed here), chunk_counts ptr (uint32 [rows, nchunks, 256]), "
        "chunk, out_k ptr, out_j ptr, k_shift, stream");
  m.def("select_write", &select_write,
        "Write one edge's mask (int8) or masked values: keep = key > K or (key == K and index < J); args: x ptr, "
        "out ptr, n, mode, values (0/1), dtype code, K ptr (int32), J ptr (int32), bad flag ptr (int32, set to 1 if x holds "
        "NaN/Inf; 0: no check), stream");
}
