// CUDA backend of the INT4 family. append_kv_int4 is one fused pass: a warp takes one (token, head)
// row of K or V, holds D/32 values per lane, rotates them with in-register and warp-shuffle
// butterflies (the same operations in the same order as the CPU, so codes are bit-identical),
// finds min/max with warp reductions, quantizes, packs and stores; nothing intermediate touches
// device memory. hadamard_transform and dequantize_kv_int4 (test/debug ops) run one thread per row
// on the shared host/device functions.
#include <type_traits>

#include "../common/device.cuh"

#include "int4_warp.cuh"
#include "kvcore/cuda_utils.h"
#include "kvcore/detail/int4.h"
#include "kvcore/detail/paged.h"
#include "kvcore/quant.h"

namespace kvcore {
namespace {

constexpr int kWarpsPerBlock = 4;
// Rows of the one-thread-per-row kernels live in local memory, which the driver reserves for every
// resident thread of the GPU (at 2 KiB per thread, ~550 MB on an H200): bounded by the largest head dim
// attention accepts, and instantiated per bound so a small head dim reserves little.
constexpr int kMaxGenericDim = 256;

// Calls f(std::integral_constant<int, Bound>) with the smallest row bound (64, 128 or 256) >= d.
template <class F>
void with_row_bound(int64_t d, const char* op, F&& f) {
  KVCORE_CHECK_VALUE(d <= kMaxGenericDim, op, ": CUDA supports head_dim up to ", kMaxGenericDim, ", got ", d);
  if (d <= 64) f(std::integral_constant<int, 64>());
  else if (d <= 128) f(std::integral_constant<int, 128>());
  else f(std::integral_constant<int, 256>());
}

__device__ __forceinline__ float load_value(const void* base, int64_t i, DType dtype) {
  if (dtype == DType::Float32) return static_cast<const float*>(base)[i];
  return half_to_float(static_cast<const uint16_t*>(base)[i], dtype == DType::BFloat16);
}

// Grid-stride over (token, head, K or V) rows; one warp per row.
template <int N>
__global__ void append_kv_int4_kernel(AppendKVInt4Args a, DeviceErrorReport* report) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = a.tokens * a.heads * 2;
  const int64_t capacity = a.num_pages * a.page_size;
  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; row < rows;
       row += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t t = row / (a.heads * 2), h = (row / 2) % a.heads;
    const bool is_v = row & 1;
    const int64_t slot = load_index(a.slot_mapping.data, a.slot_mapping.is_int64, a.slot_mapping.stride, t);
    if (slot < 0) continue;
    if (slot >= capacity) {
      if (lane == 0 && !is_v && h == 0) report_index_error(report, 0, t, slot, capacity);
      continue;
    }
    const void* src = is_v ? a.v : a.k;
    const int64_t src_off = t * (is_v ? a.v_token_stride : a.k_token_stride) + h * (is_v ? a.v_head_stride : a.k_head_stride);
    float x[N];
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = load_value(src, src_off + lane * N + i, a.dtype);
    warp_rotate<N>(x, lane, a.rot.block, a.rot.signs, false);
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) {
      lo = fminf(lo, x[i]);
      hi = fmaxf(hi, x[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    const Int4Params prm = int4_params(lo, hi);
    const float scale = fp16_to_float(prm.scale), min = fp16_to_float(prm.min);
    const Int4Cache& cache = is_v ? a.v_cache : a.k_cache;
    const int64_t page = slot / a.page_size, in_page = slot % a.page_size;
    uint8_t* codes = cache.codes + page * cache.codes_page_stride + (in_page * a.heads + h) * (32 * N / 2) + lane * (N / 2);
#pragma unroll
    for (int i = 0; i < N; i += 2) codes[i / 2] = pack_codes(int4_code(x[i], scale, min), int4_code(x[i + 1], scale, min));
    if (lane == 0) {
      uint16_t* params = cache.params + page * cache.params_page_stride + (in_page * a.heads + h) * 2;
      params[0] = prm.scale;
      params[1] = prm.min;
    }
  }
}

// Any even head_dim up to MaxD: one thread per row, the CPU's own functions.
template <int MaxD>
__global__ void append_kv_int4_generic_kernel(AppendKVInt4Args a, DeviceErrorReport* report) {
  const int64_t rows = a.tokens * a.heads * 2;
  const int64_t capacity = a.num_pages * a.page_size;
  const int d = int(a.head_dim);
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < rows; row += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = row / (a.heads * 2), h = (row / 2) % a.heads;
    const bool is_v = row & 1;
    const int64_t slot = load_index(a.slot_mapping.data, a.slot_mapping.is_int64, a.slot_mapping.stride, t);
    if (slot < 0) continue;
    if (slot >= capacity) {
      if (!is_v && h == 0) report_index_error(report, 0, t, slot, capacity);
      continue;
    }
    const void* src = is_v ? a.v : a.k;
    const int64_t src_off = t * (is_v ? a.v_token_stride : a.k_token_stride) + h * (is_v ? a.v_head_stride : a.k_head_stride);
    float x[MaxD];
    for (int i = 0; i < d; ++i) x[i] = load_value(src, src_off + i, a.dtype);
    rotate_row(x, d, a.rot.block, a.rot.signs);
    const Int4Cache& cache = is_v ? a.v_cache : a.k_cache;
    const int64_t page = slot / a.page_size, in_page = slot % a.page_size;
    quantize_rotated_row(x, d, cache.codes + page * cache.codes_page_stride + (in_page * a.heads + h) * (d / 2),
                         cache.params + page * cache.params_page_stride + (in_page * a.heads + h) * 2);
  }
}

template <int MaxD>
__global__ void hadamard_kernel(HadamardArgs a) {
  const int d = int(a.head_dim);
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.rows; r += int64_t(gridDim.x) * blockDim.x) {
    float x[MaxD];
    for (int i = 0; i < d; ++i) x[i] = load_value(a.x, r * a.x_row_stride + i, a.dtype);
    if (a.inverse) unrotate_row(x, d, a.rot.block, a.rot.signs);
    else rotate_row(x, d, a.rot.block, a.rot.signs);
    for (int i = 0; i < d; ++i) {
      const int64_t o = r * a.out_row_stride + i;
      if (a.dtype == DType::Float32) static_cast<float*>(a.out)[o] = x[i];
      else static_cast<uint16_t*>(a.out)[o] = float_to_half(x[i], a.dtype == DType::BFloat16);
    }
  }
}

template <int MaxD>
__global__ void dequantize_kernel(DequantizeInt4Args a) {
  const int d = int(a.head_dim);
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.rows; r += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t* codes = a.codes + r * (d / 2);
    const float scale = fp16_to_float(a.params[r * 2]), min = fp16_to_float(a.params[r * 2 + 1]);
    float x[MaxD];
    for (int i = 0; i < d; ++i) x[i] = dequant_value(code_at(codes, i), scale, min);
    unrotate_row(x, d, a.rot.block, a.rot.signs);
    for (int i = 0; i < d; ++i) a.out[r * d + i] = x[i];
  }
}

unsigned grid_for(int64_t items, int per_block) {
  return unsigned(std::min<int64_t>((items + per_block - 1) / per_block, 65535 * 32));
}

}  // namespace

void hadamard_transform_cuda(const HadamardArgs& a, StreamHandle stream) {
  require_cuda("hadamard_transform");
  if (a.rows == 0) return;
  CudaDeviceGuard guard(a.device.index);
  with_row_bound(a.head_dim, "hadamard_transform", [&](auto bound) {
    launch_kernel(hadamard_kernel<bound()>, grid_for(a.rows, 128), 128, 0, to_cuda_stream(stream), a);
  });
  KVCORE_CUDA_CHECK_LAUNCH();
}

void append_kv_int4_cuda(const AppendKVInt4Args& a, StreamHandle stream_handle) {
  require_cuda("append_kv_int4");
  if (a.tokens == 0) return;
  CudaDeviceGuard guard(a.device.index);
  cudaStream_t stream = to_cuda_stream(stream_handle);
  DeviceErrorReport* report = device_error_report();
  const int64_t rows = a.tokens * a.heads * 2;
  const unsigned warp_grid = grid_for(rows, kWarpsPerBlock);
  switch (a.head_dim) {
    case 64: launch_kernel(append_kv_int4_kernel<2>, warp_grid, 32 * kWarpsPerBlock, 0, stream, a, report); break;
    case 128: launch_kernel(append_kv_int4_kernel<4>, warp_grid, 32 * kWarpsPerBlock, 0, stream, a, report); break;
    case 256: launch_kernel(append_kv_int4_kernel<8>, warp_grid, 32 * kWarpsPerBlock, 0, stream, a, report); break;
    default:
      with_row_bound(a.head_dim, "append_kv_int4", [&](auto bound) {
        launch_kernel(append_kv_int4_generic_kernel<bound()>, grid_for(rows, 128), 128, 0, stream, a, report);
      });
  }
  KVCORE_CUDA_CHECK_LAUNCH();
  raise_device_errors(stream, "append_kv_int4", {"slot_mapping"});
}

void dequantize_kv_int4_cuda(const DequantizeInt4Args& a, StreamHandle stream) {
  require_cuda("dequantize_kv_int4");
  if (a.rows == 0) return;
  CudaDeviceGuard guard(a.device.index);
  with_row_bound(a.head_dim, "dequantize_kv_int4", [&](auto bound) {
    launch_kernel(dequantize_kernel<bound()>, grid_for(a.rows, 128), 128, 0, to_cuda_stream(stream), a);
  });
  KVCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace kvcore
