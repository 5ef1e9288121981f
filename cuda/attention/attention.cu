// CUDA backend of the attention family.
//
// One kernel shape serves decode, prefill/extend and the prefix pass of shared-prefix attention:
// a CTA takes up to kMaxRows query rows that share one KV head and one KV sequence (the GQA group
// of a decode token, or a few prefill tokens x their group) and streams that sequence's visible
// keys once, its warps splitting the keys; lanes split head_dim, so each K/V row is read with
// coalesced vector loads. Long sequences are split across CTAs (split-KV) into float partial
// states that a merge kernel combines in a fixed order (deterministic). The split count depends
// only on host-known shapes and the SM count, work lists are built on the device, and scratch
// memory comes from the stream-ordered allocator, so no op synchronizes with the host and every
// op can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "kvcore/attention.h"
#include "kvcore/cuda_utils.h"
#include "kvcore/detail/attention_math.h"
#include "kvcore/detail/float16.h"

namespace kvcore {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 8;         // query rows per CTA
constexpr int kMinKeysPerSplit = 256;
constexpr int kMaxSplits = 64;

// A query row of a CTA: which token and head it is, and the query position.
struct Row {
  int token;
  int head;
  int position;
};

// Where partial states go (split-KV or shared-prefix), or nullptr to write the final output.
struct Partials {
  float* o = nullptr;       // [sources, total_q, Hq, D]
  float* lse = nullptr;     // [sources, total_q, Hq]
  int source_base = 0;      // this launch writes sources [source_base, source_base + splits)
};

template <int N>
__device__ __forceinline__ void load_lane(const uint16_t* p, bool bf16, float (&out)[N]) {
  static_assert(N == 2 || N == 4 || N == 8, "2, 4 or 8 values per lane");
  uint16_t h[N];
  if constexpr (N == 2) {
    *reinterpret_cast<uint32_t*>(h) = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (N == 4) {
    *reinterpret_cast<uint2*>(h) = *reinterpret_cast<const uint2*>(p);
  } else {
    *reinterpret_cast<uint4*>(h) = *reinterpret_cast<const uint4*>(p);
  }
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = half_to_float(h[i], bf16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The shared core: rows[0..nrows) against keys [0, num_keys) at positions key_base + j of one KV
// sequence (page list `pages`, or the single page `page0`), this CTA's split of the visible range.
template <int D>
__device__ void attend_rows(const AttentionArgs& a, const int32_t* pages, int64_t page0, int num_keys, int key_base,
                            int kv_head, const Row* rows, int nrows, int split, int num_splits, Partials part,
                            DeviceErrorReport* report) {
  constexpr int N = D / 32;
  const AttentionParams& p = a.p;
  const bool bf16 = p.dtype == DType::BFloat16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  __shared__ float s_m[kWarps][kMaxRows];
  __shared__ float s_l[kWarps][kMaxRows];
  __shared__ float s_acc[kWarps][kMaxRows][D];

  float q[kMaxRows][N], acc[kMaxRows][N], m[kMaxRows], l[kMaxRows];
  int qlo = INT32_MAX, qhi = INT32_MIN;
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) acc[r][i] = 0.f;
    if (r < nrows) {
      const uint16_t* qrow = static_cast<const uint16_t*>(a.q) + int64_t(rows[r].token) * a.q_token_stride +
                             int64_t(rows[r].head) * a.q_head_stride + lane * N;
#pragma unroll
      for (int i = 0; i < N; ++i) q[r][i] = half_to_float(qrow[i], bf16);  // q may be unaligned: scalar loads
      qlo = min(qlo, rows[r].position);
      qhi = max(qhi, rows[r].position);
    }
  }
  const KeyRange kr = visible_key_range(num_keys, key_base, qlo, qhi, p.causal, p.window);
  const int64_t len = kr.hi - kr.lo;
  const int64_t begin = kr.lo + len * split / num_splits, end = kr.lo + len * (split + 1) / num_splits;

  const auto* kbase = static_cast<const uint16_t*>(a.kv.k);
  const auto* vbase = static_cast<const uint16_t*>(a.kv.v);
  const int64_t page_size = a.kv.page_size;
  for (int64_t j = begin + warp; j < end; j += kWarps) {
    const int64_t page = pages ? pages[j / page_size] : page0;
    if (page < 0 || page >= a.kv.num_pages) {  // a bad block-table entry: skip, report in debug mode
      if (lane == 0) report_index_error(report, 1, j / page_size, page, a.kv.num_pages);
      continue;
    }
    const int64_t row_off = ((j % page_size) * p.num_kv_heads + kv_head) * D + lane * N;
    float kf[N], vf[N];
    load_lane<N>(kbase + page * a.kv.k_page_stride + row_off, bf16, kf);
    load_lane<N>(vbase + page * a.kv.v_page_stride + row_off, bf16, vf);
    const int kpos = key_base + int(j);
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= nrows || !key_visible(kpos, rows[r].position, p.causal, p.window)) continue;  // warp-uniform
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) dot += q[r][i] * kf[i];
      const float s = cap_logit(warp_sum(dot) * p.scale, p.soft_cap);
      if (s > m[r]) {
        const float correction = __expf(m[r] - s);
        l[r] *= correction;
#pragma unroll
        for (int i = 0; i < N; ++i) acc[r][i] *= correction;
        m[r] = s;
      }
      const float e = __expf(s - m[r]);
      l[r] += e;
#pragma unroll
      for (int i = 0; i < N; ++i) acc[r][i] += e * vf[i];
    }
  }

  // Combine the warps' states.
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= nrows) continue;
    if (lane == 0) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = l[r];
    }
#pragma unroll
    for (int i = 0; i < N; ++i) s_acc[warp][r][lane * N + i] = acc[r][i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nrows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][r]);
    float sum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = __expf(s_m[w][r] - mx);  // 0 for warps that saw no key
        sum += s_l[w][r] * f;
        o += s_acc[w][r][d] * f;
      }
    }
    const float out = sum > 0.f ? o / sum : 0.f;
    const float lse = sum > 0.f ? mx + __logf(sum) : -INFINITY;
    const int64_t token = rows[r].token, head = rows[r].head;
    if (part.o) {
      const int64_t state = (int64_t(part.source_base + split) * a.total_q + token) * p.num_q_heads + head;
      part.o[state * D + d] = out;
      if (d == 0) part.lse[state] = lse;
    } else {
      static_cast<uint16_t*>(a.out)[token * a.o_token_stride + head * a.o_head_stride + d] = float_to_half(out, bf16);
      if (d == 0 && a.lse) a.lse[token * a.lse_token_stride + head] = lse;
    }
  }
}

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

// tile_offsets[b] = tiles of the requests before b (prefill); tile_offsets[batch] = all tiles.
__global__ void build_tiles_kernel(const int32_t* cu_seqlens_q, int batch, int tokens_per_tile, int32_t* tile_offsets) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int32_t total = 0;
  for (int b = 0; b < batch; ++b) {
    tile_offsets[b] = total;
    const int q_len = cu_seqlens_q[b + 1] - cu_seqlens_q[b];
    total += q_len > 0 ? (q_len + tokens_per_tile - 1) / tokens_per_tile : 0;
  }
  tile_offsets[batch] = total;
}

// Grid: x = tile (decode: request), y = kv head x head chunk, z = split.
template <int D>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(AttentionArgs a, TileShape shape,
                                                                   const int32_t* tile_offsets, Partials part,
                                                                   DeviceErrorReport* report) {
  __shared__ Row rows[kMaxRows];
  __shared__ int s_nrows, s_b, s_skip;
  const int kv_head = blockIdx.y / shape.head_chunks, chunk = blockIdx.y % shape.head_chunks;
  const int group = int(a.p.num_q_heads / a.p.num_kv_heads);
  if (threadIdx.x == 0) {
    s_skip = 0;
    int b = blockIdx.x, t0 = 0, q_len = 1, first = blockIdx.x;
    if (tile_offsets) {  // prefill: find the request owning this tile
      const int tile = blockIdx.x;
      if (tile >= tile_offsets[a.p.batch]) {
        s_skip = 1;
      } else {
        int lo = 0, hi = int(a.p.batch) - 1;
        while (lo < hi) {  // last b with tile_offsets[b] <= tile
          const int mid = (lo + hi + 1) / 2;
          if (tile_offsets[mid] <= tile) lo = mid;
          else hi = mid - 1;
        }
        b = lo;
        first = a.cu_seqlens_q[b];
        q_len = a.cu_seqlens_q[b + 1] - first;
        t0 = (tile - tile_offsets[b]) * shape.tokens_per_tile;
      }
    }
    if (!s_skip) {
      const int seq = a.seq_lens[b];
      const int capacity = int(a.kv.block_table ? a.kv.max_pages * a.kv.page_size : a.kv.page_size);
      if (seq > capacity || seq < 1) {  // never read past the block table
        report_index_error(report, 0, b, seq, capacity + 1);
        s_skip = 1;
      }
      const int h0 = chunk * shape.heads_per_chunk;
      const int heads = min(shape.heads_per_chunk, group - h0);
      const int tokens = min(shape.tokens_per_tile, q_len - t0);
      int n = 0;
      for (int t = 0; t < tokens; ++t)
        for (int h = 0; h < heads; ++h) rows[n++] = Row{first + t0 + t, kv_head * group + h0 + h, seq - q_len + t0 + t};
      s_nrows = n;
      s_b = b;
    }
  }
  __syncthreads();
  if (s_skip || s_nrows == 0) return;
  const int b = s_b;
  const int32_t* pages = a.kv.block_table ? a.kv.block_table + int64_t(b) * a.kv.block_table_stride : nullptr;
  attend_rows<D>(a, pages, b, a.seq_lens[b], 0, kv_head, rows, s_nrows, blockIdx.z, gridDim.z, part, report);
}

// Shared-prefix pass. Grid: x = row tile within a group (up to the largest group), y = kv head x
// head chunk, z = group * splits + split. A group's rows are its requests' query tokens (contiguous
// in q) times the group's heads; queries sit at prefix_len + their request-local position.
template <int D>
__global__ void __launch_bounds__(kThreads) prefix_attention_kernel(SharedPrefixArgs sa, TileShape shape, int splits,
                                                                    Partials part, DeviceErrorReport* report) {
  __shared__ Row rows[kMaxRows];
  __shared__ int s_nrows;
  const AttentionArgs& a = sa.suffix;
  const int g = blockIdx.z / splits, split = blockIdx.z % splits;
  const int kv_head = blockIdx.y / shape.head_chunks, chunk = blockIdx.y % shape.head_chunks;
  const int group = int(a.p.num_q_heads / a.p.num_kv_heads);
  const int r0 = sa.group_indptr[g], r1 = sa.group_indptr[g + 1];
  const int tok0 = a.cu_seqlens_q ? a.cu_seqlens_q[r0] : r0;
  const int tok1 = a.cu_seqlens_q ? a.cu_seqlens_q[r1] : r1;
  const int t0 = tok0 + int(blockIdx.x) * shape.tokens_per_tile;
  if (t0 >= tok1) return;
  if (threadIdx.x == 0) {
    const int h0 = chunk * shape.heads_per_chunk;
    const int heads = min(shape.heads_per_chunk, group - h0);
    const int tokens = min(shape.tokens_per_tile, tok1 - t0);
    int n = 0, b = r0;
    for (int t = 0; t < tokens; ++t) {
      const int token = t0 + t;
      if (a.cu_seqlens_q) {
        while (a.cu_seqlens_q[b + 1] <= token) ++b;
      } else {
        b = token;
      }
      const int first = a.cu_seqlens_q ? a.cu_seqlens_q[b] : b;
      const int q_len = a.cu_seqlens_q ? a.cu_seqlens_q[b + 1] - first : 1;
      const int position = sa.prefix_lens[g] + a.seq_lens[b] - q_len + (token - first);
      for (int h = 0; h < heads; ++h) rows[n++] = Row{token, kv_head * group + h0 + h, position};
    }
    s_nrows = n;
  }
  __syncthreads();
  const int32_t* pages = sa.prefix_block_table + int64_t(g) * sa.prefix_block_table_stride;
  attend_rows<D>(a, pages, 0, sa.prefix_lens[g], 0, kv_head, rows, s_nrows, split, splits, part, report);
}

// out[t, h] = the LSE-weighted combination of `sources` float partial states, in source order.
__global__ void merge_partials_kernel(AttentionArgs a, Partials part, int sources) {
  const int64_t state = blockIdx.x;  // token * Hq + head
  const int64_t states = a.total_q * a.p.num_q_heads;
  const int64_t d_total = a.p.head_dim;
  const bool bf16 = a.p.dtype == DType::BFloat16;
  float mx = -INFINITY;
  for (int s = 0; s < sources; ++s) mx = fmaxf(mx, part.lse[s * states + state]);
  const int64_t token = state / a.p.num_q_heads, head = state % a.p.num_q_heads;
  for (int64_t d = threadIdx.x; d < d_total; d += blockDim.x) {
    float sum = 0.f, o = 0.f;
    if (mx != -INFINITY)
      for (int s = 0; s < sources; ++s) {
        const float w = __expf(part.lse[s * states + state] - mx);
        sum += w;
        o += w * part.o[(s * states + state) * d_total + d];
      }
    static_cast<uint16_t*>(a.out)[token * a.o_token_stride + head * a.o_head_stride + d] =
        float_to_half(sum > 0.f ? o / sum : 0.f, bf16);
    if (d == 0 && a.lse) a.lse[token * a.lse_token_stride + head] = sum > 0.f ? mx + __logf(sum) : -INFINITY;
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
    const float o = w.wa * oa + w.wb * ob;
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

// Each lane loads D/32 16-bit values at once, so pages must be aligned to D/16 bytes.
void check_kv_alignment(const PagedKV& kv, int64_t d) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(kv.k) | reinterpret_cast<uintptr_t>(kv.v) |
                         uintptr_t(kv.k_page_stride * 2) | uintptr_t(kv.v_page_stride * 2);
  KVCORE_CHECK_VALUE(bits % uintptr_t(d / 16) == 0, "k_cache/v_cache: CUDA attention with head_dim ", d,
                     " needs page addresses and strides aligned to ", d / 16, " bytes");
}

template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default: KVCORE_THROW(ErrorKind::Value, "head_dim ", d, " is not supported (expected 64, 128 or 256)");
  }
}

int64_t max_keys(const PagedKV& kv) { return kv.block_table ? kv.max_pages * kv.page_size : kv.page_size; }

// Runs the paged kernel: directly into `out` (one split), or into partial sources.
void launch_paged(const AttentionArgs& a, cudaStream_t stream, const int32_t* tile_offsets, int64_t tiles, int splits,
                  Partials part) {
  const TileShape shape = tile_shape(a.p);
  dim3 grid(unsigned(tiles), unsigned(a.p.num_kv_heads * shape.head_chunks), unsigned(splits));
  DeviceErrorReport* report = device_error_report();
  dispatch_head_dim(a.p.head_dim, [&](auto d) {
    paged_attention_kernel<decltype(d)::value><<<grid, kThreads, 0, stream>>>(a, shape, tile_offsets, part, report);
  });
  KVCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace

void attention_cuda(const AttentionArgs& a, StreamHandle stream_handle) {
  require_cuda("attention");
  if (a.total_q == 0 || a.p.batch == 0) return;
  CudaDeviceGuard guard(a.device.index);
  check_kv_alignment(a.kv, a.p.head_dim);
  cudaStream_t stream = to_cuda_stream(stream_handle);
  const TileShape shape = tile_shape(a.p);
  const int64_t tiles = a.cu_seqlens_q ? (a.total_q + shape.tokens_per_tile - 1) / shape.tokens_per_tile + a.p.batch
                                       : a.p.batch;
  const int splits = choose_splits(tiles * a.p.num_kv_heads * shape.head_chunks, max_keys(a.kv), a.device.index);
  const int64_t states = a.total_q * a.p.num_q_heads;
  const size_t tiles_bytes = a.cu_seqlens_q ? size_t(a.p.batch + 1) * 4 : 0;
  const size_t part_bytes = splits > 1 ? size_t(splits) * size_t(states) * size_t(a.p.head_dim + 1) * 4 : 0;
  StreamScratch scratch((tiles_bytes + 255) / 256 * 256 + part_bytes, stream);
  int32_t* tile_offsets = nullptr;
  if (a.cu_seqlens_q) {
    tile_offsets = scratch.at<int32_t>(0);
    build_tiles_kernel<<<1, 32, 0, stream>>>(a.cu_seqlens_q, int(a.p.batch), shape.tokens_per_tile, tile_offsets);
    KVCORE_CUDA_CHECK_LAUNCH();
  }
  Partials part;
  if (splits > 1) {
    part.o = scratch.at<float>((tiles_bytes + 255) / 256 * 256);
    part.lse = part.o + size_t(splits) * size_t(states) * size_t(a.p.head_dim);
  }
  launch_paged(a, stream, tile_offsets, tiles, splits, part);
  if (splits > 1) {
    merge_partials_kernel<<<unsigned(states), 128, 0, stream>>>(a, part, splits);
    KVCORE_CUDA_CHECK_LAUNCH();
  }
  raise_device_errors(stream, "attention", {"seq_lens", "block_table"});
}

void shared_prefix_attention_cuda(const SharedPrefixArgs& sa, StreamHandle stream_handle) {
  require_cuda("shared_prefix attention");
  const AttentionArgs& a = sa.suffix;
  if (a.total_q == 0 || a.p.batch == 0) return;
  CudaDeviceGuard guard(a.device.index);
  check_kv_alignment(a.kv, a.p.head_dim);
  cudaStream_t stream = to_cuda_stream(stream_handle);
  const TileShape shape = tile_shape(a.p);
  const int64_t states = a.total_q * a.p.num_q_heads;
  // Row tiles per group: bounded by the whole batch's query tokens (host-known).
  const int64_t prefix_tiles = (a.total_q + shape.tokens_per_tile - 1) / shape.tokens_per_tile;
  const int prefix_splits =
      choose_splits(sa.num_groups * a.p.num_kv_heads * shape.head_chunks, sa.max_prefix_pages * a.kv.page_size,
                    a.device.index);
  const int64_t suffix_tiles = a.cu_seqlens_q ? prefix_tiles + a.p.batch : a.p.batch;
  const int suffix_splits =
      choose_splits(suffix_tiles * a.p.num_kv_heads * shape.head_chunks, max_keys(a.kv), a.device.index);
  const int sources = prefix_splits + suffix_splits;
  const size_t tiles_bytes = a.cu_seqlens_q ? (size_t(a.p.batch + 1) * 4 + 255) / 256 * 256 : 0;
  StreamScratch scratch(tiles_bytes + size_t(sources) * size_t(states) * size_t(a.p.head_dim + 1) * 4, stream);
  Partials part;
  part.o = scratch.at<float>(tiles_bytes);
  part.lse = part.o + size_t(sources) * size_t(states) * size_t(a.p.head_dim);
  // Prefix pass: every group's stacked queries against its prefix.
  dim3 grid(unsigned(prefix_tiles), unsigned(a.p.num_kv_heads * shape.head_chunks),
            unsigned(sa.num_groups * prefix_splits));
  dispatch_head_dim(a.p.head_dim, [&](auto d) {
    prefix_attention_kernel<decltype(d)::value>
        <<<grid, kThreads, 0, stream>>>(sa, shape, prefix_splits, part, device_error_report());
  });
  KVCORE_CUDA_CHECK_LAUNCH();
  // Suffix pass: per-request pages, partial sources after the prefix ones.
  int32_t* tile_offsets = nullptr;
  if (a.cu_seqlens_q) {
    tile_offsets = scratch.at<int32_t>(0);
    build_tiles_kernel<<<1, 32, 0, stream>>>(a.cu_seqlens_q, int(a.p.batch), shape.tokens_per_tile, tile_offsets);
    KVCORE_CUDA_CHECK_LAUNCH();
  }
  Partials suffix_part = part;
  suffix_part.source_base = prefix_splits;
  launch_paged(a, stream, tile_offsets, suffix_tiles, suffix_splits, suffix_part);
  merge_partials_kernel<<<unsigned(states), 128, 0, stream>>>(a, part, sources);
  KVCORE_CUDA_CHECK_LAUNCH();
  raise_device_errors(stream, "shared_prefix attention", {"seq_lens", "block_table"});
}

void merge_states_cuda(const MergeStatesArgs& m, StreamHandle stream_handle) {
  require_cuda("merge_states");
  if (m.tokens == 0 || m.heads == 0) return;
  CudaDeviceGuard guard(m.device.index);
  merge_states_kernel<<<unsigned(m.tokens * m.heads), 128, 0, to_cuda_stream(stream_handle)>>>(m);
  KVCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace kvcore
