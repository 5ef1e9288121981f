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
  // A token's heads are adjacent in the cache; when they are adjacent in k/v too, copy them at once.
  const bool k_rows_dense = a.heads == 1 || a.k_head_stride == a.head_dim;
  const bool v_rows_dense = a.heads == 1 || a.v_head_stride == a.head_dim;
  auto copy_token = [&](void* cache, int64_t page_stride, const void* src, int64_t token_stride,
                        int64_t head_stride, bool dense, int64_t t, int64_t slot) {
    char* dst = static_cast<char*>(cache) + paged_row_offset(slot, 0, a.page_size, a.heads, a.head_dim, page_stride) * es;
    const char* from = static_cast<const char*>(src) + t * token_stride * es;
    if (dense) {
      std::memcpy(dst, from, row_bytes * size_t(a.heads));
      return;
    }
    for (int64_t h = 0; h < a.heads; ++h)
      std::memcpy(dst + size_t(h) * row_bytes, from + h * head_stride * es, row_bytes);
  };
  // Chunks of at least ~1 MiB of K+V: below that, waking workers costs more than it saves.
  parallel_for(a.tokens, std::max<int64_t>(1, (1 << 20) / (2 * a.heads * int64_t(row_bytes) + 1)),
               [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = load_index(sm.data, sm.is_int64, sm.stride, t);
      if (slot < 0) continue;
      copy_token(a.k_cache, a.k_page_stride, a.k, a.k_token_stride, a.k_head_stride, k_rows_dense, t, slot);
      copy_token(a.v_cache, a.v_page_stride, a.v, a.v_token_stride, a.v_head_stride, v_rows_dense, t, slot);
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
      const char* from = a.src + s * a.src_page_stride;
      char* to = a.dst + d * a.dst_page_stride;
      if (from != to) std::memcpy(to, from, size_t(a.page_bytes));
    }
  });
}

}  // namespace kvcore
