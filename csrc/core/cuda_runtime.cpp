// CUDA-side runtime: availability probe, the run-time-resolved driver table, device guard and the
// debug error report. Compiled only in CUDA builds.
#include "kvcore/build_config.h"
#if KVCORE_WITH_CUDA

#include <cuda_runtime_api.h>

#include <mutex>
#include <unordered_map>

#include "kvcore/cuda_driver.h"
#include "kvcore/cuda_utils.h"

namespace kvcore {

const DriverApi& driver_api() {
  static DriverApi api;
  static std::once_flag once;
  std::call_once(once, [] {
    cudaDriverEntryPointQueryResult found{};
    void* fn = nullptr;
    auto resolve = [&](const char* name, unsigned version) -> void* {
      fn = nullptr;
      if (cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &found) != cudaSuccess ||
          found != cudaDriverEntryPointSuccess)
        return nullptr;
      return fn;
    };
#define KVCORE_RESOLVE_REQUIRED(name, version)                                     \
  api.name = reinterpret_cast<PFN_##name##_v##version>(resolve(#name, version));   \
  if (!api.name) api.missing += (api.missing.empty() ? "" : ", ") + std::string(#name);
#define KVCORE_RESOLVE_OPTIONAL(name, version) \
  api.name = reinterpret_cast<PFN_##name##_v##version>(resolve(#name, version));
    KVCORE_DRIVER_REQUIRED(KVCORE_RESOLVE_REQUIRED)
    KVCORE_DRIVER_OPTIONAL(KVCORE_RESOLVE_OPTIONAL)
#undef KVCORE_RESOLVE_REQUIRED
#undef KVCORE_RESOLVE_OPTIONAL
    api.complete = api.missing.empty();
    cudaGetLastError();  // a failed lookup must not leave a sticky error for the next launch check
  });
  return api;
}

const DriverApi& require_driver_api() {
  const DriverApi& api = driver_api();
  KVCORE_CHECK(api.complete, "the CUDA driver API is unavailable (unresolved: ", api.missing,
               "); is an NVIDIA driver installed?");
  return api;
}

std::string driver_error_string(CUresult result) {
  const DriverApi& api = driver_api();
  const char* name = nullptr;
  const char* text = nullptr;
  if (api.cuGetErrorName) api.cuGetErrorName(result, &name);
  if (api.cuGetErrorString) api.cuGetErrorString(result, &text);
  return std::string(name ? name : "CUresult " + std::to_string(int(result))) + " (" +
         (text ? text : "no description") + ")";
}

CudaStatus cuda_status() {
  static CudaStatus status;
  static std::once_flag once;
  std::call_once(once, [] {
    CudaStatus s;
    cudaRuntimeGetVersion(&s.runtime_version);
    cudaError_t err = cudaDriverGetVersion(&s.driver_version);
    if (err == cudaSuccess) err = cudaGetDeviceCount(&s.device_count);
    if (err != cudaSuccess) {
      s.device_count = 0;
      s.reason = std::string("no usable CUDA driver or device: ") + cudaGetErrorName(err) + " (" +
                 cudaGetErrorString(err) + ")";
      if (err == cudaErrorInsufficientDriver)
        s.reason += "; libcuda is missing or older than the CUDA runtime kvcore was built with";
    } else if (s.device_count == 0) {
      s.reason = "the CUDA driver reports no devices";
    } else if (!driver_api().complete) {
      s.reason = "the CUDA driver lacks required entry points: " + driver_api().missing;
    } else {
      s.available = true;
      s.reason = std::to_string(s.device_count) + " CUDA device(s), driver " +
                 std::to_string(s.driver_version) + ", runtime " + std::to_string(s.runtime_version);
    }
    cudaGetLastError();  // clear the error the probe may have left
    status = s;
  });
  return status;
}

CudaDeviceGuard::CudaDeviceGuard(int device) {
  KVCORE_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) KVCORE_CUDA_CHECK(cudaSetDevice(device));
}

CudaDeviceGuard::~CudaDeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_ && previous_ >= 0)
    cudaSetDevice(previous_);
}

namespace {
std::mutex g_report_mu;
std::unordered_map<int, DeviceErrorReport*> g_reports;  // one per device, never freed
}  // namespace

DeviceErrorReport* device_error_report() {
  if (!debug_checks()) return nullptr;
  int device = 0;
  KVCORE_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(g_report_mu);
  DeviceErrorReport*& r = g_reports[device];
  if (!r) {
    KVCORE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&r), sizeof(DeviceErrorReport)));
    KVCORE_CUDA_CHECK(cudaMemset(r, 0, sizeof(DeviceErrorReport)));
  }
  return r;
}

void raise_device_errors(cudaStream_t stream, const char* op, std::initializer_list<const char*> arg_names) {
  DeviceErrorReport* r = device_error_report();
  if (!r) return;
  DeviceErrorReport host{};
  KVCORE_CUDA_CHECK(cudaMemcpyAsync(&host, r, sizeof(host), cudaMemcpyDeviceToHost, stream));
  KVCORE_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (!host.flag) return;
  KVCORE_CUDA_CHECK(cudaMemset(r, 0, sizeof(DeviceErrorReport)));
  const char* arg = "?";
  if (host.arg >= 0 && size_t(host.arg) < arg_names.size()) arg = arg_names.begin()[host.arg];
  KVCORE_THROW(ErrorKind::Index, op, ": ", arg, "[", host.position, "] = ", host.value,
               " is out of range [0, ", host.limit, ") (reported by the CUDA kernel in debug mode)");
}

}  // namespace kvcore

#endif  // KVCORE_WITH_CUDA
