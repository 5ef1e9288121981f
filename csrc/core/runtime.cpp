#include "kvcore/runtime.h"

#include <atomic>
#include <cctype>
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

std::string cuda_driver_minimum(int runtime_version) {
  switch (runtime_version / 1000) {
    case 13: return "580.65.06";
    case 12: return "525.60.13";
    default: return "";
  }
}

std::string cuda_arch_mismatch(int major, int minor, const std::string& archs) {
  const int cc = major * 10 + minor;
  std::string list, item;
  bool parsed = false;
  for (size_t start = 0; start <= archs.size();) {
    size_t end = archs.find_first_of(",;", start);
    if (end == std::string::npos) end = archs.size();
    item = archs.substr(start, end - start);
    start = end + 1;
    if (item.empty()) continue;
    size_t digits = 0;
    while (digits < item.size() && std::isdigit(static_cast<unsigned char>(item[digits]))) ++digits;
    if (digits == 0) continue;  // not an architecture (a build without real ones, e.g. "simt")
    parsed = true;
    const int arch = std::stoi(item.substr(0, digits));
    const bool family_specific = digits < item.size() && item[digits] == 'a';
    const bool real = item.find("virtual") == std::string::npos;
    const bool ptx = item.find("real") == std::string::npos;  // "80" alone is both
    if (real && (family_specific ? arch == cc : arch / 10 == major && arch <= cc)) return "";
    if (ptx && !family_specific && arch <= cc) return "";
    list += (list.empty() ? "" : ", ") + item;
  }
  if (!parsed) return "";
  return "compute capability " + std::to_string(major) + "." + std::to_string(minor) +
         " has no machine code or PTX in this build (" + list + ")";
}

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
