// CPU backend of the INT4 family.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kvcore/detail/int4.h"
#include "kvcore/detail/paged.h"
#include "kvcore/error.h"
#include "kvcore/parallel.h"
#include "kvcore/quant.h"

namespace kvcore {
namespace {

float load_value(const void* base, int64_t i, DType dtype) {
  if (dtype == DType::Float32) return static_cast<const float*>(base)[i];
  return half_to_float(static_cast<const uint16_t*>(base)[i], dtype == DType::BFloat16);
}

// Rotates, quantizes and stores one (token, head) row into its slot.
void quantize_row(const void* src, int64_t src_offset, DType dtype, int64_t d, const Rotation& rot,
                  const Int4Cache& cache, int64_t slot, int64_t page_size, int64_t heads, int64_t head, float* work) {
  for (int64_t i = 0; i < d; ++i) work[i] = load_value(src, src_offset + i, dtype);
  rotate_row(work, int(d), rot.block, rot.signs);
  const int64_t page = slot / page_size, in_page = slot % page_size;
  quantize_rotated_row(work, int(d), cache.codes + page * cache.codes_page_stride + (in_page * heads + head) * (d / 2),
                       cache.params + page * cache.params_page_stride + (in_page * heads + head) * 2);
}

}  // namespace

void hadamard_transform_cpu(const HadamardArgs& a) {
  parallel_for(a.rows, std::max<int64_t>(1, 4096 / a.head_dim), [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(a.head_dim));
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < a.head_dim; ++i) row[size_t(i)] = load_value(a.x, r * a.x_row_stride + i, a.dtype);
      if (a.inverse) unrotate_row(row.data(), int(a.head_dim), a.rot.block, a.rot.signs);
      else rotate_row(row.data(), int(a.head_dim), a.rot.block, a.rot.signs);
      for (int64_t i = 0; i < a.head_dim; ++i) {
        const int64_t o = r * a.out_row_stride + i;
        if (a.dtype == DType::Float32) static_cast<float*>(a.out)[o] = row[size_t(i)];
        else static_cast<uint16_t*>(a.out)[o] = float_to_half(row[size_t(i)], a.dtype == DType::BFloat16);
      }
    }
  });
}

void append_kv_int4_cpu(const AppendKVInt4Args& a) {
  const int64_t capacity = a.num_pages * a.page_size;
  const IndexArray& sm = a.slot_mapping;
  for (int64_t t = 0; t < a.tokens; ++t) {  // validate everything before writing anything
    const int64_t slot = load_index(sm.data, sm.is_int64, sm.stride, t);
    KVCORE_CHECK_INDEX(slot < capacity, "append_kv_int4: slot_mapping[", t, "] = ", slot,
                       " is out of range for a cache of ", a.num_pages, " pages x ", a.page_size, " tokens (",
                       capacity, " slots)");
  }
  parallel_for(a.tokens, std::max<int64_t>(1, 64 / a.heads), [&](int64_t begin, int64_t end) {
    std::vector<float> work(static_cast<size_t>(a.head_dim));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = load_index(sm.data, sm.is_int64, sm.stride, t);
      if (slot < 0) continue;
      for (int64_t h = 0; h < a.heads; ++h) {
        quantize_row(a.k, t * a.k_token_stride + h * a.k_head_stride, a.dtype, a.head_dim, a.rot, a.k_cache, slot,
                     a.page_size, a.heads, h, work.data());
        quantize_row(a.v, t * a.v_token_stride + h * a.v_head_stride, a.dtype, a.head_dim, a.rot, a.v_cache, slot,
                     a.page_size, a.heads, h, work.data());
      }
    }
  });
}

void dequantize_kv_int4_cpu(const DequantizeInt4Args& a) {
  parallel_for(a.rows, std::max<int64_t>(1, 4096 / a.head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* codes = a.codes + r * (a.head_dim / 2);
      const float scale = fp16_to_float(a.params[r * 2]), min = fp16_to_float(a.params[r * 2 + 1]);
      float* out = a.out + r * a.head_dim;
      for (int64_t i = 0; i < a.head_dim; ++i) out[i] = dequant_value(code_at(codes, int(i)), scale, min);
      unrotate_row(out, int(a.head_dim), a.rot.block, a.rot.signs);
    }
  });
}

}  // namespace kvcore
