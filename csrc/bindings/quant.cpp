// INT4 ops: hadamard_transform, append_kv_int4, dequantize_kv_int4, and INT4 attention.
#include <nanobind/stl/optional.h>

#include <optional>

#include "bindings.h"
#include "kvcore/attention.h"
#include "kvcore/quant.h"
#include "ndarray.h"

namespace kvcore::bindings {
void register_quant(nb::module_& m) {
  m.def(
      "hadamard_transform",
      [](const InArray& x, const OutArray& out, int64_t block_size, const std::optional<InArray>& signs, bool inverse,
         StreamHandle stream) {
        HadamardArgs a = make_hadamard_args(to_view(x, "x"), to_view(out, "out"), block_size,
                                            optional_view(signs, "signs"), inverse);
        nb::gil_scoped_release release;
        if (a.device.is_cuda()) hadamard_transform_cuda(a, stream);
        else hadamard_transform_cpu(a);
      },
      nb::arg("x"), nb::arg("out").noconvert(), nb::arg("block_size"), nb::arg("signs").none(), nb::arg("inverse"),
      nb::arg("stream"));

  m.def(
      "append_kv_int4",
      [](const InArray& k, const InArray& v, const OutArray& k_codes, const OutArray& k_params, const OutArray& v_codes,
         const OutArray& v_params, const InArray& slot_mapping, int64_t block_size, const std::optional<InArray>& signs,
         StreamHandle stream) {
        AppendKVInt4Args a = make_append_kv_int4_args(
            to_view(k, "k"), to_view(v, "v"), to_view(k_codes, "k_codes"), to_view(k_params, "k_params"),
            to_view(v_codes, "v_codes"), to_view(v_params, "v_params"), to_view(slot_mapping, "slot_mapping"),
            block_size, optional_view(signs, "signs"));
        nb::gil_scoped_release release;
        if (a.device.is_cuda()) append_kv_int4_cuda(a, stream);
        else append_kv_int4_cpu(a);
      },
      nb::arg("k"), nb::arg("v"), nb::arg("k_codes").noconvert(), nb::arg("k_params").noconvert(),
      nb::arg("v_codes").noconvert(), nb::arg("v_params").noconvert(), nb::arg("slot_mapping"),
      nb::arg("block_size"), nb::arg("signs").none(), nb::arg("stream"));

  m.def(
      "dequantize_kv_int4",
      [](const InArray& codes, const InArray& params, const OutArray& out, int64_t block_size,
         const std::optional<InArray>& signs, StreamHandle stream) {
        DequantizeInt4Args a = make_dequantize_int4_args(to_view(codes, "codes"), to_view(params, "params"),
                                                         to_view(out, "out"), block_size, optional_view(signs, "signs"));
        nb::gil_scoped_release release;
        if (a.device.is_cuda()) dequantize_kv_int4_cuda(a, stream);
        else dequantize_kv_int4_cpu(a);
      },
      nb::arg("codes"), nb::arg("params"), nb::arg("out").noconvert(), nb::arg("block_size"), nb::arg("signs").none(),
      nb::arg("stream"));

  m.def(
      "attention_int4",
      [](const InArray& q, const InArray& k_codes, const InArray& k_params, const InArray& v_codes,
         const InArray& v_params, const std::optional<InArray>& block_table, const InArray& seq_lens,
         const std::optional<InArray>& cu_seqlens_q, const OutArray& out, const std::optional<OutArray>& lse,
         int64_t block_size, const std::optional<InArray>& signs, float scale, float soft_cap, int64_t window,
         bool causal, StreamHandle stream) {
        AttentionOptions o;
        o.scale = scale;
        o.soft_cap = soft_cap;
        o.window = window;
        o.causal = causal;
        AttentionArgs a = make_attention_int4_args(
            to_view(q, "q"), to_view(k_codes, "k_codes"), to_view(k_params, "k_params"), to_view(v_codes, "v_codes"),
            to_view(v_params, "v_params"), optional_view(block_table, "block_table"), to_view(seq_lens, "seq_lens"),
            optional_view(cu_seqlens_q, "cu_seqlens_q"), to_view(out, "out"), optional_view(lse, "lse"), o,
            !cu_seqlens_q.has_value(), block_size, optional_view(signs, "signs"));
        nb::gil_scoped_release release;
        if (a.device.is_cuda()) attention_cuda(a, stream);
        else attention_cpu(a);
      },
      nb::arg("q"), nb::arg("k_codes"), nb::arg("k_params"), nb::arg("v_codes"), nb::arg("v_params"),
      nb::arg("block_table").none(), nb::arg("seq_lens"), nb::arg("cu_seqlens_q").none(), nb::arg("out").noconvert(),
      nb::arg("lse").noconvert().none(), nb::arg("block_size"), nb::arg("signs").none(), nb::arg("scale"),
      nb::arg("soft_cap"), nb::arg("window"), nb::arg("causal"), nb::arg("stream"));

  m.def(
      "shared_prefix_attention_int4",
      [](const InArray& q, const InArray& k_codes, const InArray& k_params, const InArray& v_codes,
         const InArray& v_params, const InArray& prefix_block_table, const InArray& prefix_lens,
         const InArray& group_indptr, const InArray& block_table, const InArray& seq_lens,
         const std::optional<InArray>& cu_seqlens_q, const OutArray& out, const std::optional<OutArray>& lse,
         int64_t block_size, const std::optional<InArray>& signs, float scale, float soft_cap, int64_t window,
         bool causal, StreamHandle stream) {
        AttentionOptions o;
        o.scale = scale;
        o.soft_cap = soft_cap;
        o.window = window;
        o.causal = causal;
        AttentionArgs suffix = make_attention_int4_args(
            to_view(q, "q"), to_view(k_codes, "k_codes"), to_view(k_params, "k_params"), to_view(v_codes, "v_codes"),
            to_view(v_params, "v_params"), to_view(block_table, "block_table"), to_view(seq_lens, "seq_lens"),
            optional_view(cu_seqlens_q, "cu_seqlens_q"), to_view(out, "out"), optional_view(lse, "lse"), o,
            !cu_seqlens_q.has_value(), block_size, optional_view(signs, "signs"));
        SharedPrefixArgs a = make_shared_prefix_args(suffix, to_view(prefix_block_table, "prefix_block_table"),
                                                     to_view(prefix_lens, "prefix_lens"),
                                                     to_view(group_indptr, "group_indptr"));
        nb::gil_scoped_release release;
        if (suffix.device.is_cuda()) shared_prefix_attention_cuda(a, stream);
        else shared_prefix_attention_cpu(a);
      },
      nb::arg("q"), nb::arg("k_codes"), nb::arg("k_params"), nb::arg("v_codes"), nb::arg("v_params"),
      nb::arg("prefix_block_table"), nb::arg("prefix_lens"), nb::arg("group_indptr"), nb::arg("block_table"),
      nb::arg("seq_lens"), nb::arg("cu_seqlens_q").none(), nb::arg("out").noconvert(),
      nb::arg("lse").noconvert().none(), nb::arg("block_size"), nb::arg("signs").none(), nb::arg("scale"),
      nb::arg("soft_cap"), nb::arg("window"), nb::arg("causal"), nb::arg("stream"));
}

}  // namespace kvcore::bindings
