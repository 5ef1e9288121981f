// Tensor-core attention body for many query rows against one KV sequence: prefill/extend tiles and
// the stacked-query prefix pass of shared-prefix attention. A CTA of 4 warps takes 64 query rows
// (query tokens x the GQA group of one KV head), streams key tiles through shared memory, and
// computes S = Q K^T and O += P V with WMMA (mma.sync, sm_80+); the online softmax runs on the
// warp's own 16 rows in shared memory, so the warps only meet to load K/V tiles.
#pragma once

#include <mma.h>

#include "../common/device.cuh"

#include "kvcore/attention.h"
#include "kvcore/detail/attention_math.h"
#include "kvcore/detail/device_error.h"
#include "kvcore/detail/float16.h"
#include "kvcore/detail/int4.h"
#include "../quant/int4_warp.cuh"

namespace kvcore {
namespace tc {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 64;  // query rows per CTA, 16 per warp

template <int D>
struct Tile {
  static constexpr int kKeys = D == 256 ? 32 : 64;  // keys per shared-memory tile
  // Shared memory: Q, K, V tiles (16-bit), S (float), P (16-bit), O (float), row stats.
  static constexpr size_t kQ = size_t(kRows) * D * 2;
  static constexpr size_t kK = size_t(kKeys) * D * 2;
  static constexpr size_t kS = size_t(kRows) * kKeys * 4;
  static constexpr size_t kP = size_t(kRows) * kKeys * 2;
  static constexpr size_t kO = size_t(kRows) * D * 4;
  static constexpr size_t kStats = size_t(kRows) * 4 * 2;
  static constexpr size_t kBytes = kQ + 2 * kK + kS + kP + kO + kStats;
};

struct RowSlot {
  int token;
  int head;
  int position;
};

// Where results go: the final output (part.o == nullptr) or float partial sources.
struct TcPartials {
  float* o = nullptr;
  float* lse = nullptr;
  int source_base = 0;
};

// Eight dequantized INT4 values (rotated basis) as 16-bit floats of the attention dtype.
__device__ __forceinline__ uint4 dequantize8(const uint8_t* codes, const uint16_t* params, bool bf16) {
  const float scale = fp16_to_float(params[0]), min = fp16_to_float(params[1]);
  const uint32_t packed = *reinterpret_cast<const uint32_t*>(codes);
  uint16_t h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = float_to_half(dequant_value(int((packed >> (4 * i)) & 0xf), scale, min), bf16);
  return *reinterpret_cast<const uint4*>(h);
}

// rows[0..nrows) (nrows <= kRows) against keys [0, num_keys) of one sequence; this CTA's split of
// the visible key range. T is __nv_bfloat16 or __half, matching the cache dtype. A bad page entry
// is reported as argument `table_arg` and its keys are masked out, as decode skips them.
template <int D, typename T>
__device__ void attend_rows_tc(const AttentionArgs& a, const int32_t* pages, int64_t page0, int num_keys,
                               int kv_head, const RowSlot* rows, int nrows, int split, int num_splits,
                               TcPartials part, DeviceErrorReport* report, int table_arg) {
  using TileT = Tile<D>;
  constexpr int N = TileT::kKeys;
  KVCORE_DYNAMIC_SHARED(unsigned char, smem, 128);
  KVCORE_SHARED(bool, key_ok, [N]);  // whether key k0 + kk of the current tile is on a valid page
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = reinterpret_cast<T*>(smem + TileT::kQ);
  T* vs = reinterpret_cast<T*>(smem + TileT::kQ + TileT::kK);
  float* ss = reinterpret_cast<float*>(smem + TileT::kQ + 2 * TileT::kK);
  T* ps = reinterpret_cast<T*>(smem + TileT::kQ + 2 * TileT::kK + TileT::kS);
  float* os = reinterpret_cast<float*>(smem + TileT::kQ + 2 * TileT::kK + TileT::kS + TileT::kP);
  float* row_m = reinterpret_cast<float*>(smem + TileT::kQ + 2 * TileT::kK + TileT::kS + TileT::kP + TileT::kO);
  float* row_l = row_m + kRows;

  const AttentionParams& p = a.p;
  const bool bf16 = p.dtype == DType::BFloat16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto* qbase = static_cast<const uint16_t*>(a.q);
  uint16_t* qs16 = reinterpret_cast<uint16_t*>(qs);

  // Q tile (rows beyond nrows are zero), O = 0, stats.
  int qlo = INT32_MAX, qhi = INT32_MIN;
  for (int r = 0; r < nrows; ++r) {
    qlo = min(qlo, rows[r].position);
    qhi = max(qhi, rows[r].position);
  }
  if (a.kv.int4) {  // queries rotated like the cached keys, so scores need no un-rotation
    constexpr int NL = D / 32;
    for (int r = warp; r < kRows; r += kWarps) {
      float x[NL];
#pragma unroll
      for (int i = 0; i < NL; ++i)
        x[i] = r < nrows ? half_to_float(qbase[int64_t(rows[r].token) * a.q_token_stride +
                                               int64_t(rows[r].head) * a.q_head_stride + lane * NL + i], bf16)
                         : 0.f;
      warp_rotate<NL>(x, lane, a.kv.rot_block, a.kv.rot_signs, false);
#pragma unroll
      for (int i = 0; i < NL; ++i) qs16[r * D + lane * NL + i] = float_to_half(x[i], bf16);
    }
    for (int i = threadIdx.x; i < kRows * D; i += kThreads) os[i] = 0.f;
  } else {
    for (int i = threadIdx.x; i < kRows * D; i += kThreads) {
      const int r = i / D, d = i % D;
      qs16[i] = r < nrows ? qbase[int64_t(rows[r].token) * a.q_token_stride + int64_t(rows[r].head) * a.q_head_stride + d]
                          : uint16_t(0);
      os[i] = 0.f;
    }
  }
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    row_m[r] = -INFINITY;
    row_l[r] = 0.f;
  }
  const KeyRange kr = visible_key_range(num_keys, 0, qlo, qhi, p.causal, p.window);
  const int64_t len = kr.hi - kr.lo;
  const int begin = int(kr.lo + len * split / num_splits), end = int(kr.lo + len * (split + 1) / num_splits);
  __syncthreads();

  const auto* kbase = static_cast<const uint16_t*>(a.kv.k);
  const auto* vbase = static_cast<const uint16_t*>(a.kv.v);
  constexpr int kVec = 8;  // 16-bit values per 16-byte load
  for (int k0 = begin; k0 < end; k0 += N) {
    // K and V tiles; keys past `end` or on a bad page are zero and masked below (key_ok).
    for (int i = threadIdx.x; i < N * (D / kVec); i += kThreads) {
      const int kk = i / (D / kVec), c = (i % (D / kVec)) * kVec;
      const int j = k0 + kk;
      uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
      bool ok = false;
      if (j < end) {
        const int64_t page = pages ? pages[j / a.kv.page_size] : page0;
        ok = page >= 0 && page < a.kv.num_pages;
        if (ok && a.kv.int4) {
          const int64_t row = (j % a.kv.page_size) * p.num_kv_heads + kv_head;
          kv4 = dequantize8(a.kv.k_codes + page * a.kv.k_codes_page_stride + row * (D / 2) + c / 2,
                            a.kv.k_params + page * a.kv.k_params_page_stride + row * 2, bf16);
          vv4 = dequantize8(a.kv.v_codes + page * a.kv.v_codes_page_stride + row * (D / 2) + c / 2,
                            a.kv.v_params + page * a.kv.v_params_page_stride + row * 2, bf16);
        } else if (ok) {
          const int64_t off = ((j % a.kv.page_size) * p.num_kv_heads + kv_head) * D + c;
          kv4 = *reinterpret_cast<const uint4*>(kbase + page * a.kv.k_page_stride + off);
          vv4 = *reinterpret_cast<const uint4*>(vbase + page * a.kv.v_page_stride + off);
        } else if (c == 0) {
          report_index_error(report, table_arg, j / a.kv.page_size, page, a.kv.num_pages);
        }
      }
      if (c == 0) key_ok[kk] = ok;
      *reinterpret_cast<uint4*>(reinterpret_cast<uint16_t*>(ks) + kk * D + c) = kv4;
      *reinterpret_cast<uint4*>(reinterpret_cast<uint16_t*>(vs) + kk * D + c) = vv4;
    }
    __syncthreads();

    // S[16 rows of this warp][N] = Q K^T
    const int r0 = warp * 16;
    for (int n = 0; n < N / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, qs + r0 * D + kk * 16, D);
        wmma::load_matrix_sync(fb, ks + n * 16 * D + kk * 16, D);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(ss + r0 * N + n * 16, acc, N, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax on the warp's rows; P = exp(S - m), O *= correction.
    for (int rr = 0; rr < 16; ++rr) {
      const int r = r0 + rr;
      const bool valid = r < nrows;
      float s_local[N / 32];
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < N / 32; ++c) {
        const int col = lane + 32 * c, j = k0 + col;
        float s = -INFINITY;
        if (valid && j < end && key_ok[col] && key_visible(j, rows[r].position, p.causal, p.window))
          s = cap_logit(ss[r * N + col] * p.scale, p.soft_cap);
        s_local[c] = s;
        mx = fmaxf(mx, s);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < N / 32; ++c) {
        const float e = m_new == -INFINITY ? 0.f : __expf(s_local[c] - m_new);
        sum += e;
        reinterpret_cast<uint16_t*>(ps)[r * N + lane + 32 * c] = float_to_half(e, bf16);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      const float correction = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
      for (int d = lane; d < D; d += 32) os[r * D + d] *= correction;
      __syncwarp();
      if (lane == 0) {
        row_m[r] = m_new;
        row_l[r] = row_l[r] * correction + sum;
      }
    }
    __syncwarp();

    // O[16 rows][D] += P V
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, os + r0 * D + n * 16, D, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < N / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, ps + r0 * N + kk * 16, N);
        wmma::load_matrix_sync(fb, vs + kk * 16 * D + n * 16, D);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(os + r0 * D + n * 16, acc, D, wmma::mem_row_major);
    }
    __syncthreads();  // K/V tiles are reloaded next
  }

  if (a.kv.int4) {  // V's rotation undone on the output (linear, so before normalizing is fine)
    constexpr int NL = D / 32;
    for (int rr = 0; rr < 16; ++rr) {
      const int r = warp * 16 + rr;
      float x[NL];
#pragma unroll
      for (int i = 0; i < NL; ++i) x[i] = os[r * D + lane * NL + i];
      warp_rotate<NL>(x, lane, a.kv.rot_block, a.kv.rot_signs, true);
#pragma unroll
      for (int i = 0; i < NL; ++i) os[r * D + lane * NL + i] = x[i];
    }
    __syncwarp();
  }

  // Normalize and write this warp's rows.
  for (int rr = 0; rr < 16; ++rr) {
    const int r = warp * 16 + rr;
    if (r >= nrows) break;
    const float l = row_l[r];
    const float lse = l > 0.f ? row_m[r] + __logf(l) : -INFINITY;
    const int64_t token = rows[r].token, head = rows[r].head;
    for (int d = lane; d < D; d += 32) {
      const float o = l > 0.f ? os[r * D + d] / l : 0.f;
      if (part.o) {
        const int64_t state = (int64_t(part.source_base + split) * a.total_q + token) * p.num_q_heads + head;
        part.o[state * D + d] = o;
        if (d == 0) part.lse[state] = lse;
      } else {
        static_cast<uint16_t*>(a.out)[token * a.o_token_stride + head * a.o_head_stride + d] = float_to_half(o, bf16);
        if (d == 0 && a.lse) a.lse[token * a.lse_token_stride + head] = lse;
      }
    }
  }
}

}  // namespace tc
}  // namespace kvcore
