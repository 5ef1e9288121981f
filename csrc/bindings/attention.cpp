// Attention ops: ndarray -> view, checks, device dispatch. Optional arrays arrive as None.
#include <nanobind/stl/optional.h>

#include <optional>

#include "bindings.h"
#include "kvcore/attention.h"
#include "ndarray.h"

namespace kvcore::bindings {

void register_attention(nb::module_& m) {
  m.def(
      "attention",
      [](const InArray& q, const InArray& k_cache, const InArray& v_cache, const std::optional<InArray>& block_table,
         const InArray& seq_lens, const std::optional<InArray>& cu_seqlens_q, const OutArray& out,
         const std::optional<OutArray>& lse, float scale, float soft_cap, int64_t window, bool causal,
         StreamHandle stream) {
        const bool decode = !cu_seqlens_q.has_value();
        const TensorView q_v = to_view(q, "q");
        const TensorView k_cache_v = to_view(k_cache, "k_cache");
        const TensorView v_cache_v = to_view(v_cache, "v_cache");
        const TensorView block_table_v = optional_view(block_table, "block_table");
        const TensorView seq_lens_v = to_view(seq_lens, "seq_lens");
        const TensorView cu_seqlens_q_v = optional_view(cu_seqlens_q, "cu_seqlens_q");
        const TensorView out_v = to_view(out, "out");
        const TensorView lse_v = optional_view(lse, "lse");
        AttentionArgs a = make_attention_args(q_v, k_cache_v, v_cache_v, block_table_v, seq_lens_v, cu_seqlens_q_v,
                                              out_v, lse_v, AttentionOptions{scale, soft_cap, window, causal}, decode);
        nb::gil_scoped_release release;
        if (a.device.is_cuda()) attention_cuda(a, stream);
        else attention_cpu(a);
      },
      nb::arg("q"), nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("block_table").none(), nb::arg("seq_lens"),
      nb::arg("cu_seqlens_q").none(), nb::arg("out").noconvert(), nb::arg("lse").noconvert().none(),
      nb::arg("scale"), nb::arg("soft_cap"), nb::arg("window"), nb::arg("causal"), nb::arg("stream"),
      "Paged decode (cu_seqlens_q=None) or prefill/extend attention; see kvcore.paged_decode / paged_prefill.");

  m.def(
      "shared_prefix_attention",
      [](const InArray& q, const InArray& k_cache, const InArray& v_cache, const InArray& prefix_block_table,
         const InArray& prefix_lens, const InArray& group_indptr, const InArray& block_table, const InArray& seq_lens,
         const std::optional<InArray>& cu_seqlens_q, const OutArray& out, const std::optional<OutArray>& lse,
         float scale, float soft_cap, int64_t window, bool causal, StreamHandle stream) {
        const bool decode = !cu_seqlens_q.has_value();
        const TensorView q_v = to_view(q, "q");
        const TensorView k_cache_v = to_view(k_cache, "k_cache");
        const TensorView v_cache_v = to_view(v_cache, "v_cache");
        const TensorView block_table_v = to_view(block_table, "block_table");
        const TensorView seq_lens_v = to_view(seq_lens, "seq_lens");
        const TensorView cu_seqlens_q_v = optional_view(cu_seqlens_q, "cu_seqlens_q");
        const TensorView out_v = to_view(out, "out");
        const TensorView lse_v = optional_view(lse, "lse");
        AttentionArgs suffix = make_attention_args(q_v, k_cache_v, v_cache_v, block_table_v, seq_lens_v,
                                                   cu_seqlens_q_v, out_v, lse_v, AttentionOptions{scale, soft_cap, window, causal},
                                                   decode);
        const TensorView prefix_block_table_v = to_view(prefix_block_table, "prefix_block_table");
        const TensorView prefix_lens_v = to_view(prefix_lens, "prefix_lens");
        const TensorView group_indptr_v = to_view(group_indptr, "group_indptr");
        SharedPrefixArgs a = make_shared_prefix_args(suffix, prefix_block_table_v, prefix_lens_v, group_indptr_v);
        nb::gil_scoped_release release;
        if (suffix.device.is_cuda()) shared_prefix_attention_cuda(a, stream);
        else shared_prefix_attention_cpu(a);
      },
      nb::arg("q"), nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("prefix_block_table"), nb::arg("prefix_lens"),
      nb::arg("group_indptr"), nb::arg("block_table"), nb::arg("seq_lens"), nb::arg("cu_seqlens_q").none(),
      nb::arg("out").noconvert(), nb::arg("lse").noconvert().none(), nb::arg("scale"), nb::arg("soft_cap"),
      nb::arg("window"), nb::arg("causal"), nb::arg("stream"));

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
        MergeStatesArgs a = make_merge_states_args(o_a_v, lse_a_v, o_b_v, lse_b_v, out_v, lse_out_v);
        nb::gil_scoped_release release;
        if (a.device.is_cuda()) merge_states_cuda(a, stream);
        else merge_states_cpu(a);
      },
      nb::arg("o_a"), nb::arg("lse_a"), nb::arg("o_b"), nb::arg("lse_b"), nb::arg("out").noconvert(),
      nb::arg("lse_out").noconvert().none(), nb::arg("stream"));
}

}  // namespace kvcore::bindings
