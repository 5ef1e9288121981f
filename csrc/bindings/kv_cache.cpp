// append_kv and copy_pages: ndarray -> view, checks, device dispatch.
#include "bindings.h"
#include "kvcore/kv_cache.h"
#include "ndarray.h"

namespace kvcore::bindings {

void register_kv_cache(nb::module_& m) {
  m.def(
      "append_kv",
      [](const InArray& k, const InArray& v, const OutArray& k_cache, const OutArray& v_cache,
         const InArray& slot_mapping, StreamHandle stream) {
        const TensorView k_v = to_view(k, "k");
        const TensorView v_v = to_view(v, "v");
        const TensorView k_cache_v = to_view(k_cache, "k_cache");
        const TensorView v_cache_v = to_view(v_cache, "v_cache");
        const TensorView slot_mapping_v = to_view(slot_mapping, "slot_mapping");
        AppendKVArgs a = make_append_kv_args(k_v, v_v, k_cache_v, v_cache_v, slot_mapping_v);
        nb::gil_scoped_release release;
        if (a.device.is_cuda()) append_kv_cuda(a, stream);
        else append_kv_cpu(a);
      },
      nb::arg("k"), nb::arg("v"), nb::arg("k_cache").noconvert(), nb::arg("v_cache").noconvert(),
      nb::arg("slot_mapping"), nb::arg("stream") = 0);

  m.def(
      "copy_pages",
      [](const InArray& src, const OutArray& dst, const InArray& src_pages, const InArray& dst_pages,
         StreamHandle stream) {
        const TensorView src_v = to_view(src, "src");
        const TensorView dst_v = to_view(dst, "dst");
        const TensorView src_pages_v = to_view(src_pages, "src_pages");
        const TensorView dst_pages_v = to_view(dst_pages, "dst_pages");
        CopyPagesArgs a = make_copy_pages_args(src_v, dst_v, src_pages_v, dst_pages_v);
        nb::gil_scoped_release release;
        if (a.src_device.is_cuda() || a.dst_device.is_cuda()) copy_pages_cuda(a, stream);
        else copy_pages_cpu(a);
      },
      nb::arg("src"), nb::arg("dst").noconvert(), nb::arg("src_pages"), nb::arg("dst_pages"),
      nb::arg("stream") = 0);
}

}  // namespace kvcore::bindings
