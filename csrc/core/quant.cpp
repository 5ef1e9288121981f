// Argument validation for the INT4 family, shared by every backend.
#include "kvcore/quant.h"

#include <algorithm>

#include "kvcore/error.h"

namespace kvcore {
namespace {

bool present(const TensorView& t) { return t.data != nullptr || t.ndim > 0; }

}  // namespace

Rotation make_rotation(int64_t head_dim, int64_t block, const TensorView& signs, const Device& device) {
  // Default: min(D, 128) for power-of-two head dims; in general the largest power of two dividing D, up to 128.
  if (block == 0) block = std::min<int64_t>(head_dim & -head_dim, 128);
  KVCORE_CHECK_VALUE(block > 0 && (block & (block - 1)) == 0 && head_dim % block == 0, "block_size: ", block,
                     " must be a power of two dividing head_dim ", head_dim);
  Rotation r;
  r.block = int(block);
  if (present(signs)) {
    check_dtype(signs, {DType::Float32});
    check_ndim(signs, 1);
    check_dim(signs, 0, head_dim, "head_dim");
    check_inner_contiguous(signs, 1);
    KVCORE_CHECK_VALUE(signs.device == device, signs.name, " is on ", signs.device.str(), " but the data is on ",
                       device.str(), ": all arrays must be on the same device");
    if (!device.is_cuda())
      for (int64_t i = 0; i < head_dim; ++i) {
        const float s = signs.ptr<const float>()[i];
        KVCORE_CHECK_VALUE(s == 1.0f || s == -1.0f, signs.name, "[", i, "] = ", s, ": signs must be +1 or -1");
      }
    r.signs = signs.ptr<const float>();
  }
  return r;
}

Int4Cache make_int4_cache(const TensorView& codes, const TensorView& params, int64_t num_pages, int64_t page_size,
                          int64_t heads, int64_t head_dim) {
  check_dtype(codes, {DType::UInt8});
  check_dtype(params, {DType::Float16});
  check_ndim(codes, 4);
  check_ndim(params, 4);
  if (num_pages >= 0) {
    check_dim(codes, 0, num_pages, "num_pages");
    check_dim(codes, 1, page_size, "page_size");
  }
  check_dim(codes, 2, heads, "kv heads");
  check_dim(codes, 3, head_dim / 2, "head_dim / 2");
  for (int i = 0; i < 3; ++i) check_dim(params, i, codes.shape[i], "must match the codes");
  check_dim(params, 3, 2, "(scale, min)");
  check_inner_contiguous(codes, 3);
  check_inner_contiguous(params, 3);
  check_same_device(params, codes);
  Int4Cache c;
  c.codes = codes.ptr<uint8_t>();
  c.params = params.ptr<uint16_t>();
  c.codes_page_stride = codes.strides[0];
  c.params_page_stride = params.strides[0];
  return c;
}

HadamardArgs make_hadamard_args(const TensorView& x, const TensorView& out, int64_t block, const TensorView& signs,
                                bool inverse) {
  check_dtype(x, {DType::Float32, DType::BFloat16, DType::Float16});
  check_same_dtype(out, x);
  check_ndim(x, 2);
  check_ndim(out, 2);
  check_dim(out, 0, x.shape[0], "rows");
  check_dim(out, 1, x.shape[1], "head_dim");
  check_inner_contiguous(x, 1);
  check_inner_contiguous(out, 1);
  check_same_device(out, x);
  HadamardArgs a;
  a.x = x.data;
  a.out = out.data;
  a.rows = x.shape[0];
  a.head_dim = x.shape[1];
  a.x_row_stride = x.strides[0];
  a.out_row_stride = out.strides[0];
  a.dtype = x.dtype;
  a.rot = make_rotation(a.head_dim, block, signs, x.device);
  a.inverse = inverse;
  a.device = x.device;
  return a;
}

AppendKVInt4Args make_append_kv_int4_args(const TensorView& k, const TensorView& v, const TensorView& k_codes,
                                          const TensorView& k_params, const TensorView& v_codes,
                                          const TensorView& v_params, const TensorView& slot_mapping, int64_t block,
                                          const TensorView& signs) {
  check_dtype(k, {DType::BFloat16, DType::Float16, DType::Float32});
  check_same_dtype(v, k);
  check_ndim(k, 3);
  check_ndim(v, 3);
  const int64_t tokens = k.shape[0], heads = k.shape[1], d = k.shape[2];
  for (int i = 0; i < 3; ++i) check_dim(v, i, k.shape[i], "must match k");
  KVCORE_CHECK_VALUE(d % 2 == 0, k.name, ": head_dim ", d, " must be even for INT4 packing");
  check_inner_contiguous(k, 1);
  check_inner_contiguous(v, 1);
  check_ndim(k_codes, 4);
  AppendKVInt4Args a;
  a.num_pages = k_codes.shape[0];
  a.page_size = k_codes.shape[1];
  KVCORE_CHECK_VALUE(a.page_size > 0, k_codes.name, ": page_size must be positive");
  a.k_cache = make_int4_cache(k_codes, k_params, a.num_pages, a.page_size, heads, d);
  a.v_cache = make_int4_cache(v_codes, v_params, a.num_pages, a.page_size, heads, d);
  check_index_array(slot_mapping);
  check_dim(slot_mapping, 0, tokens, "tokens");
  for (const TensorView* t : {&v, &k_codes, &k_params, &v_codes, &v_params, &slot_mapping}) check_same_device(*t, k);
  a.k = k.data;
  a.v = v.data;
  a.k_token_stride = k.strides[0];
  a.k_head_stride = k.strides[1];
  a.v_token_stride = v.strides[0];
  a.v_head_stride = v.strides[1];
  a.dtype = k.dtype;
  a.slot_mapping = make_index_array(slot_mapping);
  a.tokens = tokens;
  a.heads = heads;
  a.head_dim = d;
  a.rot = make_rotation(d, block, signs, k.device);
  a.device = k.device;
  return a;
}

DequantizeInt4Args make_dequantize_int4_args(const TensorView& codes, const TensorView& params, const TensorView& out,
                                             int64_t block, const TensorView& signs) {
  check_dtype(codes, {DType::UInt8});
  check_dtype(params, {DType::Float16});
  check_dtype(out, {DType::Float32});
  check_ndim(codes, 2);
  check_ndim(params, 2);
  check_ndim(out, 2);
  const int64_t rows = codes.shape[0], d = codes.shape[1] * 2;
  check_dim(params, 0, rows, "rows");
  check_dim(params, 1, 2, "(scale, min)");
  check_dim(out, 0, rows, "rows");
  check_dim(out, 1, d, "head_dim");
  for (const TensorView* t : {&codes, &params, &out}) check_inner_contiguous(*t, 2);
  check_same_device(params, codes);
  check_same_device(out, codes);
  DequantizeInt4Args a;
  a.codes = codes.ptr<const uint8_t>();
  a.params = params.ptr<const uint16_t>();
  a.out = out.ptr<float>();
  a.rows = rows;
  a.head_dim = d;
  a.rot = make_rotation(d, block, signs, codes.device);
  a.device = codes.device;
  return a;
}

}  // namespace kvcore
