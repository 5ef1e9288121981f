// KV-cache page ops: append new tokens' K/V into a paged cache, and copy whole pages between
// page-major buffers (swap, offload, defragment). Both are pure data movement, so CPU and CUDA
// results are bit-identical by construction.
#pragma once

#include <cstdint>

#include "kvcore/runtime.h"
#include "kvcore/tensor.h"

namespace kvcore {

// A 1-D int32/int64 index array (slot_mapping, page lists) as kernels read it.
struct IndexArray {
  const void* data = nullptr;
  bool is_int64 = false;
  int64_t stride = 1;  // in elements
  int64_t size = 0;
};
IndexArray make_index_array(const TensorView& t);

struct AppendKVArgs {
  const void* k = nullptr;        // [tokens, heads, head_dim], last dim contiguous
  const void* v = nullptr;        // [tokens, heads, head_dim], last dim contiguous
  void* k_cache = nullptr;        // [num_pages, page_size, heads, head_dim], inner 3 dims contiguous
  void* v_cache = nullptr;        // [num_pages, page_size, heads, head_dim], inner 3 dims contiguous
  IndexArray slot_mapping;        // [tokens]; slot = page * page_size + offset, negative = skip
  int64_t tokens = 0, heads = 0, head_dim = 0, num_pages = 0, page_size = 0;
  int64_t k_token_stride = 0, k_head_stride = 0;  // elements
  int64_t v_token_stride = 0, v_head_stride = 0;  // elements
  int64_t k_page_stride = 0, v_page_stride = 0;   // elements
  size_t elem_bytes = 0;          // 2 (bf16/fp16) or 4 (fp32)
  Device device;
};

// Validates the arrays (dtypes, shapes, contiguity, devices) and builds the kernel arguments.
AppendKVArgs make_append_kv_args(const TensorView& k, const TensorView& v, const TensorView& k_cache,
                                 const TensorView& v_cache, const TensorView& slot_mapping);
// Checks every slot is < num_pages * page_size before writing anything (IndexError otherwise).
void append_kv_cpu(const AppendKVArgs& args);
// Out-of-range slots are skipped, and reported as IndexError when debug checks are on.
void append_kv_cuda(const AppendKVArgs& args, StreamHandle stream);

struct CopyPagesArgs {
  const char* src = nullptr;      // [src_num_pages, ...page], page contents contiguous
  char* dst = nullptr;            // [dst_num_pages, ...page], same page shape and dtype
  int64_t src_num_pages = 0, dst_num_pages = 0;
  int64_t src_page_stride = 0, dst_page_stride = 0;  // bytes
  int64_t page_bytes = 0;
  IndexArray src_pages, dst_pages;  // [num_copies]: dst[dst_pages[i]] = src[src_pages[i]]
  int64_t num_copies = 0;
  Device src_device, dst_device, index_device;
};

CopyPagesArgs make_copy_pages_args(const TensorView& src, const TensorView& dst,
                                   const TensorView& src_pages, const TensorView& dst_pages);
// Host-side validation of host-resident page lists: ranges, duplicate destinations, and (when src
// and dst overlap in memory) destinations that are also sources.
void validate_copy_pages_indices(const CopyPagesArgs& args);
void copy_pages_cpu(const CopyPagesArgs& args);
// Page lists on the host: DMA copies (one cudaMemcpy2DAsync per run of consecutive pages), any
// mix of device and host buffers. Page lists on the device: one kernel, both buffers must be
// device-accessible (device or pinned host memory); bad indices skipped, reported in debug mode.
void copy_pages_cuda(const CopyPagesArgs& args, StreamHandle stream);

}  // namespace kvcore
