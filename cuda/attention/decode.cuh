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
// - INT4 caches take the same tiles and lanes (8 codes, 4 bytes, per lane and key): codes and
//   (scale, min) pairs stream through the pipeline, codes become exact floats by a magic-number
//   OR, and dequantization folds into the scores and the output: q.k = scale (q.codes) + min sum(q),
//   sum_j p_j v_j = sum_j (p_j scale_j) codes_j + sum_j p_j min_j. Queries are rotated into the
//   cache's basis first and the output is rotated back.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../common/device.cuh"
#include "../quant/int4_warp.cuh"

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

// The cache type of an INT4 KV decode (the 16-bit ones are __half and __nv_bfloat16).
struct Int4KV {};

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

// Element d of a row's result (with d == 0 its natural-log LSE) into the final 16-bit output or the
// split's partial state.
template <int D>
__device__ __forceinline__ void store_result(const AttentionArgs& a, const Partials& part, const Split& sp,
                                             const Row& row, int d, float value, float lse, bool bf16) {
  if (float* po = partial_o(part, sp)) {
    const int64_t state = partial_state(a, part, sp, row.token, row.head);
    po[state * D + d] = value;
    if (d == 0) partial_lse(part, sp)[state] = lse;
  } else {
    const int64_t token = row.token, head = row.head;
    static_cast<uint16_t*>(a.out)[token * a.o_token_stride + head * a.o_head_stride + d] = float_to_half(value, bf16);
    if (d == 0 && a.lse) a.lse[token * a.lse_token_stride + head] = lse;
  }
}


template <int D>
struct Tile {
  static constexpr int kChunks = D / 8;  // 16-byte chunks per K/V row
  static constexpr int kLanes = kChunks <= 8 ? 8 : (kChunks <= 16 ? 16 : 32);  // lanes per key
  static constexpr int kKeysPerStep = 32 / kLanes;  // keys a warp scores at once
  static constexpr int kSteps = 4;  // INT4 at 8 steps: no fewer instructions per key, spills at 8 rows
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
  // INT4 stage: K codes, V codes ([kKeys][D / 2] bytes each), then K and V (scale, min) words.
  static constexpr int kCodeRow = D / 2;
  static constexpr int kCodeCopy = kCodeRow % 16 == 0 ? 16 : 8;  // cp.async size of the code rows
  static constexpr int kCodeCopies = (kKeys * (kCodeRow / kCodeCopy) + kThreads - 1) / kThreads;
  static constexpr int kInt4Stage = 2 * kKeys * (kCodeRow + 4);
  static constexpr size_t kInt4Pipe = size_t(kStages) * kInt4Stage;
  static constexpr size_t kInt4Bytes = kInt4Pipe > kCombine ? kInt4Pipe : kCombine;
  static_assert(kCodeRow % 8 == 0 && kKeys <= kThreads, "code rows in 8-byte copies, a param copy per thread");
};

// Eight INT4 codes (element i in bits 4i..4i+3) as exact floats code_i * 16^(i % 4): OR-ing the
// nibbles, kept in place, into the mantissa of 2^23 and subtracting 2^23. The 16^(i % 4) factors
// are folded into the other operand (nibble_scale), which keeps every product's rounding.
__device__ __forceinline__ void int4_codes(uint32_t w, float (&f)[8]) {
  const uint32_t hi = w >> 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[i] = bits_to_float(ptx::lop3<0xEA>(w, 0xfu << (4 * i), 0x4b000000u)) - 8388608.f;  // (a & b) | c
    f[i + 4] = bits_to_float(ptx::lop3<0xEA>(hi, 0xfu << (4 * i), 0x4b000000u)) - 8388608.f;
  }
}
__device__ __forceinline__ constexpr float nibble_scale(int i) {
  return (i % 4) == 0 ? 1.f : (i % 4) == 1 ? 1.f / 16 : (i % 4) == 2 ? 1.f / 256 : 1.f / 4096;
}

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
// T: the cache type (__half, __nv_bfloat16 or Int4KV; INT4 queries and outputs are of p.dtype);
// Cap: soft cap on. A bad page entry is reported (debug mode) as argument `table_arg` and its keys
// are skipped.
template <int D, int R, typename T, bool Cap>
__device__ void attend_tiled(const AttentionArgs& a, const int32_t* pages, int page0, int num_keys, int key_base,
                             int kv_head, const Row* rows, int nrows, Split sp, Partials part,
                             DeviceErrorReport* report, int table_arg) {
  using TileT = Tile<D>;
  constexpr bool Int4 = std::is_same_v<T, Int4KV>;
  constexpr int C = TileT::kChunks, L = TileT::kLanes, KS = TileT::kKeysPerStep, NK = TileT::kKeys;
  constexpr int S = TileT::kStages, CR = TileT::kCodeRow, CC = TileT::kCodeCopy;
  const AttentionParams& p = a.p;
  const bool bf16 = Int4 ? p.dtype == DType::BFloat16 : std::is_same_v<T, __nv_bfloat16>;  // q and out
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int ch = lane % L;  // this lane's chunk of head_dim (8 values)
  const bool ch_ok = C == L || ch < C;

  KVCORE_DYNAMIC_SHARED(unsigned char, smem, 16);
  KVCORE_SHARED(unsigned long long, s_valid, [S]);  // keys of a stage's tile that were loaded
  KVCORE_SHARED(float, s_m, [kWarps][R]);
  KVCORE_SHARED(float, s_l, [kWarps][R]);
  uint16_t* const ks = reinterpret_cast<uint16_t*>(smem);
  uint16_t* const vs = ks + S * TileT::kElems;

  // Queries in registers, pre-scaled: scores come out in base-2 units (or, with a soft cap, as
  // logit / cap for the tanh). INT4: rotated first (in shared memory, before the pipeline uses
  // it), scaled by nibble_scale, and each row's sum kept for the min term.
  const float qscale = Cap ? p.scale / p.soft_cap : p.scale * kLog2e;
  float q[R][8], qsum[R];
  int pos[R];
  int qlo = INT32_MAX, qhi = INT32_MIN;
  float* const qrot = reinterpret_cast<float*>(smem);  // INT4: [nrows][D]
  // INT4 rotations: each warp takes a run of rows (no loop around rotate_rows' own).
  constexpr int kRowsPerWarp = (R + kWarps - 1) / kWarps;
  const int warp_row0 = warp * kRowsPerWarp, warp_rows = max(0, min(kRowsPerWarp, nrows - warp_row0));
  if constexpr (Int4) {
    for (int idx = tid; idx < nrows * D; idx += kThreads) {
      const Row& row = rows[idx / D];
      qrot[idx] = half_to_float(static_cast<const uint16_t*>(a.q)[int64_t(row.token) * a.q_token_stride +
                                                                   int64_t(row.head) * a.q_head_stride + idx % D],
                                bf16);
    }
    __syncthreads();
    rotate_rows<D>(qrot + warp_row0 * D, warp_rows, lane, a.kv.rot_block, a.kv.rot_signs, false);
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool live = r < nrows;
    pos[r] = rows[live ? r : 0].position;
    qlo = min(qlo, pos[r]);
    qhi = max(qhi, pos[r]);
    const uint16_t* qrow = static_cast<const uint16_t*>(a.q) + int64_t(rows[live ? r : 0].token) * a.q_token_stride +
                           int64_t(rows[live ? r : 0].head) * a.q_head_stride + ch * 8;
    qsum[r] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // q may be unaligned: scalar loads
      const float x = !(live && ch_ok) ? 0.f : (Int4 ? qrot[r * D + ch * 8 + i] : half_to_float(qrow[i], bf16)) * qscale;
      qsum[r] += x;
      q[r][i] = Int4 ? x * nibble_scale(i) : x;
    }
    if constexpr (Int4) {
#pragma unroll
      for (int o = L / 2; o > 0; o >>= 1) qsum[r] += __shfl_xor_sync(0xffffffffu, qsum[r], o);
    }
  }
  if constexpr (Int4) __syncthreads();  // qrot is read; the pipeline takes the memory
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

  const uint32_t page_size = uint32_t(a.kv.page_size);
  const bool pow2 = (page_size & (page_size - 1)) == 0;
  const int page_shift = __ffs(int(page_size)) - 1;
  const int num_pages = int(a.kv.num_pages < INT32_MAX ? a.kv.num_pages : INT32_MAX);

  // Issues the copies of tile u into its stage (always commits a group, possibly empty).
  auto load_tile = [&](int u) {
    if (u < tiles) {
      const int t0 = begin + u * NK, slot = u % S;
      int pg[TileT::kKeyWords];
      uint32_t kv_row[TileT::kKeyWords];  // the key's (token, kv head) row within its page
#pragma unroll
      for (int h = 0; h < TileT::kKeyWords; ++h) {
        const int k = lane + 32 * h, j = t0 + k;
        pg[h] = -1;
        kv_row[h] = 0;
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
            kv_row[h] = in * uint32_t(p.num_kv_heads) + uint32_t(kv_head);
          }
        }
      }
      if (warp == 0) {
        unsigned long long bits = 0;
#pragma unroll
        for (int h = 0; h < TileT::kKeyWords; ++h) bits |= (unsigned long long)__ballot_sync(0xffffffffu, pg[h] >= 0) << (32 * h);
        if (lane == 0) s_valid[slot] = bits;
      }
      // Page and row of tile key `key` (< NK), from the lane that looked it up; every lane
      // shuffles, the source lane is key % 32.
      auto source = [&](int key, int& page, uint32_t& row) {
        page = -1;
        row = 0;
#pragma unroll
        for (int h = 0; h < TileT::kKeyWords; ++h) {
          const int ph = __shfl_sync(0xffffffffu, pg[h], key & 31);
          const uint32_t rh = __shfl_sync(0xffffffffu, kv_row[h], key & 31);
          if ((key >> 5) == h) {
            page = ph;
            row = rh;
          }
        }
      };
      if constexpr (Int4) {
        unsigned char* const stage = smem + size_t(slot) * TileT::kInt4Stage;
        unsigned char* const kc = stage;
        unsigned char* const vc = stage + NK * CR;
        unsigned char* const kp = stage + 2 * NK * CR;  // (scale, min) words
        unsigned char* const vp = kp + NK * 4;
#pragma unroll
        for (int i = 0; i < TileT::kCodeCopies; ++i) {
          const int c = tid + i * kThreads;
          const int key = (c / (CR / CC)) % NK, cc = c % (CR / CC);
          int page;
          uint32_t row;
          source(key, page, row);
          if ((NK * (CR / CC)) % kThreads == 0 || c < NK * (CR / CC)) {
            const bool ok = page >= 0;
            const int64_t kpg = ok ? int64_t(page) * a.kv.k_codes_page_stride + row * CR + cc * CC : 0;
            const int64_t vpg = ok ? int64_t(page) * a.kv.v_codes_page_stride + row * CR + cc * CC : 0;
            ptx::cp_async<CC>(kc + key * CR + cc * CC, a.kv.k_codes + kpg, ok);
            ptx::cp_async<CC>(vc + key * CR + cc * CC, a.kv.v_codes + vpg, ok);
          }
        }
        {
          const int key = tid % NK;
          int page;
          uint32_t row;
          source(key, page, row);
          if (tid < NK) {
            const bool ok = page >= 0;
            const int64_t kpg = ok ? int64_t(page) * a.kv.k_params_page_stride + row * 2 : 0;
            const int64_t vpg = ok ? int64_t(page) * a.kv.v_params_page_stride + row * 2 : 0;
            ptx::cp_async<4>(kp + key * 4, a.kv.k_params + kpg, ok);
            ptx::cp_async<4>(vp + key * 4, a.kv.v_params + vpg, ok);
          }
        }
      } else {
        const auto* kbase = static_cast<const uint16_t*>(a.kv.k);
        const auto* vbase = static_cast<const uint16_t*>(a.kv.v);
        uint16_t* kd = ks + slot * TileT::kElems;
        uint16_t* vd = vs + slot * TileT::kElems;
#pragma unroll
        for (int i = 0; i < TileT::kCopies; ++i) {
          const int c = tid + i * kThreads;
          const int key = (c / C) % NK, cc = c % C;
          int page;
          uint32_t row;
          source(key, page, row);
          if ((NK * C) % kThreads == 0 || c < NK * C) {
            const bool ok = page >= 0;
            const uint16_t* ksrc = ok ? kbase + int64_t(page) * a.kv.k_page_stride + row * D + cc * 8 : kbase;
            const uint16_t* vsrc = ok ? vbase + int64_t(page) * a.kv.v_page_stride + row * D + cc * 8 : vbase;
            ptx::cp_async_16(kd + key * D + cc * 8, ksrc, ok);
            ptx::cp_async_16(vd + key * D + cc * 8, vsrc, ok);
          }
        }
      }
    }
    ptx::cp_async_commit();
  };

  // A lane's 8 values of tile key `key` of K or V (is_v), with the row's (scale, min) for INT4.
  // 16-bit: the values; INT4: the codes scaled as int4_codes gives them.
  auto tile_values = [&](int slot, int key, bool is_v, float (&f)[8], float& scale, float& min) {
    if constexpr (Int4) {
      const unsigned char* stage = smem + size_t(slot) * TileT::kInt4Stage;
      const uint32_t w = ch_ok ? *reinterpret_cast<const uint32_t*>(stage + (is_v ? NK * CR : 0) + key * CR + ch * 4) : 0u;
      const uint32_t prm = *reinterpret_cast<const uint32_t*>(stage + 2 * NK * CR + (is_v ? NK * 4 : 0) + key * 4);
      int4_codes(w, f);
      scale = fp16_to_float(uint16_t(prm & 0xffffu));
      min = fp16_to_float(uint16_t(prm >> 16));
    } else {
      tile_chunk<D, std::is_same_v<T, __nv_bfloat16>>((is_v ? vs : ks) + slot * TileT::kElems, key, ch, ch_ok, f);
      scale = 1.f;
      min = 0.f;
    }
  };

  float m[R], l[R], acc[R][8], vmin[R];  // vmin: INT4's sum_j p_j min_j of this lane's keys
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    vmin[r] = 0.f;
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

    float s[TileT::kSteps][R];
#pragma unroll
    for (int st = 0; st < TileT::kSteps; ++st) {
      float kf[8], kscale, kmin;
      tile_values(slot, key0 + st * KS, false, kf, kscale, kmin);
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
        if constexpr (Int4) dot = kscale * dot + kmin * qsum[r];
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
      if constexpr (Int4) vmin[r] *= corr;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[r][i] *= corr;
    }
#pragma unroll
    for (int st = 0; st < TileT::kSteps; ++st) {
      float vf[8], vscale, vmn;
      tile_values(slot, key0 + st * KS, true, vf, vscale, vmn);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float w = Int4 ? s[st][r] * vscale : s[st][r];
        if constexpr (Int4) vmin[r] += s[st][r] * vmn;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r][i] += w * vf[i];
      }
    }
  }

  // INT4: the codes' scales undone and the min term added; then the key groups of a warp, then
  // the warps.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if constexpr (Int4) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[r][i] = acc[r][i] * nibble_scale(i) + vmin[r];
    }
#pragma unroll
    for (int o = L; o < 32; o <<= 1) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], o);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[r][i] += __shfl_xor_sync(0xffffffffu, acc[r][i], o);
    }
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below
  float* const s_acc = reinterpret_cast<float*>(smem);  // [kWarps][R][D]
  KVCORE_SHARED(float, s_lse, [R]);  // INT4: the rows' LSE until the output is rotated back
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
  for (int idx = tid; idx < nrows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const MergedState st =
        merge_warp_states(&s_m[0][r], &s_l[0][r], R, [&](int w) { return s_acc[(w * R + r) * D + d]; });
    if constexpr (Int4) {  // into warp 0's rows (this thread alone read that element)
      s_acc[r * D + d] = st.value;
      if (d == 0) s_lse[r] = st.lse;
    } else {
      store_result<D>(a, part, sp, rows[r], d, st.value, st.lse, bf16);
    }
  }
  if constexpr (Int4) {  // V's rotation undone on the output
    __syncthreads();
    rotate_rows<D>(s_acc + warp_row0 * D, warp_rows, lane, a.kv.rot_block, a.kv.rot_signs, true);
    __syncthreads();
    for (int idx = tid; idx < nrows * D; idx += kThreads)
      store_result<D>(a, part, sp, rows[idx / D], idx % D, s_acc[idx], s_lse[idx / D], bf16);
  }
}

}  // namespace decode
}  // namespace kvcore
