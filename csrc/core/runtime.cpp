#include "kvcore/runtime.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kvcore/build_config.h"
#include "kvcore/error.h"

namespace kvcore {

#if !KVCORE_WITH_CUDA
// A CPU-only build: CUDA is never available, with one stable reason.
CudaStatus cuda_status() {
  CudaStatus s;
  s.reason = "kvcore was built without CUDA (no nvcc at build time, or KVCORE_CUDA=OFF)";
  return s;
}
#endif  // otherwise defined in cuda_runtime.cpp

BuildInfo build_info() {
  BuildInfo b;
  b.version = KVCORE_VERSION;
  b.cuda_compiled = KVCORE_WITH_CUDA;
  b.cuda_architectures = KVCORE_CUDA_ARCHS;
  b.cuda_version = KVCORE_CUDA_COMPILER_VERSION;
#if defined(__clang__)
  b.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  b.compiler = "gcc " __VERSION__;
#else
  b.compiler = "unknown";
#endif
  return b;
}

void require_cuda(const char* op) {
  CudaStatus s = cuda_status();
  KVCORE_CHECK(s.available, op, ": CUDA is not available: ", s.reason);
}

namespace {
bool env_debug() {
  const char* v = std::getenv("KVCORE_DEBUG");
  return v && *v && std::strcmp(v, "0") != 0;
}
std::atomic<bool> g_debug{env_debug()};
}  // namespace

bool debug_checks() { return g_debug.load(std::memory_order_relaxed); }
void set_debug_checks(bool enabled) { g_debug.store(enabled); }

}  // namespace kvcore
