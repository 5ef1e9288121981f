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

// Why some device cannot run this build's kernels, or "".
static std::string first_arch_mismatch(int device_count) {
  for (int d = 0; d < device_count; ++d) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d) != cudaSuccess)
      continue;
    const std::string why = cuda_arch_mismatch(major, minor, KVCORE_CUDA_ARCHS);
    if (!why.empty()) return "device " + std::to_string(d) + ": " + why + "; rebuild with -DKVCORE_CUDA_ARCHITECTURES";
  }
  return "";
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
      if (err == cudaErrorInsufficientDriver) {
        const std::string minimum = cuda_driver_minimum(s.runtime_version);
        s.reason += "; libcuda is missing or older than the CUDA " + std::to_string(s.runtime_version / 1000) + "." +
                    std::to_string(s.runtime_version % 1000 / 10) + " runtime kvcore was built with" +
                    (minimum.empty() ? std::string() : ", which needs NVIDIA driver >= " + minimum);
      }
    } else if (s.device_count == 0) {
      s.reason = "the CUDA driver reports no devices";
    } else if (!driver_api().complete) {
      s.reason = "the CUDA driver lacks required entry points: " + driver_api().missing;
    } else if (std::string mismatch = first_arch_mismatch(s.device_count); !mismatch.empty()) {
      s.reason = mismatch;
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

// Allocation is not stream-ordered, so a capture in global mode (any thread) would reject it;
// relaxed mode for this thread makes it legal, as graph-aware allocators do.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  ~RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

std::mutex g_report_mu;
std::unordered_map<int, DeviceErrorReport*> g_reports;  // one per device, never freed
}  // namespace

DeviceErrorReport* device_error_report() {
  if (!debug_checks()) return nullptr;
  int device = 0;
  KVCORE_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(g_report_mu);
  DeviceErrorReport*& r = g_reports[device];
  if (!r) {  // once per device; legal inside a stream capture (relaxed mode for this thread)
    RelaxedCaptureMode relaxed;
    KVCORE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&r), sizeof(DeviceErrorReport)));
    KVCORE_CUDA_CHECK(cudaMemset(r, 0, sizeof(DeviceErrorReport)));
  }
  return r;
}

void raise_device_errors(cudaStream_t stream, const char* op, std::initializer_list<const char*> arg_names) {
  DeviceErrorReport* r = device_error_report();
  if (!r) return;
  // Inside a capture nothing can be read back (and a sync would invalidate the capture): what the
  // graph's kernels report stays in the report and is raised by the next checked op outside it.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  KVCORE_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  DeviceErrorReport host{};
  KVCORE_CUDA_CHECK(cudaMemcpyAsync(&host, r, sizeof(host), cudaMemcpyDeviceToHost, stream));
  KVCORE_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (!host.flag) return;
  KVCORE_CUDA_CHECK(cudaMemset(r, 0, sizeof(DeviceErrorReport)));
  const char* arg = "?";
  if (host.arg >= 0 && size_t(host.arg) < arg_names.size()) arg = arg_names.begin()[host.arg];
  KVCORE_THROW(ErrorKind::Index, op, ": ", arg, "[", host.position, "] = ", host.value,
               " is out of range [", host.low, ", ", host.limit, ") (reported by the CUDA kernel in debug mode)");
}

namespace cuda {
namespace {

cudaStream_t as_stream(StreamHandle s) { return reinterpret_cast<cudaStream_t>(s); }
cudaEvent_t as_event(EventHandle e) { return reinterpret_cast<cudaEvent_t>(e); }

}  // namespace

int get_device() {
  require_cuda("cuda_get_device");
  int device = 0;
  KVCORE_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

void set_device(int device) {
  require_cuda("cuda_set_device");
  KVCORE_CHECK_VALUE(device >= 0 && device < cuda_status().device_count, "device: expected 0..",
                     cuda_status().device_count - 1, ", got ", device);
  KVCORE_CUDA_CHECK(cudaSetDevice(device));
}

StreamHandle stream_create(int device) {
  require_cuda("cuda_stream_create");
  CudaDeviceGuard guard(device);
  cudaStream_t s = nullptr;
  KVCORE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return reinterpret_cast<StreamHandle>(s);
}

void stream_destroy(StreamHandle stream) { KVCORE_CUDA_CHECK(cudaStreamDestroy(as_stream(stream))); }
void stream_synchronize(StreamHandle stream) { KVCORE_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream))); }

bool stream_is_capturing(StreamHandle stream) {
  require_cuda("cuda_stream_is_capturing");
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  KVCORE_CUDA_CHECK(cudaStreamIsCapturing(as_stream(stream), &status));
  return status != cudaStreamCaptureStatusNone;
}

EventHandle event_create(int device) {
  require_cuda("cuda_event_create");
  CudaDeviceGuard guard(device);
  cudaEvent_t e = nullptr;
  KVCORE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return reinterpret_cast<EventHandle>(e);
}

void event_destroy(EventHandle event) { KVCORE_CUDA_CHECK(cudaEventDestroy(as_event(event))); }
void event_record(EventHandle event, StreamHandle stream) {
  KVCORE_CUDA_CHECK(cudaEventRecord(as_event(event), as_stream(stream)));
}
void stream_wait_event(StreamHandle stream, EventHandle event) {
  KVCORE_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), as_event(event), 0));
}

bool event_query(EventHandle event) {
  const cudaError_t err = cudaEventQuery(as_event(event));
  if (err == cudaErrorNotReady) return false;
  KVCORE_CUDA_CHECK(err);
  return true;
}

void memcpy_async(std::uintptr_t dst, std::uintptr_t src, std::size_t bytes, StreamHandle stream) {
  if (bytes == 0) return;
  KVCORE_CHECK_VALUE(dst != 0 && src != 0, "memcpy_async: null pointer");
  KVCORE_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes,
                                    cudaMemcpyDefault, as_stream(stream)));
}

std::uintptr_t device_malloc(int device, std::size_t bytes) {
  require_cuda("cuda_malloc");
  CudaDeviceGuard guard(device);
  RelaxedCaptureMode relaxed;
  void* p = nullptr;
  KVCORE_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1));
  return reinterpret_cast<std::uintptr_t>(p);
}

void device_free(std::uintptr_t ptr) {
  RelaxedCaptureMode relaxed;
  KVCORE_CUDA_CHECK(cudaFree(reinterpret_cast<void*>(ptr)));
}

bool host_register(std::uintptr_t ptr, std::size_t bytes) {
  require_cuda("cuda_host_register");
  if (cudaHostRegister(reinterpret_cast<void*>(ptr), bytes, cudaHostRegisterPortable) == cudaSuccess) return true;
  cudaGetLastError();  // a refusal must not leave a sticky error for the next launch check
  return false;
}

void host_unregister(std::uintptr_t ptr) { KVCORE_CUDA_CHECK(cudaHostUnregister(reinterpret_cast<void*>(ptr))); }

}  // namespace cuda

}  // namespace kvcore

#endif  // KVCORE_WITH_CUDA
