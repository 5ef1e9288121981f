// Attention ops over 16-bit and INT4 pages: ndarray -> view, checks, device dispatch. Optional
// arrays arrive as None; the three prefix arrays, when given, make the call shared-prefix attention.
#include <nanobind/stl/optional.h>

#include <optional>

#include "bindings.h"
#include "kvcore/attention.h"
#include "kvcore/error.h"
#include "ndarray.h"

namespace kvcore::bindings {
namespace {

using OptIn = std::optional<InArray>;

// Runs `a` as plain paged attention, or as shared-prefix attention when the prefix arrays are given.
void run(const AttentionArgs& a, const OptIn& prefix_block_table, const OptIn& prefix_lens, const OptIn& group_indptr,
         StreamHandle stream) {
  if (prefix_block_table || prefix_lens || group_indptr) {
    KVCORE_CHECK_VALUE(prefix_block_table && prefix_lens && group_indptr,
                       "prefix_block_table, prefix_lens and group_indptr: give all three or none");
    const TensorView table_v = to_view(*prefix_block_table, "prefix_block_table");
    const TensorView lens_v = to_view(*prefix_lens, "prefix_lens");
    const TensorView indptr_v = to_view(*group_indptr, "group_indptr");
    const SharedPrefixArgs s = make_shared_prefix_args(a, table_v, lens_v, indptr_v);
    nb::gil_scoped_release release;
    if (a.device.is_cuda()) shared_prefix_attention_cuda(s, stream);
    else shared_prefix_attention_cpu(s);
    return;
  }
  nb::gil_scoped_release release;
  if (a.device.is_cuda()) attention_cuda(a, stream);
  else attention_cpu(a);
}

}  // namespace

void register_attention(nb::module_& m) {
  m.def(
      "attention",
      [](const InArray& q, const InArray& k_cache, const InArray& v_cache, const OptIn& block_table,
         const InArray& seq_lens, const OptIn& cu_seqlens_q, const OutArray& out, const std::optional<OutArray>& lse,
         float scale, float soft_cap, int64_t window, bool causal, StreamHandle stream, const OptIn& prefix_block_table,
         const OptIn& prefix_lens, const OptIn& group_indptr) {
        // Converted in argument order, so an error names the first bad argument.
        const TensorView q_v = to_view(q, "q");
        const TensorView k_cache_v = to_view(k_cache, "k_cache");
        const TensorView v_cache_v = to_view(v_cache, "v_cache");
        const TensorView block_table_v = optional_view(block_table, "block_table");
        const TensorView seq_lens_v = to_view(seq_lens, "seq_lens");
        const TensorView cu_seqlens_q_v = optional_view(cu_seqlens_q, "cu_seqlens_q");
        const TensorView out_v = to_view(out, "out");
        const TensorView lse_v = optional_view(lse, "lse");
        const AttentionArgs a = make_attention_args(q_v, k_cache_v, v_cache_v, block_table_v, seq_lens_v,
                                                    cu_seqlens_q_v, out_v, lse_v,
                                                    AttentionOptions{scale, soft_cap, window, causal},
                                                    !cu_seqlens_q.has_value());
        run(a, prefix_block_table, prefix_lens, group_indptr, stream);
      },
      nb::arg("q"), nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("block_table").none(), nb::arg("seq_lens"),
      nb::arg("cu_seqlens_q").none(), nb::arg("out").noconvert(), nb::arg("lse").noconvert().none(),
      nb::arg("scale"), nb::arg("soft_cap"), nb::arg("window"), nb::arg("causal"), nb::arg("stream"),
      nb::arg("prefix_block_table").none() = nb::none(), nb::arg("prefix_lens").none() = nb::none(),
      nb::arg("group_indptr").none() = nb::none(),
      "Paged decode (cu_seqlens_q=None) or prefill/extend attention, shared-prefix with the prefix arrays; "
      "see kvcore.paged_decode / paged_prefill / shared_prefix_*.");

  m.def(
      "attention_int4",
      [](const InArray& q, const InArray& k_codes, const InArray& k_params, const InArray& v_codes,
         const InArray& v_params, const OptIn& block_table, const InArray& seq_lens, const OptIn& cu_seqlens_q,
         const OutArray& out, const std::optional<OutArray>& lse, int64_t block_size, const OptIn& signs, float scale,
         float soft_cap, int64_t window, bool causal, StreamHandle stream, const OptIn& prefix_block_table,
         const OptIn& prefix_lens, const OptIn& group_indptr) {
        const TensorView q_v = to_view(q, "q");
        const TensorView k_codes_v = to_view(k_codes, "k_codes");
        const TensorView k_params_v = to_view(k_params, "k_params");
        const TensorView v_codes_v = to_view(v_codes, "v_codes");
        const TensorView v_params_v = to_view(v_params, "v_params");
        const TensorView block_table_v = optional_view(block_table, "block_table");
        const TensorView seq_lens_v = to_view(seq_lens, "seq_lens");
        const TensorView cu_seqlens_q_v = optional_view(cu_seqlens_q, "cu_seqlens_q");
        const TensorView out_v = to_view(out, "out");
        const TensorView lse_v = optional_view(lse, "lse");
        const TensorView signs_v = optional_view(signs, "signs");
        const AttentionArgs a = make_attention_int4_args(
            q_v, k_codes_v, k_params_v, v_codes_v, v_params_v, block_table_v, seq_lens_v, cu_seqlens_q_v, out_v, lse_v,
            AttentionOptions{scale, soft_cap, window, causal}, !cu_seqlens_q.has_value(), block_size, signs_v);
        run(a, prefix_block_table, prefix_lens, group_indptr, stream);
      },
      nb::arg("q"), nb::arg("k_codes"), nb::arg("k_params"), nb::arg("v_codes"), nb::arg("v_params"),
      nb::arg("block_table").none(), nb::arg("seq_lens"), nb::arg("cu_seqlens_q").none(), nb::arg("out").noconvert(),
      nb::arg("lse").noconvert().none(), nb::arg("block_size"), nb::arg("signs").none(), nb::arg("scale"),
      nb::arg("soft_cap"), nb::arg("window"), nb::arg("causal"), nb::arg("stream"),
      nb::arg("prefix_block_table").none() = nb::none(), nb::arg("prefix_lens").none() = nb::none(),
      nb::arg("group_indptr").none() = nb::none(),
      "attention over INT4 pages (codes + params, rotated basis); see kvcore.paged_decode_int4 and friends.");

  m.def(
      "merge_states",
      [](const InArray& o_a, const InArray& lse_a, const InArray& o_b, const InArray& lse_b, const OutArray& out,
         const std::optional<OutArray>& lse_out, StreamHandle stream) {
        const TensorView o_a_v = to_view(o_a, "o_a");
        const TensorView lse_a_v = to_view(lse_a, "lse_a");
        const TensorView o_b_v = to_view(o_b, "o_b");
        const TensorView lse_b_v = to_view(lse_b, "lse_b");
        const TensorView out_v = to_view(out, "out");
        const TensorView lse_out_v = optional_view(lse_out, "lse_out");
        const MergeStatesArgs a = make_merge_states_args(o_a_v, lse_a_v, o_b_v, lse_b_v, out_v, lse_out_v);
        nb::gil_scoped_release release;
        if (a.device.is_cuda()) merge_states_cuda(a, stream);
        else merge_states_cpu(a);
      },
      nb::arg("o_a"), nb::arg("lse_a"), nb::arg("o_b"), nb::arg("lse_b"), nb::arg("out").noconvert(),
      nb::arg("lse_out").noconvert().none(), nb::arg("stream"));
}

}  // namespace kvcore::bindings
