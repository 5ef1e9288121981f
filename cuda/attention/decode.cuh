// Decode attention on CUDA cores, one CTA per (request, KV head, split) with up to kMaxRows query
// rows (the GQA group, or query tokens x heads for wide groups at extend):
// - K and V stream through shared memory in tiles of 16 KB (64/32/16 keys at D = 64/<=128/>128),
//   a kStages-deep cp.async pipeline of 16-byte copies; a tile's page entries are read once per
//   warp (one key per lane, 32-bit math) and handed to the copying threads by shuffles.
// - Each warp scores its keys of the tile for all rows (lanes split head_dim in 16-byte chunks,
//   a key per kLanes lanes), then does one online-softmax update per tile in base 2 (log2 e is
//   folded into the query scale), then P V. Masking (split end, bad pages, causal/window per row)
//   runs only on the tiles that need it.
// - The warps' states meet once at the end, in shared memory reused from the pipeline.
#pragma once

#include <cstdint>

#include "../common/device.cuh"

#include "kvcore/attention.h"
#include "kvcore/detail/attention_math.h"
#include "kvcore/detail/device_error.h"
#include "kvcore/detail/float16.h"

namespace kvcore {
namespace decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 8;  // query rows per CTA
constexpr int kMaxSplits = 64;
constexpr int kMinKeysPerSplit = 256;
constexpr int kSplitAlign = 64;  // split lengths are whole tiles of every head dim
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A query row of a CTA: which token and head it is, and the query position.
struct Row {
  int token;
  int head;
  int position;
};

// Where partial states go (split-KV or shared-prefix), or nullptr everywhere for the final output.
struct Partials {
  float* o = nullptr;       // fixed splits: [sources, total_q, Hq, D]
  float* lse = nullptr;     // [sources, total_q, Hq]
  int source_base = 0;      // this launch writes sources [source_base, source_base + splits)
  float* item_o = nullptr;  // work-list splits (decode): [items, Hq, D], item = (request, split)
  float* item_lse = nullptr;  // [items, Hq]
};

// The device-built split plan of a decode pass (see plan_decode_splits_kernel): request b owns
// work items [first[b], first[b + 1]), split s of it covers `split_chunk(len, *chunk)` keys from
// s times that.
struct WorkList {
  int32_t* first = nullptr;         // [batch + 1]
  int32_t* item_request = nullptr;  // [max_items]
  int32_t* chunk = nullptr;         // [1] keys per split before the per-request split cap
};

// Which split of the visible keys a CTA takes: chunk > 0: keys [lo + index chunk, ...) of a
// work-list split (item = its partial slot); otherwise the index-th of `count` even splits.
struct Split {
  int index;
  int count;
  int chunk;
  int item;
};

__host__ __device__ inline int split_chunk(int64_t len, int chunk) {
  const int64_t capped = (len + kMaxSplits - 1) / kMaxSplits;  // never more than kMaxSplits splits
  const int64_t c = (capped + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  return int(c > chunk ? c : chunk);
}

__device__ inline KeyRange split_keys(KeyRange kr, const Split& sp) {
  const int64_t len = kr.hi - kr.lo;
  if (sp.chunk > 0) {
    const int64_t c = split_chunk(len, sp.chunk), b = kr.lo + int64_t(sp.index) * c;
    return {b < kr.hi ? b : kr.hi, b + c < kr.hi ? b + c : kr.hi};
  }
  return {kr.lo + len * sp.index / sp.count, kr.lo + len * (sp.index + 1) / sp.count};
}

// The float slot of a row's partial state.
__device__ inline int64_t partial_state(const AttentionArgs& a, const Partials& part, const Split& sp, int token,
                                        int head) {
  if (sp.chunk > 0) return int64_t(sp.item) * a.p.num_q_heads + head;
  return (int64_t(part.source_base + sp.index) * a.total_q + token) * a.p.num_q_heads + head;
}
__device__ inline float* partial_o(const Partials& part, const Split& sp) { return sp.chunk > 0 ? part.item_o : part.o; }
__device__ inline float* partial_lse(const Partials& part, const Split& sp) {
  return sp.chunk > 0 ? part.item_lse : part.lse;
}

// A row's state merged from the warps' states (base-2 maxima m[w * stride], sums l[w * stride],
// unnormalized accumulators acc(w)): the normalized value and the natural-log LSE; 0 and -inf when
// no warp saw a key.
struct MergedState {
  float value, lse;
};
template <typename Acc>
__device__ __forceinline__ MergedState merge_warp_states(const float* m, const float* l, int stride,
                                                       Acc acc) {
  float mx = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m[w * stride]);
  float sum = 0.f, o = 0.f;
  if (mx != -INFINITY) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = ptx::ex2(m[w * stride] - mx);  // 0 for warps that saw no key
      sum += l[w * stride] * f;
      o += acc(w) * f;
    }
  }
  return {sum > 0.f ? o / sum : 0.f, sum > 0.f ? (mx + __log2f(sum)) * kLn2 : -INFINITY};
}

template <int D>
struct Tile {
  static constexpr int kChunks = D / 8;  // 16-byte chunks per K/V row
  static constexpr int kLanes = kChunks <= 8 ? 8 : (kChunks <= 16 ? 16 : 32);  // lanes per key
  static constexpr int kKeysPerStep = 32 / kLanes;  // keys a warp scores at once
  static constexpr int kSteps = 4;
  static constexpr int kKeysPerWarp = kSteps * kKeysPerStep;
  static constexpr int kKeys = kWarps * kKeysPerWarp;  // 64, 32 or 16: 16 KB of K + V per stage
  static constexpr int kStages = 3;
  static constexpr int kElems = kKeys * D;  // 16-bit elements of K (or V) per stage
  static constexpr int kCopies = (kKeys * kChunks + kThreads - 1) / kThreads;  // per thread, per tensor
  static constexpr int kKeyWords = (kKeys + 31) / 32;  // page entries per lane
  static constexpr size_t kPipe = size_t(kStages) * 2 * kElems * 2;
  static constexpr size_t kCombine = size_t(kWarps) * kMaxRows * D * 4;
  static constexpr size_t kBytes = kPipe > kCombine ? kPipe : kCombine;
  static_assert(D % 8 == 0 && kChunks <= 32, "head_dim in 16-byte chunks, at most one chunk per lane");
};

// Eight 16-bit values (one 16-byte chunk) as floats.
template <bool BF16>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (BF16) {
      f[2 * i] = bits_to_float(w[i] << 16);
      f[2 * i + 1] = bits_to_float(w[i] & 0xffff0000u);
    } else {
      f[2 * i] = fp16_to_float(uint16_t(w[i] & 0xffffu));
      f[2 * i + 1] = fp16_to_float(uint16_t(w[i] >> 16));
    }
  }
}

// A lane's chunk `ch` of row `key` of a shared-memory tile as floats (zeros past head_dim).
template <int D, bool BF16>
__device__ __forceinline__ void tile_chunk(const uint16_t* tile, int key, int ch, bool ch_ok, float (&f)[8]) {
  uint4 raw = make_uint4(0, 0, 0, 0);
  if (ch_ok) raw = *reinterpret_cast<const uint4*>(tile + key * D + ch * 8);
  unpack8<BF16>(raw, f);
}

// rows[0..nrows) (nrows <= R) against keys [0, num_keys) at positions key_base + j of one KV
// sequence (page list `pages`, or the single page `page0`), split `sp` of the visible range.
// BF16: the cache dtype; Cap: soft cap on. A bad page entry is reported (debug mode) as argument
// `table_arg` and its keys are skipped.
template <int D, int R, bool BF16, bool Cap>
__device__ void attend_tiled(const AttentionArgs& a, const int32_t* pages, int page0, int num_keys, int key_base,
                             int kv_head, const Row* rows, int nrows, Split sp, Partials part,
                             DeviceErrorReport* report, int table_arg) {
  using TileT = Tile<D>;
  constexpr int C = TileT::kChunks, L = TileT::kLanes, KS = TileT::kKeysPerStep, NK = TileT::kKeys;
  constexpr int S = TileT::kStages;
  const AttentionParams& p = a.p;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int ch = lane % L;  // this lane's chunk of head_dim
  const bool ch_ok = C == L || ch < C;

  KVCORE_DYNAMIC_SHARED(unsigned char, smem, 16);
  KVCORE_SHARED(unsigned long long, s_valid, [S]);  // keys of a stage's tile that were loaded
  KVCORE_SHARED(float, s_m, [kWarps][R]);
  KVCORE_SHARED(float, s_l, [kWarps][R]);
  uint16_t* const ks = reinterpret_cast<uint16_t*>(smem);
  uint16_t* const vs = ks + S * TileT::kElems;

  // Queries in registers, pre-scaled: scores come out in base-2 units (or, with a soft cap, as
  // logit / cap for the tanh).
  const float qscale = Cap ? p.scale / p.soft_cap : p.scale * kLog2e;
  float q[R][8];
  int pos[R];
  int qlo = INT32_MAX, qhi = INT32_MIN;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool live = r < nrows;
    pos[r] = rows[live ? r : 0].position;
    qlo = min(qlo, pos[r]);
    qhi = max(qhi, pos[r]);
    const uint16_t* qrow = static_cast<const uint16_t*>(a.q) + int64_t(rows[live ? r : 0].token) * a.q_token_stride +
                           int64_t(rows[live ? r : 0].head) * a.q_head_stride + ch * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i)  // q may be unaligned: scalar loads
      q[r][i] = live && ch_ok ? half_to_float(qrow[i], BF16) * qscale : 0.f;
  }
  const KeyRange kr = split_keys(visible_key_range(num_keys, key_base, qlo, qhi, p.causal, p.window), sp);
  const int begin = int(kr.lo), end = int(kr.hi);
  // Keys every row sees: tiles inside [all_lo, all_hi) need no per-row mask.
  int all_lo = begin, all_hi = end;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const KeyRange rr = visible_key_range(num_keys, key_base, pos[r], pos[r], p.causal, p.window);
    all_lo = max(all_lo, int(rr.lo));
    all_hi = min(all_hi, int(rr.hi));
  }
  const int tiles = (end - begin + NK - 1) / NK;

  const auto* kbase = static_cast<const uint16_t*>(a.kv.k);
  const auto* vbase = static_cast<const uint16_t*>(a.kv.v);
  const uint32_t page_size = uint32_t(a.kv.page_size);
  const bool pow2 = (page_size & (page_size - 1)) == 0;
  const int page_shift = __ffs(int(page_size)) - 1;
  const int num_pages = int(a.kv.num_pages < INT32_MAX ? a.kv.num_pages : INT32_MAX);
  const uint32_t row_stride = uint32_t(p.num_kv_heads) * D;

  // Issues the copies of tile u into its stage (always commits a group, possibly empty).
  auto load_tile = [&](int u) {
    if (u < tiles) {
      const int t0 = begin + u * NK, slot = u % S;
      int pg[TileT::kKeyWords];
      uint32_t off[TileT::kKeyWords];
#pragma unroll
      for (int h = 0; h < TileT::kKeyWords; ++h) {
        const int k = lane + 32 * h, j = t0 + k;
        pg[h] = -1;
        off[h] = 0;
        if (k < NK && j < end) {
          uint32_t pi = 0, in = uint32_t(j);
          int page = page0;
          if (pages) {
            pi = pow2 ? uint32_t(j) >> page_shift : uint32_t(j) / page_size;
            in = uint32_t(j) - pi * page_size;
            page = pages[pi];
          }
          if (page < 0 || page >= num_pages || page >= a.kv.num_pages) {
            if (warp == 0) report_index_error(report, table_arg, pi, page, a.kv.num_pages);
          } else {
            pg[h] = page;
            off[h] = in * row_stride + uint32_t(kv_head) * D;
          }
        }
      }
      if (warp == 0) {
        unsigned long long bits = 0;
#pragma unroll
        for (int h = 0; h < TileT::kKeyWords; ++h) bits |= (unsigned long long)__ballot_sync(0xffffffffu, pg[h] >= 0) << (32 * h);
        if (lane == 0) s_valid[slot] = bits;
      }
      uint16_t* kd = ks + slot * TileT::kElems;
      uint16_t* vd = vs + slot * TileT::kElems;
#pragma unroll
      for (int i = 0; i < TileT::kCopies; ++i) {
        const int c = tid + i * kThreads;
        const int row = c / C, cc = c % C;
        int page = -1;
        uint32_t o = 0;
#pragma unroll
        for (int h = 0; h < TileT::kKeyWords; ++h) {  // every lane shuffles: the source lane is row % 32
          const int ph = __shfl_sync(0xffffffffu, pg[h], row & 31);
          const uint32_t oh = __shfl_sync(0xffffffffu, off[h], row & 31);
          if ((row >> 5) == h) {
            page = ph;
            o = oh;
          }
        }
        if ((NK * C) % kThreads == 0 || c < NK * C) {
          const bool ok = page >= 0;
          const uint16_t* ksrc = ok ? kbase + int64_t(page) * a.kv.k_page_stride + o + cc * 8 : kbase;
          const uint16_t* vsrc = ok ? vbase + int64_t(page) * a.kv.v_page_stride + o + cc * 8 : vbase;
          ptx::cp_async_16(kd + row * D + cc * 8, ksrc, ok);
          ptx::cp_async_16(vd + row * D + cc * 8, vsrc, ok);
        }
      }
    }
    ptx::cp_async_commit();
  };

  float m[R], l[R], acc[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[r][i] = 0.f;
  }
  const float cap2 = Cap ? p.soft_cap * kLog2e : 0.f;
  const int key0 = warp * TileT::kKeysPerWarp + lane / L;  // this lane's key of the tile at step 0

#pragma unroll
  for (int u = 0; u < S - 1; ++u) load_tile(u);
  for (int t = 0; t < tiles; ++t) {
    ptx::cp_async_wait<S - 2>();
    __syncthreads();  // tile t landed for every thread; every warp is done with tile t - 1
    load_tile(t + S - 1);
    const int slot = t % S, t0 = begin + t * NK;
    const uint16_t* kt = ks + slot * TileT::kElems;
    const uint16_t* vt = vs + slot * TileT::kElems;

    float s[TileT::kSteps][R];
#pragma unroll
    for (int st = 0; st < TileT::kSteps; ++st) {
      const int key = key0 + st * KS;
      float kf[8];
      tile_chunk<D, BF16>(kt, key, ch, ch_ok, kf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float d0 = q[r][0] * kf[0], d1 = q[r][1] * kf[1];
#pragma unroll
        for (int i = 2; i < 8; i += 2) {
          d0 += q[r][i] * kf[i];
          d1 += q[r][i + 1] * kf[i + 1];
        }
        float dot = d0 + d1;
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        s[st][r] = Cap ? cap2 * tanhf(dot) : dot;
      }
    }
    const unsigned long long valid = s_valid[slot];
    const unsigned long long full = NK == 64 ? ~0ull : (1ull << NK) - 1;
    if (valid != full || t0 < all_lo || t0 + NK > all_hi) {  // edge tile: mask per key and row
#pragma unroll
      for (int st = 0; st < TileT::kSteps; ++st) {
        const int key = key0 + st * KS;
        const bool loaded = (valid >> key) & 1ull;
        const int kpos = key_base + t0 + key;
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (!loaded || !key_visible(kpos, pos[r], p.causal, p.window)) s[st][r] = -INFINITY;
      }
    }
    // One online-softmax update per tile; m is the same in every lane of the warp.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mt = s[0][r];
#pragma unroll
      for (int st = 1; st < TileT::kSteps; ++st) mt = fmaxf(mt, s[st][r]);
#pragma unroll
      for (int o = L; o < 32; o <<= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
      const float mn = fmaxf(m[r], mt);
      const float ref = mn == -INFINITY ? 0.f : mn;  // nothing visible yet: every weight stays 0
      const float corr = ptx::ex2(m[r] - ref);
      m[r] = mn;
      float sum = 0.f;
#pragma unroll
      for (int st = 0; st < TileT::kSteps; ++st) {
        s[st][r] = ptx::ex2(s[st][r] - ref);
        sum += s[st][r];
      }
      l[r] = l[r] * corr + sum;  // this lane's key group only: summed over groups at the end
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[r][i] *= corr;
    }
#pragma unroll
    for (int st = 0; st < TileT::kSteps; ++st) {
      const int key = key0 + st * KS;
      float vf[8];
      tile_chunk<D, BF16>(vt, key, ch, ch_ok, vf);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r][i] += s[st][r] * vf[i];
    }
  }

  // The key groups of a warp, then the warps.
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int o = L; o < 32; o <<= 1) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], o);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[r][i] += __shfl_xor_sync(0xffffffffu, acc[r][i], o);
    }
  ptx::cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below
  float* const s_acc = reinterpret_cast<float*>(smem);  // [kWarps][R][D]
  if (lane < C) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int i = 0; i < 8; ++i) s_acc[(warp * R + r) * D + lane * 8 + i] = acc[r][i];
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = l[r];
    }
  }
  __syncthreads();
  const bool bf16 = BF16;
  float* const po = partial_o(part, sp);
  float* const plse = partial_lse(part, sp);
  for (int idx = tid; idx < nrows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const MergedState st =
        merge_warp_states(&s_m[0][r], &s_l[0][r], R, [&](int w) { return s_acc[(w * R + r) * D + d]; });
    const float out = st.value, lse = st.lse;
    const int64_t token = rows[r].token, head = rows[r].head;
    if (po) {
      const int64_t state = partial_state(a, part, sp, int(token), int(head));
      po[state * D + d] = out;
      if (d == 0) plse[state] = lse;
    } else {
      static_cast<uint16_t*>(a.out)[token * a.o_token_stride + head * a.o_head_stride + d] = float_to_half(out, bf16);
      if (d == 0 && a.lse) a.lse[token * a.lse_token_stride + head] = lse;
    }
  }
}

}  // namespace decode
}  // namespace kvcore
