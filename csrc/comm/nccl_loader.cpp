// The nccl link's library: libnccl.so.2 is loaded at run time (never linked), so the extension
// imports everywhere and the link reports why it is unavailable.
#include <dlfcn.h>

#include <mutex>

#include "kvcore/comm.h"

namespace kvcore::comm {

std::pair<bool, std::string> nccl_status() {
  static std::once_flag once;
  static std::pair<bool, std::string> status;
  std::call_once(once, [] {
    void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* err = dlerror();
      status = {false, std::string("libnccl.so.2 could not be loaded: ") + (err ? err : "unknown error")};
      return;
    }
    // The entry points a communicator over NCCL needs.
    for (const char* symbol : {"ncclGetVersion", "ncclGetUniqueId", "ncclCommInitRank", "ncclCommDestroy",
                               "ncclAllReduce", "ncclAllGather", "ncclReduceScatter"}) {
      if (!dlsym(lib, symbol)) {
        status = {false, std::string("libnccl.so.2 lacks ") + symbol};
        return;
      }
    }
    using GetVersion = int (*)(int*);
    int version = 0;
    reinterpret_cast<GetVersion>(dlsym(lib, "ncclGetVersion"))(&version);
    const int major = version >= 10000 ? version / 10000 : version / 1000;
    const int minor = version >= 10000 ? version / 100 % 100 : version / 100 % 10;
    status = {true, "NCCL " + std::to_string(major) + "." + std::to_string(minor) + "." +
                        std::to_string(version % 100) + " loaded"};
  });
  return status;
}

}  // namespace kvcore::comm
