// The CUDA driver API, resolved at run time through cudaGetDriverEntryPointByVersion into one table
// of typed function pointers. kvcore never links libcuda: on a machine without a driver the table
// is simply unavailable and cuda_status() says why. Include only in CUDA builds.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <string>

namespace kvcore {

// X(name, version): PFN_<name>_v<version> from cudaTypedefs.h, requested at that ABI version.
#define KVCORE_DRIVER_REQUIRED(X)          \
  X(cuGetErrorString, 6000)                \
  X(cuGetErrorName, 6000)                  \
  X(cuDriverGetVersion, 2020)              \
  X(cuDeviceGet, 2000)                     \
  X(cuCtxGetCurrent, 4000)                 \
  X(cuMemAddressReserve, 10020)            \
  X(cuMemAddressFree, 10020)               \
  X(cuMemCreate, 10020)                    \
  X(cuMemRelease, 10020)                   \
  X(cuMemMap, 10020)                       \
  X(cuMemUnmap, 10020)                     \
  X(cuMemSetAccess, 10020)                 \
  X(cuMemGetAllocationGranularity, 10020)

// Entries later features use when present; a null pointer means the driver lacks them.
#define KVCORE_DRIVER_OPTIONAL(X)          \
  X(cuMemGetAccess, 10020)                 \
  X(cuMemRetainAllocationHandle, 11000)    \
  X(cuMemExportToShareableHandle, 10020)   \
  X(cuMemImportFromShareableHandle, 10020) \
  X(cuMemGetAllocationPropertiesFromHandle, 10020)

struct DriverApi {
#define KVCORE_DRIVER_FIELD(name, version) PFN_##name##_v##version name = nullptr;
  KVCORE_DRIVER_REQUIRED(KVCORE_DRIVER_FIELD)
  KVCORE_DRIVER_OPTIONAL(KVCORE_DRIVER_FIELD)
#undef KVCORE_DRIVER_FIELD
  bool complete = false;      // every required entry resolved
  std::string missing;        // names of required entries that did not resolve
};

// Resolves the table once (thread-safe) and returns it; never throws. Check `complete`.
const DriverApi& driver_api();
// Like driver_api() but throws KVCoreError naming the missing entries.
const DriverApi& require_driver_api();

// "CUDA_ERROR_OUT_OF_MEMORY (out of memory)" for a driver result.
std::string driver_error_string(CUresult result);

}  // namespace kvcore

// Checks a driver call made through the table; out-of-memory becomes MemoryError.
#define KVCORE_CU_CHECK(expr)                                                                  \
  do {                                                                                         \
    CUresult kvcore_cu_result_ = (expr);                                                       \
    if (kvcore_cu_result_ != CUDA_SUCCESS)                                                     \
      KVCORE_THROW(kvcore_cu_result_ == CUDA_ERROR_OUT_OF_MEMORY ? ::kvcore::ErrorKind::Memory \
                                                                 : ::kvcore::ErrorKind::Runtime, \
                   #expr " failed: ", ::kvcore::driver_error_string(kvcore_cu_result_));       \
  } while (0)
