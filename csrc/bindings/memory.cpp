// PagePool, VirtualTensor and Transfer: thin glue; the Python classes in kvcore.memory wrap these.
#include <nanobind/stl/function.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "kvcore/error.h"
#include "kvcore/memory.h"
#include "ndarray.h"

namespace kvcore::bindings {
namespace {

// A Python callable kept by C++; released with the GIL held whatever thread drops it.
struct PyCallable {
  nb::object fn;
  explicit PyCallable(nb::object f) : fn(std::move(f)) {}
  ~PyCallable() {
    nb::gil_scoped_acquire gil;
    fn.reset();
  }
};

nb::dlpack::dtype dlpack_dtype(DType d) {
  switch (d) {
    case DType::Float32: return nb::dtype<float>();
    case DType::Float16: return {uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
    case DType::BFloat16: return {uint8_t(nb::dlpack::dtype_code::Bfloat), 16, 1};
    case DType::Int32: return nb::dtype<int32_t>();
    case DType::Int64: return nb::dtype<int64_t>();
    case DType::UInt8: return nb::dtype<uint8_t>();
  }
  return nb::dtype<uint8_t>();
}

std::string device_str(Device d) { return d.str(); }

// A zero-copy view of `shape` elements of `dtype` starting `offset` bytes into the tensor's range.
nb::ndarray<nb::array_api> make_view(const VirtualTensor& t, int64_t offset, const std::vector<int64_t>& shape, DType dtype) {
  KVCORE_CHECK_VALUE(!shape.empty() && shape.size() <= size_t(kMaxDims), "view: shape must have 1 to ", kMaxDims,
                     " dimensions");
  const int64_t reserved = t.num_pages() * t.page_bytes();
  const int64_t itemsize = int64_t(dtype_size(dtype));
  int64_t n = 1;
  for (int64_t d : shape) {
    KVCORE_CHECK_VALUE(d >= 0, "view: negative dimension ", d);
    KVCORE_CHECK_INDEX(d == 0 || n <= reserved / itemsize / d, "view: shape is larger than the tensor's ", reserved,
                       " reserved bytes");
    n *= d;
  }
  // Written so huge offsets cannot overflow.
  KVCORE_CHECK_INDEX(offset >= 0 && offset <= reserved && n * itemsize <= reserved - offset, "view: ", n * itemsize,
                     " bytes at offset ", offset, " are outside the tensor's ", reserved, " reserved bytes");
  KVCORE_CHECK_VALUE(offset % itemsize == 0, "view: offset ", offset, " is not aligned to ", dtype_name(dtype));
  std::shared_ptr<void> token = t.retain_view();
  auto* holder = new std::shared_ptr<void>(std::move(token));
  nb::capsule owner(holder, [](void* p) noexcept { delete static_cast<std::shared_ptr<void>*>(p); });
  std::vector<size_t> dims(shape.begin(), shape.end());
  const Device dev = t.device();
  return nb::ndarray<nb::array_api>(static_cast<char*>(t.data()) + offset, dims.size(), dims.data(), owner, nullptr,
                       dlpack_dtype(dtype), dev.is_cuda() ? nb::device::cuda::value : nb::device::cpu::value,
                       dev.index);
}

}  // namespace

void register_memory(nb::module_& m) {
  nb::class_<Transfer>(m, "Transfer")
      .def("done", &Transfer::done, nb::call_guard<nb::gil_scoped_release>())
      .def("wait", &Transfer::wait, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("bytes", &Transfer::bytes);

  nb::class_<PagePool>(m, "PagePool")
      .def("__init__",
           [](PagePool* self, const std::string& device, int64_t capacity_bytes, int64_t host_capacity_bytes,
              int64_t page_bytes) {
             const Device d = parse_device(device);
             nb::gil_scoped_release release;
             new (self) PagePool(d, capacity_bytes, host_capacity_bytes, page_bytes);
           },
           nb::arg("device"), nb::arg("capacity_bytes"), nb::arg("host_capacity_bytes") = 0,
           nb::arg("page_bytes") = 0)
      .def_prop_ro("device", [](const PagePool& p) { return device_str(p.device()); })
      .def_prop_ro("page_bytes", &PagePool::page_bytes)
      .def_prop_ro("granularity", &PagePool::granularity)
      .def_prop_ro("capacity_pages", &PagePool::capacity_pages)
      .def_prop_ro("free_pages", &PagePool::free_pages)
      .def_prop_ro("host_capacity_pages", &PagePool::host_capacity_pages)
      .def_prop_ro("host_free_pages", &PagePool::host_free_pages)
      .def("resize", &PagePool::resize, nb::arg("capacity_pages"), nb::call_guard<nb::gil_scoped_release>())
      .def("on_reclaim",
           [](PagePool& p, nb::callable fn) {
             auto cb = std::make_shared<PyCallable>(std::move(fn));
             return p.on_reclaim([cb](int64_t pages) -> int64_t {
               nb::gil_scoped_acquire gil;
               nb::object r = cb->fn(pages);
               return r.is_none() ? 0 : nb::cast<int64_t>(r);
             });
           },
           nb::arg("fn"))
      .def("remove_reclaim", &PagePool::remove_reclaim, nb::arg("id"))
      .def("stats", [](const PagePool& p) {
        PoolStats s = p.stats();
        nb::dict d;
        d["page_bytes"] = s.page_bytes;
        d["granularity"] = s.granularity;
        d["pages_total"] = s.pages_total;
        d["pages_free"] = s.pages_free;
        d["pages_mapped"] = s.pages_mapped;
        d["pages_shared"] = s.pages_shared;
        d["pages_releasing"] = s.pages_releasing;
        d["pages_offloaded"] = s.pages_offloaded;
        d["host_pages_total"] = s.host_pages_total;
        d["host_pages_free"] = s.host_pages_free;
        d["tensors"] = s.tensors;
        d["reserved_bytes"] = s.reserved_bytes;
        d["zero_page_access"] = s.zero_page_access;
        nb::dict calls;
        for (const auto& [name, c] : s.driver_calls) {
          nb::dict e;
          e["count"] = c.count;
          e["mean_us"] = c.count ? c.total_us / double(c.count) : 0.0;
          calls[name.c_str()] = e;
        }
        d["driver_calls"] = calls;
        return d;
      });

  nb::class_<VirtualTensor>(m, "VirtualTensor")
      .def("__init__",
           [](VirtualTensor* self, const PagePool& pool, const std::vector<int64_t>& shape, const std::string& dtype) {
             const DType d = parse_dtype(dtype);
             nb::gil_scoped_release release;
             new (self) VirtualTensor(pool, shape, d);
           },
           nb::arg("pool"), nb::arg("shape"), nb::arg("dtype"))
      .def_prop_ro("shape", [](const VirtualTensor& t) { return t.shape(); })
      .def_prop_ro("dtype", [](const VirtualTensor& t) { return std::string(dtype_name(t.dtype())); })
      .def_prop_ro("device", [](const VirtualTensor& t) { return device_str(t.device()); })
      .def_prop_ro("data_ptr", [](const VirtualTensor& t) { return reinterpret_cast<uintptr_t>(t.data()); })
      .def_prop_ro("num_pages", &VirtualTensor::num_pages)
      .def_prop_ro("page_bytes", &VirtualTensor::page_bytes)
      .def_prop_ro("nbytes", &VirtualTensor::nbytes)
      .def("map", &VirtualTensor::map, nb::arg("first"), nb::arg("count"), nb::call_guard<nb::gil_scoped_release>())
      .def("unmap", &VirtualTensor::unmap, nb::arg("first"), nb::arg("count"), nb::arg("stream") = 0,
           nb::call_guard<nb::gil_scoped_release>())
      .def("ensure", &VirtualTensor::ensure, nb::arg("nbytes"), nb::call_guard<nb::gil_scoped_release>())
      .def("alias", &VirtualTensor::alias, nb::arg("page"), nb::arg("other"), nb::arg("other_page"),
           nb::call_guard<nb::gil_scoped_release>())
      .def("offload", &VirtualTensor::offload, nb::arg("first"), nb::arg("count"), nb::arg("stream") = 0,
           nb::call_guard<nb::gil_scoped_release>())
      .def("prefetch", &VirtualTensor::prefetch, nb::arg("first"), nb::arg("count"), nb::arg("stream") = 0,
           nb::call_guard<nb::gil_scoped_release>())
      .def("is_mapped", &VirtualTensor::is_mapped, nb::arg("page"))
      .def("is_offloaded", &VirtualTensor::is_offloaded, nb::arg("page"))
      .def("mapped_pages", &VirtualTensor::mapped_pages)
      .def("physical_page", &VirtualTensor::physical_page, nb::arg("page"))
      .def("free", &VirtualTensor::free, nb::arg("stream") = 0, nb::call_guard<nb::gil_scoped_release>())
      .def("use_stream", &VirtualTensor::use_stream, nb::arg("stream"))
      .def_prop_ro("is_freed", &VirtualTensor::is_freed)
      .def("view",
           [](const VirtualTensor& t, int64_t offset, const std::vector<int64_t>& shape, const std::string& dtype) {
             return make_view(t, offset, shape, parse_dtype(dtype));
           },
           nb::arg("offset"), nb::arg("shape"), nb::arg("dtype"),
           "A zero-copy DLPack-capable array over part of the tensor's fixed address range.");
}

}  // namespace kvcore::bindings
