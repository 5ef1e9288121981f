// INT4 KV cache: block-diagonal Hadamard rotation + per-(token, head) asymmetric INT4, fused into
// the paged write; dequantization for tests and debugging. Formats and math: detail/int4.h.
// Attention reads INT4 pages through PagedKV's int4 fields (attention.h).
#pragma once

#include <cstdint>

#include "kvcore/kv_cache.h"
#include "kvcore/runtime.h"
#include "kvcore/tensor.h"

namespace kvcore {

// The rotation applied to every head vector of a layer's K and V.
struct Rotation {
  int block = 0;                 // Hadamard block size b (a power of two dividing head_dim)
  const float* signs = nullptr;  // [head_dim] of +1/-1, or nullptr
};

// One INT4 page cache (K or V): codes uint8 [num_pages, page_size, H, D/2] and params float16
// [num_pages, page_size, H, 2] = (scale, min), inner three dims contiguous, any page stride.
struct Int4Cache {
  uint8_t* codes = nullptr;
  uint16_t* params = nullptr;
  int64_t codes_page_stride = 0;   // bytes
  int64_t params_page_stride = 0;  // float16 elements
};

struct HadamardArgs {
  const void* x = nullptr;  // [rows, D], last dim contiguous
  void* out = nullptr;      // [rows, D], last dim contiguous; may alias x
  int64_t rows = 0, head_dim = 0, x_row_stride = 0, out_row_stride = 0;
  DType dtype = DType::Float32;  // of x and out: float32, bfloat16 or float16
  Rotation rot;
  bool inverse = false;
  Device device;
};

struct AppendKVInt4Args {
  const void* k = nullptr;  // [tokens, H, D], last dim contiguous
  const void* v = nullptr;
  int64_t k_token_stride = 0, k_head_stride = 0, v_token_stride = 0, v_head_stride = 0;
  DType dtype = DType::BFloat16;  // of k and v: bfloat16, float16 or float32
  Int4Cache k_cache, v_cache;
  IndexArray slot_mapping;  // [tokens]; negative = skip
  int64_t tokens = 0, heads = 0, head_dim = 0, num_pages = 0, page_size = 0;
  Rotation rot;
  Device device;
};

struct DequantizeInt4Args {
  const uint8_t* codes = nullptr;   // [rows, D/2] (rows = flattened leading dims, contiguous)
  const uint16_t* params = nullptr; // [rows, 2]
  float* out = nullptr;             // [rows, D] float32
  int64_t rows = 0, head_dim = 0;
  Rotation rot;
  Device device;
};

// Checks block (default min(D, 128) when 0) and signs ([D] float32 on the device; on the CPU every
// entry must be +1 or -1); returns the rotation.
Rotation make_rotation(int64_t head_dim, int64_t block, const TensorView& signs, const Device& device);
Int4Cache make_int4_cache(const TensorView& codes, const TensorView& params, int64_t num_pages, int64_t page_size,
                          int64_t heads, int64_t head_dim);

HadamardArgs make_hadamard_args(const TensorView& x, const TensorView& out, int64_t block, const TensorView& signs,
                                bool inverse);
AppendKVInt4Args make_append_kv_int4_args(const TensorView& k, const TensorView& v, const TensorView& k_codes,
                                          const TensorView& k_params, const TensorView& v_codes,
                                          const TensorView& v_params, const TensorView& slot_mapping, int64_t block,
                                          const TensorView& signs);
DequantizeInt4Args make_dequantize_int4_args(const TensorView& codes, const TensorView& params, const TensorView& out,
                                             int64_t block, const TensorView& signs);

void hadamard_transform_cpu(const HadamardArgs& args);
void append_kv_int4_cpu(const AppendKVInt4Args& args);  // validates every slot first
void dequantize_kv_int4_cpu(const DequantizeInt4Args& args);

void hadamard_transform_cuda(const HadamardArgs& args, StreamHandle stream);
void append_kv_int4_cuda(const AppendKVInt4Args& args, StreamHandle stream);
void dequantize_kv_int4_cuda(const DequantizeInt4Args& args, StreamHandle stream);

}  // namespace kvcore
