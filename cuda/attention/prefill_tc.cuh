// Tensor-core attention body for many query rows against one KV sequence: prefill/extend tiles and
// the stacked-query prefix pass of shared-prefix attention, FA2-style. A CTA of 4 warps takes 64
// query rows (query tokens x the GQA group of one KV head); each warp owns 16 rows. K/V tiles stream
// through XOR-swizzled (or odd-pitch) shared memory with cp.async, double buffered; S = Q K^T and
// O += P V run on mma.sync m16n8k16 with S, P and O in registers (P is the S accumulator fragment
// repacked as the A operand), the online softmax works in base 2 with log2(e) folded into the scale,
// and row statistics only travel within a lane quad. The warps only meet to load K/V tiles.
//
// Decode GQA groups (4..16 rows) run the same body with SharedRows: the 4 warps share one 16-row
// A operand (rows padded with zeros) and split each tile's keys among themselves, so every K/V byte
// is read from shared memory once per CTA; their states are combined once at the end.
//
// 64 rows per CTA, not 128: rows are query tokens x the GQA group, so ragged extend batches with
// short query ranges fill 128-row tiles poorly, and at 64 rows a D = 128 CTA (Q + two K/V stages,
// 87 KB of shared memory) still fits twice into an sm_90a SM (D = 64: three CTAs on sm_80 and sm_90a).
#pragma once

#include "../common/device.cuh"
#include "decode.cuh"

#include "kvcore/attention.h"
#include "kvcore/detail/attention_math.h"
#include "kvcore/detail/device_error.h"
#include "kvcore/detail/float16.h"
#include "kvcore/detail/int4.h"
#include "../quant/int4_warp.cuh"

namespace kvcore {
namespace tc {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 64;  // query rows per CTA, 16 per warp
constexpr int kSharedRows = 16;  // query rows of a CTA whose warps share them (SharedRows)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Soft cap as a template argument (decode instantiates both) or read from the params (prefill).
enum class SoftCap { Runtime, Off, On };

template <int D, int QRows = kRows>
struct Tile {
  static_assert(D % 16 == 0 && D <= 256, "head_dim a multiple of 16, at most 256");
  static constexpr int kKeys = D <= 128 ? 64 : 32;  // keys per shared-memory tile
  static constexpr int kChunks = D / 8;            // 16-byte chunks per K/V/Q row
  // ldmatrix reads one chunk column of 8 rows: conflict-free when those 8 chunks sit in 8 distinct
  // 16-byte bank groups. Rows of a multiple of 8 chunks XOR the chunk index with the row; D = 80
  // and 96 (10, 12 chunks) pad the row to an odd chunk count instead, which has the same effect.
  static constexpr bool kXor = kChunks % 8 == 0;
  static constexpr int kPitch = kXor ? kChunks : (kChunks | 1);  // chunks between rows
  // Q fragments stay in registers up to D = 128; wider heads re-read them from shared memory each
  // tile (O alone takes D / 2 registers per lane there, Q in registers too would spill).
  static constexpr bool kQInRegs = D <= 128;
  static constexpr size_t kQ = size_t(QRows) * kPitch * 16;
  static constexpr size_t kKV = size_t(kKeys) * kPitch * 16;  // one K or V stage
  // Float rows of the INT4 rotations and the output staging (SharedRows: the 4 warps' unnormalized
  // 16-row states) alias the K/V stages (not in use then).
  static constexpr size_t kStage = size_t(kRows) * D * 4;
  static constexpr size_t kArena = 4 * kKV > kStage ? 4 * kKV : kStage;
  static constexpr size_t kBytes = kQ + kArena;
  // INT4: a tile's raw K and V code rows land in a staging buffer (two, one per tile parity),
  // then become the stages' K code values and dequantized V; each key's K (scale, min) as floats,
  // per parity.
  static constexpr int kCodeRow = D / 2;
  static constexpr int kCodeCopy = kCodeRow % 16 == 0 ? 16 : 8;  // cp.async size of the code rows
  static constexpr int kCodeCopies = (kKeys * (kCodeRow / kCodeCopy) + kThreads - 1) / kThreads;  // per thread
  static constexpr size_t kStaging = size_t(kKeys) * 2 * kCodeRow;
  // Decode (QRows = kSharedRows) splits the rotated INT4 queries into two 16-bit tiles, hi + lo.
  static constexpr size_t kInt4Bytes = kBytes + 2 * kStaging + 2 * size_t(kKeys) * 8 + (QRows == kSharedRows ? kQ : 0);
};

// The 16-bit chunk index of (row, chunk) in a swizzled tile.
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  using TileT = Tile<D>;
  return row * TileT::kPitch + (TileT::kXor ? (chunk ^ (row & 7)) : chunk);
}

template <typename T>
__device__ __forceinline__ uint32_t float_bits16(float x) {
  if constexpr (std::is_same_v<T, __half>) return __half_as_ushort(__float2half_rn(x));
  else return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return float_bits16<T>(lo) | float_bits16<T>(hi) << 16;
}

// Eight INT4 codes (element i in bits 4i..4i+3, the CPU's packing) as four pairs of T holding the
// exact code values (elements 2i, 2i + 1 in pair i): prmt puts the two nibbles of byte i at bits
// 0-3 and 16-19, lop3 ORs them into the mantissas of M = 1024 (fp16) or 128 (bf16), where a unit
// is one ulp, and a packed fma subtracts M.
template <typename T>
__device__ __forceinline__ uint4 codes8(uint32_t w) {
  constexpr bool kHalf = std::is_same_v<T, __half>;
  constexpr uint32_t kMagic = kHalf ? 0x64006400u : 0x43004300u;
  constexpr uint32_t kOne = kHalf ? 0x3c003c00u : 0x3f803f80u;
  constexpr uint32_t kMinusMagic = kHalf ? 0xe400e400u : 0xc300c300u;
  const uint32_t odd = w >> 4;  // the high nibbles, at the bottom of each byte
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t pair = ptx::prmt(w, odd, uint32_t(i) | uint32_t(4 + i) << 8);  // bytes: w[i], -, odd[i], -
    r[i] = ptx::fma2<T>(ptx::lop3<0xEA>(pair, 0x000f000fu, kMagic), kOne, kMinusMagic);  // (a & b) | c
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// Eight INT4 V values code * scale + min as fp16 pairs, rounded once from the exact value (scale and
// min are the stored fp16 pairs (scale, scale) and (min, min)).
__device__ __forceinline__ uint4 dequantize8(uint32_t w, uint32_t scale2, uint32_t min2) {
  const uint4 c = codes8<__half>(w);
  return make_uint4(ptx::fma2<__half>(c.x, scale2, min2), ptx::fma2<__half>(c.y, scale2, min2),
                    ptx::fma2<__half>(c.z, scale2, min2), ptx::fma2<__half>(c.w, scale2, min2));
}

// rows[0..nrows) (1 <= nrows <= kRows, SharedRows: <= kSharedRows) against keys [0, num_keys) of one
// sequence; split `sp` of the visible key range, results written as decode::attend_tiled writes
// them. T is __nv_bfloat16 or __half, the 16-bit cache dtype or (Int4) the query dtype. A bad page
// entry is reported as argument `table_arg` and its keys are masked out, as decode skips them.
//
// INT4 K tiles hold the exact code values C, and dequantization folds into the scores:
// S = Q (scale C + min)^T = scale (Q C^T) + min rowsum(Q) per key column, so no rounding of
// dequantized K enters. V is dequantized into fp16 (whatever the query dtype: INT4 params are fp16,
// and P V = (P scale) C + P min would put the rounding of P scale against |min| rather than |v|),
// and P V runs on fp16 mma.
template <int D, typename T, bool Int4 = false, bool SharedRows = false, SoftCap Cap = SoftCap::Runtime>
__device__ void attend_rows_tc(const AttentionArgs& a, const int32_t* pages, int64_t page0, int num_keys,
                               int kv_head, const decode::Row* rows, int nrows, decode::Split sp,
                               decode::Partials part, DeviceErrorReport* report, int table_arg) {
  constexpr int QR = SharedRows ? kSharedRows : kRows;  // rows of the Q tile
  using TileT = Tile<D, QR>;
  constexpr int N = TileT::kKeys, C = TileT::kChunks, DB = D / 8;
  constexpr int KW = SharedRows ? N / kWarps : N;  // keys of a tile that one warp multiplies
  constexpr int NB = KW / 8;                      // their 8-key blocks
  static_assert(NB == 1 ? D % 32 == 0 : NB % 2 == 0, "8-key warp slices pair up k-steps and head_dim blocks");
  constexpr int kCopies = N * C / kThreads;  // 16-byte chunks per thread of each K/V tile
  static_assert(N * C % kThreads == 0, "K/V tiles split evenly over the threads");
  constexpr int kSlots = 3;  // key tables: tile t is read while t + 1 loads and t + 2 is looked up
  KVCORE_DYNAMIC_SHARED(unsigned char, smem, 128);
  KVCORE_SHARED(int, s_page, [kSlots][N]);      // page of key k0 + kk, -1: past the split or a bad page
  KVCORE_SHARED(int64_t, s_koff, [kSlots][N]);  // element offset of the key's K row (V: s_voff)
  KVCORE_SHARED(int64_t, s_voff, [kSlots][N]);
  KVCORE_SHARED(int, s_bad, [kSlots][2]);      // per looking-up warp: some key of the tile is masked
  KVCORE_SHARED(float, s_lse, [kRows]);
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* arena = reinterpret_cast<uint16_t*>(smem + TileT::kQ);
  float* fstage = reinterpret_cast<float*>(smem + TileT::kQ);  // [kRows][D] floats, aliases the K/V stages
  auto k_stage = [&](int s) { return arena + size_t(s) * (TileT::kKV / 2); };  // K0, K1, V0, V1
  auto v_stage = [&](int s) { return arena + size_t(2 + s) * (TileT::kKV / 2); };
  // INT4: staging [parity][K codes [N][D/2], V codes], then K (scale, min) as floats [parity][N].
  unsigned char* const staging = smem + TileT::kBytes;
  float2* const s_kprm = reinterpret_cast<float2*>(staging + 2 * TileT::kStaging);
  constexpr int CR = TileT::kCodeRow, CU = TileT::kCodeCopy, CPR = CR / CU, NC = TileT::kCodeCopies;
  // INT4 decode (QSplit): the rotated queries as hi + lo 16-bit tiles, both multiplied with the exact
  // codes, so the scores keep ~16 more bits of the float32 queries than one 16-bit tile (the rows'
  // rounding would otherwise show in every score; prefill accepts it like 16-bit caches do).
  constexpr bool QSplit = Int4 && SharedRows;
  uint16_t* const qs_lo = reinterpret_cast<uint16_t*>(staging + 2 * TileT::kStaging + 2 * N * 8);
  // INT4 (scale, min) words, read from global memory by load and used by expand one iteration later:
  // the V pair of each code copy of this thread, the K pair of key threadIdx.x.
  uint32_t vprm[NC], kprm = 0;

  using VT = std::conditional_t<Int4, __half, T>;  // the V stage and P V mma type
  const AttentionParams& p = a.p;
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;  // fragment row group and column pair
  const int row0 = SharedRows ? 0 : warp * 16;  // this warp's first row of the Q tile
  const int key0 = SharedRows ? warp * KW : 0;  // and its first key of each K/V tile
  const auto* qbase = static_cast<const uint16_t*>(a.q);

  // Q tile (rows past nrows are zero). INT4: queries rotated like the cached keys, so scores need
  // no un-rotation.
  if constexpr (Int4) {
    for (int i = threadIdx.x; i < QR * D; i += kThreads) {
      const int r = i / D, d = i % D;
      fstage[i] = r < nrows ? half_to_float(qbase[int64_t(rows[r].token) * a.q_token_stride +
                                                  int64_t(rows[r].head) * a.q_head_stride + d], bf16)
                            : 0.f;
    }
    __syncthreads();
    rotate_rows<D>(fstage + warp * (QR / kWarps) * D, QR / kWarps, lane, a.kv.rot_block, a.kv.rot_signs, false);
    __syncthreads();
    for (int i = threadIdx.x; i < QR * D; i += kThreads) {
      const int r = i / D, d = i % D;
      const uint16_t hi = uint16_t(float_bits16<T>(fstage[i]));
      qs[swizzle<D>(r, d / 8) * 8 + d % 8] = hi;
      if constexpr (QSplit) qs_lo[swizzle<D>(r, d / 8) * 8 + d % 8] = uint16_t(float_bits16<T>(fstage[i] - half_to_float(hi, bf16)));
    }
  } else {
    for (int i = threadIdx.x; i < QR * D; i += kThreads) {
      const int r = i / D, d = i % D;  // q rows may be unaligned (fused QKV slices): 16-bit loads, once
      qs[swizzle<D>(r, d / 8) * 8 + d % 8] =
          r < nrows ? qbase[int64_t(rows[r].token) * a.q_token_stride + int64_t(rows[r].head) * a.q_head_stride + d]
                    : uint16_t(0);
    }
  }

  // Key range of the CTA (causal: up to its last query, so fully masked tiles are never loaded) and
  // of this warp's rows (tiles outside it are skipped, tiles inside it need no mask).
  int qlo = INT32_MAX, qhi = INT32_MIN, wlo = INT32_MAX, whi = INT32_MIN;
  for (int r = 0; r < nrows; ++r) {
    const int pos = rows[r].position;
    qlo = min(qlo, pos);
    qhi = max(qhi, pos);
    if (SharedRows || r / 16 == warp) {
      wlo = min(wlo, pos);
      whi = max(whi, pos);
    }
  }
  const bool warp_active = row0 < nrows;
  const int last = nrows - 1;
  const int pos_lo = rows[min(row0 + g, last)].position, pos_hi = rows[min(row0 + g + 8, last)].position;
  const KeyRange kr = decode::split_keys(visible_key_range(num_keys, 0, qlo, qhi, p.causal, p.window), sp);
  const int begin = int(kr.lo), end = int(kr.hi);
  const int ntiles = (end - begin + N - 1) / N;
  const int window = int(p.window), page_size = int(a.kv.page_size);
  // Scores in base 2: exp(s - m) = 2^(s log2e - m log2e).
  const float scale_log2 = p.scale * kLog2e;
  const bool soft_cap = Cap == SoftCap::Runtime ? p.soft_cap > 0.f : Cap == SoftCap::On;

  const auto* kbase = static_cast<const uint16_t*>(a.kv.k);
  const auto* vbase = static_cast<const uint16_t*>(a.kv.v);
  const int64_t row_stride = p.num_kv_heads;

  // Page of each key of a tile, looked up once per tile (32-bit index math).
  auto lookup = [&](int tile) {
    if (threadIdx.x >= N) return;
    const int slot = tile % kSlots, kk = threadIdx.x, j = begin + tile * N + kk;
    int page = -1;
    int64_t koff = 0, voff = 0;
    if (tile < ntiles && j < end) {
      const int64_t pg = pages ? int64_t(pages[j / page_size]) : page0;
      const int64_t row = int64_t(j % page_size) * row_stride + kv_head;
      if (pg >= 0 && pg < a.kv.num_pages) {
        page = int(pg);
        if constexpr (Int4) {
          koff = row;  // INT4: the row index within the page
        } else {
          koff = pg * a.kv.k_page_stride + row * D;
          voff = pg * a.kv.v_page_stride + row * D;
        }
      } else {
        report_index_error(report, table_arg, j / page_size, pg, a.kv.num_pages);
      }
    }
    s_page[slot][kk] = page;
    s_koff[slot][kk] = koff;
    s_voff[slot][kk] = voff;
    const bool bad = __any_sync(0xffffffffu, page < 0);
    if (lane == 0) s_bad[slot][warp] = bad;
  };
  // K/V of a tile into a stage: cp.async 16-byte copies (zero-filled for masked keys); INT4 codes and
  // params into the tile's staging buffer instead.
  auto load = [&](int tile) {
    if (tile >= ntiles) return;
    const int slot = tile % kSlots, stage = tile & 1;
    if constexpr (Int4) {
      unsigned char* const st = staging + stage * TileT::kStaging;
#pragma unroll
      for (int u = 0; u < NC; ++u) {
        const int i = threadIdx.x + u * kThreads;
        if ((N * CPR) % kThreads != 0 && i >= N * CPR) break;
        const int kk = i / CPR, c = i % CPR;
        const int page = s_page[slot][kk];
        const bool ok = page >= 0;
        const int64_t row = s_koff[slot][kk];
        ptx::cp_async<CU>(st + kk * CR + c * CU,
                          a.kv.k_codes + (ok ? page * a.kv.k_codes_page_stride + row * CR + c * CU : 0), ok);
        ptx::cp_async<CU>(st + (N + kk) * CR + c * CU,
                          a.kv.v_codes + (ok ? page * a.kv.v_codes_page_stride + row * CR + c * CU : 0), ok);
        vprm[u] = ok ? *reinterpret_cast<const uint32_t*>(a.kv.v_params + page * a.kv.v_params_page_stride + row * 2) : 0u;
      }
      if (threadIdx.x < N) {
        const int page = s_page[slot][threadIdx.x];
        kprm = page >= 0 ? *reinterpret_cast<const uint32_t*>(a.kv.k_params + page * a.kv.k_params_page_stride +
                                                              s_koff[slot][threadIdx.x] * 2)
                         : 0u;
      }
    } else {
      uint16_t* ks = k_stage(stage);
      uint16_t* vs = v_stage(stage);
      auto copy = [&](int i) {
        const int kk = i / C, c = i % C;
        const int page = s_page[slot][kk];
        const int dst = swizzle<D>(kk, c) * 8;
        const bool ok = page >= 0;
        ptx::cp_async_16(ks + dst, kbase + (ok ? s_koff[slot][kk] + c * 8 : 0), ok);
        ptx::cp_async_16(vs + dst, vbase + (ok ? s_voff[slot][kk] + c * 8 : 0), ok);
      };
      if constexpr (SharedRows) {  // unrolled: decode's tile loop is then the loop around the mma work
#pragma unroll
        for (int n = 0; n < kCopies; ++n) copy(threadIdx.x + n * kThreads);
      } else {
        for (int i = threadIdx.x; i < N * C; i += kThreads) copy(i);
      }
    }
  };
  // INT4: a landed staging buffer into the tile's K code and V stages, and the K params. Each
  // thread expands what it copied itself (landed for it after its own wait), so the barrier that
  // follows is enough.
  auto expand = [&](int tile) {
    if (tile >= ntiles) return;
    const int stage = tile & 1;
    const unsigned char* st = staging + stage * TileT::kStaging;
    uint16_t* ks = k_stage(stage);
    uint16_t* vs = v_stage(stage);
#pragma unroll
    for (int u = 0; u < NC; ++u) {
      const int i = threadIdx.x + u * kThreads;
      if ((N * CPR) % kThreads != 0 && i >= N * CPR) break;
      const int kk = i / CPR, c = i % CPR;
      const uint32_t scale2 = ptx::prmt(vprm[u], 0, 0x1010), min2 = ptx::prmt(vprm[u], 0, 0x3232);  // pairs
#pragma unroll
      for (int w = 0; w < CU / 4; ++w) {  // a word of 8 codes is one 16-byte chunk of the stage
        const int chunk = c * (CU / 4) + w;
        *reinterpret_cast<uint4*>(ks + swizzle<D>(kk, chunk) * 8) =
            codes8<T>(*reinterpret_cast<const uint32_t*>(st + kk * CR + chunk * 4));
        *reinterpret_cast<uint4*>(vs + swizzle<D>(kk, chunk) * 8) =
            dequantize8(*reinterpret_cast<const uint32_t*>(st + (N + kk) * CR + chunk * 4), scale2, min2);
      }
    }
    if (threadIdx.x < N)
      s_kprm[stage * N + threadIdx.x] = make_float2(fp16_to_float(uint16_t(kprm & 0xffffu)), fp16_to_float(uint16_t(kprm >> 16)));
  };

  lookup(0);
  lookup(1);
  __syncthreads();  // Q tile and the first key tables
  load(0);
  ptx::cp_async_commit();
  // INT4: each row's sum of its (16-bit) query values, for the min term; lanes l and l + 16 sum
  // the halves of row l of the warp.
  float qsum[2] = {0.f, 0.f};  // rows g, g + 8
  if constexpr (Int4) {
    const int r = row0 + lane % 16, d0 = (lane / 16) * (D / 2);
    float sum = 0.f;
    for (int d = d0; d < d0 + D / 2; ++d) {
      const int at = swizzle<D>(r, d / 8) * 8 + d % 8;
      sum += half_to_float(qs[at], bf16) + (QSplit ? half_to_float(qs_lo[at], bf16) : 0.f);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 16);
    qsum[0] = __shfl_sync(0xffffffffu, sum, g);
    qsum[1] = __shfl_sync(0xffffffffu, sum, g + 8);
  }

  // Q fragments (A operand, 16 rows x 16 columns per k-step): lane l addresses row l % 8 (+8 for
  // matrices 1 and 3) at column chunk 2 ks (+1 for matrices 2 and 3).
  const int a_row = row0 + (lane % 8) + 8 * ((lane / 8) & 1), a_chunk = lane / 16;
  auto load_q = [&](uint32_t (&qa)[4], int ks, const uint16_t* tile) {
    ptx::ldmatrix<4>(qa, tile + swizzle<D>(a_row, 2 * ks + a_chunk) * 8);
  };
  uint32_t qf[TileT::kQInRegs ? D / 16 : 1][4], qf_lo[TileT::kQInRegs && QSplit ? D / 16 : 1][4];
  if constexpr (TileT::kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      load_q(qf[ks], ks, qs);
      if constexpr (QSplit) load_q(qf_lo[ks], ks, qs_lo);
    }
  }
  // K (B operand of S, [key][d] rows): matrices 0, 1 = keys +0..7 at chunks 2ks, 2ks+1; 2, 3 = keys
  // +8..15. V (B operand of O, ldmatrix.trans of [key][d]): 0, 1 = keys +0..7, +8..15 at chunk 2dp;
  // 2, 3 the same at chunk 2dp + 1. A warp slice of 8 keys (NB == 1) reads one key block at four
  // consecutive chunks instead: K for two k-steps, V for four head_dim blocks.
  const int k_row = (lane % 8) + 8 * (lane / 16), k_chunk = (lane / 8) & 1;
  const int v_row = (lane % 8) + 8 * ((lane / 8) & 1), v_chunk = lane / 16;

  float o[DB][4];
#pragma unroll
  for (int i = 0; i < DB; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8; l is this lane's share

  for (int tile = 0; tile < ntiles; ++tile) {
    lookup(tile + 2);
    if constexpr (Int4) {  // tile's copies landed and expanded before tile + 1's (and its params) are issued
      ptx::cp_async_wait<0>();
      expand(tile);
      load(tile + 1);
      ptx::cp_async_commit();
    } else {
      load(tile + 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();  // this thread's copies of `tile` landed
    }
    __syncthreads();  // everyone's copies (INT4: expanded), and the key table of tile + 1
    const int slot = tile % kSlots, k0 = begin + tile * N;
    const bool skip = !warp_active || (p.causal && k0 > whi) || (window > 0 && k0 + N - 1 <= wlo - window);
    if (!skip) {
      const uint16_t* kt = k_stage(tile & 1);
      const uint16_t* vt = v_stage(tile & 1);
      float s[NB][4];
#pragma unroll
      for (int i = 0; i < NB; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      auto q_step = [&](uint32_t (&qa)[4], int ks, bool lo) {
        if constexpr (TileT::kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) qa[i] = lo ? qf_lo[QSplit ? ks : 0][i] : qf[ks][i];
        } else {
          load_q(qa, ks, lo ? qs_lo : qs);
        }
      };
      if constexpr (NB == 1) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ks += 2) {
          uint32_t kb[4];
          ptx::ldmatrix<4>(kb, kt + swizzle<D>(key0 + lane % 8, 2 * ks + lane / 8) * 8);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t qa[4];
            q_step(qa, ks + h, false);
            const uint32_t b[2] = {kb[2 * h], kb[2 * h + 1]};
            ptx::mma_m16n8k16<T>(s[0], qa, b, s[0]);
            if constexpr (QSplit) {
              q_step(qa, ks + h, true);
              ptx::mma_m16n8k16<T>(s[0], qa, b, s[0]);
            }
          }
        }
      } else {
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          uint32_t qa[4], qa_lo[4];
          q_step(qa, ks, false);
          if constexpr (QSplit) q_step(qa_lo, ks, true);
#pragma unroll
          for (int nb = 0; nb < NB; nb += 2) {
            uint32_t kb[4];
            ptx::ldmatrix<4>(kb, kt + swizzle<D>(key0 + nb * 8 + k_row, 2 * ks + k_chunk) * 8);
            const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
            ptx::mma_m16n8k16<T>(s[nb], qa, b0, s[nb]);
            ptx::mma_m16n8k16<T>(s[nb + 1], qa, b1, s[nb + 1]);
            if constexpr (QSplit) {
              ptx::mma_m16n8k16<T>(s[nb], qa_lo, b0, s[nb]);
              ptx::mma_m16n8k16<T>(s[nb + 1], qa_lo, b1, s[nb + 1]);
            }
          }
        }
      }
      if constexpr (Int4) {  // K's scale and min per key column
        const float2* prm = s_kprm + (tile & 1) * N;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float2 pr = prm[key0 + nb * 8 + 2 * t4 + j];
            s[nb][j] = pr.x * s[nb][j] + pr.y * qsum[0];
            s[nb][2 + j] = pr.x * s[nb][2 + j] + pr.y * qsum[1];
          }
      }
      // Scores (base 2), masked only on tiles that straddle the split end, a bad page or the
      // causal / window edge of this warp's rows.
      const bool edge = s_bad[slot][0] | (N > 32 ? s_bad[slot][1] : 0) || (p.causal && k0 + N - 1 > wlo) ||
                        (window > 0 && k0 <= whi - window);
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float x = soft_cap ? cap_logit(s[nb][i] * p.scale, p.soft_cap) * kLog2e : s[nb][i] * scale_log2;
          if (edge) {
            const int kk = key0 + nb * 8 + 2 * t4 + (i & 1);
            if (s_page[slot][kk] < 0 || !key_visible(k0 + kk, i < 2 ? pos_lo : pos_hi, p.causal, window)) x = -INFINITY;
          }
          s[nb][i] = x;
        }
      // Online softmax: row max over the lane quad, P = 2^(S - m), O and l rescaled.
      float mx[2] = {m[0], m[1]};
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        mx[0] = fmaxf(mx[0], fmaxf(s[nb][0], s[nb][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[nb][2], s[nb][3]));
      }
      float corr[2], base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        base[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // no visible key yet: every P is 0, not NaN
        corr[r] = ptx::ex2(m[r] - base[r]);
        m[r] = mx[r];
        l[r] *= corr[r];
      }
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[nb][i] = ptx::ex2(s[nb][i] - base[i / 2]);
          l[i / 2] += s[nb][i];
        }
#pragma unroll
      for (int db = 0; db < DB; ++db) {
        o[db][0] *= corr[0];
        o[db][1] *= corr[0];
        o[db][2] *= corr[1];
        o[db][3] *= corr[1];
      }
      // O += P V: the accumulators of key blocks 2kk, 2kk + 1 are the A fragment of k-step kk. A
      // single 8-key block is the first half of a k-step, the second half zero in A and in B.
      if constexpr (NB == 1) {
        const uint32_t pa[4] = {pack2<VT>(s[0][0], s[0][1]), pack2<VT>(s[0][2], s[0][3]), 0u, 0u};
#pragma unroll
        for (int dp = 0; dp < DB; dp += 4) {
          uint32_t vb[4];
          ptx::ldmatrix<4, true>(vb, vt + swizzle<D>(key0 + lane % 8, dp + lane / 8) * 8);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t b[2] = {vb[j], 0u};
            ptx::mma_m16n8k16<VT>(o[dp + j], pa, b, o[dp + j]);
          }
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < NB / 2; ++kk) {
          const uint32_t pa[4] = {pack2<VT>(s[2 * kk][0], s[2 * kk][1]), pack2<VT>(s[2 * kk][2], s[2 * kk][3]),
                                  pack2<VT>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack2<VT>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
          for (int dp = 0; dp < DB; dp += 2) {
            uint32_t vb[4];
            ptx::ldmatrix<4, true>(vb, vt + swizzle<D>(key0 + kk * 16 + v_row, dp + v_chunk) * 8);
            const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
            ptx::mma_m16n8k16<VT>(o[dp], pa, b0, o[dp]);
            ptx::mma_m16n8k16<VT>(o[dp + 1], pa, b1, o[dp + 1]);
          }
        }
      }
    }
    __syncthreads();  // the stage is refilled next iteration
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // the K/V stages become the output staging rows

  // Row sums over the quad.
  float* orow = fstage + warp * 16 * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  if constexpr (SharedRows) {
    // Each warp holds the same rows over its quarter of the keys: unnormalized O, m and l into
    // shared memory, then the four states of each row merged.
    KVCORE_SHARED(float, s_warp_m, [kWarps][kSharedRows]);
    KVCORE_SHARED(float, s_warp_l, [kWarps][kSharedRows]);
#pragma unroll
    for (int db = 0; db < DB; ++db) {
      const int d = db * 8 + 2 * t4;
      orow[g * D + d] = o[db][0];
      orow[g * D + d + 1] = o[db][1];
      orow[(g + 8) * D + d] = o[db][2];
      orow[(g + 8) * D + d + 1] = o[db][3];
    }
    if (t4 == 0) {
      s_warp_m[warp][g] = m[0];
      s_warp_m[warp][g + 8] = m[1];
      s_warp_l[warp][g] = l[0];
      s_warp_l[warp][g + 8] = l[1];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nrows * D; idx += kThreads) {
      const int r = idx / D, d = idx % D;
      const decode::MergedState st = decode::merge_warp_states(&s_warp_m[0][r], &s_warp_l[0][r], kSharedRows,
                                                               [&](int w) { return fstage[(w * 16 + r) * D + d]; });
      if constexpr (Int4) {  // into warp 0's rows (this thread alone read that element)
        fstage[r * D + d] = st.value;
        if (d == 0) s_lse[r] = st.lse;
      } else {
        decode::store_result<D>(a, part, sp, rows[r], d, st.value, st.lse, bf16);
      }
    }
    if constexpr (Int4) {  // V's rotation undone on the output
      __syncthreads();
      rotate_rows<D>(fstage + warp * (kSharedRows / kWarps) * D, kSharedRows / kWarps, lane, a.kv.rot_block,
                     a.kv.rot_signs, true);
      __syncthreads();
      for (int idx = threadIdx.x; idx < nrows * D; idx += kThreads)
        decode::store_result<D>(a, part, sp, rows[idx / D], idx % D, fstage[idx], s_lse[idx / D], bf16);
    }
    return;
  }
  // O into the staging rows, normalized.
  const float inv[2] = {l[0] > 0.f ? 1.f / l[0] : 0.f, l[1] > 0.f ? 1.f / l[1] : 0.f};
#pragma unroll
  for (int db = 0; db < DB; ++db) {
    const int d = db * 8 + 2 * t4;
    orow[g * D + d] = o[db][0] * inv[0];
    orow[g * D + d + 1] = o[db][1] * inv[0];
    orow[(g + 8) * D + d] = o[db][2] * inv[1];
    orow[(g + 8) * D + d + 1] = o[db][3] * inv[1];
  }
  if (t4 == 0) {
    s_lse[warp * 16 + g] = l[0] > 0.f ? m[0] * kLn2 + __logf(l[0]) : -INFINITY;  // natural log
    s_lse[warp * 16 + g + 8] = l[1] > 0.f ? m[1] * kLn2 + __logf(l[1]) : -INFINITY;
  }
  __syncwarp();
  // V's rotation undone on the output (linear, so after normalizing is fine).
  if constexpr (Int4) rotate_rows<D>(orow, 16, lane, a.kv.rot_block, a.kv.rot_signs, true);

  // This warp's rows, lanes along head_dim.
  for (int rr = 0; rr < 16; ++rr) {
    const int r = warp * 16 + rr;
    if (r >= nrows) break;
    for (int d = lane; d < D; d += 32) decode::store_result<D>(a, part, sp, rows[r], d, orow[rr * D + d], s_lse[r], bf16);
  }
}

}  // namespace tc
}  // namespace kvcore
