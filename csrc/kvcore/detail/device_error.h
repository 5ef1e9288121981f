// Debug-mode error reporting from CUDA kernels: the first bad index a kernel meets is recorded in
// a small device-side struct, which the host reads after the op (only when debug checks are on).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KVCORE_HD __host__ __device__ __forceinline__
#else
#define KVCORE_HD inline
#endif

namespace kvcore {

struct DeviceErrorReport {
  int flag;          // 0 = clean, 1 = an error was recorded
  int arg;           // index into the op's argument-name list
  long long position;
  long long value;
  long long limit;   // valid values are in [0, limit)
};

#if defined(__CUDACC__)
__device__ __forceinline__ void report_index_error(DeviceErrorReport* report, int arg, long long position,
                                                   long long value, long long limit) {
  if (report && atomicCAS(&report->flag, 0, 1) == 0) {
    report->arg = arg;
    report->position = position;
    report->value = value;
    report->limit = limit;
  }
}
#endif

}  // namespace kvcore
