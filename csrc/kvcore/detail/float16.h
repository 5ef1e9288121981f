// bfloat16 / float16 <-> float conversions, round-to-nearest-even, bit-identical on host and device
// (the device path uses the CUDA intrinsics, which round the same way).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "kvcore/detail/device_error.h"  // KVCORE_HD

namespace kvcore {

KVCORE_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

KVCORE_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

KVCORE_HD float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

KVCORE_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

KVCORE_HD float fp16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    int e = -1;  // subnormal: normalize
    do {
      ++e;
      mant <<= 1;
    } while (!(mant & 0x400u));
    return bits_to_float(sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13);
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | mant << 13);
  return bits_to_float(sign | (exp + 112) << 23 | mant << 13);
#endif
}

KVCORE_HD uint16_t float_to_fp16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (a >= 0x47800000u) return uint16_t(sign | 0x7c00u);  // >= 65536 (and inf): inf
  if (a < 0x38800000u) {                                  // below 2^-14: subnormal or zero
    if (a < 0x33000000u) return uint16_t(sign);           // below 2^-25 rounds to zero
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = (a >> 13) - (112u << 10);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is correct
  return uint16_t(sign | r);
#endif
}

// Loads/stores of 16-bit floating types by DType flag (true: bfloat16, false: float16).
KVCORE_HD float half_to_float(uint16_t v, bool is_bf16) { return is_bf16 ? bf16_to_float(v) : fp16_to_float(v); }
KVCORE_HD uint16_t float_to_half(float f, bool is_bf16) { return is_bf16 ? float_to_bf16(f) : float_to_fp16(f); }

}  // namespace kvcore
