// CUDA backend of the attention family.
//
// Decode (memory-bound): a CTA takes the GQA group of one request's KV head (up to kMaxRows query
// rows) and streams the visible keys once, its warps splitting the keys. One to three rows run on
// CUDA cores, lanes splitting head_dim (decode.cuh); wider groups run on tensor cores, the rows
// padded to one 16-row mma operand that all warps share (prefill_tc.cuh, SharedRows). INT4 caches
// take the same kernels: codes stream through the cp.async pipelines and dequantization folds into
// the scores (scale q.codes + min sum q). Prefill/extend and
// the stacked-query prefix pass of shared-prefix attention run on tensor cores (prefill_tc.cuh):
// 64 query rows per CTA against shared-memory K/V tiles. Long sequences are split across CTAs (split-KV) into float partial
// states that a merge kernel combines in a fixed order (deterministic). The split count depends
// only on host-known shapes and the SM count, work lists are built on the device, and scratch
// memory comes from the stream-ordered allocator, so no op synchronizes with the host and every
// op can be captured in a CUDA graph.
#include "../common/device.cuh"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "kvcore/attention.h"
#include "kvcore/cuda_utils.h"
#include "kvcore/detail/attention_math.h"
#include "kvcore/detail/float16.h"
#include "decode.cuh"
#include "prefill_tc.cuh"

namespace kvcore {
namespace {

using decode::kMaxRows;
using decode::kMaxSplits;
using decode::kMinKeysPerSplit;
using decode::kThreads;
using decode::kWarps;
using decode::Partials;
using decode::Row;
using decode::Split;
using decode::WorkList;
// Argument positions in kArgNames, the names raise_device_errors reports.
constexpr int kSeqLensArg = 0;
constexpr int kBlockTableArg = 1;
constexpr int kPrefixBlockTableArg = 2;
constexpr int kCuSeqlensArg = 3;
constexpr int kPrefixLensArg = 4;
constexpr int kGroupIndptrArg = 5;
#define KVCORE_ATTENTION_ARG_NAMES \
  { "seq_lens", "block_table", "prefix_block_table", "cu_seqlens_q", "prefix_lens", "group_indptr" }

// Rows of one tile: `tokens` consecutive query tokens of request b times `heads` heads of the group.
struct TileShape {
  int tokens_per_tile;  // query tokens per CTA
  int head_chunks;      // CTAs per KV head when the group exceeds kMaxRows
  int heads_per_chunk;
};
TileShape tile_shape(const AttentionParams& p) {
  const int group = int(p.num_q_heads / p.num_kv_heads);
  TileShape t;
  t.heads_per_chunk = std::min(group, kMaxRows);
  t.head_chunks = (group + t.heads_per_chunk - 1) / t.heads_per_chunk;
  t.tokens_per_tile = kMaxRows / t.heads_per_chunk;
  return t;
}

// Debug mode: the ragged and grouping metadata the other kernels index with, checked on the device
// before any of them runs (they skip their work once the report is set). cu_seqlens_q must start
// at 0, grow by at most seq_lens[b] per request and end at total_q; group_indptr must start at 0,
// never decrease and end at batch; prefix_lens must fit their table rows.
__global__ void validate_metadata_kernel(AttentionArgs a, SharedPrefixArgs sa, DeviceErrorReport* report) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const int64_t batch = a.p.batch;
  if (a.cu_seqlens_q) {
    if (a.cu_seqlens_q[0] != 0) return report_range_error(report, kCuSeqlensArg, 0, a.cu_seqlens_q[0], 0, 1);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t lo = a.cu_seqlens_q[b], v = a.cu_seqlens_q[b + 1];
      const int64_t hi = b + 1 == batch ? a.total_q : lo + std::max<int64_t>(a.seq_lens[b], 0);
      if (b + 1 == batch ? v != a.total_q : (v < lo || v > hi))
        return report_range_error(report, kCuSeqlensArg, b + 1, v, b + 1 == batch ? a.total_q : lo,
                                  (b + 1 == batch ? a.total_q : hi) + 1);
    }
  }
  if (sa.group_indptr) {
    if (sa.group_indptr[0] != 0) return report_range_error(report, kGroupIndptrArg, 0, sa.group_indptr[0], 0, 1);
    for (int64_t g = 0; g < sa.num_groups; ++g) {
      const int64_t lo = sa.group_indptr[g], v = sa.group_indptr[g + 1];
      const bool last = g + 1 == sa.num_groups;
      if (last ? v != batch : (v < lo || v > batch))
        return report_range_error(report, kGroupIndptrArg, g + 1, v, last ? batch : lo, batch + 1);
      const int64_t capacity = sa.max_prefix_pages * a.kv.page_size, len = sa.prefix_lens[g];
      if (len < 0 || len > capacity) return report_range_error(report, kPrefixLensArg, g, len, 0, capacity + 1);
    }
  }
}

// Whether the op's report is already set (debug mode), read once per CTA so that all its threads
// agree: another CTA may set the flag at any moment.
__device__ bool cta_report_failed(const DeviceErrorReport* report) {
  if (!report) return false;
  KVCORE_SHARED(int, s_failed, );
  if (threadIdx.x == 0) s_failed = report_failed(report);
  __syncthreads();
  return s_failed != 0;
}

// tile_offsets[b] = tiles of the requests before b (prefill); tile_offsets[batch] = all tiles.
__global__ void build_tiles_kernel(const int32_t* cu_seqlens_q, int batch, int tokens_per_tile, int32_t* tile_offsets,
                                   DeviceErrorReport* report) {
  if (threadIdx.x != 0 || blockIdx.x != 0 || report_failed(report)) return;
  int32_t total = 0;
  for (int b = 0; b < batch; ++b) {
    tile_offsets[b] = total;
    const int q_len = cu_seqlens_q[b + 1] - cu_seqlens_q[b];
    total += q_len > 0 ? (q_len + tokens_per_tile - 1) / tokens_per_tile : 0;
  }
  tile_offsets[batch] = total;
}

// Which request and query tokens a tile covers (decode: tile = request). Tiles past the last one
// are skipped. A request whose length exceeds its block table (reported in debug mode) attends to
// no keys: its rows still get an empty state (output 0, LSE -inf), so no split partial or output
// row is left unwritten.
struct TileRequest {
  int skip, b, first, q_len, t0, seq;
};
__device__ TileRequest locate_tile(const AttentionArgs& a, const int32_t* tile_offsets, int tokens_per_tile, int tile,
                                   DeviceErrorReport* report) {
  TileRequest r{0, tile, tile, 1, 0, 0};
  if (tile_offsets) {
    if (tile >= tile_offsets[a.p.batch]) return TileRequest{1, 0, 0, 0, 0, 0};
    int lo = 0, hi = int(a.p.batch) - 1;
    while (lo < hi) {  // the last request whose first tile is <= tile
      const int mid = (lo + hi + 1) / 2;
      if (tile_offsets[mid] <= tile) lo = mid;
      else hi = mid - 1;
    }
    r.b = lo;
    r.first = a.cu_seqlens_q[lo];
    r.q_len = a.cu_seqlens_q[lo + 1] - r.first;
    r.t0 = (tile - tile_offsets[lo]) * tokens_per_tile;
  }
  r.seq = a.seq_lens[r.b];
  const int64_t capacity = a.kv.block_table ? a.kv.max_pages * a.kv.page_size : a.kv.page_size;
  if (r.seq > capacity || r.seq < 1) {  // never read past the block table
    report_range_error(report, kSeqLensArg, r.b, r.seq, 1, capacity + 1);
    r.seq = 0;
  }
  return r;
}

// A CTA's query rows and request. Grid: y = kv head x head chunk; with a work list (decode)
// x = work item, else x = tile (decode: request) and z = split.
struct CtaRows {
  Row rows[kMaxRows];
  int nrows, b, seq, kv_head;
  const int32_t* pages;  // request b's block table row (nullptr: the single page b)
  Split sp;
};
__device__ bool setup_rows(const AttentionArgs& a, const TileShape& shape, const int32_t* tile_offsets,
                           const WorkList& work, DeviceErrorReport* report, CtaRows& c) {
  KVCORE_SHARED(int, s_skip, );
  const int kv_head = blockIdx.y / shape.head_chunks, chunk = blockIdx.y % shape.head_chunks;
  const int group = int(a.p.num_q_heads / a.p.num_kv_heads);
  if (threadIdx.x == 0) {
    int tile = blockIdx.x;
    s_skip = 0;
    if (work.first) {
      const int item = blockIdx.x;
      if (item >= work.first[a.p.batch]) {
        s_skip = 1;
      } else {
        tile = work.item_request[item];
        c.sp = Split{item - work.first[tile], 0, *work.chunk, item};
      }
    } else {
      c.sp = Split{int(blockIdx.z), int(gridDim.z), 0, 0};
    }
    const TileRequest tr = s_skip ? TileRequest{1, 0, 0, 0, 0, 0}
                                  : locate_tile(a, tile_offsets, shape.tokens_per_tile, tile, report);
    s_skip = tr.skip;
    if (!tr.skip) {
      const int h0 = chunk * shape.heads_per_chunk;
      const int heads = min(shape.heads_per_chunk, group - h0);
      const int tokens = min(shape.tokens_per_tile, tr.q_len - tr.t0);
      int n = 0;
      for (int t = 0; t < tokens; ++t)
        for (int h = 0; h < heads; ++h)
          c.rows[n++] = Row{tr.first + tr.t0 + t, kv_head * group + h0 + h, tr.seq - tr.q_len + tr.t0 + t};
      c.nrows = n;
      c.b = tr.b;
      c.kv_head = kv_head;
      c.pages = a.kv.block_table ? a.kv.block_table + int64_t(tr.b) * a.kv.block_table_stride : nullptr;
      c.seq = tr.seq;
    }
  }
  __syncthreads();
  return !s_skip && c.nrows > 0;
}

template <int D, int R, typename T, bool Cap>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(AttentionArgs a, TileShape shape,
                                                                   const int32_t* tile_offsets, Partials part,
                                                                   WorkList work, DeviceErrorReport* report) {
  if (cta_report_failed(report)) return;  // metadata failed its debug check
  KVCORE_SHARED(CtaRows, c, );
  if (!setup_rows(a, shape, tile_offsets, work, report, c)) return;
  decode::attend_tiled<D, R, T, Cap>(a, c.pages, c.b, c.seq, 0, c.kv_head, c.rows, c.nrows, c.sp, part, report,
                                     kBlockTableArg);
}

// Tensor-core decode of a GQA group (4..kMaxRows rows; T: the cache or, INT4, the query dtype),
// grid and rows as paged_attention_kernel.
template <int D, typename T, bool Int4, bool Cap>
__global__ void __launch_bounds__(tc::kThreads) paged_attention_tc_kernel(AttentionArgs a, TileShape shape,
                                                                          const int32_t* tile_offsets, Partials part,
                                                                          WorkList work, DeviceErrorReport* report) {
  if (cta_report_failed(report)) return;  // metadata failed its debug check
  KVCORE_SHARED(CtaRows, c, );
  if (!setup_rows(a, shape, tile_offsets, work, report, c)) return;
  tc::attend_rows_tc<D, T, Int4, true, Cap ? tc::SoftCap::On : tc::SoftCap::Off>(
      a, c.pages, c.b, c.seq, c.kv_head, c.rows, c.nrows, c.sp, part, report, kBlockTableArg);
}

// Tensor-core prefill/extend. Grid: x = tile of tokens_per_tile tokens x the group, y = kv head,
// z = split.
template <int D, typename T, bool Int4>
__global__ void __launch_bounds__(tc::kThreads) prefill_tc_kernel(AttentionArgs a, int tokens_per_tile,
                                                                  const int32_t* tile_offsets, Partials part,
                                                                  DeviceErrorReport* report) {
  if (cta_report_failed(report)) return;  // metadata failed its debug check
  KVCORE_SHARED(Row, rows, [tc::kRows]);
  KVCORE_SHARED(int, s_nrows, );
  KVCORE_SHARED(int, s_b, );
  KVCORE_SHARED(int, s_skip, );
  KVCORE_SHARED(int, s_seq, );
  const int kv_head = blockIdx.y, group = int(a.p.num_q_heads / a.p.num_kv_heads);
  if (threadIdx.x == 0) {
    const TileRequest tr = locate_tile(a, tile_offsets, tokens_per_tile, blockIdx.x, report);
    s_skip = tr.skip;
    if (!tr.skip) {
      const int tokens = min(tokens_per_tile, tr.q_len - tr.t0);
      int n = 0;
      for (int t = 0; t < tokens; ++t)
        for (int h = 0; h < group; ++h)
          rows[n++] = Row{tr.first + tr.t0 + t, kv_head * group + h, tr.seq - tr.q_len + tr.t0 + t};
      s_nrows = n;
      s_b = tr.b;
      s_seq = tr.seq;
    }
  }
  __syncthreads();
  if (s_skip || s_nrows == 0) return;
  const int b = s_b;
  const int32_t* pages = a.kv.block_table ? a.kv.block_table + int64_t(b) * a.kv.block_table_stride : nullptr;
  tc::attend_rows_tc<D, T, Int4>(a, pages, b, s_seq, kv_head, rows, s_nrows, Split{int(blockIdx.z), int(gridDim.z), 0, 0},
                                 part, report, kBlockTableArg);
}

// Tensor-core prefix pass of shared-prefix attention. The query rows (token x head of the GQA group,
// token-major) of all groups are stacked and cut into 64-row tiles, so the grid is known on the host
// without any work list and no CTA is empty; groups are contiguous runs of tokens, and a tile that
// crosses group boundaries runs one pass per group against that group's prefix. Grid: x = row tile,
// y = kv head, z = split. The bounds ask for 1 CTA per SM: without it ptxas stops at 168 registers at
// D = 80/96 and spills.
template <int D, typename T, bool Int4>
__global__ void __launch_bounds__(tc::kThreads, 1) prefix_tc_kernel(SharedPrefixArgs sa, int splits, Partials part,
                                                                 DeviceErrorReport* report) {
  if (cta_report_failed(report)) return;  // metadata failed its debug check
  KVCORE_SHARED(Row, rows, [tc::kRows]);
  KVCORE_SHARED(int, s_seg, [tc::kRows + 1]);  // rows [s_seg[i], s_seg[i + 1]) belong to group s_group[i]
  KVCORE_SHARED(int, s_group, [tc::kRows]);
  KVCORE_SHARED(int, s_segs, );
  const AttentionArgs& a = sa.suffix;
  const int kv_head = blockIdx.y, split = blockIdx.z, group = int(a.p.num_q_heads / a.p.num_kv_heads);
  if (threadIdx.x == 0) {
    const int row0 = int(blockIdx.x) * tc::kRows;
    const int n = min(tc::kRows, int(a.total_q) * group - row0);
    // Request and group of the first row (the last one starting at or before it), then walk on.
    const int token0 = row0 / group;
    int b = token0, lo = 0, hi = int(a.p.batch) - 1;
    if (a.cu_seqlens_q) {
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (a.cu_seqlens_q[mid] <= token0) lo = mid;
        else hi = mid - 1;
      }
      b = lo;
    }
    lo = 0, hi = int(sa.num_groups) - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (sa.group_indptr[mid] <= b) lo = mid;
      else hi = mid - 1;
    }
    int g = lo, segs = 0;
    for (int i = 0; i < n; ++i) {
      const int token = (row0 + i) / group;
      if (a.cu_seqlens_q) {
        while (a.cu_seqlens_q[b + 1] <= token) ++b;
      } else {
        b = token;
      }
      while (sa.group_indptr[g + 1] <= b) ++g;
      if (segs == 0 || s_group[segs - 1] != g) {
        s_seg[segs] = i;
        s_group[segs++] = g;
      }
      const int first = a.cu_seqlens_q ? a.cu_seqlens_q[b] : b;
      const int q_len = a.cu_seqlens_q ? a.cu_seqlens_q[b + 1] - first : 1;
      rows[i] = Row{token, kv_head * group + (row0 + i) % group,
                    sa.prefix_lens[g] + a.seq_lens[b] - q_len + (token - first)};
    }
    s_seg[segs] = n;
    s_segs = segs;
  }
  __syncthreads();
  for (int i = 0; i < s_segs; ++i) {
    const int g = s_group[i];
    const int32_t* pages = sa.prefix_block_table + int64_t(g) * sa.prefix_block_table_stride;
    tc::attend_rows_tc<D, T, Int4>(a, pages, 0, sa.prefix_lens[g], kv_head, rows + s_seg[i], s_seg[i + 1] - s_seg[i],
                                   Split{split, splits, 0, 0}, part, report, kPrefixBlockTableArg);
    __syncthreads();  // the next group's pass reuses the shared memory
  }
}

// out[t, h] = the LSE-weighted combination of its float partial states in a fixed order: the
// `sources` fixed ones, then (decode with a work list) request t's work items.
__global__ void merge_partials_kernel(AttentionArgs a, Partials part, int sources, WorkList work) {
  const int64_t state = blockIdx.x;  // token * Hq + head
  const int64_t states = a.total_q * a.p.num_q_heads;
  const int64_t d_total = a.p.head_dim;
  const bool bf16 = a.p.dtype == DType::BFloat16;
  const int64_t token = state / a.p.num_q_heads, head = state % a.p.num_q_heads;
  const int i0 = work.first ? work.first[token] : 0, i1 = work.first ? work.first[token + 1] : 0;
  auto lse_of = [&](int s) {
    return s < sources ? part.lse[s * states + state] : part.item_lse[int64_t(i0 + s - sources) * a.p.num_q_heads + head];
  };
  auto o_of = [&](int s, int64_t d) {
    return s < sources ? part.o[(s * states + state) * d_total + d]
                       : part.item_o[(int64_t(i0 + s - sources) * a.p.num_q_heads + head) * d_total + d];
  };
  const int total = sources + (i1 - i0);
  float mx = -INFINITY;
  for (int s = 0; s < total; ++s) mx = fmaxf(mx, lse_of(s));
  for (int64_t d = threadIdx.x; d < d_total; d += blockDim.x) {
    float sum = 0.f, o = 0.f;
    if (mx != -INFINITY)
      for (int s = 0; s < total; ++s) {
        const float w = __expf(lse_of(s) - mx);
        sum += w;
        o += w * o_of(s, d);
      }
    static_cast<uint16_t*>(a.out)[token * a.o_token_stride + head * a.o_head_stride + d] =
        float_to_half(sum > 0.f ? o / sum : 0.f, bf16);
    if (d == 0 && a.lse) a.lse[token * a.lse_token_stride + head] = sum > 0.f ? mx + __logf(sum) : -INFINITY;
  }
}

// Decode split plan from the actual lengths, on the device (one warp; graph-safe, deterministic):
// a split takes chunk = max(kMinKeysPerSplit, keys of all requests x ctas_per_item / target_ctas)
// keys (whole tiles), so the items number at most batch + target_ctas / ctas_per_item; a request
// with no visible key still gets one item (its empty state).
__global__ void plan_decode_splits_kernel(AttentionArgs a, int ctas_per_item, int target_ctas, WorkList work) {
  const int lane = threadIdx.x;
  const int batch = int(a.p.batch);
  const int64_t capacity = a.kv.block_table ? a.kv.max_pages * a.kv.page_size : a.kv.page_size;
  auto visible = [&](int b) -> int64_t {  // as locate_tile and visible_key_range see request b
    const int64_t seq = a.seq_lens[b];
    if (seq > capacity || seq < 1) return 0;
    const KeyRange kr = visible_key_range(seq, 0, seq - 1, seq - 1, a.p.causal, a.p.window);
    return kr.hi - kr.lo;
  };
  long long keys = 0;
  for (int b = lane; b < batch; b += 32) keys += visible(b);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) keys += __shfl_xor_sync(0xffffffffu, keys, o);
  long long want = (keys * ctas_per_item + target_ctas - 1) / target_ctas;
  want = (want + decode::kSplitAlign - 1) / decode::kSplitAlign * decode::kSplitAlign;
  const int chunk = int(std::max<long long>(kMinKeysPerSplit, std::min<long long>(want, INT32_MAX / 2)));
  int running = 0;
  for (int base = 0; base < batch; base += 32) {
    const int b = base + lane;
    int n = 0;
    if (b < batch) {
      const int64_t len = visible(b);
      const int c = decode::split_chunk(len, chunk);
      n = len > 0 ? int((len + c - 1) / c) : 1;
    }
    int incl = n;  // inclusive scan over the lanes
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    const int first = running + incl - n;
    if (b < batch) {
      work.first[b] = first;
      for (int s = 0; s < n; ++s) work.item_request[first + s] = b;
    }
    running += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) {
    work.first[batch] = running;
    *work.chunk = chunk;
  }
}

__device__ __forceinline__ float load_state(const void* p, int64_t i, DType dtype) {
  if (dtype == DType::Float32) return static_cast<const float*>(p)[i];
  return half_to_float(static_cast<const uint16_t*>(p)[i], dtype == DType::BFloat16);
}

__global__ void merge_states_kernel(MergeStatesArgs m) {
  const int64_t t = blockIdx.x / m.heads, h = blockIdx.x % m.heads;
  const MergeWeights w = merge_weights(m.lse_a[t * m.lse_a_stride + h], m.lse_b[t * m.lse_b_stride + h]);
  for (int64_t d = threadIdx.x; d < m.head_dim; d += blockDim.x) {
    const float oa = load_state(m.o_a, t * m.a_token_stride + h * m.a_head_stride + d, m.dtype);
    const float ob = load_state(m.o_b, t * m.b_token_stride + h * m.b_head_stride + d, m.dtype);
    const float o = (w.wa > 0.f ? w.wa * oa : 0.f) + (w.wb > 0.f ? w.wb * ob : 0.f);  // empty states add nothing
    const int64_t i = t * m.o_token_stride + h * m.o_head_stride + d;
    if (m.dtype == DType::Float32) static_cast<float*>(m.out)[i] = o;
    else static_cast<uint16_t*>(m.out)[i] = float_to_half(o, m.dtype == DType::BFloat16);
  }
  if (threadIdx.x == 0 && m.lse_out) m.lse_out[t * m.lse_out_stride + h] = w.lse;
}

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> counts;
  std::lock_guard<std::mutex> lock(mu);
  if (counts.size() <= size_t(device)) counts.resize(size_t(device) + 1, 0);
  if (!counts[size_t(device)])
    KVCORE_CUDA_CHECK(cudaDeviceGetAttribute(&counts[size_t(device)], cudaDevAttrMultiProcessorCount, device));
  return counts[size_t(device)];
}

// Splits per row tile, from shapes only (graph-safe): enough CTAs to fill the GPU twice, each split
// covering at least kMinKeysPerSplit keys of the longest possible sequence.
int choose_splits(int64_t ctas, int64_t max_keys, int device) {
  const int64_t want = (2 * int64_t(sm_count(device)) + ctas - 1) / std::max<int64_t>(ctas, 1);
  const int64_t by_length = std::max<int64_t>(1, max_keys / kMinKeysPerSplit);
  return int(std::clamp<int64_t>(std::min(want, by_length), 1, kMaxSplits));
}

// Scratch from the stream-ordered allocator: allocation and release are stream operations.
class StreamScratch {
 public:
  StreamScratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes) KVCORE_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~StreamScratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  template <typename T>
  T* at(size_t byte_offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// K/V tiles are copied 16 bytes at once, so pages must be 16-byte aligned; INT4 code rows are
// copied in 16 (or, when D / 2 is no multiple of 16, 8) bytes and (scale, min) pairs in 4.
void check_kv_alignment(const PagedKV& kv, int64_t d) {
  if (kv.int4) {
    const uintptr_t codes = reinterpret_cast<uintptr_t>(kv.k_codes) | reinterpret_cast<uintptr_t>(kv.v_codes) |
                            uintptr_t(kv.k_codes_page_stride) | uintptr_t(kv.v_codes_page_stride);
    const uintptr_t need = (d / 2) % 16 == 0 ? 16 : 8;
    KVCORE_CHECK_VALUE(codes % need == 0, "k_codes/v_codes: CUDA attention with head_dim ", d,
                       " needs page addresses and strides aligned to ", need, " bytes");
    const uintptr_t params = reinterpret_cast<uintptr_t>(kv.k_params) | reinterpret_cast<uintptr_t>(kv.v_params) |
                             uintptr_t(kv.k_params_page_stride * 2) | uintptr_t(kv.v_params_page_stride * 2);
    KVCORE_CHECK_VALUE(params % 4 == 0, "k_params/v_params: CUDA attention needs page addresses and strides aligned "
                       "to 4 bytes");
    return;
  }
  const uintptr_t bits = reinterpret_cast<uintptr_t>(kv.k) | reinterpret_cast<uintptr_t>(kv.v) |
                         uintptr_t(kv.k_page_stride * 2) | uintptr_t(kv.v_page_stride * 2);
  KVCORE_CHECK_VALUE(bits % 16 == 0, "k_cache/v_cache: CUDA attention with head_dim ", d,
                     " needs page addresses and strides aligned to 16 bytes");
}

template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 80: f(std::integral_constant<int, 80>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 192: f(std::integral_constant<int, 192>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default:
      KVCORE_THROW(ErrorKind::Value, "head_dim ", d, " is not supported by the CUDA kernels (expected 64, 80, 96, 128, 192 or 256)");
  }
}

int64_t max_keys(const PagedKV& kv) { return kv.block_table ? kv.max_pages * kv.page_size : kv.page_size; }

// Launches the decode kernels (decode, or groups wider than a tensor-core prefill tile): grid x =
// work items (with a work list) or tiles, z = fixed splits.
template <typename T>
struct TypeTag {
  using type = T;
};

template <int D>
void launch_paged_d(const AttentionArgs& a, cudaStream_t stream, dim3 grid, const TileShape& shape,
                    const int32_t* tile_offsets, Partials part, WorkList work) {
  DeviceErrorReport* report = device_error_report();
  auto run = [&](auto kernel, size_t smem) {
    KVCORE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    launch_kernel(kernel, grid, kThreads, smem, stream, a, shape, tile_offsets, part, work, report);
  };
  // Rows per CTA as a template argument: registers for the group actually there. Groups of 4 or
  // more rows go to tensor cores.
  const int rows = std::min(kMaxRows, shape.heads_per_chunk * (a.cu_seqlens_q ? shape.tokens_per_tile : 1));
  static_assert(kMaxRows <= tc::kSharedRows && kThreads == tc::kThreads, "a decode CTA fits one shared 16-row tile");
  auto by_rows = [&](auto t, auto cap) {
    using T = typename decltype(t)::type;
    constexpr bool Cap = decltype(cap)::value;
    if constexpr (std::is_same_v<T, decode::Int4KV>) {  // INT4: the query dtype picks the mma type
      const size_t smem = decode::Tile<D>::kInt4Bytes;
      if (rows <= 1) run(paged_attention_kernel<D, 1, T, Cap>, smem);
      else if (rows < 4) run(paged_attention_kernel<D, 3, T, Cap>, smem);
      else if (a.p.dtype == DType::BFloat16)
        run(paged_attention_tc_kernel<D, __nv_bfloat16, true, Cap>, tc::Tile<D, tc::kSharedRows>::kInt4Bytes);
      else
        run(paged_attention_tc_kernel<D, __half, true, Cap>, tc::Tile<D, tc::kSharedRows>::kInt4Bytes);
    } else {
      if (rows <= 1) run(paged_attention_kernel<D, 1, T, Cap>, decode::Tile<D>::kBytes);
      else if (rows < 4) run(paged_attention_kernel<D, 3, T, Cap>, decode::Tile<D>::kBytes);
      else run(paged_attention_tc_kernel<D, T, false, Cap>, tc::Tile<D, tc::kSharedRows>::kBytes);
    }
  };
  auto by_cap = [&](auto t) {
    if (a.p.soft_cap > 0.f) by_rows(t, std::true_type{});
    else by_rows(t, std::false_type{});
  };
  if (a.kv.int4) by_cap(TypeTag<decode::Int4KV>{});
  else if (a.p.dtype == DType::BFloat16) by_cap(TypeTag<__nv_bfloat16>{});
  else by_cap(TypeTag<__half>{});
}

void launch_paged(const AttentionArgs& a, cudaStream_t stream, const int32_t* tile_offsets, int64_t grid_x, int splits,
                  Partials part, WorkList work) {
  const TileShape shape = tile_shape(a.p);
  dim3 grid(unsigned(grid_x), unsigned(a.p.num_kv_heads * shape.head_chunks), unsigned(splits));
  dispatch_head_dim(a.p.head_dim, [&](auto d) {
    launch_paged_d<decltype(d)::value>(a, stream, grid, shape, tile_offsets, part, work);
  });
  KVCORE_CUDA_CHECK_LAUNCH();
}

// Runs a tensor-core kernel instantiation for the dtype and cache kind with its dynamic shared memory.
template <int D, template <int, typename, bool> class Kernel, typename... Args>
void launch_tc(DType dtype, bool int4, dim3 grid, cudaStream_t stream, Args... args) {
  const size_t smem = int4 ? tc::Tile<D>::kInt4Bytes : tc::Tile<D>::kBytes;
  auto run = [&](auto kernel) {
    KVCORE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    launch_kernel(kernel, grid, tc::kThreads, smem, stream, args...);
  };
  auto by_kind = [&](auto t) {
    using T = typename decltype(t)::type;
    if (int4) run(Kernel<D, T, true>::fn);
    else run(Kernel<D, T, false>::fn);
  };
  if (dtype == DType::BFloat16) by_kind(TypeTag<__nv_bfloat16>{});
  else by_kind(TypeTag<__half>{});
  KVCORE_CUDA_CHECK_LAUNCH();
}
template <int D, typename T, bool Int4>
struct PrefillTc {
  static constexpr auto fn = prefill_tc_kernel<D, T, Int4>;
};
template <int D, typename T, bool Int4>
struct PrefixTc {
  static constexpr auto fn = prefix_tc_kernel<D, T, Int4>;
};

int group_size(const AttentionParams& p) { return int(p.num_q_heads / p.num_kv_heads); }
bool use_tensor_cores(const AttentionArgs& a) { return a.cu_seqlens_q && group_size(a.p) <= tc::kRows; }
int tc_tokens_per_tile(const AttentionParams& p) { return std::max(1, tc::kRows / group_size(p)); }

// How one paged pass runs: kernel kind, query tokens per tile, tile count bound, KV splits. Decode
// splits come from a device-side work list over the actual lengths (work_list), unless no request
// could get more than one split (then one CTA per request writes the output).
struct PassPlan {
  bool tensor_cores;
  int tokens_per_tile;
  int64_t tiles;
  int splits;           // fixed splits (1 with a work list)
  bool work_list;
  int64_t max_items;    // work items bound (work list)
  int ctas_per_item;
  int target_ctas;
  bool partials() const { return work_list || splits > 1; }
};
PassPlan plan_paged(const AttentionArgs& a) {
  PassPlan plan;
  plan.tensor_cores = use_tensor_cores(a);
  const TileShape shape = tile_shape(a.p);
  plan.tokens_per_tile = plan.tensor_cores ? tc_tokens_per_tile(a.p) : shape.tokens_per_tile;
  plan.tiles = a.cu_seqlens_q ? (a.total_q + plan.tokens_per_tile - 1) / plan.tokens_per_tile + a.p.batch : a.p.batch;
  const int64_t ctas = plan.tiles * a.p.num_kv_heads * (plan.tensor_cores ? 1 : shape.head_chunks);
  plan.work_list = false;
  plan.ctas_per_item = int(a.p.num_kv_heads * shape.head_chunks);
  plan.target_ctas = 2 * sm_count(a.device.index);
  plan.max_items = a.p.batch + plan.target_ctas / plan.ctas_per_item;
  if (!a.cu_seqlens_q) {
    plan.splits = 1;
    plan.work_list = plan.max_items > a.p.batch && max_keys(a.kv) > kMinKeysPerSplit;
    return plan;
  }
  plan.splits = choose_splits(ctas, max_keys(a.kv), a.device.index);
  return plan;
}

// Scratch of a pass's work list: first [batch + 1], chunk [1], item_request [max_items].
size_t work_list_bytes(const AttentionArgs& a, const PassPlan& plan) {
  return plan.work_list ? (size_t(a.p.batch + 2) + size_t(plan.max_items)) * 4 : 0;
}
WorkList work_list_at(const AttentionArgs& a, const PassPlan& plan, int32_t* at) {
  if (!plan.work_list) return WorkList{};
  return WorkList{at, at + a.p.batch + 2, at + a.p.batch + 1};
}
// Float partial scratch of a pass's work items: o [max_items, Hq, D], lse [max_items, Hq].
size_t item_bytes(const AttentionArgs& a, const PassPlan& plan) {
  return plan.work_list ? size_t(plan.max_items) * size_t(a.p.num_q_heads) * size_t(a.p.head_dim + 1) * 4 : 0;
}
void set_items(const AttentionArgs& a, const PassPlan& plan, float* at, Partials& part) {
  if (!plan.work_list) return;
  part.item_o = at;
  part.item_lse = at + size_t(plan.max_items) * size_t(a.p.num_q_heads) * size_t(a.p.head_dim);
}

// One paged pass into `part` (or straight into the output when part.o and part.item_o are null).
void run_paged(const AttentionArgs& a, const PassPlan& plan, cudaStream_t stream, int32_t* tile_offsets, Partials part,
               WorkList work) {
  if (a.cu_seqlens_q) {
    launch_kernel(build_tiles_kernel, 1, 32, 0, stream, a.cu_seqlens_q, int(a.p.batch), plan.tokens_per_tile, tile_offsets,
                  device_error_report());
    KVCORE_CUDA_CHECK_LAUNCH();
  }
  if (!plan.tensor_cores) {
    if (plan.work_list) {
      launch_kernel(plan_decode_splits_kernel, 1, 32, 0, stream, a, plan.ctas_per_item, plan.target_ctas, work);
      KVCORE_CUDA_CHECK_LAUNCH();
    }
    launch_paged(a, stream, a.cu_seqlens_q ? tile_offsets : nullptr, plan.work_list ? plan.max_items : plan.tiles,
                 plan.splits, part, work);
    return;
  }
  const dim3 grid(unsigned(plan.tiles), unsigned(a.p.num_kv_heads), unsigned(plan.splits));
  DeviceErrorReport* report = device_error_report();
  dispatch_head_dim(a.p.head_dim, [&](auto d) {
    launch_tc<decltype(d)::value, PrefillTc>(a.p.dtype, a.kv.int4, grid, stream, a, plan.tokens_per_tile,
                                             static_cast<const int32_t*>(tile_offsets), part, report);
  });
}

size_t round_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

void validate_metadata(const AttentionArgs& a, const SharedPrefixArgs& sa, cudaStream_t stream) {
  DeviceErrorReport* report = device_error_report();
  if (!report || (!a.cu_seqlens_q && !sa.group_indptr)) return;
  launch_kernel(validate_metadata_kernel, 1, 32, 0, stream, a, sa, report);
  KVCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace

void attention_cuda(const AttentionArgs& a, StreamHandle stream_handle) {
  require_cuda("attention");
  if (a.total_q == 0 || a.p.batch == 0) return;
  CudaDeviceGuard guard(a.device.index);
  check_kv_alignment(a.kv, a.p.head_dim);
  cudaStream_t stream = to_cuda_stream(stream_handle);
  const PassPlan plan = plan_paged(a);
  const int64_t states = a.total_q * a.p.num_q_heads;
  const size_t tiles_bytes = a.cu_seqlens_q ? round_up(size_t(a.p.batch + 1) * 4) : 0;
  const size_t work_bytes = round_up(work_list_bytes(a, plan));
  const size_t part_bytes = plan.splits > 1 ? size_t(plan.splits) * size_t(states) * size_t(a.p.head_dim + 1) * 4 : 0;
  StreamScratch scratch(tiles_bytes + work_bytes + part_bytes + item_bytes(a, plan), stream);
  Partials part;
  if (plan.splits > 1) {
    part.o = scratch.at<float>(tiles_bytes + work_bytes);
    part.lse = part.o + size_t(plan.splits) * size_t(states) * size_t(a.p.head_dim);
  }
  set_items(a, plan, scratch.at<float>(tiles_bytes + work_bytes + part_bytes), part);
  const WorkList work = work_list_at(a, plan, scratch.at<int32_t>(tiles_bytes));
  validate_metadata(a, SharedPrefixArgs{}, stream);
  run_paged(a, plan, stream, a.cu_seqlens_q ? scratch.at<int32_t>(0) : nullptr, part, work);
  if (plan.partials()) {
    launch_kernel(merge_partials_kernel, unsigned(states), 128, 0, stream, a, part, plan.work_list ? 0 : plan.splits,
                  work);
    KVCORE_CUDA_CHECK_LAUNCH();
  }
  raise_device_errors(stream, "attention", KVCORE_ATTENTION_ARG_NAMES);
}

void shared_prefix_attention_cuda(const SharedPrefixArgs& sa, StreamHandle stream_handle) {
  require_cuda("shared_prefix attention");
  const AttentionArgs& a = sa.suffix;
  if (a.total_q == 0 || a.p.batch == 0) return;
  CudaDeviceGuard guard(a.device.index);
  check_kv_alignment(a.kv, a.p.head_dim);
  KVCORE_CHECK_VALUE(group_size(a.p) <= tc::kRows, "shared-prefix attention on CUDA supports at most ", tc::kRows,
                     " query heads per kv head");
  cudaStream_t stream = to_cuda_stream(stream_handle);
  const int64_t states = a.total_q * a.p.num_q_heads;
  // Prefix pass: the stacked query rows (tokens x heads of the group) of all groups in 64-row tiles.
  const int64_t prefix_tiles = (a.total_q * group_size(a.p) + tc::kRows - 1) / tc::kRows;
  const int prefix_splits =
      choose_splits(prefix_tiles * a.p.num_kv_heads, sa.max_prefix_pages * a.kv.page_size, a.device.index);
  const PassPlan suffix = plan_paged(a);
  // Fixed sources: the prefix splits, then the suffix's fixed splits (none with a work list).
  const int sources = prefix_splits + (suffix.work_list ? 0 : suffix.splits);
  const size_t tiles_bytes = a.cu_seqlens_q ? round_up(size_t(a.p.batch + 1) * 4) : 0;
  const size_t work_bytes = round_up(work_list_bytes(a, suffix));
  const size_t part_bytes = size_t(sources) * size_t(states) * size_t(a.p.head_dim + 1) * 4;
  StreamScratch scratch(tiles_bytes + work_bytes + part_bytes + item_bytes(a, suffix), stream);
  Partials part;
  part.o = scratch.at<float>(tiles_bytes + work_bytes);
  part.lse = part.o + size_t(sources) * size_t(states) * size_t(a.p.head_dim);
  const WorkList work = work_list_at(a, suffix, scratch.at<int32_t>(tiles_bytes));
  validate_metadata(a, sa, stream);
  const dim3 grid(unsigned(prefix_tiles), unsigned(a.p.num_kv_heads), unsigned(prefix_splits));
  DeviceErrorReport* report = device_error_report();
  dispatch_head_dim(a.p.head_dim, [&](auto d) {
    launch_tc<decltype(d)::value, PrefixTc>(a.p.dtype, a.kv.int4, grid, stream, sa, prefix_splits, part, report);
  });
  Partials suffix_part = part;
  suffix_part.source_base = prefix_splits;
  set_items(a, suffix, scratch.at<float>(tiles_bytes + work_bytes + part_bytes), suffix_part);
  run_paged(a, suffix, stream, a.cu_seqlens_q ? scratch.at<int32_t>(0) : nullptr, suffix_part, work);
  launch_kernel(merge_partials_kernel, unsigned(states), 128, 0, stream, a, suffix_part, sources, work);
  KVCORE_CUDA_CHECK_LAUNCH();
  raise_device_errors(stream, "shared_prefix attention", KVCORE_ATTENTION_ARG_NAMES);
}

void merge_states_cuda(const MergeStatesArgs& m, StreamHandle stream_handle) {
  require_cuda("merge_states");
  if (m.tokens == 0 || m.heads == 0) return;
  CudaDeviceGuard guard(m.device.index);
  launch_kernel(merge_states_kernel, unsigned(m.tokens * m.heads), 128, 0, to_cuda_stream(stream_handle), m);
  KVCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace kvcore
