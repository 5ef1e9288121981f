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
    return d;
  }, "What this build contains: version, whether CUDA was compiled, its architectures and version.");
  m.def("cuda_status", [] {
    CudaStatus s = cuda_status();
    return std::make_tuple(s.available, s.reason);
  }, "(available, reason): whether CUDA ops can run here, and why not. Never raises.");
  m.def("_require_cuda", [](const std::string& op) { require_cuda(op.c_str()); },
        "Raises KVCoreError with cuda_status()'s reason when CUDA cannot be used.");
  m.def("dtype_size", [](const std::string& name) { return dtype_size(parse_dtype(name)); }, nb::arg("dtype"),
        "Bytes per element of a kvcore dtype name (TypeError for unsupported ones).");
  m.def("cuda_device_count", [] { return cuda_status().device_count; });
  m.def("debug_checks", &debug_checks, "Whether CUDA kernels report out-of-range indices (KVCORE_DEBUG).");
  m.def("set_debug_checks", &set_debug_checks, nb::arg("enabled"));
  m.def("num_threads", &num_threads, "Worker threads of the CPU backend.");
  m.def("set_num_threads", &set_num_threads, nb::arg("n"), "0 restores the default.");
}

}  // namespace kvcore::bindings
