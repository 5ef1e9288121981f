// The CUDA runtime and driver APIs kvcore calls, emulated on the host for the SIMT harness.
//
// Memory: host memory tagged as device (cudaMalloc, arrays the tests hand over as device arrays,
// VMM reservations), pinned host (cudaHostAlloc/Register) or pageable (everything else), which is
// what cudaPointerGetAttributes reports. Work runs synchronously when it is submitted, so every
// stream is always idle and events complete at once; while a stream is being captured, work
// submitted to it is recorded into a graph instead, and what a real capture refuses (synchronizing
// a capturing stream, cudaMalloc or cudaMemcpy in global capture mode) fails the same way. The
// driver's VMM calls are real virtual memory: a PROT_NONE reservation, memfd physical pages mapped
// with MAP_FIXED, access set with mprotect. Every call is appended to a trace tests can read.
#include "simt_api.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

#include "cuda.h"
#include "cuda_runtime_api.h"
#include "cudaTypedefs.h"
#include "internal.h"

namespace simt {

void execute_launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, KernelBody body, void* context);

namespace {

std::recursive_mutex g_mu;

struct Region {
  size_t bytes;
  MemoryKind kind;
  bool owned;  // allocated by the emulation (freed by cudaFree / cudaFreeHost)
};
std::map<uintptr_t, Region> g_regions;  // by start address
std::map<uintptr_t, size_t> g_red_zones;  // start -> bytes
std::atomic<uint64_t> g_red_generation{1};

struct Stream {
  unsigned flags;
  bool capturing = false;
  Graph* graph = nullptr;
};
std::set<cudaStream_t> g_streams;
struct Event {
  cudaStream_t recorded_on = nullptr;
  bool recorded = false;
};
std::set<cudaEvent_t> g_events;
std::map<const void*, int> g_max_dynamic_smem;

std::vector<TraceEntry> g_trace;
std::vector<std::string> g_kernel_errors;
int g_sm_count = 132;
std::string g_fail_next;
int g_fail_next_result = 0;

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;
thread_local cudaStreamCaptureMode t_capture_mode = cudaStreamCaptureModeGlobal;

void trace(const char* call, uintptr_t a = 0, uintptr_t b = 0, uint64_t size = 0) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_trace.push_back(TraceEntry{call, a, b, size});
}

// An injected failure for the named call (tests of error paths).
bool injected(const char* call) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (g_fail_next.empty() || g_fail_next != call) return false;
  g_fail_next.clear();
  return true;
}

cudaError_t set_error(cudaError_t e, const std::string& message = {}) {
  t_last_error = e;
  t_last_message = message;
  return e;
}

Stream* stream_of(cudaStream_t s) {
  return s && g_streams.count(s) ? reinterpret_cast<Stream*>(s) : nullptr;
}

bool any_capture_active() {
  for (cudaStream_t s : g_streams)
    if (reinterpret_cast<Stream*>(s)->capturing) return true;
  return false;
}

// A call that is illegal while some stream captures in global mode invalidates the capture.
cudaError_t refuse_if_capturing(const char* call) {
  if (t_capture_mode == cudaStreamCaptureModeRelaxed || !any_capture_active()) return cudaSuccess;
  return set_error(cudaErrorStreamCaptureUnsupported,
                   std::string(call) + " is not permitted while a stream is being captured");
}

// Runs `work` now, or records it when `stream` is capturing.
cudaError_t submit(cudaStream_t stream, std::function<void()> work) {
  Stream* s = stream_of(stream);
  if (s && s->capturing) {
    s->graph->nodes.push_back(std::move(work));
    return cudaSuccess;
  }
  if (!s && stream && stream != reinterpret_cast<cudaStream_t>(1) && stream != reinterpret_cast<cudaStream_t>(2))
    return set_error(cudaErrorInvalidResourceHandle, "unknown stream handle");
  if (!s && any_capture_active() && t_capture_mode != cudaStreamCaptureModeRelaxed)
    return set_error(cudaErrorStreamCaptureImplicit, "work on the legacy default stream while another stream captures");
  work();
  return cudaSuccess;
}

// Allocations of the emulation: 256-byte aligned, between two red zones.
constexpr size_t kGlobalRedZone = 256;
void* aligned(size_t bytes) {
  void* base = nullptr;
  if (posix_memalign(&base, kGlobalRedZone, bytes + 2 * kGlobalRedZone)) return nullptr;
  char* p = static_cast<char*>(base) + kGlobalRedZone;
  add_red_zone(base, kGlobalRedZone);
  add_red_zone(p + bytes, kGlobalRedZone);
  return p;
}
void release(void* p, size_t bytes) {
  remove_red_zone(static_cast<char*>(p) - kGlobalRedZone);
  remove_red_zone(static_cast<char*>(p) + bytes);
  std::free(static_cast<char*>(p) - kGlobalRedZone);
}

}  // namespace

void register_memory(const void* p, size_t bytes, MemoryKind kind) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_regions[uintptr_t(p)] = Region{bytes, kind, false};
}
void unregister_memory(const void* p) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_regions.erase(uintptr_t(p));
}
void add_red_zone(const void* p, size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_red_zones[uintptr_t(p)] = bytes;
  g_red_generation.fetch_add(1, std::memory_order_relaxed);
}
void remove_red_zone(const void* p) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_red_zones.erase(uintptr_t(p));
  g_red_generation.fetch_add(1, std::memory_order_relaxed);
}
uint64_t red_zone_generation() { return g_red_generation.load(std::memory_order_relaxed); }
bool find_red_zone(uintptr_t a, size_t n, uintptr_t* zone, size_t* zone_bytes) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  auto it = g_red_zones.upper_bound(a + n - 1);  // the first zone starting after the access
  if (it == g_red_zones.begin()) return false;
  --it;
  if (it->first + it->second <= a) return false;
  *zone = it->first;
  *zone_bytes = it->second;
  return true;
}

MemoryKind memory_kind(const void* p) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  auto it = g_regions.upper_bound(uintptr_t(p));
  if (it == g_regions.begin()) return MemoryKind::Pageable;
  --it;
  if (uintptr_t(p) - it->first < std::max<size_t>(it->second.bytes, 1)) return it->second.kind;
  return MemoryKind::Pageable;
}

std::vector<TraceEntry> take_trace() {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  std::vector<TraceEntry> t;
  t.swap(g_trace);
  return t;
}
void set_sm_count(int n) { g_sm_count = n; }
int sm_count() { return g_sm_count; }
void fail_next_call(const std::string& call, int result) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_fail_next = call;
  g_fail_next_result = result;
}

void begin_capture(cudaStream_t stream, Graph* graph) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  Stream* s = stream_of(stream);
  if (!s) throw std::invalid_argument("begin_capture: capture needs a stream made by cudaStreamCreateWithFlags");
  s->capturing = true;
  s->graph = graph;
}
void end_capture(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  Stream* s = stream_of(stream);
  if (!s) throw std::invalid_argument("end_capture: unknown stream");
  s->capturing = false;
  s->graph = nullptr;
}
void replay(const Graph& graph) {
  for (const auto& node : graph.nodes) node();
}
Graph::~Graph() {
  for (auto [p, bytes] : deferred_frees) release(p, bytes);
}

std::string last_error_message() { return t_last_message; }

void record_launch_error(int code, const std::string& message) {
  set_error(cudaError_t(code), message);
  trace("kernel_error", 0, 0, uint64_t(code));
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_kernel_errors.push_back(message);
}
std::vector<std::string> take_kernel_errors() {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  std::vector<std::string> e;
  e.swap(g_kernel_errors);
  return e;
}
size_t max_shared_per_block() { return 232448; }  // 227 KiB, as on sm_90
int simt_threads() {
  static const int n = [] {
    const char* v = std::getenv("KVCORE_SIMT_THREADS");
    const int want = v ? std::atoi(v) : int(std::thread::hardware_concurrency());
    return std::max(1, std::min(want, 16));
  }();
  return n;
}
size_t max_dynamic_smem_attribute(const void* kernel) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  auto it = g_max_dynamic_smem.find(kernel);
  return it == g_max_dynamic_smem.end() ? 0 : size_t(it->second);
}

void run_launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream, KernelBody body,
                std::shared_ptr<void> context) {
  trace("launch", reinterpret_cast<uintptr_t>(kernel), reinterpret_cast<uintptr_t>(stream));
  const cudaError_t e = submit(stream, [=] { execute_launch(kernel, grid, block, dynamic_smem, body, context.get()); });
  if (e != cudaSuccess) record_launch_error(int(e), t_last_message);
}

}  // namespace simt

using namespace simt;

// --- Runtime API ------------------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return t_last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureImplicit: return "cudaErrorStreamCaptureImplicit";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t e) {
  // The emulation's own description of the last failure (a kernel error names the check, block,
  // thread and source line), else the generic text.
  if (e == t_last_error || !t_last_message.empty()) {
    static thread_local std::string s;
    s = t_last_message.empty() ? std::string("simt: ") + cudaGetErrorName(e) : "simt: " + t_last_message;
    return s.c_str();
  }
  return cudaGetErrorName(e);
}

cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  trace("cudaSetDevice", uintptr_t(d));
  return d == 0 ? cudaSuccess : set_error(cudaErrorInvalidDevice, "the harness emulates one device");
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  if (device != 0) return set_error(cudaErrorInvalidDevice);
  if (attr == cudaDevAttrMultiProcessorCount) *v = sm_count();
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = int(max_shared_per_block());
  else if (attr == cudaDevAttrComputeCapabilityMajor) *v = 9;  // the kernels compile as __CUDA_ARCH__ 900
  else if (attr == cudaDevAttrComputeCapabilityMinor) *v = 0;
  else return set_error(cudaErrorInvalidValue, "attribute not emulated");
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  if (cudaError_t e = refuse_if_capturing("cudaDeviceSynchronize")) return e;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return set_error(cudaErrorInvalidValue);
  if (value < 0 || size_t(value) > max_shared_per_block())
    return set_error(cudaErrorInvalidValue, "cudaFuncAttributeMaxDynamicSharedMemorySize " + std::to_string(value) +
                                                " exceeds the device's " + std::to_string(max_shared_per_block()));
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
  trace("cudaMalloc", 0, 0, bytes);
  if (cudaError_t e = refuse_if_capturing("cudaMalloc")) return e;
  *p = aligned(bytes);
  if (!*p) return set_error(cudaErrorMemoryAllocation);
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_regions[uintptr_t(*p)] = Region{bytes, MemoryKind::Device, true};
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  trace("cudaFree", uintptr_t(p));
  if (!p) return cudaSuccess;
  if (cudaError_t e = refuse_if_capturing("cudaFree")) return e;
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  auto it = g_regions.find(uintptr_t(p));
  if (it == g_regions.end() || !it->second.owned || it->second.kind != MemoryKind::Device)
    return set_error(cudaErrorInvalidDevicePointer, "cudaFree of a pointer cudaMalloc did not return");
  const size_t bytes = it->second.bytes;
  g_regions.erase(it);
  release(p, bytes);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t stream) {
  trace("cudaMallocAsync", 0, uintptr_t(stream), bytes);
  *p = aligned(bytes);
  if (!*p) return set_error(cudaErrorMemoryAllocation);
  // Stream-ordered memory starts as garbage, and finite garbage (0x5a5a5a5a is 1.5e16 as a float):
  // NaN would slip through fmaxf-based merges unnoticed.
  std::memset(*p, 0x5a, bytes);
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_regions[uintptr_t(*p)] = Region{bytes, MemoryKind::Device, true};
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t stream) {
  trace("cudaFreeAsync", uintptr_t(p), uintptr_t(stream));
  if (!p) return cudaSuccess;
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  auto it = g_regions.find(uintptr_t(p));
  if (it == g_regions.end() || !it->second.owned)
    return set_error(cudaErrorInvalidDevicePointer, "cudaFreeAsync of a pointer cudaMallocAsync did not return");
  Stream* s = stream_of(stream);
  const size_t bytes = it->second.bytes;
  g_regions.erase(it);
  if (s && s->capturing) {  // a graph's memory lives as long as the graph: it is replayed later
    s->graph->deferred_frees.push_back({p, bytes});
    return cudaSuccess;
  }
  release(p, bytes);
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) {
  trace("cudaHostAlloc", 0, 0, bytes);
  *p = aligned(bytes);
  if (!*p) return set_error(cudaErrorMemoryAllocation);
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_regions[uintptr_t(*p)] = Region{bytes, MemoryKind::Pinned, true};
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  trace("cudaFreeHost", uintptr_t(p));
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  auto it = g_regions.find(uintptr_t(p));
  if (it == g_regions.end() || !it->second.owned || it->second.kind != MemoryKind::Pinned)
    return set_error(cudaErrorInvalidValue, "cudaFreeHost of a pointer cudaHostAlloc did not return");
  const size_t bytes = it->second.bytes;
  g_regions.erase(it);
  release(p, bytes);
  return cudaSuccess;
}
cudaError_t cudaHostRegister(void* p, size_t bytes, unsigned) {
  trace("cudaHostRegister", uintptr_t(p), 0, bytes);
  if (memory_kind(p) != MemoryKind::Pageable) return set_error(cudaErrorInvalidValue, "already registered");
  register_memory(p, bytes, MemoryKind::Pinned);
  return cudaSuccess;
}
cudaError_t cudaHostUnregister(void* p) {
  trace("cudaHostUnregister", uintptr_t(p));
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  auto it = g_regions.find(uintptr_t(p));
  if (it == g_regions.end() || it->second.owned || it->second.kind != MemoryKind::Pinned)
    return set_error(cudaErrorInvalidValue, "cudaHostUnregister of memory cudaHostRegister did not register");
  g_regions.erase(it);
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p) {
  *attr = cudaPointerAttributes{};
  switch (memory_kind(p)) {
    case MemoryKind::Device:
      attr->type = cudaMemoryTypeDevice;
      attr->devicePointer = const_cast<void*>(p);
      break;
    case MemoryKind::Pinned:
      attr->type = cudaMemoryTypeHost;
      attr->devicePointer = const_cast<void*>(p);
      attr->hostPointer = const_cast<void*>(p);
      break;
    default: attr->type = cudaMemoryTypeUnregistered; break;
  }
  return cudaSuccess;
}

// A copy or memset may touch device memory only where the emulated device could: device or
// pinned host memory on the device side, anything on the host side of a host<->device copy.
cudaError_t cudaMemset(void* p, int v, size_t bytes) {
  trace("cudaMemset", uintptr_t(p), 0, bytes);
  if (cudaError_t e = refuse_if_capturing("cudaMemset")) return e;
  std::memset(p, v, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t stream) {
  trace("cudaMemsetAsync", uintptr_t(p), uintptr_t(stream), bytes);
  return submit(stream, [=] { std::memset(p, v, bytes); });
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  trace("cudaMemcpy", uintptr_t(dst), uintptr_t(src), bytes);
  if (cudaError_t e = refuse_if_capturing("cudaMemcpy")) return e;
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t stream) {
  trace("cudaMemcpyAsync", uintptr_t(dst), uintptr_t(src), bytes);
  return submit(stream, [=] { std::memmove(dst, src, bytes); });
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind, cudaStream_t stream) {
  trace("cudaMemcpy2DAsync", uintptr_t(dst), uintptr_t(src), width * height);
  if (width > dpitch || width > spitch) return set_error(cudaErrorInvalidValue, "cudaMemcpy2DAsync: width > pitch");
  return submit(stream, [=] {
    for (size_t r = 0; r < height; ++r)
      std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  });
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  auto* s = new Stream{flags};
  *stream = reinterpret_cast<cudaStream_t>(s);
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_streams.insert(*stream);
  trace("cudaStreamCreate", uintptr_t(*stream), flags);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  trace("cudaStreamDestroy", uintptr_t(stream));
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (!g_streams.erase(stream)) return set_error(cudaErrorInvalidResourceHandle, "unknown stream");
  delete reinterpret_cast<Stream*>(stream);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  trace("cudaStreamSynchronize", uintptr_t(stream));
  Stream* s = stream_of(stream);
  if (s && s->capturing)
    return set_error(cudaErrorStreamCaptureUnsupported, "cudaStreamSynchronize of a stream that is being captured");
  if (cudaError_t e = refuse_if_capturing("cudaStreamSynchronize")) return e;
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned) {
  trace("cudaStreamWaitEvent", uintptr_t(stream), uintptr_t(event));
  return g_events.count(event) ? cudaSuccess : set_error(cudaErrorInvalidResourceHandle, "unknown event");
}
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  Stream* s = stream_of(stream);
  *status = s && s->capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) {
  std::swap(*mode, t_capture_mode);
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned) {
  *event = reinterpret_cast<cudaEvent_t>(new Event{});
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  g_events.insert(*event);
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (!g_events.erase(event)) return set_error(cudaErrorInvalidResourceHandle, "unknown event");
  delete reinterpret_cast<Event*>(event);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  trace("cudaEventRecord", uintptr_t(event), uintptr_t(stream));
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (!g_events.count(event)) return set_error(cudaErrorInvalidResourceHandle, "unknown event");
  auto* e = reinterpret_cast<Event*>(event);
  e->recorded = true;
  e->recorded_on = stream;
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  return g_events.count(event) ? cudaSuccess : set_error(cudaErrorInvalidResourceHandle, "unknown event");
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  trace("cudaEventSynchronize", uintptr_t(event));
  return g_events.count(event) ? cudaSuccess : set_error(cudaErrorInvalidResourceHandle, "unknown event");
}

// --- Driver API: virtual memory -----------------------------------------------------------------

namespace {

constexpr size_t kGranularity = 2 << 20;

struct PhysicalPage {
  int fd;
  size_t bytes;
  int mappings = 0;
  bool released = false;
};
std::map<CUmemGenericAllocationHandle, PhysicalPage> g_pages;
CUmemGenericAllocationHandle g_next_handle = 1;
struct Reservation {
  size_t bytes;
  std::map<uintptr_t, std::pair<CUmemGenericAllocationHandle, size_t>> mapped;  // at -> (page, bytes)
  std::map<uintptr_t, unsigned long long> access;                               // granule -> flags
};
std::map<uintptr_t, Reservation> g_reservations;

Reservation* reservation_of(uintptr_t at, size_t bytes, uintptr_t* base) {
  auto it = g_reservations.upper_bound(at);
  if (it == g_reservations.begin()) return nullptr;
  --it;
  if (at < it->first || at + bytes > it->first + it->second.bytes) return nullptr;
  *base = it->first;
  return &it->second;
}

void drop_page_ref(CUmemGenericAllocationHandle h) {
  auto it = g_pages.find(h);
  if (it == g_pages.end()) return;
  if (it->second.released && it->second.mappings == 0) {
    close(it->second.fd);
    g_pages.erase(it);
  }
}

CUresult driver_fail(const char* call) {
  trace(call, 0, 0, uint64_t(g_fail_next_result ? g_fail_next_result : CUDA_ERROR_OUT_OF_MEMORY));
  return CUresult(g_fail_next_result ? g_fail_next_result : CUDA_ERROR_OUT_OF_MEMORY);
}

CUresult cuGetErrorString(CUresult r, const char** s) {
  *s = r == CUDA_SUCCESS ? "no error" : r == CUDA_ERROR_OUT_OF_MEMORY ? "out of memory" : "invalid argument";
  return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult r, const char** s) {
  switch (r) {
    case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; break;
  }
  return CUDA_SUCCESS;
}
CUresult cuDriverGetVersion(int* v) {
  *v = 13000;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *d = 0;
  return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
  static int primary;
  *c = reinterpret_cast<CUcontext>(&primary);
  return CUDA_SUCCESS;
}
CUresult cuMemGetAllocationGranularity(size_t* g, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) {
  *g = kGranularity;
  return CUDA_SUCCESS;
}
CUresult cuMemAddressReserve(CUdeviceptr* ptr, size_t bytes, size_t alignment, CUdeviceptr, unsigned long long) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (injected("cuMemAddressReserve")) return driver_fail("cuMemAddressReserve");
  if (bytes == 0 || bytes % kGranularity) return CUDA_ERROR_INVALID_VALUE;
  const size_t align = std::max(alignment, kGranularity);
  void* raw = mmap(nullptr, bytes + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  const uintptr_t base = (uintptr_t(raw) + align - 1) / align * align;
  if (base > uintptr_t(raw)) munmap(raw, base - uintptr_t(raw));
  munmap(reinterpret_cast<void*>(base + bytes), uintptr_t(raw) + bytes + align - base - bytes);
  g_reservations[base] = Reservation{bytes, {}, {}};
  g_regions[base] = Region{bytes, MemoryKind::Device, false};
  *ptr = base;
  trace("cuMemAddressReserve", base, 0, bytes);
  return CUDA_SUCCESS;
}
CUresult cuMemAddressFree(CUdeviceptr ptr, size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  trace("cuMemAddressFree", ptr, 0, bytes);
  auto it = g_reservations.find(ptr);
  if (it == g_reservations.end() || it->second.bytes != bytes) return CUDA_ERROR_INVALID_VALUE;
  if (!it->second.mapped.empty()) return CUDA_ERROR_INVALID_VALUE;  // unmap first
  munmap(reinterpret_cast<void*>(ptr), bytes);
  g_reservations.erase(it);
  g_regions.erase(ptr);
  return CUDA_SUCCESS;
}
CUresult cuMemCreate(CUmemGenericAllocationHandle* h, size_t bytes, const CUmemAllocationProp*, unsigned long long) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  if (injected("cuMemCreate")) return driver_fail("cuMemCreate");
  if (bytes == 0 || bytes % kGranularity) return CUDA_ERROR_INVALID_VALUE;
  const int fd = memfd_create("simt-page", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, off_t(bytes)) != 0) {
    if (fd >= 0) close(fd);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  *h = g_next_handle++;
  g_pages[*h] = PhysicalPage{fd, bytes};
  trace("cuMemCreate", *h, 0, bytes);
  return CUDA_SUCCESS;
}
CUresult cuMemRelease(CUmemGenericAllocationHandle h) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  trace("cuMemRelease", h);
  auto it = g_pages.find(h);
  if (it == g_pages.end() || it->second.released) return CUDA_ERROR_INVALID_VALUE;
  it->second.released = true;
  drop_page_ref(h);  // the memory lives on while mapped
  return CUDA_SUCCESS;
}
CUresult cuMemMap(CUdeviceptr ptr, size_t bytes, size_t offset, CUmemGenericAllocationHandle h, unsigned long long) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  trace("cuMemMap", ptr, h, bytes);
  if (injected("cuMemMap")) return driver_fail("cuMemMap");
  auto page = g_pages.find(h);
  uintptr_t base = 0;
  Reservation* r = reservation_of(ptr, bytes, &base);
  if (page == g_pages.end() || page->second.released || !r || offset + bytes > page->second.bytes ||
      ptr % kGranularity || bytes % kGranularity)
    return CUDA_ERROR_INVALID_VALUE;
  for (auto& [at, m] : r->mapped)
    if (ptr < at + m.second && at < ptr + bytes) return CUDA_ERROR_INVALID_VALUE;  // already mapped
  void* p = mmap(reinterpret_cast<void*>(ptr), bytes, PROT_NONE, MAP_SHARED | MAP_FIXED, page->second.fd, off_t(offset));
  if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  r->mapped[ptr] = {h, bytes};
  for (size_t g = 0; g < bytes; g += kGranularity) r->access[ptr + g] = CU_MEM_ACCESS_FLAGS_PROT_NONE;
  ++page->second.mappings;
  return CUDA_SUCCESS;
}
CUresult cuMemUnmap(CUdeviceptr ptr, size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  trace("cuMemUnmap", ptr, 0, bytes);
  uintptr_t base = 0;
  Reservation* r = reservation_of(ptr, bytes, &base);
  if (!r) return CUDA_ERROR_INVALID_VALUE;
  auto it = r->mapped.find(ptr);
  if (it == r->mapped.end() || it->second.second != bytes) return CUDA_ERROR_INVALID_VALUE;
  mmap(reinterpret_cast<void*>(ptr), bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  const CUmemGenericAllocationHandle h = it->second.first;
  r->mapped.erase(it);
  for (size_t g = 0; g < bytes; g += kGranularity) r->access.erase(ptr + g);
  auto page = g_pages.find(h);
  if (page != g_pages.end()) {
    --page->second.mappings;
    drop_page_ref(h);
  }
  return CUDA_SUCCESS;
}
CUresult cuMemSetAccess(CUdeviceptr ptr, size_t bytes, const CUmemAccessDesc* desc, size_t count) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  trace("cuMemSetAccess", ptr, desc && count ? desc[0].flags : 0, bytes);
  if (injected("cuMemSetAccess")) return driver_fail("cuMemSetAccess");
  uintptr_t base = 0;
  Reservation* r = reservation_of(ptr, bytes, &base);
  if (!r || count != 1 || bytes % kGranularity) return CUDA_ERROR_INVALID_VALUE;
  for (size_t g = 0; g < bytes; g += kGranularity)
    if (!r->access.count(ptr + g)) return CUDA_ERROR_INVALID_VALUE;  // every granule must be mapped
  const int prot = desc->flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE ? PROT_READ | PROT_WRITE
                   : desc->flags == CU_MEM_ACCESS_FLAGS_PROT_READ    ? PROT_READ
                                                                     : PROT_NONE;
  if (mprotect(reinterpret_cast<void*>(ptr), bytes, prot) != 0) return CUDA_ERROR_INVALID_VALUE;
  for (size_t g = 0; g < bytes; g += kGranularity) r->access[ptr + g] = desc->flags;
  return CUDA_SUCCESS;
}
CUresult cuMemGetAccess(unsigned long long* flags, const CUmemLocation*, CUdeviceptr ptr) {
  std::lock_guard<std::recursive_mutex> lock(g_mu);
  uintptr_t base = 0;
  Reservation* r = reservation_of(ptr, 1, &base);
  if (!r) return CUDA_ERROR_INVALID_VALUE;
  auto it = r->access.find(ptr / kGranularity * kGranularity);
  *flags = it == r->access.end() ? CU_MEM_ACCESS_FLAGS_PROT_NONE : it->second;
  return CUDA_SUCCESS;
}

}  // namespace

namespace simt {
unsigned long long access_flags(const void* p) {
  unsigned long long flags = 0;
  if (cuMemGetAccess(&flags, nullptr, CUdeviceptr(uintptr_t(p))) != CUDA_SUCCESS) return ~0ull;
  return flags;
}
}  // namespace simt

cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  static const std::map<std::string, void*> table = {
      {"cuGetErrorString", reinterpret_cast<void*>(&cuGetErrorString)},
      {"cuGetErrorName", reinterpret_cast<void*>(&cuGetErrorName)},
      {"cuDriverGetVersion", reinterpret_cast<void*>(&cuDriverGetVersion)},
      {"cuDeviceGet", reinterpret_cast<void*>(&cuDeviceGet)},
      {"cuCtxGetCurrent", reinterpret_cast<void*>(&cuCtxGetCurrent)},
      {"cuMemAddressReserve", reinterpret_cast<void*>(&cuMemAddressReserve)},
      {"cuMemAddressFree", reinterpret_cast<void*>(&cuMemAddressFree)},
      {"cuMemCreate", reinterpret_cast<void*>(&cuMemCreate)},
      {"cuMemRelease", reinterpret_cast<void*>(&cuMemRelease)},
      {"cuMemMap", reinterpret_cast<void*>(&cuMemMap)},
      {"cuMemUnmap", reinterpret_cast<void*>(&cuMemUnmap)},
      {"cuMemSetAccess", reinterpret_cast<void*>(&cuMemSetAccess)},
      {"cuMemGetAllocationGranularity", reinterpret_cast<void*>(&cuMemGetAllocationGranularity)},
      {"cuMemGetAccess", reinterpret_cast<void*>(&cuMemGetAccess)},
  };
  auto it = table.find(symbol);
  *fn = it == table.end() ? nullptr : it->second;
  if (status) *status = it == table.end() ? cudaDriverEntryPointSymbolNotFound : cudaDriverEntryPointSuccess;
  return cudaSuccess;
}
