// kvcore_simt._simt: control of the emulated device for the tests (which memory is device or
// pinned, the API call trace, injected driver failures, stream capture and replay) and the
// harness's self-test kernels.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>

#include "simt_api.h"

namespace nb = nanobind;

namespace simt::selftest {
// Runs self-test kernel `name` (selftest/kernels.cu); returns its output values.
std::vector<float> run(const std::string& name, std::vector<float> input);
std::vector<std::string> names();
}  // namespace simt::selftest

NB_MODULE(_simt, m) {
  m.doc() = "Control of the SIMT harness's emulated CUDA device (test infrastructure)";

  m.def(
      "register_memory",
      [](uintptr_t ptr, size_t bytes, const std::string& kind) {
        if (kind != "device" && kind != "pinned") throw nb::value_error("kind: expected 'device' or 'pinned'");
        simt::register_memory(reinterpret_cast<void*>(ptr), bytes,
                              kind == "device" ? simt::MemoryKind::Device : simt::MemoryKind::Pinned);
      },
      nb::arg("ptr"), nb::arg("bytes"), nb::arg("kind"),
      "Marks host memory [ptr, ptr + bytes) as device memory or pinned host memory of the emulated GPU.");
  m.def("unregister_memory", [](uintptr_t ptr) { simt::unregister_memory(reinterpret_cast<void*>(ptr)); },
        nb::arg("ptr"));
  m.def("add_red_zone", [](uintptr_t ptr, size_t bytes) { simt::add_red_zone(reinterpret_cast<void*>(ptr), bytes); },
        nb::arg("ptr"), nb::arg("bytes"), "Bytes no kernel may touch (reported as an out-of-bounds global access).");
  m.def("remove_red_zone", [](uintptr_t ptr) { simt::remove_red_zone(reinterpret_cast<void*>(ptr)); },
        nb::arg("ptr"));

  m.def(
      "device_view",
      [](nb::ndarray<nb::device::cpu> a, nb::handle owner) {
        std::vector<size_t> shape(a.ndim());
        std::vector<int64_t> strides(a.ndim());
        for (size_t i = 0; i < a.ndim(); ++i) {
          shape[i] = a.shape(i);
          strides[i] = a.stride(i);
        }
        return nb::ndarray<>(a.data(), a.ndim(), shape.data(), owner, strides.data(), a.dtype(), nb::device::cuda::value, 0);
      },
      nb::arg("array"), nb::arg("owner"),
      "The same memory as a DLPack array on cuda:0 (register it as device memory first); `owner` keeps it alive.");

  m.def("take_trace", [] {
    std::vector<std::tuple<std::string, uintptr_t, uintptr_t, uint64_t>> out;
    for (const auto& e : simt::take_trace()) out.emplace_back(e.call, e.a, e.b, e.size);
    return out;
  }, "The runtime/driver calls since the last call: (name, arg, arg, size).");
  m.def("take_kernel_errors", &simt::take_kernel_errors, "Errors the harness found in kernels since the last call.");
  m.def("set_sm_count", &simt::set_sm_count, nb::arg("count"));
  m.def("sm_count", &simt::sm_count);
  m.def("fail_next_call", &simt::fail_next_call, nb::arg("call"), nb::arg("result") = 2,
        "The next call of a driver entry point (e.g. 'cuMemMap') fails with CUresult `result`.");
  m.def("access_flags", [](uintptr_t p) { return simt::access_flags(reinterpret_cast<void*>(p)); }, nb::arg("ptr"));

  nb::class_<simt::Graph>(m, "Graph", "Work recorded from a captured stream")
      .def("replay", [](const simt::Graph& g) { simt::replay(g); })
      .def_prop_ro("nodes", [](const simt::Graph& g) { return g.nodes.size(); });
  m.def(
      "begin_capture",
      [](uintptr_t stream) {
        auto* g = new simt::Graph();
        simt::begin_capture(reinterpret_cast<cudaStream_t>(stream), g);
        return g;
      },
      nb::arg("stream"), nb::rv_policy::take_ownership,
      "Starts capturing `stream` (a handle from cuda_stream_create) into a new Graph.");
  m.def("end_capture", [](uintptr_t stream) { simt::end_capture(reinterpret_cast<cudaStream_t>(stream)); },
        nb::arg("stream"));

  m.def("selftest", &simt::selftest::run, nb::arg("name"), nb::arg("input"),
        "Runs one of the harness's self-test kernels on `input`; returns what it wrote.");
  m.def("selftest_names", &simt::selftest::names);
}
