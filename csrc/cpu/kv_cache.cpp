// CPU backend of the kv_cache family.
#include <algorithm>
#include <cstring>

#include "kvcore/detail/paged.h"
#include "kvcore/error.h"
#include "kvcore/kv_cache.h"
#include "kvcore/parallel.h"

namespace kvcore {

void append_kv_cpu(const AppendKVArgs& a) {
  const int64_t capacity = a.num_pages * a.page_size;
  const IndexArray& sm = a.slot_mapping;
  // Validate everything before writing anything, so a bad call leaves the cache untouched.
  for (int64_t t = 0; t < a.tokens; ++t) {
    const int64_t slot = load_index(sm.data, sm.is_int64, sm.stride, t);
    KVCORE_CHECK_INDEX(slot < capacity, "append_kv: slot_mapping[", t, "] = ", slot,
                       " is out of range for a cache of ", a.num_pages, " pages x ", a.page_size,
                       " tokens (", capacity, " slots)");
  }
  const size_t row_bytes = size_t(a.head_dim) * a.elem_bytes;
  const int64_t es = int64_t(a.elem_bytes);
  parallel_for(a.tokens, std::max<int64_t>(1, 16384 / (a.heads * int64_t(row_bytes) + 1)),
               [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = load_index(sm.data, sm.is_int64, sm.stride, t);
      if (slot < 0) continue;
      for (int64_t h = 0; h < a.heads; ++h) {
        const int64_t dst_off = paged_row_offset(slot, h, a.page_size, a.heads, a.head_dim, a.k_page_stride);
        const int64_t vdst_off = paged_row_offset(slot, h, a.page_size, a.heads, a.head_dim, a.v_page_stride);
        std::memcpy(static_cast<char*>(a.k_cache) + dst_off * es,
                    static_cast<const char*>(a.k) + (t * a.k_token_stride + h * a.k_head_stride) * es,
                    row_bytes);
        std::memcpy(static_cast<char*>(a.v_cache) + vdst_off * es,
                    static_cast<const char*>(a.v) + (t * a.v_token_stride + h * a.v_head_stride) * es,
                    row_bytes);
      }
    }
  });
}

void copy_pages_cpu(const CopyPagesArgs& a) {
  validate_copy_pages_indices(a);
  parallel_for(a.num_copies, std::max<int64_t>(1, (1 << 20) / (a.page_bytes + 1)),
               [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = load_index(a.src_pages.data, a.src_pages.is_int64, a.src_pages.stride, i);
      const int64_t d = load_index(a.dst_pages.data, a.dst_pages.is_int64, a.dst_pages.stride, i);
      if (s != d || a.src != a.dst) {
        std::memcpy(a.dst + d * a.dst_page_stride, a.src + s * a.src_page_stride, size_t(a.page_bytes));
      }
    }
  });
}

}  // namespace kvcore
