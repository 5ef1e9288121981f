// The block-diagonal Hadamard rotation of INT4 KV on the device, two ways; both do exactly the
// additions of hadamard_block (detail/int4.h) in the same order, so results equal the CPU's:
// - warp_rotate: a row of D = 32 N values in registers, lane l holding elements [l N, (l + 1) N);
//   stages below N run in registers, the others through shuffles.
// - rotate_rows: a warp's rows of any D in shared memory.
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

// In-place normalized block Hadamard rotation of a warp's rows of D floats in shared memory (the
// butterflies of hadamard_block in the same order, so the result equals the CPU's rotate_row /
// unrotate_row). Any D that the block divides.
template <int D>
__device__ void rotate_rows(float* rows, int nrows, int lane, int block, const float* signs, bool inverse) {
  const int n = nrows * D;
  if (signs && !inverse)
    for (int i = lane; i < n; i += 32) rows[i] *= signs[i % D];
  __syncwarp();
  for (int h = 1; h < block; h <<= 1) {
    for (int p = lane; p < n / 2; p += 32) {
      const int i = (p / h) * 2 * h + p % h;  // pairs never straddle rows: h < block divides D
      const float a = rows[i], b = rows[i + h];
      rows[i] = a + b;
      rows[i + h] = a - b;
    }
    __syncwarp();
  }
  const float norm = 1.0f / sqrtf(float(block));
  for (int i = lane; i < n; i += 32) {
    float x = rows[i] * norm;
    if (signs && inverse) x *= signs[i % D];
    rows[i] = x;
  }
  __syncwarp();
}

}  // namespace kvcore
