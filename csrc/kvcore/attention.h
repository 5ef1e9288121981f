// Attention over paged (or per-sequence contiguous) KV: decode, prefill/extend on a cached prefix,
// shared-prefix (cascade) attention, and the merge of partial attention states.
//
// Conventions (CPU and CUDA alike):
// - K/V caches are [num_pages, page_size, Hkv, D] with the inner three dims contiguous and any page
//   stride. block_table [batch, max_pages] int32 maps a request's logical page to a cache page. The
//   "virtual" layout of a VirtualTensor, [max_seqs, max_tokens, Hkv, D], is the same thing with
//   page_size = max_tokens and a one-column block table of sequence slots (or none: request b uses
//   sequence b).
// - Request b has seq_lens[b] keys at positions 0..seq_lens[b]-1. Its queries are the last q_len
//   tokens of the sequence: query t sits at position seq_lens[b] - q_len + t (decode: q_len = 1).
// - A key at position j is visible to a query at position p when j <= p (causal) and, with a
//   sliding window w > 0, when j > p - w. Decode is causal by construction (p = seq_len - 1).
// - logits = scale * (q . k), then soft_cap * tanh(logits / soft_cap) when soft_cap > 0.
// - LSE is the natural-log log-sum-exp of the (capped) logits per (query, head), float32; a query
//   with no visible key gets LSE = -inf and a zero output.
// - GQA: query head h reads KV head h / (Hq / Hkv).
#pragma once

#include <cstdint>

#include "kvcore/runtime.h"
#include "kvcore/tensor.h"

namespace kvcore {

// The KV side: pages and how requests map onto them.
struct PagedKV {
  const void* k = nullptr;          // [num_pages, page_size, Hkv, D], inner 3 dims contiguous
  const void* v = nullptr;          // [num_pages, page_size, Hkv, D], inner 3 dims contiguous
  int64_t k_page_stride = 0;        // elements between pages of k
  int64_t v_page_stride = 0;        // elements between pages of v
  int64_t num_pages = 0;
  int64_t page_size = 0;
  const int32_t* block_table = nullptr;  // [batch, max_pages]; nullptr: request b is page b
  int64_t block_table_stride = 0;   // elements between rows of block_table
  int64_t max_pages = 0;            // columns of block_table (1 without one)

  // INT4 pages (quant.h): when int4 is set, K/V are read from these instead of k/v, in the rotated
  // basis; queries are rotated the same way and outputs rotated back, inside the kernels.
  bool int4 = false;
  const uint8_t* k_codes = nullptr;      // [num_pages, page_size, Hkv, D/2]
  const uint8_t* v_codes = nullptr;
  const uint16_t* k_params = nullptr;    // [num_pages, page_size, Hkv, 2] float16 (scale, min)
  const uint16_t* v_params = nullptr;
  int64_t k_codes_page_stride = 0, v_codes_page_stride = 0;    // bytes
  int64_t k_params_page_stride = 0, v_params_page_stride = 0;  // float16 elements
  int rot_block = 0;                     // Hadamard block size
  const float* rot_signs = nullptr;      // [D] or nullptr
};

struct AttentionParams {
  int64_t batch = 0;
  int64_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  float scale = 0;                  // softmax scale
  float soft_cap = 0;               // 0: off
  int64_t window = 0;               // 0: off
  bool causal = true;               // prefill only; decode is always causal
  DType dtype = DType::BFloat16;    // q, k, v and out (bfloat16 or float16)
};

struct AttentionArgs {
  AttentionParams p;
  const void* q = nullptr;          // [total_q, Hq, D], last dim contiguous
  int64_t q_token_stride = 0, q_head_stride = 0;
  void* out = nullptr;              // [total_q, Hq, D], last dim contiguous
  int64_t o_token_stride = 0, o_head_stride = 0;
  float* lse = nullptr;             // [total_q, Hq] float32 or nullptr
  int64_t lse_token_stride = 0;     // elements between tokens of lse (heads contiguous)
  PagedKV kv;
  const int32_t* seq_lens = nullptr;      // [batch] keys per request
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1] query offsets; nullptr: decode (one each)
  int64_t total_q = 0;
  Device device;
};

// Shared-prefix (cascade) attention: requests grouped by a common prefix, listed once per group.
// Requests of group g are [group_indptr[g], group_indptr[g+1]) of the batch (contiguous). Each
// request's own KV (its "suffix", which includes its new tokens) is described by `suffix`, whose
// key positions continue after the group's prefix: a suffix key j sits at prefix_len + j.
struct SharedPrefixArgs {
  AttentionArgs suffix;                     // q, out, lse, suffix pages, seq_lens = suffix lengths
  const int32_t* prefix_block_table = nullptr;  // [num_groups, max_prefix_pages] into the same caches
  int64_t prefix_block_table_stride = 0;
  int64_t max_prefix_pages = 0;
  const int32_t* prefix_lens = nullptr;     // [num_groups] prefix length in tokens (may be 0)
  const int32_t* group_indptr = nullptr;    // [num_groups + 1], group_indptr[num_groups] == batch
  int64_t num_groups = 0;
};

// merge_states: o = (o_a e^lse_a + o_b e^lse_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b).
struct MergeStatesArgs {
  const void* o_a = nullptr;        // [tokens, heads, D], last dim contiguous
  const void* o_b = nullptr;
  const float* lse_a = nullptr;     // [tokens, heads]
  const float* lse_b = nullptr;
  void* out = nullptr;              // [tokens, heads, D]
  float* lse_out = nullptr;         // [tokens, heads] or nullptr
  int64_t tokens = 0, heads = 0, head_dim = 0;
  int64_t a_token_stride = 0, a_head_stride = 0, b_token_stride = 0, b_head_stride = 0;
  int64_t o_token_stride = 0, o_head_stride = 0;
  int64_t lse_a_stride = 0, lse_b_stride = 0, lse_out_stride = 0;  // elements between tokens
  DType dtype = DType::Float32;     // of o_a, o_b and out: float32, bfloat16 or float16
  Device device;
};

// Options shared by the ops (window = 0 and soft_cap = 0 mean off; scale <= 0 means D^-0.5).
struct AttentionOptions {
  float scale = 0;
  float soft_cap = 0;
  int64_t window = 0;
  bool causal = true;
};

// Validation + argument building. block_table may be an empty view (data == nullptr) for the
// virtual layout; lse may be empty when not requested; cu_seqlens_q is empty for decode.
AttentionArgs make_attention_args(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                                  const TensorView& block_table, const TensorView& seq_lens,
                                  const TensorView& cu_seqlens_q, const TensorView& out, const TensorView& lse,
                                  const AttentionOptions& options, bool decode);
// The INT4 variant: K/V given as codes + params (quant.h formats) with their rotation; q, out and
// lse as above. k/v_codes play the role of k_cache/v_cache in all checks.
AttentionArgs make_attention_int4_args(const TensorView& q, const TensorView& k_codes, const TensorView& k_params,
                                       const TensorView& v_codes, const TensorView& v_params,
                                       const TensorView& block_table, const TensorView& seq_lens,
                                       const TensorView& cu_seqlens_q, const TensorView& out, const TensorView& lse,
                                       const AttentionOptions& options, bool decode, int64_t rot_block,
                                       const TensorView& rot_signs);
SharedPrefixArgs make_shared_prefix_args(const AttentionArgs& suffix, const TensorView& prefix_block_table,
                                         const TensorView& prefix_lens, const TensorView& group_indptr);
MergeStatesArgs make_merge_states_args(const TensorView& o_a, const TensorView& lse_a, const TensorView& o_b,
                                       const TensorView& lse_b, const TensorView& out, const TensorView& lse_out);

// CPU checks the host-side metadata (block-table entries, seq_lens vs. the table, cu_seqlens_q,
// group_indptr) and raises IndexError/ValueError before computing.
void attention_cpu(const AttentionArgs& args);
void shared_prefix_attention_cpu(const SharedPrefixArgs& args);
void merge_states_cpu(const MergeStatesArgs& args);

// CUDA: no host synchronization; metadata errors are reported only with debug checks on.
void attention_cuda(const AttentionArgs& args, StreamHandle stream);
void shared_prefix_attention_cuda(const SharedPrefixArgs& args, StreamHandle stream);
void merge_states_cuda(const MergeStatesArgs& args, StreamHandle stream);

}  // namespace kvcore
