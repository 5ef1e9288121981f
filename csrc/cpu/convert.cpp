#include "convert.h"

#include "kvcore/detail/float16.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvcore::cpu {
namespace {

#if defined(__x86_64__)
__attribute__((target("avx,f16c"))) void fp16_row_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

__attribute__((target("avx,f16c"))) void float_row_fp16_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = float_to_fp16(src[i]);
}

bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

}  // namespace

void half_row_to_float(const uint16_t* src, float* dst, int64_t n, bool is_bf16) {
  if (is_bf16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);  // a shift: vectorizes
    return;
  }
#if defined(__x86_64__)
  if (has_f16c()) {
    fp16_row_f16c(src, dst, n);  // exact, like the scalar conversion
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(src[i]);
}

void float_row_to_half(const float* src, uint16_t* dst, int64_t n, bool is_bf16) {
  if (is_bf16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);  // integer rounding: vectorizes
    return;
  }
#if defined(__x86_64__)
  if (has_f16c()) {
    float_row_fp16_f16c(src, dst, n);  // round to nearest even like the scalar path (a NaN stays a NaN)
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_fp16(src[i]);
}

}  // namespace kvcore::cpu
