// Control of the emulated device, for the harness's bindings and tests: what memory counts as
// device or pinned, the call trace, injected failures, stream capture into replayable graphs.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "cuda_runtime_api.h"

namespace simt {

enum class MemoryKind { Pageable, Device, Pinned };
void register_memory(const void* p, size_t bytes, MemoryKind kind);
void unregister_memory(const void* p);
MemoryKind memory_kind(const void* p);

// Global-memory red zones: bytes next to an allocation that no kernel may touch (the emulation's own
// allocations get one on each side; tests add them around the arrays they hand over). A kernel's
// access to one is reported as an out-of-bounds global access.
void add_red_zone(const void* p, size_t bytes);
void remove_red_zone(const void* p);

struct TraceEntry {
  std::string call;
  uintptr_t a, b;  // the call's main pointer/handle arguments (see cuda_api.cpp)
  uint64_t size;
};
std::vector<TraceEntry> take_trace();

// Errors kernels reported since the last call (also returned by cudaGetLastError).
std::vector<std::string> take_kernel_errors();

void set_sm_count(int n);
int sm_count();
// The next call of `call` (a driver entry such as "cuMemMap") fails with `result`.
void fail_next_call(const std::string& call, int result);

// Work submitted to a capturing stream, replayable; owns the memory freed inside the capture.
struct Graph {
  std::vector<std::function<void()>> nodes;
  std::vector<std::pair<void*, size_t>> deferred_frees;  // (pointer, bytes)
  Graph() = default;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph();
};
void begin_capture(cudaStream_t stream, Graph* graph);
void end_capture(cudaStream_t stream);
void replay(const Graph& graph);

// The access flags (CU_MEM_ACCESS_FLAGS_*) of the VMM granule holding p; ~0 when p is not reserved.
unsigned long long access_flags(const void* p);

}  // namespace simt
