// The attention kernel of the CPU backend (attention_kernel.inc) built once per instruction set:
// each build is the same source over a different vector type V, compiled under a `#pragma GCC
// target` region so the rest of the binary keeps the baseline instruction set (template code of the
// standard library is never instantiated with wider instructions, unlike per-file -m flags).
//
// A vector type provides: W lanes of float (T), the blocking constants of the micro-kernels, loads
// and stores, arithmetic, fused multiply-add (a plain multiply and add in the portable build, which
// is compiled without contraction), lane select, round-to-nearest, 2^n, horizontal sum, and the two
// conversions (one vector of bfloat16 / float16 to float32; one float16 scalar; INT4 codes to
// float32 in the kernel's lane order, one vector or a whole row).
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "kvcore/detail/attention_math.h"
#include "kvcore/detail/float16.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// GCC 12's AVX-512 intrinsics start from `__m512 __Y = __Y;` (an undefined vector), which
// -Wmaybe-uninitialized (and, for _mm512_unpacklo_epi32, -Wuninitialized) reports once they are
// inlined here under the sanitizers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace kvcore::cpu {

// --- portable build --------------------------------------------------------------------------------
namespace generic {

struct V {
  static constexpr int W = 8;
  static constexpr int kDotRows = 4;   // query rows per dot-product pass (decode form)
  static constexpr int kGemmJ = 4;     // keys per score tile (row-major form); row vectors: 2
  static constexpr int kPvRows = 2;    // rows x column vectors of the P.V tile
  static constexpr int kPvCols = 2;
  struct T {
    float v[W];
  };
  static T zero() { return set1(0.f); }
  static T set1(float x) {
    T r;
    for (int i = 0; i < W; ++i) r.v[i] = x;
    return r;
  }
  static T load(const float* p) {
    T r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static void store(float* p, T a) {
    for (int i = 0; i < W; ++i) p[i] = a.v[i];
  }
#define KVCORE_LANES(expr)                 \
  T r;                                     \
  for (int i = 0; i < W; ++i) r.v[i] = expr; \
  return r
  static T add(T a, T b) { KVCORE_LANES(a.v[i] + b.v[i]); }
  static T sub(T a, T b) { KVCORE_LANES(a.v[i] - b.v[i]); }
  static T mul(T a, T b) { KVCORE_LANES(a.v[i] * b.v[i]); }
  static T fma(T a, T b, T c) { KVCORE_LANES(a.v[i] * b.v[i] + c.v[i]); }
  static T max(T a, T b) { KVCORE_LANES(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
  static T select_lt(T a, T b, T x, T y) { KVCORE_LANES(a.v[i] < b.v[i] ? x.v[i] : y.v[i]); }
  static T select_eq(T a, T b, T x, T y) { KVCORE_LANES(a.v[i] == b.v[i] ? x.v[i] : y.v[i]); }
  // Nearest integer of |x| < 2^22 (ties to even): adding and subtracting 1.5 * 2^23 rounds.
  static T round(T a) { KVCORE_LANES((a.v[i] + 12582912.f) - 12582912.f); }
  // 2^n for integer-valued n in [-126, 127].
  static T exp2i(T n) { KVCORE_LANES(bits_to_float(uint32_t(int32_t(n.v[i]) + 127) << 23)); }
#undef KVCORE_LANES
  static float hsum(T a) {
    return ((a.v[0] + a.v[1]) + (a.v[2] + a.v[3])) + ((a.v[4] + a.v[5]) + (a.v[6] + a.v[7]));
  }
  static T load_bf16(const uint16_t* p) {
    T r;
    for (int i = 0; i < W; ++i) r.v[i] = bf16_to_float(p[i]);
    return r;
  }
  static T load_fp16(const uint16_t* p) {
    T r;
    for (int i = 0; i < W; ++i) r.v[i] = fp16_to_float(p[i]);
    return r;
  }
  static float fp16(uint16_t h) { return fp16_to_float(h); }
  // Lanes c .. c + W of a row of codes in the unpacked order (below), for d a multiple of 2W.
  static T load_int4(const uint8_t* row, int64_t c) {
    const uint8_t* b = row + (c & ~int64_t(2 * W - 1)) / 2;
    T r;
    if (c & W) {
      for (int i = 0; i < W; ++i) r.v[i] = float(b[i] >> 4);
    } else {
      for (int i = 0; i < W; ++i) r.v[i] = float(b[i] & 0xf);
    }
    return r;
  }
  // Codes of d elements (d a multiple of 16) in chunks of 16: the 8 low nibbles (elements 2i), then
  // the 8 high nibbles (elements 2i + 1).
  static void unpack_int4(const uint8_t* src, float* dst, int64_t d) {
    for (int64_t c = 0; c < d; c += 2 * W)
      for (int i = 0; i < W; ++i) {
        const uint8_t b = src[c / 2 + i];
        dst[c + i] = float(b & 0xf);
        dst[c + W + i] = float(b >> 4);
      }
  }
};

#include "attention_kernel.inc"

}  // namespace generic

#if defined(__x86_64__)

// --- AVX2 + FMA + F16C -----------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

struct V {
  static constexpr int W = 8;
  static constexpr int kDotRows = 4;
  static constexpr int kGemmJ = 4;
  static constexpr int kPvRows = 4;
  static constexpr int kPvCols = 2;
  using T = __m256;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T a) { _mm256_storeu_ps(p, a); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T select_lt(T a, T b, T x, T y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
  static T select_eq(T a, T b, T x, T y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
  static T round(T a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T exp2i(T n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static float hsum(T a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static T load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static T load_fp16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float fp16(uint16_t h) { return _cvtsh_ss(h); }
  static T load_int4(const uint8_t* row, int64_t c) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (c & ~int64_t(2 * W - 1)) / 2)));
    return _mm256_cvtepi32_ps(c & W ? _mm256_srli_epi32(b, 4) : _mm256_and_si256(b, _mm256_set1_epi32(0xf)));
  }
  static void unpack_int4(const uint8_t* src, float* dst, int64_t d) {
    const __m256i low = _mm256_set1_epi32(0xf);
    for (int64_t c = 0; c < d; c += 2 * W) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + c / 2)));
      _mm256_storeu_ps(dst + c, _mm256_cvtepi32_ps(_mm256_and_si256(b, low)));
      _mm256_storeu_ps(dst + c + W, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)));
    }
  }
};

#include "attention_kernel.inc"

}  // namespace avx2
#pragma GCC pop_options

// --- AVX-512 (F, BW, VL, DQ) -----------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {

struct V {
  static constexpr int W = 16;
  static constexpr int kDotRows = 8;
  static constexpr int kGemmJ = 8;
  static constexpr int kPvRows = 4;
  static constexpr int kPvCols = 4;
  using T = __m512;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T a) { _mm512_storeu_ps(p, a); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T select_lt(T a, T b, T x, T y) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x); }
  static T select_eq(T a, T b, T x, T y) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), y, x); }
  static T round(T a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T exp2i(T n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static float hsum(T a) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static T load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static T load_fp16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static float fp16(uint16_t h) { return _cvtsh_ss(h); }
  static T load_int4(const uint8_t* row, int64_t c) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (c & ~int64_t(2 * W - 1)) / 2)));
    return _mm512_cvtepi32_ps(c & W ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(0xf)));
  }
  // Chunks of 32 elements (16 bytes: 16 low nibbles, then 16 high ones); a last chunk of 16 (when
  // d is an odd multiple of 16) splits 8 / 8, as in the 8-lane builds.
  static void unpack_int4(const uint8_t* src, float* dst, int64_t d) {
    int64_t c = 0;
    for (; c + 2 * W <= d; c += 2 * W) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c / 2)));
      _mm512_storeu_ps(dst + c, _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xf))));
      _mm512_storeu_ps(dst + c + W, _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)));
    }
    if (c < d) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + c / 2)));
      _mm256_storeu_ps(dst + c, _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xf))));
      _mm256_storeu_ps(dst + c + 8, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)));
    }
  }
};

#include "attention_kernel.inc"

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8")
#include "attention_int4_amx.inc"
#pragma GCC pop_options

}  // namespace avx512
#pragma GCC pop_options

#endif  // __x86_64__

// --- selection -------------------------------------------------------------------------------------
namespace {

// AMX-INT8 in the CPU, its tile state enabled by the OS (XCR0), and the tile data granted to this
// process (Linux asks for it once per process: ARCH_REQ_XCOMP_PERM for XTILEDATA).
bool amx_usable() {
#if defined(__x86_64__) && defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), int8 = d & (1u << 25);
  if (!tile || !int8) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;  // XTILECFG and XTILEDATA
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

Isa best_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return amx_usable() ? Isa::Avx512Amx : Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
#endif
  return Isa::Generic;
}

Isa select_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("KVCORE_CPU_ISA");
  if (!env || !*env) return best;
  Isa want = best;
  if (!std::strcmp(env, "generic")) want = Isa::Generic;
  else if (!std::strcmp(env, "avx2")) want = Isa::Avx2;
  else if (!std::strcmp(env, "avx512")) want = Isa::Avx512;
  else if (!std::strcmp(env, "amx")) want = Isa::Avx512Amx;
  return int(want) < int(best) ? want : best;
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = select_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Amx: return "amx";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

void attend_partial(const AttendTask& task) {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::Avx512Amx:
      // INT4 of the decode form (rows < lanes) on tiles; the rest as AVX-512.
      if (task.kv->int4 && task.rows < 16 && task.p->head_dim <= 512) return avx512::amx_int4::attend(task);
      return avx512::attend_partial(task);
    case Isa::Avx512: return avx512::attend_partial(task);
    case Isa::Avx2: return avx2::attend_partial(task);
#endif
    default: return generic::attend_partial(task);
  }
}

}  // namespace kvcore::cpu
