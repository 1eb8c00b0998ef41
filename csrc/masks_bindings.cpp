// Python bindings of the mask kernels (csrc/masks.cu, csrc/masks_della.cu, csrc/masks_select.cu); see
// sparsity_engine/ops/masks/cuda.py.
#include <cstdint>
#include <vector>

#include <pybind11/stl.h>

#include "registry.h"

int64_t masks_nm_mask_max_m();
void masks_nm_mask(uintptr_t scores, uintptr_t out, int64_t numel, int64_t n, int64_t m, int dtype,
                   uintptr_t stream);
int64_t masks_della_max_cols(int dtype);
void masks_della_probs(uintptr_t x, uintptr_t probs, int64_t rows, int64_t n, double lo, double span, int dtype,
                       uintptr_t stream);
void masks_della_deltas(const std::vector<uintptr_t>& inputs, const std::vector<uintptr_t>& outs, uintptr_t base,
                        int64_t rows, int64_t n, const std::vector<double>& lo, const std::vector<double>& span,
                        const std::vector<int64_t>& seeds, int active, int norm, uintptr_t parts, int np,
                        uintptr_t bad, int dtype, uintptr_t stream);
void masks_select_edges(const std::vector<uintptr_t>& inputs, uintptr_t base, int64_t n,
                        const std::vector<int>& row_input, const std::vector<int64_t>& row_rank,
                        const std::vector<int>& row_later_first, const std::vector<int>& row_slot, int mode,
                        int dtype, uintptr_t state, uintptr_t hist, uintptr_t chunk_counts, int64_t chunk,
                        uintptr_t out_k, uintptr_t out_j, int k_shift, uintptr_t stream);
void masks_select_write(uintptr_t x, uintptr_t out, int64_t n, int mode, int values, int dtype, uintptr_t edge_k,
                        uintptr_t edge_j, uintptr_t bad_flag, uintptr_t stream);

SE_BINDINGS(masks) {
  m.def("masks_nm_mask", &masks_nm_mask,
        "N:M keep-mask: out[numel] bytes = 1 for the n largest of every m consecutive scores (ties to the lower "
        "index); args: scores ptr, out ptr, numel, n, m, dtype code (kF32/kF16/kBF16), stream");
  m.def("masks_della_probs", &masks_della_probs,
        "DELLA keep-probabilities of fp32/fp16/bf16 rows (16-bit: a per-row magnitude histogram; fp32: a block "
        "radix sort): probs[rows, n] fp32 = "
        "clamp(lo + span * mean_rank / (n - 1), 0, 1); args: x ptr, probs ptr, rows, n, lo, span, dtype code, "
        "stream");
  m.def("masks_della_deltas", &masks_della_deltas,
        "Fused DELLA task vectors of a merge: out_i = (t_i - base) where u(seed_i, flat index) < p (DELLA's "
        "rank-based probability in each row), unmasked for models whose bit in active is clear; per-row norm "
        "terms before / after the mask into parts [rows, 2, np] (norm 1 l1, 2 l2, 3 linf, 0 none); bad set to 1 "
        "on NaN/Inf deltas. args: input ptrs, out ptrs, base ptr, rows, n, lo, span, seeds, active bits, norm, "
        "parts ptr, np, bad ptr, dtype code (kF16/kBF16), stream");
  m.def("masks_della_max_cols", &masks_della_max_cols, "longest row masks_della_probs accepts for a dtype code");
  m.def("masks_nm_mask_max_m", &masks_nm_mask_max_m, "largest group size m masks_nm_mask accepts");
  m.def("masks_select_edges", &masks_select_edges,
        "Radix select of band edges over whole tensors: per row, the key K of the entry at 1-based position p "
        "(row_rank) of the descending key order and the flat index J that splits its ties; writes K >> k_shift "
        "and J to out_k / out_j (int32) at the row's slot. args: input ptrs, base ptr (0: none), n, row_input, "
        "row_rank, row_later_first, row_slot, mode (0 magnitude, 1 order), dtype code, state ptr (int64 "
        "[rows, 4], scratch), hist ptr (uint32 [rows, 256], scratch: zeroed here), chunk_counts ptr (uint32 "
        "[rows, nchunks, 256]), chunk, out_k ptr, out_j ptr, k_shift, stream");
  m.def("masks_select_write", &masks_select_write,
        "Write one edge's mask (int8) or masked values: keep = key > K or (key == K and index < J); args: x ptr, "
        "out ptr, n, mode, values (0/1), dtype code, K ptr (int32), J ptr (int32), bad flag ptr (int32, set to 1 "
        "if x holds NaN/Inf; 0: no check), stream");
}
