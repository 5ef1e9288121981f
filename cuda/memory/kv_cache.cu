// CUDA backend of the kv_cache family: append_kv and copy_pages. Pure data movement in the widest
// vector the alignment of every pointer and stride allows (16 bytes on the usual layouts).
#include <cstdint>
#include <vector>

#include "../common/device.cuh"

#include "kvcore/cuda_utils.h"
#include "kvcore/detail/paged.h"
#include "kvcore/kv_cache.h"

namespace kvcore {
namespace {

struct alignas(16) Bytes16 { uint4 v; };
struct alignas(8) Bytes8 { uint2 v; };

// The largest power of two up to 16 that divides every value (addresses, strides, row sizes).
int common_alignment(std::initializer_list<uint64_t> values) {
  uint64_t bits = 16;
  for (uint64_t v : values) bits |= v;
  return int(bits & (~bits + 1));  // lowest set bit
}

template <typename Vec>
__global__ void append_kv_kernel(AppendKVArgs a, DeviceErrorReport* report) {
  const int64_t t = blockIdx.x;
  const int64_t slot = load_index(a.slot_mapping.data, a.slot_mapping.is_int64, a.slot_mapping.stride, t);
  if (slot < 0) return;
  const int64_t capacity = a.num_pages * a.page_size;
  if (slot >= capacity) {
    if (threadIdx.x == 0) report_index_error(report, 0, t, slot, capacity);
    return;
  }
  const int64_t es = int64_t(a.elem_bytes);
  const int vecs_per_row = int(a.head_dim * es / int64_t(sizeof(Vec)));
  const int total = int(a.heads) * vecs_per_row;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int h = i / vecs_per_row;
    const int c = i - h * vecs_per_row;
    const int64_t kd = paged_row_offset(slot, h, a.page_size, a.heads, a.head_dim, a.k_page_stride) * es;
    const int64_t vd = paged_row_offset(slot, h, a.page_size, a.heads, a.head_dim, a.v_page_stride) * es;
    const Vec kval = reinterpret_cast<const Vec*>(static_cast<const char*>(a.k) +
                                                  (t * a.k_token_stride + h * a.k_head_stride) * es)[c];
    const Vec vval = reinterpret_cast<const Vec*>(static_cast<const char*>(a.v) +
                                                  (t * a.v_token_stride + h * a.v_head_stride) * es)[c];
    reinterpret_cast<Vec*>(static_cast<char*>(a.k_cache) + kd)[c] = kval;
    reinterpret_cast<Vec*>(static_cast<char*>(a.v_cache) + vd)[c] = vval;
  }
}

template <typename Vec>
void launch_append_kv(const AppendKVArgs& a, cudaStream_t stream, DeviceErrorReport* report) {
  const int64_t total = a.heads * a.head_dim * int64_t(a.elem_bytes) / int64_t(sizeof(Vec));
  const int threads = int(std::min<int64_t>(256, (total + 31) / 32 * 32));
  launch_kernel(append_kv_kernel<Vec>, unsigned(a.tokens), threads, 0, stream, a, report);
  KVCORE_CUDA_CHECK_LAUNCH();
}

// Grid: x = one copy (pair of pages), y = a slice of the page.
template <typename Vec>
__global__ void copy_pages_kernel(CopyPagesArgs a, DeviceErrorReport* report) {
  const int64_t i = blockIdx.x;
  const int64_t s = load_index(a.src_pages.data, a.src_pages.is_int64, a.src_pages.stride, i);
  const int64_t d = load_index(a.dst_pages.data, a.dst_pages.is_int64, a.dst_pages.stride, i);
  if (s < 0 || s >= a.src_num_pages || d < 0 || d >= a.dst_num_pages) {
    if (threadIdx.x == 0 && blockIdx.y == 0) {
      const bool bad_src = s < 0 || s >= a.src_num_pages;
      report_index_error(report, bad_src ? 0 : 1, i, bad_src ? s : d, bad_src ? a.src_num_pages : a.dst_num_pages);
    }
    return;
  }
  const Vec* src = reinterpret_cast<const Vec*>(a.src + s * a.src_page_stride);
  Vec* dst = reinterpret_cast<Vec*>(a.dst + d * a.dst_page_stride);
  if (static_cast<const void*>(src) == dst) return;
  const int64_t n = a.page_bytes / int64_t(sizeof(Vec));
  const int64_t step = int64_t(gridDim.y) * blockDim.x;
  int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  // Four independent loads in flight per thread before the stores.
  for (; j + 3 * step < n; j += 4 * step) {
    const Vec v0 = src[j], v1 = src[j + step], v2 = src[j + 2 * step], v3 = src[j + 3 * step];
    dst[j] = v0;
    dst[j + step] = v1;
    dst[j + 2 * step] = v2;
    dst[j + 3 * step] = v3;
  }
  for (; j < n; j += step) dst[j] = src[j];
}

template <typename Vec>
void launch_copy_pages(const CopyPagesArgs& a, cudaStream_t stream, DeviceErrorReport* report) {
  constexpr int kThreads = 256;
  const int64_t vecs = a.page_bytes / int64_t(sizeof(Vec));
  const int64_t slices = std::min<int64_t>(std::max<int64_t>(1, vecs / (kThreads * 4)), 1024);
  dim3 grid(unsigned(a.num_copies), unsigned(slices));
  launch_kernel(copy_pages_kernel<Vec>, grid, kThreads, 0, stream, a, report);
  KVCORE_CUDA_CHECK_LAUNCH();
}

// A host buffer a kernel will touch must be pinned and mapped; returns its device-side address.
const char* device_address(const char* p, const char* what) {
  cudaPointerAttributes attr{};
  KVCORE_CUDA_CHECK(cudaPointerGetAttributes(&attr, p));
  KVCORE_CHECK_VALUE(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ||
                         (attr.type == cudaMemoryTypeHost && attr.devicePointer),
                     "copy_pages: ", what, " is pageable host memory, which a kernel cannot access; "
                     "pin it (e.g. torch's pin_memory()) or pass the page lists on the CPU");
  return static_cast<const char*>(attr.devicePointer ? attr.devicePointer : p);
}

}  // namespace

void append_kv_cuda(const AppendKVArgs& a, StreamHandle stream_handle) {
  require_cuda("append_kv");
  if (a.tokens == 0) return;
  KVCORE_CHECK_VALUE(a.tokens < (int64_t(1) << 31), "append_kv: too many tokens in one call (", a.tokens, ")");
  CudaDeviceGuard guard(a.device.index);
  cudaStream_t stream = to_cuda_stream(stream_handle);
  DeviceErrorReport* report = device_error_report();
  const int64_t es = int64_t(a.elem_bytes);
  const int align = common_alignment(
      {uint64_t(reinterpret_cast<uintptr_t>(a.k)), uint64_t(reinterpret_cast<uintptr_t>(a.v)),
       uint64_t(reinterpret_cast<uintptr_t>(a.k_cache)), uint64_t(reinterpret_cast<uintptr_t>(a.v_cache)),
       uint64_t(a.head_dim * es), uint64_t(a.k_token_stride * es), uint64_t(a.k_head_stride * es),
       uint64_t(a.v_token_stride * es), uint64_t(a.v_head_stride * es), uint64_t(a.k_page_stride * es),
       uint64_t(a.v_page_stride * es)});
  if (align >= 16) launch_append_kv<Bytes16>(a, stream, report);
  else if (align >= 8) launch_append_kv<Bytes8>(a, stream, report);
  else if (align >= 4) launch_append_kv<uint32_t>(a, stream, report);
  else launch_append_kv<uint16_t>(a, stream, report);
  raise_device_errors(stream, "append_kv", {"slot_mapping"});
}

void copy_pages_cuda(const CopyPagesArgs& args, StreamHandle stream_handle) {
  require_cuda("copy_pages");
  if (args.num_copies == 0) return;
  const Device& gpu = args.src_device.is_cuda() ? args.src_device : args.dst_device;
  CudaDeviceGuard guard(gpu.index);
  cudaStream_t stream = to_cuda_stream(stream_handle);

  if (!args.index_device.is_cuda()) {
    // Page lists on the host: validate them, then one 2-D DMA copy per run of consecutive pages.
    validate_copy_pages_indices(args);
    const IndexArray &sp = args.src_pages, &dp = args.dst_pages;
    auto src_at = [&](int64_t i) { return args.src + load_index(sp.data, sp.is_int64, sp.stride, i) * args.src_page_stride; };
    auto dst_at = [&](int64_t i) { return args.dst + load_index(dp.data, dp.is_int64, dp.stride, i) * args.dst_page_stride; };
    int64_t i = 0;
    while (i < args.num_copies) {
      const char* from = src_at(i);
      char* to = dst_at(i);
      if (from == to) {  // a self copy is a no-op
        ++i;
        continue;
      }
      int64_t run = 1;
      while (i + run < args.num_copies && src_at(i + run) == from + run * args.src_page_stride &&
             dst_at(i + run) == to + run * args.dst_page_stride && src_at(i + run) != dst_at(i + run))
        ++run;
      KVCORE_CUDA_CHECK(cudaMemcpy2DAsync(to, size_t(args.dst_page_stride), from, size_t(args.src_page_stride),
                                          size_t(args.page_bytes), size_t(run), cudaMemcpyDefault, stream));
      i += run;
    }
    return;
  }

  // Page lists on the device: one kernel, graph-capturable, no host involvement.
  CopyPagesArgs a = args;
  KVCORE_CHECK_VALUE(a.num_copies < (int64_t(1) << 31), "copy_pages: too many pages in one call");
  a.src = device_address(args.src, "src");
  a.dst = const_cast<char*>(device_address(args.dst, "dst"));
  DeviceErrorReport* report = device_error_report();
  const int align = common_alignment({uint64_t(reinterpret_cast<uintptr_t>(a.src)),
                                      uint64_t(reinterpret_cast<uintptr_t>(a.dst)), uint64_t(a.page_bytes),
                                      uint64_t(a.src_page_stride), uint64_t(a.dst_page_stride)});
  if (align >= 16) launch_copy_pages<Bytes16>(a, stream, report);
  else if (align >= 8) launch_copy_pages<Bytes8>(a, stream, report);
  else if (align >= 4) launch_copy_pages<uint32_t>(a, stream, report);
  else if (align >= 2) launch_copy_pages<uint16_t>(a, stream, report);
  else launch_copy_pages<uint8_t>(a, stream, report);
  raise_device_errors(stream, "copy_pages", {"src_pages", "dst_pages"});
}

}  // namespace kvcore
