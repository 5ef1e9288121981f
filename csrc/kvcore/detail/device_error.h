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
  long long low;     // valid values are in [low, limit)
  long long limit;
};

#if defined(__CUDACC__)
__device__ __forceinline__ void report_range_error(DeviceErrorReport* report, int arg, long long position,
                                                   long long value, long long low, long long limit) {
  if (report && atomicCAS(&report->flag, 0, 1) == 0) {
    report->arg = arg;
    report->position = position;
    report->value = value;
    report->low = low;
    report->limit = limit;
  }
}
__device__ __forceinline__ void report_index_error(DeviceErrorReport* report, int arg, long long position,
                                                   long long value, long long limit) {
  report_range_error(report, arg, position, value, 0, limit);
}
// In debug mode, kernels after a failed metadata check skip their work (it would read out of bounds).
__device__ __forceinline__ bool report_failed(const DeviceErrorReport* report) {
  return report && *static_cast<const volatile int*>(&report->flag);
}
#endif

}  // namespace kvcore
