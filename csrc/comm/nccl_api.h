// The few NCCL declarations the nccl link uses, written out here so the build never needs nccl.h:
// libnccl.so.2 is loaded at run time (never linked). Types match NCCL's C ABI.
#pragma once

#include <string>

namespace kvcore::comm::nccl {

using Result = int;                 // ncclResult_t
using Comm = struct ncclComm*;      // ncclComm_t, opaque
using Stream = void*;               // cudaStream_t
struct UniqueId {                   // ncclUniqueId
  char internal[128];
};
constexpr Result kSuccess = 0;      // ncclSuccess
constexpr Result kInProgress = 7;   // ncclInProgress: a non-blocking communicator is still working
constexpr int kUint8 = 1;           // ncclUint8: exchanges move raw bytes

// ncclConfig_t as of NCCL 2.17 (NCCL reads `size` and `version` and defaults the fields a caller's
// older layout lacks); fields left at kConfigUndefInt keep NCCL's defaults.
constexpr int kConfigUndefInt = -2147483647 - 1;  // NCCL_CONFIG_UNDEF_INT (INT_MIN)
struct Config {
  size_t size = sizeof(Config);
  unsigned int magic = 0xcafebeef;
  unsigned int version = 21700;  // NCCL_VERSION(2, 17, 0)
  int blocking = kConfigUndefInt;
  int cga_cluster_size = kConfigUndefInt;
  int min_ctas = kConfigUndefInt;
  int max_ctas = kConfigUndefInt;
  const char* net_name = nullptr;
  int split_share = kConfigUndefInt;
};

struct Api {
  Result (*GetVersion)(int* version) = nullptr;
  Result (*GetUniqueId)(UniqueId* id) = nullptr;
  Result (*CommInitRankConfig)(Comm* comm, int nranks, UniqueId id, int rank, Config* config) = nullptr;
  Result (*CommDestroy)(Comm comm) = nullptr;
  Result (*CommAbort)(Comm comm) = nullptr;
  Result (*CommGetAsyncError)(Comm comm, Result* async_error) = nullptr;
  Result (*GroupStart)() = nullptr;
  Result (*GroupEnd)() = nullptr;
  Result (*Send)(const void* buf, size_t count, int datatype, int peer, Comm comm, Stream stream) = nullptr;
  Result (*Recv)(void* buf, size_t count, int datatype, int peer, Comm comm, Stream stream) = nullptr;
  const char* (*GetErrorString)(Result result) = nullptr;
  const char* (*GetLastError)(Comm comm) = nullptr;  // optional (NCCL 2.13+): the detail behind an error
};

// The loaded entry points; KVCoreError with nccl_status()'s reason when NCCL is unavailable.
const Api& api();

// Throws KVCoreError "<what> failed: <NCCL's error string>" (plus NCCL's last-error detail) unless
// `result` is success.
void check(Result result, const char* what, Comm comm = nullptr);

}  // namespace kvcore::comm::nccl
