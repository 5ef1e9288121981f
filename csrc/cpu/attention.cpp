// CPU backend of the attention family: the reference the CUDA kernels are tested against, and a
// working multithreaded backend. float32 accumulation, online softmax over the visible keys.
#include <algorithm>
#include <cmath>
#include <vector>

#include "convert.h"
#include "simd.h"
#include "kvcore/attention.h"
#include "kvcore/detail/attention_math.h"
#include "kvcore/detail/float16.h"
#include "kvcore/detail/int4.h"
#include "kvcore/error.h"
#include "kvcore/parallel.h"

namespace kvcore {
namespace {

// Work items: about kRowsPerItem query rows (prefill tokens x the GQA group) against all their
// keys; rows that few (decode) are split over fixed key ranges of kSplitKeys, merged in key order.
// Both depend only on the shapes, so results do not depend on the number of threads.
constexpr int64_t kRowsPerItem = 128;
// Calls with fewer items than this get smaller ones (down to kMinRowsPerItem rows): a few long
// items leave threads idle at the end and while the pool wakes up.
constexpr int64_t kMinItems = 8;
constexpr int64_t kMinRowsPerItem = 64;
constexpr int64_t kSplitKeys = 512;
constexpr int64_t kSplitMaxRows = 16;
constexpr int64_t kInlineWork = 16384;  // query rows x keys below which a call stays on one thread
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

// A query row: its token and head in q.
struct QueryRow {
  int64_t token, head;
};

// Query rows of one work item as float32 (rotated for INT4), with their positions, and the item's
// partial state; per thread, reused across calls.
struct RowBuf {
  std::vector<float> q, acc, m, l, o;
  std::vector<int64_t> pos;
  int64_t qlo = 0, qhi = 0;
};
RowBuf& row_buf() {
  thread_local RowBuf b;
  return b;
}

// Row (token, head) of a float32 or 16-bit array, from or to float32.
void store_row(void* base, int64_t token_stride, int64_t head_stride, int64_t token, int64_t head, int64_t d,
               DType dtype, const float* o) {
  const int64_t off = token * token_stride + head * head_stride;
  if (dtype == DType::Float32) {
    std::copy(o, o + d, static_cast<float*>(base) + off);
    return;
  }
  cpu::float_row_to_half(o, static_cast<uint16_t*>(base) + off, d, dtype == DType::BFloat16);
}

void load_row(const void* base, int64_t token_stride, int64_t head_stride, int64_t token, int64_t head, int64_t d,
              DType dtype, float* o) {
  const int64_t off = token * token_stride + head * head_stride;
  if (dtype == DType::Float32) {
    std::copy(static_cast<const float*>(base) + off, static_cast<const float*>(base) + off + d, o);
    return;
  }
  cpu::half_row_to_float(static_cast<const uint16_t*>(base) + off, o, d, dtype == DType::BFloat16);
}

// Query row r is (token, head) = q_row(r) of a's queries.
template <class QRow, class QPos>
void load_rows(const AttentionArgs& a, int64_t rows, QRow q_row, QPos qpos, RowBuf& b) {
  const AttentionParams& p = a.p;
  const PagedKV& kv = a.kv;
  const int64_t d = p.head_dim;
  const size_t n = size_t(rows), dd = size_t(d);
  if (b.q.size() < n * dd) b.q.resize(n * dd);
  if (b.acc.size() < n * dd) b.acc.resize(n * dd);
  if (b.pos.size() < n) b.pos.resize(n), b.m.resize(n), b.l.resize(n);
  if (b.o.size() < dd) b.o.resize(dd);
  b.qlo = INT64_MAX;
  b.qhi = INT64_MIN;
  for (int64_t r = 0; r < rows; ++r) {
    float* q = &b.q[size_t(r) * dd];
    const QueryRow qr = q_row(r);
    load_row(a.q, a.q_token_stride, a.q_head_stride, qr.token, qr.head, d, p.dtype, q);
    if (kv.int4) rotate_row(q, int(d), kv.rot_block, kv.rot_signs);  // scores in the rotated basis
    b.pos[size_t(r)] = qpos(r);
    b.qlo = std::min(b.qlo, b.pos[size_t(r)]);
    b.qhi = std::max(b.qhi, b.pos[size_t(r)]);
  }
}

cpu::AttendTask make_task(const AttentionParams& p, const KeySeq& ks, int64_t kv_head, int64_t k_lo, int64_t k_hi,
                          int64_t rows, const RowBuf& b, float* m, float* l, float* acc) {
  cpu::AttendTask t;
  t.p = &p;
  t.kv = ks.kv;
  t.pages = ks.pages;
  t.page0 = ks.page0;
  t.key_base = ks.key_base;
  t.kv_head = kv_head;
  t.k_lo = k_lo;
  t.k_hi = k_hi;
  t.rows = rows;
  t.q = b.q.data();
  t.pos = b.pos.data();
  t.m = m;
  t.l = l;
  t.acc = acc;
  return t;
}

// The normalized output of a partial state (back in the natural basis for INT4); returns the LSE.
float finalize_row(const PagedKV& kv, int64_t d, float m, float l, const float* acc, float* o) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int64_t i = 0; i < d; ++i) o[i] = acc[i] * inv;
  if (kv.int4) unrotate_row(o, int(d), kv.rot_block, kv.rot_signs);  // V's rotation undone
  return l > 0.f ? m + std::log(l) : -INFINITY;
}

// Attention of `rows` query rows that share one KV head over one KV sequence. q_row(r) gives a
// row's query (token, head), qpos(r) its position; emit(r, o, lse) receives the normalized float output.
template <class QRow, class QPos, class Emit>
void attend(const AttentionArgs& a, const KeySeq& ks, int64_t kv_head, int64_t rows, QRow q_row, QPos qpos,
            Emit emit) {
  const AttentionParams& p = a.p;
  RowBuf& b = row_buf();
  load_rows(a, rows, q_row, qpos, b);
  const KeyRange kr = visible_key_range(ks.num_keys, ks.key_base, b.qlo, b.qhi, p.causal, p.window);
  cpu::attend_partial(make_task(p, ks, kv_head, kr.lo, kr.hi, rows, b, b.m.data(), b.l.data(), b.acc.data()));
  const int64_t d = p.head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    const float lse = finalize_row(*ks.kv, d, b.m[size_t(r)], b.l[size_t(r)], &b.acc[size_t(r * d)], b.o.data());
    emit(r, b.o.data(), lse);
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
  const int64_t group = p.num_q_heads / p.num_kv_heads, d = p.head_dim;
  int64_t tokens_per_item = std::max<int64_t>(1, kRowsPerItem / group);
  for (;;) {
    int64_t n = 0;
    for (int64_t b = 0; b < p.batch; ++b)
      n += (query_range(a, b).count + tokens_per_item - 1) / tokens_per_item * p.num_kv_heads;
    if (n >= kMinItems || tokens_per_item == 1 || (tokens_per_item / 2) * group < kMinRowsPerItem) break;
    tokens_per_item /= 2;
  }
  struct Item {
    int64_t b, kv_head, t0, nt, k_lo, k_hi;
    int64_t state;   // first row of this item's partial state, or -1: not split
    int64_t splits;  // items of the same rows (on the first of them), 0 on the others
  };
  thread_local std::vector<Item> items;
  items.clear();
  int64_t state_rows = 0, work = 0;  // work: query rows x keys
  for (int64_t b = 0; b < p.batch; ++b) {
    const QueryRange qr = query_range(a, b);
    const int64_t seq = a.seq_lens[b];
    if (qr.count == 0) continue;
    // Last tokens first: under a causal mask they see the most keys, and the pool hands out work in
    // order, so the longest items start first.
    for (int64_t t = (qr.count - 1) / tokens_per_item * tokens_per_item; t >= 0; t -= tokens_per_item) {
      const int64_t nt = std::min(tokens_per_item, qr.count - t);
      const KeyRange kr = visible_key_range(seq, 0, seq - qr.count + t, seq - qr.count + t + nt - 1, p.causal,
                                            p.window);
      const int64_t splits = nt * group <= kSplitMaxRows ? std::max<int64_t>(1, (kr.hi - kr.lo + kSplitKeys - 1) / kSplitKeys) : 1;
      for (int64_t h = 0; h < p.num_kv_heads; ++h) {
        if (splits == 1) {
          items.push_back({b, h, qr.first + t, nt, kr.lo, kr.hi, -1, 1});
          work += nt * group * (kr.hi - kr.lo);
          continue;
        }
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t lo = kr.lo + sp * kSplitKeys;
          items.push_back({b, h, qr.first + t, nt, lo, std::min(kr.hi, lo + kSplitKeys), state_rows,
                           sp == 0 ? splits : 0});
          state_rows += nt * group;
          work += nt * group * (std::min(kr.hi, lo + kSplitKeys) - lo);
        }
      }
    }
  }
  // Partial states of split items: m, l and acc per row.
  thread_local std::vector<float> st_m, st_l, st_acc;
  if (int64_t(st_m.size()) < state_rows) st_m.resize(size_t(state_rows)), st_l.resize(size_t(state_rows));
  if (int64_t(st_acc.size()) < state_rows * d) st_acc.resize(size_t(state_rows * d));
  float* sm = st_m.data();
  float* sl = st_l.data();
  float* sacc = st_acc.data();
  const Item* all = items.data();

  auto token_of = [group](const Item& it, int64_t r) { return it.t0 + r / group; };
  auto head_of = [group](const Item& it, int64_t r) { return it.kv_head * group + r % group; };
  // Small calls run on the calling thread: waking the pool costs more than the work.
  const int64_t grain = work < kInlineWork ? int64_t(items.size()) : 1;
  parallel_for(int64_t(items.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = all[i];
      const QueryRange qr = query_range(a, it.b);
      const int64_t seq = a.seq_lens[it.b], rows = it.nt * group;
      RowBuf& buf = row_buf();
      load_rows(
          a, rows, [&](int64_t r) { return QueryRow{token_of(it, r), head_of(it, r)}; },
          [&](int64_t r) { return seq - qr.count + (token_of(it, r) - qr.first); }, buf);
      const KeySeq ks = request_keys(a, it.b, 0);
      if (it.state >= 0) {
        cpu::attend_partial(make_task(p, ks, it.kv_head, it.k_lo, it.k_hi, rows, buf, sm + it.state, sl + it.state,
                                      sacc + it.state * d));
        continue;
      }
      cpu::attend_partial(make_task(p, ks, it.kv_head, it.k_lo, it.k_hi, rows, buf, buf.m.data(), buf.l.data(),
                                    buf.acc.data()));
      for (int64_t r = 0; r < rows; ++r) {
        const float lse =
            finalize_row(a.kv, d, buf.m[size_t(r)], buf.l[size_t(r)], &buf.acc[size_t(r * d)], buf.o.data());
        emit(token_of(it, r), head_of(it, r), buf.o.data(), lse);
      }
    }
  });
  if (state_rows == 0) return;

  // Merge the splits of each item in key order.
  thread_local std::vector<int64_t> firsts;
  firsts.clear();
  for (int64_t i = 0; i < int64_t(items.size()); ++i)
    if (items[size_t(i)].splits > 1) firsts.push_back(i);
  const int64_t* first = firsts.data();
  parallel_for(int64_t(firsts.size()), 16, [&](int64_t begin, int64_t end) {
    RowBuf& buf = row_buf();
    if (buf.acc.size() < size_t(d)) buf.acc.resize(size_t(d));
    if (buf.o.size() < size_t(d)) buf.o.resize(size_t(d));
    float* acc = buf.acc.data();
    for (int64_t f = begin; f < end; ++f) {
      const Item& it0 = all[first[f]];
      const int64_t rows = it0.nt * group;
      for (int64_t r = 0; r < rows; ++r) {
        float m = -INFINITY;
        for (int64_t sp = 0; sp < it0.splits; ++sp) m = std::max(m, sm[all[first[f] + sp].state + r]);
        float l = 0.f;
        for (int64_t i = 0; i < d; ++i) acc[i] = 0.f;
        if (m != -INFINITY)
          for (int64_t sp = 0; sp < it0.splits; ++sp) {
            const int64_t s = all[first[f] + sp].state + r;
            if (sl[s] == 0.f) continue;
            const float w = std::exp(sm[s] - m);
            l += w * sl[s];
            const float* src = sacc + s * d;
            for (int64_t i = 0; i < d; ++i) acc[i] += w * src[i];
          }
        const float lse = finalize_row(a.kv, d, m, l, acc, buf.o.data());
        emit(token_of(it0, r), head_of(it0, r), buf.o.data(), lse);
      }
    }
  });
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
  parallel_for(int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Item it = items[size_t(i)];
      const std::vector<Row>& rows = group_rows[size_t(it.g)];
      const KeySeq ks{&a.kv, sa.prefix_block_table + it.g * sa.prefix_block_table_stride, 0, sa.prefix_lens[it.g], 0};
      auto row = [&](int64_t r) { return rows[size_t((it.r0 + r) / group)]; };
      auto head = [&](int64_t r) { return it.kv_head * group + (it.r0 + r) % group; };
      attend(
          a, ks, it.kv_head, it.nr, [&](int64_t r) { return QueryRow{row(r).token, head(r)}; },
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
