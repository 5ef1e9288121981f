// Process-wide runtime facts: what was built, whether CUDA can run here and why not, debug checks.
#pragma once

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
// Throws KVCoreError with cuda_status()'s reason when CUDA cannot be used.
void require_cuda(const char* op);

// Debug checks make CUDA kernels report out-of-range indices (block-table entries, slots, pages)
// and the op then synchronizes its stream to raise them. Off by default, so no op synchronizes;
// the environment variable KVCORE_DEBUG=1 turns them on at start-up.
bool debug_checks();
void set_debug_checks(bool enabled);

// A CUDA stream passed through the API as an integer handle (0 = the legacy default stream).
using StreamHandle = std::uintptr_t;

}  // namespace kvcore
