// float16 for the SIMT harness: storage type and the conversion intrinsics kernels use, computed by
// the host compiler's _Float16 (IEEE binary16, round to nearest even), independent of kvcore's own
// conversions in csrc/kvcore/detail/float16.h.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return float(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
