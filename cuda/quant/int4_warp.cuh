// Warp-cooperative block-diagonal Hadamard rotation: a row of D = 32 N values, lane l holding
// elements [l N, (l + 1) N). Stages below N run in registers, the others through shuffles; every
// element sees exactly the additions of hadamard_block (detail/int4.h), in the same order.
#pragma once

#include <cmath>

#include "../common/device.cuh"

namespace kvcore {

template <int N>
__device__ __forceinline__ void warp_rotate(float (&x)[N], int lane, int block, const float* signs, bool inverse) {
  if (signs && !inverse) {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] *= signs[lane * N + i];
  }
#pragma unroll
  for (int h = 1; h < N; h <<= 1) {
    if (h >= block) break;
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (!(i & h)) {
        const float a = x[i], b = x[i + h];
        x[i] = a + b;
        x[i + h] = a - b;
      }
  }
  for (int h = N; h < block; h <<= 1) {
    const int lane_mask = h / N;
    const bool upper = lane & lane_mask;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float partner = __shfl_xor_sync(0xffffffffu, x[i], lane_mask);
      x[i] = upper ? partner - x[i] : x[i] + partner;
    }
  }
  const float norm = 1.0f / sqrtf(float(block));
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] *= norm;
  if (signs && inverse) {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] *= signs[lane * N + i];
  }
}

}  // namespace kvcore
