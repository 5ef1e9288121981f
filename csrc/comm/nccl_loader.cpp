// The nccl link's library: libnccl.so.2 is loaded at run time (never linked), so the extension
// imports everywhere and the link reports why it is unavailable.
#include <dlfcn.h>

#include <mutex>
#include <type_traits>

#include "kvcore/comm.h"
#include "kvcore/error.h"
#include "nccl_api.h"

namespace kvcore::comm {
namespace nccl {
namespace {

struct Loaded {
  Api api;
  bool ok = false;
  std::string reason;
};

const Loaded& loaded() {
  static Loaded state;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* err = dlerror();
      state.reason = std::string("libnccl.so.2 could not be loaded: ") + (err ? err : "unknown error");
      return;
    }
    Api& a = state.api;
    std::string missing;
    auto resolve = [&](auto& fn, const char* symbol, bool required) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
      if (!fn && required) missing += (missing.empty() ? "" : ", ") + std::string(symbol);
    };
    // The entry points the nccl link uses.
    resolve(a.GetVersion, "ncclGetVersion", true);
    resolve(a.GetUniqueId, "ncclGetUniqueId", true);
    resolve(a.CommInitRankConfig, "ncclCommInitRankConfig", true);  // NCCL 2.14+
    resolve(a.CommDestroy, "ncclCommDestroy", true);
    resolve(a.CommAbort, "ncclCommAbort", true);
    resolve(a.CommGetAsyncError, "ncclCommGetAsyncError", true);
    resolve(a.GroupStart, "ncclGroupStart", true);
    resolve(a.GroupEnd, "ncclGroupEnd", true);
    resolve(a.Send, "ncclSend", true);
    resolve(a.Recv, "ncclRecv", true);
    resolve(a.GetErrorString, "ncclGetErrorString", true);
    resolve(a.GetLastError, "ncclGetLastError", false);
    if (!missing.empty()) {
      state.reason = "libnccl.so.2 lacks " + missing;
      return;
    }
    int version = 0;
    a.GetVersion(&version);
    const int major = version >= 10000 ? version / 10000 : version / 1000;
    const int minor = version >= 10000 ? version / 100 % 100 : version / 100 % 10;
    state.ok = true;
    state.reason = "NCCL " + std::to_string(major) + "." + std::to_string(minor) + "." +
                   std::to_string(version % 100) + " loaded";
  });
  return state;
}

}  // namespace

const Api& api() {
  const Loaded& l = loaded();
  KVCORE_CHECK(l.ok, "NCCL is unavailable: ", l.reason);
  return l.api;
}

void check(Result result, const char* what, Comm comm) {
  if (result == kSuccess) return;
  const Api& a = api();
  const char* text = a.GetErrorString(result);
  const char* detail = a.GetLastError ? a.GetLastError(comm) : nullptr;
  KVCORE_THROW(ErrorKind::Runtime, what, " failed: ", text ? text : "unknown NCCL error", " (ncclResult_t ", result,
               ")", detail && *detail ? std::string(": ") + detail : std::string());
}

}  // namespace nccl

std::pair<bool, std::string> nccl_status() {
  const auto& l = nccl::loaded();
  return {l.ok, l.reason};
}

std::string nccl_unique_id() {
  nccl::UniqueId id{};
  nccl::check(nccl::api().GetUniqueId(&id), "ncclGetUniqueId");
  return std::string(id.internal, sizeof(id.internal));
}

}  // namespace kvcore::comm
