// Process-wide runtime facts: what was built, whether CUDA can run here and why not, debug checks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvcore {

struct BuildInfo {
  std::string version;
  bool cuda_compiled = false;
  std::string cuda_architectures;  // e.g. "80-real,90a-real,90-virtual"; empty without CUDA
  std::string cuda_version;        // nvcc version used for the build; empty without CUDA
  std::string compiler;            // host C++ compiler
};
BuildInfo build_info();

struct CudaStatus {
  bool available = false;
  std::string reason;       // why CUDA is unusable, or a one-line description of what was found
  int device_count = 0;
  int driver_version = 0;   // as reported by the driver (e.g. 13000), 0 when none
  int runtime_version = 0;  // the CUDA runtime linked into kvcore, 0 without CUDA
};
// Never throws; probes once and caches the answer.
CudaStatus cuda_status();

// The oldest Linux driver a CUDA runtime version (e.g. 13000) runs on, with minor-version
// compatibility: "580.65.06" for 13.x, "525.60.13" for 12.x; "" when unknown.
std::string cuda_driver_minimum(int runtime_version);
// "" when a device of compute capability major.minor can run a build for `archs` (CMake's list,
// "80-real,90a-real,90-virtual"): machine code for the same major and an equal or lower minor
// (an "a" variant only on its exact capability), or PTX of an equal or lower one; else why not.
std::string cuda_arch_mismatch(int major, int minor, const std::string& archs);
// Throws KVCoreError with cuda_status()'s reason when CUDA cannot be used.
void require_cuda(const char* op);

// Debug checks make CUDA kernels report out-of-range indices (block-table entries, slots, pages)
// and the op then synchronizes its stream to raise them. Off by default, so no op synchronizes;
// the environment variable KVCORE_DEBUG=1 turns them on at start-up.
bool debug_checks();
void set_debug_checks(bool enabled);

// A CUDA stream passed through the API as an integer handle (0 = the legacy default stream).
using StreamHandle = std::uintptr_t;

// Thin CUDA runtime calls for the Python layer (kvcore.comm drives its streams, events and
// buffers with them). Handles and pointers are integers; every failure, and every call in a
// CPU-only build, raises KVCoreError.
namespace cuda {
using EventHandle = std::uintptr_t;

int get_device();
void set_device(int device);
StreamHandle stream_create(int device);  // non-blocking: never waits on the legacy default stream
void stream_destroy(StreamHandle stream);
void stream_synchronize(StreamHandle stream);
bool stream_is_capturing(StreamHandle stream);
EventHandle event_create(int device);  // timing disabled
void event_destroy(EventHandle event);
void event_record(EventHandle event, StreamHandle stream);
void stream_wait_event(StreamHandle stream, EventHandle event);
bool event_query(EventHandle event);  // whether the work before the record has completed
// cudaMemcpyAsync in whichever direction the addresses say (unified addressing).
void memcpy_async(std::uintptr_t dst, std::uintptr_t src, std::size_t bytes, StreamHandle stream);
// Device memory; allowed while another stream is being captured into a CUDA graph.
std::uintptr_t device_malloc(int device, std::size_t bytes);
void device_free(std::uintptr_t ptr);
// Page-locks existing host memory so copies to and from it are asynchronous DMA; false (and no
// error) when the system refuses, the memory then works as ordinary pageable memory.
bool host_register(std::uintptr_t ptr, std::size_t bytes);
void host_unregister(std::uintptr_t ptr);
}  // namespace cuda

}  // namespace kvcore
