// Attention math shared by the CPU and CUDA backends: visibility, soft cap, state merging.
#pragma once

#include <cmath>
#include <cstdint>

#include "kvcore/detail/device_error.h"  // KVCORE_HD

namespace kvcore {

// Whether a key at position kpos is visible to a query at qpos (see attention.h).
KVCORE_HD bool key_visible(int64_t kpos, int64_t qpos, bool causal, int64_t window) {
  return (!causal || kpos <= qpos) && (window <= 0 || kpos > qpos - window);
}

// The key range [lo, hi) that can be visible to queries at positions [qpos_lo, qpos_hi] among
// num_keys keys starting at position key_base.
struct KeyRange {
  int64_t lo, hi;
};
KVCORE_HD KeyRange visible_key_range(int64_t num_keys, int64_t key_base, int64_t qpos_lo, int64_t qpos_hi,
                                     bool causal, int64_t window) {
  int64_t lo = 0, hi = num_keys;
  if (causal && qpos_hi + 1 - key_base < hi) hi = qpos_hi + 1 - key_base;
  if (window > 0 && qpos_lo - window + 1 - key_base > lo) lo = qpos_lo - window + 1 - key_base;
  if (hi < lo) hi = lo;
  return {lo, hi};
}

KVCORE_HD float cap_logit(float s, float soft_cap) { return soft_cap > 0.f ? soft_cap * tanhf(s / soft_cap) : s; }

// Weights of two partial states with natural-log LSEs a and b: w_a + w_b = 1; the merged LSE.
// An empty state has LSE -inf and weight 0; two empty states merge to an empty one.
struct MergeWeights {
  float wa, wb, lse;
};
KVCORE_HD MergeWeights merge_weights(float a, float b) {
  const float neg_inf = -INFINITY;
  if (a == neg_inf && b == neg_inf) return {0.f, 0.f, neg_inf};
  const float m = a > b ? a : b;
  const float ea = expf(a - m), eb = expf(b - m);
  const float s = ea + eb;
  return {ea / s, eb / s, m + logf(s)};
}

}  // namespace kvcore
