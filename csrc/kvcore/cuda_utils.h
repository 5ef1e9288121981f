// Helpers shared by CUDA host code: checked runtime calls, a device guard, and the debug-mode
// device error report. Include only in CUDA builds.
#pragma once

#include <cuda_runtime_api.h>

#include <initializer_list>

#include "kvcore/detail/device_error.h"
#include "kvcore/error.h"
#include "kvcore/runtime.h"

#define KVCORE_CUDA_CHECK(expr)                                                                    \
  do {                                                                                             \
    cudaError_t kvcore_cuda_err_ = (expr);                                                         \
    if (kvcore_cuda_err_ != cudaSuccess)                                                           \
      KVCORE_THROW(kvcore_cuda_err_ == cudaErrorMemoryAllocation ? ::kvcore::ErrorKind::Memory     \
                                                                 : ::kvcore::ErrorKind::Runtime,   \
                   #expr " failed: ", cudaGetErrorName(kvcore_cuda_err_), " (",                    \
                   cudaGetErrorString(kvcore_cuda_err_), ")");                                     \
  } while (0)

// After every kernel launch: catches bad launch configurations immediately.
#define KVCORE_CUDA_CHECK_LAUNCH() KVCORE_CUDA_CHECK(cudaGetLastError())

namespace kvcore {

inline cudaStream_t to_cuda_stream(StreamHandle s) { return reinterpret_cast<cudaStream_t>(s); }

// Makes `device` current for the scope of an op and restores the previous device.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// The current device's error report when debug checks are on, else nullptr (kernels then skip
// bad indices silently instead of reporting them).
DeviceErrorReport* device_error_report();
// In debug mode: waits for `stream`, and if a kernel reported a bad index, clears the report and
// throws IndexError naming arg_names[report.arg] and the offending position and value.
void raise_device_errors(cudaStream_t stream, const char* op, std::initializer_list<const char*> arg_names);

}  // namespace kvcore
