// INT4 KV math shared by the CPU and CUDA backends: the normalized block-diagonal Hadamard
// rotation (with optional fixed signs) and per-(token, head) asymmetric INT4 quantization.
//
// Rotation of a head vector x[D] with block size b (a power of two dividing D): each block of b
// elements is multiplied by the normalized Hadamard matrix H_b / sqrt(b) (Sylvester order), after
// the elementwise signs s (+1/-1) when given: y = H (s * x). The inverse is x = s * (H y), since the
// normalized H is symmetric and orthogonal. The butterflies run in a fixed order, so CPU and CUDA
// produce bit-identical rotations, codes and parameters.
//
// Quantization of a rotated row y[D]: min = fp16(min y), scale = fp16((max y - min y) / 15), and
// code_i = clamp(rint((y_i - min) / scale), 0, 15) (all zero when scale is 0); y_i ~= code_i * scale
// + min. Codes are packed two per byte: element 2i in the low nibble of byte i, element 2i+1 in the
// high nibble.
#pragma once

#include <cmath>
#include <cstdint>

#include "kvcore/detail/device_error.h"  // KVCORE_HD
#include "kvcore/detail/float16.h"

namespace kvcore {

// In-place normalized Hadamard transform of one block of n values (n a power of two).
KVCORE_HD void hadamard_block(float* x, int n) {
  for (int h = 1; h < n; h <<= 1)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const float norm = 1.0f / sqrtf(float(n));
  for (int i = 0; i < n; ++i) x[i] *= norm;
}

// Forward rotation y = H (s * x) of a row of d values, in place; signs may be null.
KVCORE_HD void rotate_row(float* x, int d, int block, const float* signs) {
  if (signs)
    for (int i = 0; i < d; ++i) x[i] *= signs[i];
  for (int i = 0; i < d; i += block) hadamard_block(x + i, block);
}

// Inverse rotation x = s * (H y), in place.
KVCORE_HD void unrotate_row(float* y, int d, int block, const float* signs) {
  for (int i = 0; i < d; i += block) hadamard_block(y + i, block);
  if (signs)
    for (int i = 0; i < d; ++i) y[i] *= signs[i];
}

struct Int4Params {
  uint16_t scale;  // float16 bits
  uint16_t min;    // float16 bits
};

// Parameters of a row with extremes lo <= hi, rounded to float16 as stored.
KVCORE_HD Int4Params int4_params(float lo, float hi) {
  lo += 0.0f;  // -0 becomes +0: min/max reductions may pick either zero, the stored bits must not differ
  hi += 0.0f;
  return {float_to_fp16((hi - lo) / 15.0f), float_to_fp16(lo)};
}

// The code of one rotated value, from the stored (float16-rounded) parameters.
KVCORE_HD int int4_code(float y, float scale, float min) {
  if (!(scale > 0.f)) return 0;
  const float c = rintf((y - min) / scale);
  return c < 0.f ? 0 : (c > 15.f ? 15 : int(c));
}

KVCORE_HD uint8_t pack_codes(int even, int odd) { return uint8_t(even | (odd << 4)); }
KVCORE_HD int code_at(const uint8_t* row, int i) { return (row[i >> 1] >> ((i & 1) * 4)) & 0xf; }

// code * scale + min, rounded the same way on host and device (no fused multiply-add).
KVCORE_HD float dequant_value(int code, float scale, float min) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(float(code), scale), min);
#else
  return float(code) * scale + min;  // host code is built with -ffp-contract=off
#endif
}

// Quantizes one rotated row y[d] into packed codes [d/2] and params (scale, min) as float16 bits.
KVCORE_HD void quantize_rotated_row(const float* y, int d, uint8_t* codes, uint16_t* params) {
  float lo = y[0], hi = y[0];
  for (int i = 1; i < d; ++i) {
    lo = y[i] < lo ? y[i] : lo;
    hi = y[i] > hi ? y[i] : hi;
  }
  const Int4Params prm = int4_params(lo, hi);
  const float scale = fp16_to_float(prm.scale), min = fp16_to_float(prm.min);
  for (int i = 0; i < d; i += 2) codes[i / 2] = pack_codes(int4_code(y[i], scale, min), int4_code(y[i + 1], scale, min));
  params[0] = prm.scale;
  params[1] = prm.min;
}

}  // namespace kvcore
