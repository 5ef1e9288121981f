// bfloat16 for the SIMT harness: storage type and conversion intrinsics. float -> bfloat16 rounds to
// nearest even through double arithmetic on the exact value (independent of kvcore's bit trick).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{uint16_t((u >> 16) | 0x40u)};
  // The two bfloat16 neighbours of f (truncation and one ulp away from zero) and a tie-break on the
  // even one, compared as exact doubles.
  const uint16_t lo = uint16_t(u >> 16), hi = uint16_t(lo + 1);
  const float flo = __bfloat162float(__nv_bfloat16{lo});
  const float fhi = __bfloat162float(__nv_bfloat16{hi});
  if (std::isinf(flo) || (u & 0xffffu) == 0) return __nv_bfloat16{lo};
  // Past the largest finite value the upper neighbour is 2^128 (which rounds to infinity).
  const double dhi = std::isinf(fhi) ? std::copysign(std::ldexp(1.0, 128), double(f)) : double(fhi);
  const double dl = std::fabs(double(f) - double(flo)), dh = std::fabs(dhi - double(f));
  if (dl < dh || (dl == dh && (lo & 1u) == 0)) return __nv_bfloat16{lo};
  return __nv_bfloat16{hi};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
