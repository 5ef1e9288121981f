// CPU backend of the attention family: the reference the CUDA kernels are tested against, and a
// working multithreaded backend. float32 accumulation, online softmax over the visible keys.
#include <algorithm>
#include <cmath>
#include <vector>

#include "convert.h"
#include "kvcore/attention.h"
#include "kvcore/detail/attention_math.h"
#include "kvcore/detail/float16.h"
#include "kvcore/detail/int4.h"
#include "kvcore/error.h"
#include "kvcore/parallel.h"

namespace kvcore {
namespace {

constexpr int64_t kTokensPerItem = 16;  // prefill queries per work item
constexpr int64_t kKeyBlock = 64;       // keys converted and scored together

// Eight independent partial sums, so the compiler can vectorize without reassociating.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
constexpr int64_t kRowsPerPrefixItem = 64;

// Host-side checks of the metadata every kernel trusts.
void validate_kv_rows(const PagedKV& kv, const int32_t* table, int64_t table_stride, int64_t max_pages,
                      int64_t row, int64_t len, const char* table_name, const char* lens_name) {
  const int64_t capacity = table ? max_pages * kv.page_size : kv.page_size;
  KVCORE_CHECK_INDEX(len <= capacity, lens_name, "[", row, "] = ", len, " exceeds the ", capacity,
                     " slots of its ", table ? table_name : "sequence", " (", table ? max_pages : 1, " page(s) of ",
                     kv.page_size, ")");
  const int64_t pages = (len + kv.page_size - 1) / kv.page_size;
  for (int64_t i = 0; i < pages; ++i) {
    const int64_t page = table ? table[row * table_stride + i] : row;
    if (table) {
      KVCORE_CHECK_INDEX(page >= 0 && page < kv.num_pages, table_name, "[", row, ", ", i, "] = ", page,
                         " is out of range [0, ", kv.num_pages, ")");
    } else {
      KVCORE_CHECK_INDEX(page < kv.num_pages, "request ", row, " has no sequence: the cache holds ", kv.num_pages,
                         " sequences and no block_table was given");
    }
  }
}

void validate_metadata(const AttentionArgs& a, int64_t min_seq_len) {
  for (int64_t b = 0; b < a.p.batch; ++b) {
    const int64_t len = a.seq_lens[b];
    KVCORE_CHECK_VALUE(len >= min_seq_len, "seq_lens[", b, "] = ", len,
                       min_seq_len > 0 ? ": empty sequences are not allowed" : ": must be >= 0");
    validate_kv_rows(a.kv, a.kv.block_table, a.kv.block_table_stride, a.kv.max_pages, b, len, "block_table",
                     "seq_lens");
  }
  if (!a.cu_seqlens_q) return;
  KVCORE_CHECK_VALUE(a.cu_seqlens_q[0] == 0, "cu_seqlens_q[0] = ", a.cu_seqlens_q[0], ", expected 0");
  for (int64_t b = 0; b < a.p.batch; ++b) {
    const int64_t q_len = a.cu_seqlens_q[b + 1] - a.cu_seqlens_q[b];
    KVCORE_CHECK_VALUE(q_len >= 0, "cu_seqlens_q must be non-decreasing (entry ", b + 1, ")");
    KVCORE_CHECK_VALUE(q_len <= a.seq_lens[b], "request ", b, " has ", q_len, " queries but seq_lens[", b, "] = ",
                       a.seq_lens[b], ": queries are the last tokens of the sequence, already appended");
  }
  KVCORE_CHECK_VALUE(a.cu_seqlens_q[a.p.batch] == a.total_q, "cu_seqlens_q[", a.p.batch,
                     "] = ", a.cu_seqlens_q[a.p.batch], " but q has ", a.total_q, " tokens");
}

// One KV sequence as attention reads it.
struct KeySeq {
  const PagedKV* kv;
  const int32_t* pages;  // the sequence's page list, or nullptr: the whole sequence is page `page0`
  int64_t page0;
  int64_t num_keys;
  int64_t key_base;      // position of key 0
};

// Key j's K and V rows as floats: 16-bit pages, or INT4 pages dequantized (rotated basis).
void load_kv_row(const KeySeq& ks, int64_t j, int64_t kv_head, const AttentionParams& p, float* kf, float* vf) {
  const PagedKV& kv = *ks.kv;
  const int64_t page = ks.pages ? ks.pages[j / kv.page_size] : ks.page0;
  const int64_t row = (j % kv.page_size) * p.num_kv_heads + kv_head;
  const int64_t d = p.head_dim;
  if (!kv.int4) {
    const bool bf16 = p.dtype == DType::BFloat16;
    cpu::half_row_to_float(static_cast<const uint16_t*>(kv.k) + page * kv.k_page_stride + row * d, kf, d, bf16);
    cpu::half_row_to_float(static_cast<const uint16_t*>(kv.v) + page * kv.v_page_stride + row * d, vf, d, bf16);
    return;
  }
  auto dequantize = [&](const uint8_t* codes, int64_t codes_stride, const uint16_t* params, int64_t params_stride,
                        float* out) {
    const uint8_t* c = codes + page * codes_stride + row * (d / 2);
    const uint16_t* prm = params + page * params_stride + row * 2;
    const float scale = fp16_to_float(prm[0]), min = fp16_to_float(prm[1]);
    for (int64_t i = 0; i < d; ++i) out[i] = dequant_value(code_at(c, int(i)), scale, min);
  };
  dequantize(kv.k_codes, kv.k_codes_page_stride, kv.k_params, kv.k_params_page_stride, kf);
  dequantize(kv.v_codes, kv.v_codes_page_stride, kv.v_params, kv.v_params_page_stride, vf);
}

// Attention of `rows` query rows that share one KV head over one KV sequence. q_row(r) gives a
// row's D 16-bit values, qpos(r) its position; emit(r, o, lse) receives the normalized float output.
template <class QRow, class QPos, class Emit>
void attend(const AttentionParams& p, const KeySeq& ks, int64_t kv_head, int64_t rows, QRow q_row, QPos qpos,
            Emit emit) {
  const int64_t d = p.head_dim;
  const bool bf16 = p.dtype == DType::BFloat16;
  const size_t n = static_cast<size_t>(rows), dd = static_cast<size_t>(d);
  std::vector<float> q(n * dd), acc(n * dd, 0.f), m(n, -INFINITY), l(n, 0.f);
  std::vector<int64_t> pos(n);
  int64_t qlo = INT64_MAX, qhi = INT64_MIN;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* src = q_row(r);
    cpu::half_row_to_float(src, &q[size_t(r) * dd], d, bf16);
    if (ks.kv->int4) rotate_row(&q[size_t(r * d)], int(d), ks.kv->rot_block, ks.kv->rot_signs);  // scores in the rotated basis
    pos[size_t(r)] = qpos(r);
    qlo = std::min(qlo, pos[size_t(r)]);
    qhi = std::max(qhi, pos[size_t(r)]);
  }
  const KeyRange kr = visible_key_range(ks.num_keys, ks.key_base, qlo, qhi, p.causal, p.window);
  // Keys in blocks: convert a block of K/V rows once, then per row one max, one rescale, and
  // vectorizable dot products and axpys.
  const size_t kb = static_cast<size_t>(kKeyBlock);
  std::vector<float> kblock(kb * dd), vblock(kb * dd), scores(kb);
  for (int64_t j0 = kr.lo; j0 < kr.hi; j0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, kr.hi - j0);
    for (int64_t jj = 0; jj < nk; ++jj)
      load_kv_row(ks, j0 + jj, kv_head, p, &kblock[size_t(jj) * dd], &vblock[size_t(jj) * dd]);
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = &q[size_t(r) * dd];
      float block_max = -INFINITY;
      for (int64_t jj = 0; jj < nk; ++jj) {
        float sc = -INFINITY;
        if (key_visible(ks.key_base + j0 + jj, pos[size_t(r)], p.causal, p.window))
          sc = cap_logit(dot(qr, &kblock[size_t(jj) * dd], d) * p.scale, p.soft_cap);
        scores[size_t(jj)] = sc;
        block_max = std::max(block_max, sc);
      }
      if (block_max == -INFINITY) continue;
      float* ar = &acc[size_t(r) * dd];
      float& mr = m[size_t(r)];
      if (block_max > mr) {
        const float correction = std::exp(mr - block_max);  // 0 for the first block (mr = -inf)
        l[size_t(r)] *= correction;
        for (int64_t i = 0; i < d; ++i) ar[i] *= correction;
        mr = block_max;
      }
      for (int64_t jj = 0; jj < nk; ++jj) {
        if (scores[size_t(jj)] == -INFINITY) continue;
        const float e = std::exp(scores[size_t(jj)] - mr);
        l[size_t(r)] += e;
        const float* vr = &vblock[size_t(jj) * dd];
        for (int64_t i = 0; i < d; ++i) ar[i] += e * vr[i];
      }
    }
  }
  std::vector<float> o(dd);
  for (int64_t r = 0; r < rows; ++r) {
    const float lr = l[size_t(r)];
    for (int64_t i = 0; i < d; ++i) o[size_t(i)] = lr > 0.f ? acc[size_t(r * d + i)] / lr : 0.f;
    if (ks.kv->int4) unrotate_row(o.data(), int(d), ks.kv->rot_block, ks.kv->rot_signs);  // V's rotation undone
    emit(r, o.data(), lr > 0.f ? m[size_t(r)] + std::log(lr) : -INFINITY);
  }
}

// Where query token t of request b sits, given the request's query range.
struct QueryRange {
  int64_t first, count;
};
inline QueryRange query_range(const AttentionArgs& a, int64_t b) {
  if (!a.cu_seqlens_q) return {b, 1};
  return {a.cu_seqlens_q[b], a.cu_seqlens_q[b + 1] - a.cu_seqlens_q[b]};
}

inline KeySeq request_keys(const AttentionArgs& a, int64_t b, int64_t key_base) {
  return {&a.kv, a.kv.block_table ? a.kv.block_table + b * a.kv.block_table_stride : nullptr, b, a.seq_lens[b],
          key_base};
}

// Per-request paged attention; emit(token, head, o, lse) receives each (query token, head) result.
// (In the suffix pass of shared-prefix attention, shifting keys and queries alike by the prefix
// length would change nothing, so positions stay request-local.)
template <class Emit>
void paged_attention(const AttentionArgs& a, Emit emit) {
  const AttentionParams& p = a.p;
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  struct Item {
    int64_t b, kv_head, t0, nt;
  };
  std::vector<Item> items;
  for (int64_t b = 0; b < p.batch; ++b) {
    const QueryRange qr = query_range(a, b);
    for (int64_t h = 0; h < p.num_kv_heads; ++h)
      for (int64_t t = 0; t < qr.count; t += kTokensPerItem)
        items.push_back({b, h, qr.first + t, std::min(kTokensPerItem, qr.count - t)});
  }
  const auto* q = static_cast<const uint16_t*>(a.q);
  parallel_for(int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Item it = items[size_t(i)];
      const QueryRange qr = query_range(a, it.b);
      const int64_t seq = a.seq_lens[it.b];
      auto token = [&](int64_t r) { return it.t0 + r / group; };
      auto head = [&](int64_t r) { return it.kv_head * group + r % group; };
      attend(
          p, request_keys(a, it.b, 0), it.kv_head, it.nt * group,
          [&](int64_t r) { return q + token(r) * a.q_token_stride + head(r) * a.q_head_stride; },
          [&](int64_t r) { return seq - qr.count + (token(r) - qr.first); },
          [&](int64_t r, const float* o, float lse) { emit(token(r), head(r), o, lse); });
    }
  });
}

void store_row(void* base, int64_t token_stride, int64_t head_stride, int64_t token, int64_t head, int64_t d,
               DType dtype, const float* o) {
  const int64_t off = token * token_stride + head * head_stride;
  if (dtype == DType::Float32) {
    std::copy(o, o + d, static_cast<float*>(base) + off);
    return;
  }
  uint16_t* dst = static_cast<uint16_t*>(base) + off;
  const bool bf16 = dtype == DType::BFloat16;
  for (int64_t i = 0; i < d; ++i) dst[i] = float_to_half(o[i], bf16);
}

void load_row(const void* base, int64_t token_stride, int64_t head_stride, int64_t token, int64_t head, int64_t d,
              DType dtype, float* o) {
  const int64_t off = token * token_stride + head * head_stride;
  if (dtype == DType::Float32) {
    std::copy(static_cast<const float*>(base) + off, static_cast<const float*>(base) + off + d, o);
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(base) + off;
  const bool bf16 = dtype == DType::BFloat16;
  for (int64_t i = 0; i < d; ++i) o[i] = half_to_float(src[i], bf16);
}

}  // namespace

void attention_cpu(const AttentionArgs& a) {
  validate_metadata(a, 1);
  const int64_t d = a.p.head_dim;
  paged_attention(a, [&](int64_t t, int64_t h, const float* o, float lse) {
    store_row(a.out, a.o_token_stride, a.o_head_stride, t, h, d, a.p.dtype, o);
    if (a.lse) a.lse[t * a.lse_token_stride + h] = lse;
  });
}

void shared_prefix_attention_cpu(const SharedPrefixArgs& sa) {
  const AttentionArgs& a = sa.suffix;
  const AttentionParams& p = a.p;
  validate_metadata(a, 1);
  KVCORE_CHECK_VALUE(sa.group_indptr[0] == 0, "group_indptr[0] = ", sa.group_indptr[0], ", expected 0");
  for (int64_t g = 0; g < sa.num_groups; ++g) {
    KVCORE_CHECK_VALUE(sa.group_indptr[g + 1] >= sa.group_indptr[g], "group_indptr must be non-decreasing (entry ",
                       g + 1, ")");
    KVCORE_CHECK_VALUE(sa.prefix_lens[g] >= 0, "prefix_lens[", g, "] = ", sa.prefix_lens[g], ": must be >= 0");
    validate_kv_rows(a.kv, sa.prefix_block_table, sa.prefix_block_table_stride, sa.max_prefix_pages, g,
                     sa.prefix_lens[g], "prefix_block_table", "prefix_lens");
  }
  KVCORE_CHECK_VALUE(sa.group_indptr[sa.num_groups] == p.batch, "group_indptr[", sa.num_groups, "] = ",
                     sa.group_indptr[sa.num_groups], " but the batch has ", p.batch, " requests");

  const int64_t d = p.head_dim, hq = p.num_q_heads, group = hq / p.num_kv_heads;
  const size_t states = size_t(a.total_q * hq);
  std::vector<float> o_prefix(states * size_t(d), 0.f), o_suffix(states * size_t(d), 0.f);
  std::vector<float> lse_prefix(states, -INFINITY), lse_suffix(states, -INFINITY);

  // Prefix pass: every query of a group against the group's prefix, read once per row chunk.
  struct Row {
    int64_t token, position;
  };
  struct Item {
    int64_t g, kv_head, r0, nr;
  };
  std::vector<std::vector<Row>> group_rows(static_cast<size_t>(sa.num_groups));
  std::vector<Item> items;
  for (int64_t g = 0; g < sa.num_groups; ++g) {
    std::vector<Row>& rows = group_rows[size_t(g)];
    for (int64_t b = sa.group_indptr[g]; b < sa.group_indptr[g + 1]; ++b) {
      const QueryRange qr = query_range(a, b);
      for (int64_t t = 0; t < qr.count; ++t)
        rows.push_back({qr.first + t, sa.prefix_lens[g] + a.seq_lens[b] - qr.count + t});
    }
    const int64_t n = int64_t(rows.size()) * group;
    for (int64_t h = 0; h < p.num_kv_heads; ++h)
      for (int64_t r = 0; r < n; r += kRowsPerPrefixItem) items.push_back({g, h, r, std::min(kRowsPerPrefixItem, n - r)});
  }
  const auto* q = static_cast<const uint16_t*>(a.q);
  parallel_for(int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Item it = items[size_t(i)];
      const std::vector<Row>& rows = group_rows[size_t(it.g)];
      const KeySeq ks{&a.kv, sa.prefix_block_table + it.g * sa.prefix_block_table_stride, 0, sa.prefix_lens[it.g], 0};
      auto row = [&](int64_t r) { return rows[size_t((it.r0 + r) / group)]; };
      auto head = [&](int64_t r) { return it.kv_head * group + (it.r0 + r) % group; };
      attend(
          p, ks, it.kv_head, it.nr,
          [&](int64_t r) { return q + row(r).token * a.q_token_stride + head(r) * a.q_head_stride; },
          [&](int64_t r) { return row(r).position; },
          [&](int64_t r, const float* o, float lse) {
            const size_t s = size_t(row(r).token * hq + head(r));
            std::copy(o, o + d, &o_prefix[s * size_t(d)]);
            lse_prefix[s] = lse;
          });
    }
  });

  // Suffix pass: ordinary paged attention over each request's own pages.
  paged_attention(a, [&](int64_t t, int64_t h, const float* o, float lse) {
    const size_t s = size_t(t * hq + h);
    std::copy(o, o + d, &o_suffix[s * size_t(d)]);
    lse_suffix[s] = lse;
  });

  // Exact merge of the two partial states.
  parallel_for(a.total_q, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> o(static_cast<size_t>(d));
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < hq; ++h) {
        const size_t s = size_t(t * hq + h);
        const MergeWeights w = merge_weights(lse_prefix[s], lse_suffix[s]);
        for (int64_t i = 0; i < d; ++i)
          o[size_t(i)] = w.wa * o_prefix[s * size_t(d) + size_t(i)] + w.wb * o_suffix[s * size_t(d) + size_t(i)];
        store_row(a.out, a.o_token_stride, a.o_head_stride, t, h, d, p.dtype, o.data());
        if (a.lse) a.lse[t * a.lse_token_stride + h] = w.lse;
      }
  });
}

void merge_states_cpu(const MergeStatesArgs& m) {
  parallel_for(m.tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> oa(static_cast<size_t>(m.head_dim)), ob(static_cast<size_t>(m.head_dim));
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < m.heads; ++h) {
        load_row(m.o_a, m.a_token_stride, m.a_head_stride, t, h, m.head_dim, m.dtype, oa.data());
        load_row(m.o_b, m.b_token_stride, m.b_head_stride, t, h, m.head_dim, m.dtype, ob.data());
        const MergeWeights w = merge_weights(m.lse_a[t * m.lse_a_stride + h], m.lse_b[t * m.lse_b_stride + h]);
        // A state with weight 0 (empty, lse = -inf) contributes nothing, whatever its values.
        for (int64_t i = 0; i < m.head_dim; ++i)
          oa[size_t(i)] = (w.wa > 0.f ? w.wa * oa[size_t(i)] : 0.f) + (w.wb > 0.f ? w.wb * ob[size_t(i)] : 0.f);
        store_row(m.out, m.o_token_stride, m.o_head_stride, t, h, m.head_dim, m.dtype, oa.data());
        if (m.lse_out) m.lse_out[t * m.lse_out_stride + h] = w.lse;
      }
  });
}

}  // namespace kvcore
