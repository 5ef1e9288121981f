// Argument validation for the attention family, shared by every backend.
#include <cmath>

#include "kvcore/attention.h"
#include "kvcore/error.h"
#include "kvcore/quant.h"

namespace kvcore {
namespace {

bool present(const TensorView& t) { return t.data != nullptr || t.ndim > 0; }

void check_int32_vector(const TensorView& t, int64_t size, const char* what) {
  check_dtype(t, {DType::Int32});
  check_ndim(t, 1);
  check_dim(t, 0, size, what);
  check_inner_contiguous(t, 1);
}

}  // namespace

namespace {

// Everything but the K/V arrays: q, out, lse, the metadata and the options, for a cache of
// [num_pages, page_size, hkv, D] (D taken from q).
AttentionArgs make_common(const TensorView& q, const TensorView& kv_ref, int64_t num_pages, int64_t page_size,
                          int64_t hkv, const TensorView& block_table, const TensorView& seq_lens,
                          const TensorView& cu_seqlens_q, const TensorView& out, const TensorView& lse,
                          const AttentionOptions& options, bool decode) {
  check_dtype(q, {DType::BFloat16, DType::Float16, DType::Float32});
  KVCORE_CHECK_VALUE(q.dtype != DType::Float32 || !q.device.is_cuda(), q.name,
                     ": float32 attention runs on the CPU backend; the CUDA kernels take bfloat16 or float16");
  check_ndim(q, 3);
  const int64_t total_q = q.shape[0], hq = q.shape[1], d = q.shape[2];
  // The head dims of today's models; the CUDA kernels are instantiated for 64, 128 and 256.
  KVCORE_CHECK_VALUE(d == 64 || d == 80 || d == 96 || d == 128 || d == 192 || d == 256, q.name, ": head_dim ", d,
                     " is not supported (expected 64, 80, 96, 128, 192 or 256)");
  KVCORE_CHECK_VALUE(hkv > 0 && hq % hkv == 0, q.name, ": ", hq, " query heads are not a multiple of ", hkv,
                     " kv heads");
  KVCORE_CHECK_VALUE(page_size > 0, kv_ref.name, ": page_size must be positive");
  check_inner_contiguous(q, 1);
  check_same_device(kv_ref, q);
  check_ndim(seq_lens, 1);
  const int64_t batch = seq_lens.shape[0];
  check_int32_vector(seq_lens, batch, "batch");

  AttentionArgs a;
  a.p.batch = batch;
  a.p.num_q_heads = hq;
  a.p.num_kv_heads = hkv;
  a.p.head_dim = d;
  a.p.dtype = q.dtype;
  a.p.scale = options.scale > 0 ? options.scale : 1.0f / std::sqrt(float(d));
  KVCORE_CHECK_VALUE(options.soft_cap >= 0 && std::isfinite(options.soft_cap), "soft_cap: must be >= 0, got ",
                     options.soft_cap);
  a.p.soft_cap = options.soft_cap;
  KVCORE_CHECK_VALUE(options.window >= 0, "window: must be positive (or None), got ", options.window);
  a.p.window = options.window;
  a.p.causal = decode || options.causal;

  if (present(block_table)) {
    check_dtype(block_table, {DType::Int32});
    check_ndim(block_table, 2);
    check_dim(block_table, 0, batch, "batch");
    check_inner_contiguous(block_table, 1);
    check_same_device(block_table, q);
    a.kv.block_table = block_table.ptr<const int32_t>();
    a.kv.block_table_stride = block_table.strides[0];
    a.kv.max_pages = block_table.shape[1];
  } else {
    a.kv.max_pages = 1;  // virtual layout: request b is sequence b
  }
  if (decode) {
    KVCORE_CHECK_VALUE(!present(cu_seqlens_q), "cu_seqlens_q: not used by decode");
    check_dim(q, 0, batch, "batch: one query per request");
  } else {
    check_int32_vector(cu_seqlens_q, batch + 1, "batch + 1");
    check_same_device(cu_seqlens_q, q);
    a.cu_seqlens_q = cu_seqlens_q.ptr<const int32_t>();
  }
  check_same_dtype(out, q);
  check_ndim(out, 3);
  for (int i = 0; i < 3; ++i) check_dim(out, i, q.shape[i], "must match q");
  check_inner_contiguous(out, 1);
  check_same_device(seq_lens, q);
  check_same_device(out, q);
  if (present(lse)) {
    check_dtype(lse, {DType::Float32});
    check_ndim(lse, 2);
    check_dim(lse, 0, total_q, "tokens");
    check_dim(lse, 1, hq, "query heads");
    check_inner_contiguous(lse, 1);
    check_same_device(lse, q);
    a.lse = lse.ptr<float>();
    a.lse_token_stride = lse.strides[0];
  }

  a.q = q.data;
  a.q_token_stride = q.strides[0];
  a.q_head_stride = q.strides[1];
  a.out = out.data;
  a.o_token_stride = out.strides[0];
  a.o_head_stride = out.strides[1];
  a.kv.num_pages = num_pages;
  a.kv.page_size = page_size;
  a.seq_lens = seq_lens.ptr<const int32_t>();
  a.total_q = total_q;
  a.device = q.device;
  return a;
}

}  // namespace

AttentionArgs make_attention_args(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                                  const TensorView& block_table, const TensorView& seq_lens,
                                  const TensorView& cu_seqlens_q, const TensorView& out, const TensorView& lse,
                                  const AttentionOptions& options, bool decode) {
  check_dtype(q, {DType::BFloat16, DType::Float16, DType::Float32});
  check_same_dtype(k_cache, q);
  check_same_dtype(v_cache, q);
  check_ndim(q, 3);
  check_ndim(k_cache, 4);
  check_ndim(v_cache, 4);
  check_dim(k_cache, 3, q.shape[2], "head_dim");
  for (int i = 0; i < 4; ++i) check_dim(v_cache, i, k_cache.shape[i], "must match k_cache");
  check_inner_contiguous(k_cache, 3);
  check_inner_contiguous(v_cache, 3);
  check_same_device(v_cache, k_cache);
  AttentionArgs a = make_common(q, k_cache, k_cache.shape[0], k_cache.shape[1], k_cache.shape[2], block_table,
                                seq_lens, cu_seqlens_q, out, lse, options, decode);
  a.kv.k = k_cache.data;
  a.kv.v = v_cache.data;
  a.kv.k_page_stride = k_cache.strides[0];
  a.kv.v_page_stride = v_cache.strides[0];
  return a;
}

AttentionArgs make_attention_int4_args(const TensorView& q, const TensorView& k_codes, const TensorView& k_params,
                                       const TensorView& v_codes, const TensorView& v_params,
                                       const TensorView& block_table, const TensorView& seq_lens,
                                       const TensorView& cu_seqlens_q, const TensorView& out, const TensorView& lse,
                                       const AttentionOptions& options, bool decode, int64_t rot_block,
                                       const TensorView& rot_signs) {
  check_ndim(q, 3);
  check_ndim(k_codes, 4);
  const int64_t d = q.shape[2];
  const Int4Cache kc = make_int4_cache(k_codes, k_params, -1, 0, k_codes.shape[2], d);
  const Int4Cache vc = make_int4_cache(v_codes, v_params, -1, 0, k_codes.shape[2], d);
  for (int i = 0; i < 2; ++i) check_dim(v_codes, i, k_codes.shape[i], "must match k_codes");
  check_same_device(v_codes, k_codes);
  AttentionArgs a = make_common(q, k_codes, k_codes.shape[0], k_codes.shape[1], k_codes.shape[2], block_table,
                                seq_lens, cu_seqlens_q, out, lse, options, decode);
  const Rotation rot = make_rotation(d, rot_block, rot_signs, q.device);
  a.kv.int4 = true;
  a.kv.k_codes = kc.codes;
  a.kv.v_codes = vc.codes;
  a.kv.k_params = kc.params;
  a.kv.v_params = vc.params;
  a.kv.k_codes_page_stride = kc.codes_page_stride;
  a.kv.v_codes_page_stride = vc.codes_page_stride;
  a.kv.k_params_page_stride = kc.params_page_stride;
  a.kv.v_params_page_stride = vc.params_page_stride;
  a.kv.rot_block = rot.block;
  a.kv.rot_signs = rot.signs;
  return a;
}

SharedPrefixArgs make_shared_prefix_args(const AttentionArgs& suffix, const TensorView& prefix_block_table,
                                         const TensorView& prefix_lens, const TensorView& group_indptr) {
  KVCORE_CHECK_VALUE(suffix.kv.block_table != nullptr, "block_table: shared-prefix attention needs the "
                     "suffix block table");
  check_ndim(prefix_lens, 1);
  const int64_t groups = prefix_lens.shape[0];
  check_int32_vector(prefix_lens, groups, "groups");
  check_int32_vector(group_indptr, groups + 1, "groups + 1");
  check_dtype(prefix_block_table, {DType::Int32});
  check_ndim(prefix_block_table, 2);
  check_dim(prefix_block_table, 0, groups, "groups");
  check_inner_contiguous(prefix_block_table, 1);
  for (const TensorView* t : {&prefix_lens, &group_indptr, &prefix_block_table})
    KVCORE_CHECK_VALUE(t->device == suffix.device, t->name, " is on ", t->device.str(), " but q is on ",
                       suffix.device.str(), ": all arrays must be on the same device");
  SharedPrefixArgs a;
  a.suffix = suffix;
  a.prefix_block_table = prefix_block_table.ptr<const int32_t>();
  a.prefix_block_table_stride = prefix_block_table.strides[0];
  a.max_prefix_pages = prefix_block_table.shape[1];
  a.prefix_lens = prefix_lens.ptr<const int32_t>();
  a.group_indptr = group_indptr.ptr<const int32_t>();
  a.num_groups = groups;
  return a;
}

MergeStatesArgs make_merge_states_args(const TensorView& o_a, const TensorView& lse_a, const TensorView& o_b,
                                       const TensorView& lse_b, const TensorView& out, const TensorView& lse_out) {
  check_dtype(o_a, {DType::Float32, DType::BFloat16, DType::Float16});
  check_same_dtype(o_b, o_a);
  check_same_dtype(out, o_a);
  check_ndim(o_a, 3);
  const int64_t tokens = o_a.shape[0], heads = o_a.shape[1], d = o_a.shape[2];
  for (const TensorView* t : {&o_b, &out}) {
    check_ndim(*t, 3);
    for (int i = 0; i < 3; ++i) check_dim(*t, i, o_a.shape[i], "must match o_a");
    check_inner_contiguous(*t, 1);
  }
  check_inner_contiguous(o_a, 1);
  for (const TensorView* t : {&lse_a, &lse_b, &lse_out}) {
    if (t == &lse_out && !present(lse_out)) continue;
    check_dtype(*t, {DType::Float32});
    check_ndim(*t, 2);
    check_dim(*t, 0, tokens, "tokens");
    check_dim(*t, 1, heads, "heads");
    check_inner_contiguous(*t, 1);
  }
  for (const TensorView* t : {&o_b, &lse_a, &lse_b, &out}) check_same_device(*t, o_a);
  if (present(lse_out)) check_same_device(lse_out, o_a);
  MergeStatesArgs a;
  a.o_a = o_a.data;
  a.o_b = o_b.data;
  a.lse_a = lse_a.ptr<const float>();
  a.lse_b = lse_b.ptr<const float>();
  a.out = out.data;
  a.lse_out = present(lse_out) ? lse_out.ptr<float>() : nullptr;
  a.tokens = tokens;
  a.heads = heads;
  a.head_dim = d;
  a.a_token_stride = o_a.strides[0];
  a.a_head_stride = o_a.strides[1];
  a.b_token_stride = o_b.strides[0];
  a.b_head_stride = o_b.strides[1];
  a.o_token_stride = out.strides[0];
  a.o_head_stride = out.strides[1];
  a.lse_a_stride = lse_a.strides[0];
  a.lse_b_stride = lse_b.strides[0];
  a.lse_out_stride = present(lse_out) ? lse_out.strides[0] : 0;
  a.dtype = o_a.dtype;
  a.device = o_a.device;
  return a;
}

}  // namespace kvcore
