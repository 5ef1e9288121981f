// INT4 ops: hadamard_transform, append_kv_int4, dequantize_kv_int4 (INT4 attention: attention.cpp).
#include <nanobind/stl/optional.h>

#include <optional>

#include "bindings.h"
#include "kvcore/quant.h"
#include "ndarray.h"

namespace kvcore::bindings {
void register_quant(nb::module_& m) {
  m.def(
      "hadamard_transform",
      [](const InArray& x, const OutArray& out, int64_t block_size, const std::optional<InArray>& signs, bool inverse,
         StreamHandle stream) {
        const TensorView x_v = to_view(x, "x");
        const TensorView out_v = as_rows(to_view(out, "out"));
        const TensorView signs_v = optional_view(signs, "signs");
        HadamardArgs a = make_hadamard_args(x_v, out_v, block_size, signs_v, inverse);
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
        const TensorView k_v = to_view(k, "k");
        const TensorView v_v = to_view(v, "v");
        const TensorView k_codes_v = to_view(k_codes, "k_codes");
        const TensorView k_params_v = to_view(k_params, "k_params");
        const TensorView v_codes_v = to_view(v_codes, "v_codes");
        const TensorView v_params_v = to_view(v_params, "v_params");
        const TensorView slot_mapping_v = to_view(slot_mapping, "slot_mapping");
        const TensorView signs_v = optional_view(signs, "signs");
        AppendKVInt4Args a = make_append_kv_int4_args(k_v, v_v, k_codes_v, k_params_v, v_codes_v, v_params_v,
                                                      slot_mapping_v, block_size, signs_v);
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
        const TensorView codes_v = to_view(codes, "codes");
        const TensorView params_v = to_view(params, "params");
        const TensorView out_v = as_rows(to_view(out, "out"));
        const TensorView signs_v = optional_view(signs, "signs");
        DequantizeInt4Args a = make_dequantize_int4_args(codes_v, params_v, out_v, block_size, signs_v);
        nb::gil_scoped_release release;
        if (a.device.is_cuda()) dequantize_kv_int4_cuda(a, stream);
        else dequantize_kv_int4_cpu(a);
      },
      nb::arg("codes"), nb::arg("params"), nb::arg("out").noconvert(), nb::arg("block_size"), nb::arg("signs").none(),
      nb::arg("stream"));
}

}  // namespace kvcore::bindings
