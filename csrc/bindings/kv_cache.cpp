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
        AppendKVArgs a = make_append_kv_args(to_view(k, "k"), to_view(v, "v"), to_view(k_cache, "k_cache"),
                                             to_view(v_cache, "v_cache"), to_view(slot_mapping, "slot_mapping"));
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
        CopyPagesArgs a = make_copy_pages_args(to_view(src, "src"), to_view(dst, "dst"),
                                               to_view(src_pages, "src_pages"), to_view(dst_pages, "dst_pages"));
        nb::gil_scoped_release release;
        if (a.src_device.is_cuda() || a.dst_device.is_cuda()) copy_pages_cuda(a, stream);
        else copy_pages_cpu(a);
      },
      nb::arg("src"), nb::arg("dst").noconvert(), nb::arg("src_pages"), nb::arg("dst_pages"),
      nb::arg("stream") = 0);
}

}  // namespace kvcore::bindings
