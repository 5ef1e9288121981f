// Paged-KV addressing shared by the CPU and CUDA backends.
#pragma once

#include <cstdint>

#include "kvcore/detail/device_error.h"  // KVCORE_HD

namespace kvcore {

// Element offset of (slot, head, 0) in a paged cache [num_pages, page_size, heads, head_dim] whose
// inner three dims are contiguous and whose pages are page_stride elements apart.
KVCORE_HD int64_t paged_row_offset(int64_t slot, int64_t head, int64_t page_size, int64_t heads,
                                   int64_t head_dim, int64_t page_stride) {
  const int64_t page = slot / page_size;
  const int64_t in_page = slot - page * page_size;
  return page * page_stride + (in_page * heads + head) * head_dim;
}

// Element i of a 1-D int32/int64 index array.
KVCORE_HD int64_t load_index(const void* data, bool is_int64, int64_t stride, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(data)[i * stride]
                  : static_cast<int64_t>(static_cast<const int32_t*>(data)[i * stride]);
}

}  // namespace kvcore
