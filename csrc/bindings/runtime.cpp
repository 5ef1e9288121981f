// Build facts, CUDA availability, debug checks and CPU threads.
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include "bindings.h"
#include "kvcore/parallel.h"
#include "kvcore/runtime.h"
#include "kvcore/tensor.h"

namespace kvcore::bindings {

void register_runtime(nb::module_& m) {
  m.def("build_info", [] {
    BuildInfo b = build_info();
    nb::dict d;
    d["version"] = b.version;
    d["cuda_compiled"] = b.cuda_compiled;
    d["cuda_architectures"] = b.cuda_architectures;
    d["cuda_version"] = b.cuda_version;
    d["compiler"] = b.compiler;
    d["cuda_driver_minimum"] = b.cuda_compiled ? cuda_driver_minimum(cuda_status().runtime_version) : std::string();
    return d;
  }, "What this build contains: version, whether CUDA was compiled, its architectures and version.");
  m.def("cuda_status", [] {
    CudaStatus s = cuda_status();
    return std::make_tuple(s.available, s.reason);
  }, "(available, reason): whether CUDA ops can run here, and why not. Never raises.");
  m.def("_cuda_arch_mismatch", &cuda_arch_mismatch, nb::arg("major"), nb::arg("minor"), nb::arg("archs"),
        "Why a device of that compute capability cannot run a build for `archs`, or ''.");
  m.def("_cuda_driver_minimum", &cuda_driver_minimum, nb::arg("runtime_version"));
  m.def("_require_cuda", [](const std::string& op) { require_cuda(op.c_str()); },
        "Raises KVCoreError with cuda_status()'s reason when CUDA cannot be used.");
  m.def("dtype_size", [](const std::string& name) { return dtype_size(parse_dtype(name)); }, nb::arg("dtype"),
        "Bytes per element of a kvcore dtype name (TypeError for unsupported ones).");
  m.def("cuda_device_count", [] { return cuda_status().device_count; });
  m.def("debug_checks", &debug_checks, "Whether CUDA kernels report out-of-range indices (KVCORE_DEBUG).");
  m.def("set_debug_checks", &set_debug_checks, nb::arg("enabled"));
  // The CUDA runtime calls kvcore.comm drives its streams, events and staging buffers with.
  m.def("cuda_get_device", &cuda::get_device);
  m.def("cuda_set_device", &cuda::set_device, nb::arg("device"));
  m.def("cuda_stream_create", &cuda::stream_create, nb::arg("device"), "A new non-blocking stream on `device`.");
  m.def("cuda_stream_destroy", &cuda::stream_destroy, nb::arg("stream"));
  m.def("cuda_stream_synchronize", &cuda::stream_synchronize, nb::arg("stream"),
        nb::call_guard<nb::gil_scoped_release>());
  m.def("cuda_stream_is_capturing", &cuda::stream_is_capturing, nb::arg("stream"));
  m.def("cuda_event_create", &cuda::event_create, nb::arg("device"));
  m.def("cuda_event_destroy", &cuda::event_destroy, nb::arg("event"));
  m.def("cuda_event_record", &cuda::event_record, nb::arg("event"), nb::arg("stream"));
  m.def("cuda_stream_wait_event", &cuda::stream_wait_event, nb::arg("stream"), nb::arg("event"));
  m.def("cuda_event_query", &cuda::event_query, nb::arg("event"), "Whether the recorded work has completed.");
  m.def("cuda_memcpy_async", &cuda::memcpy_async, nb::arg("dst"), nb::arg("src"), nb::arg("bytes"),
        nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>(),
        "cudaMemcpyAsync between any two addresses (direction from unified addressing).");
  m.def("cuda_malloc", &cuda::device_malloc, nb::arg("device"), nb::arg("bytes"));
  m.def("cuda_free", &cuda::device_free, nb::arg("ptr"), nb::call_guard<nb::gil_scoped_release>());
  m.def("cuda_host_register", &cuda::host_register, nb::arg("ptr"), nb::arg("bytes"),
        "Page-locks host memory for asynchronous copies; False when the system refuses.");
  m.def("cuda_host_unregister", &cuda::host_unregister, nb::arg("ptr"));
  m.def("num_threads", &num_threads, "Worker threads of the CPU backend.");
  m.def("set_num_threads", &set_num_threads, nb::arg("n"), "0 restores the default.");
}

}  // namespace kvcore::bindings
