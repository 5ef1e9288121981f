// Argument validation for the kv_cache family, shared by every backend.
#include "kvcore/kv_cache.h"

#include <algorithm>
#include <vector>

#include "kvcore/detail/paged.h"
#include "kvcore/error.h"

namespace kvcore {

IndexArray make_index_array(const TensorView& t) {
  check_index_array(t);
  IndexArray a;
  a.data = t.data;
  a.is_int64 = t.dtype == DType::Int64;
  a.stride = t.strides[0];
  a.size = t.shape[0];
  return a;
}

AppendKVArgs make_append_kv_args(const TensorView& k, const TensorView& v, const TensorView& k_cache,
                                 const TensorView& v_cache, const TensorView& slot_mapping) {
  check_dtype(k, {DType::BFloat16, DType::Float16, DType::Float32});
  for (const TensorView* t : {&v, &k_cache, &v_cache}) check_same_dtype(*t, k);
  check_ndim(k, 3);
  check_ndim(v, 3);
  check_ndim(k_cache, 4);
  check_ndim(v_cache, 4);
  const int64_t tokens = k.shape[0], heads = k.shape[1], head_dim = k.shape[2];
  check_dim(v, 0, tokens, "tokens");
  check_dim(v, 1, heads, "kv heads");
  check_dim(v, 2, head_dim, "head_dim");
  check_dim(k_cache, 2, heads, "kv heads");
  check_dim(k_cache, 3, head_dim, "head_dim");
  for (int d = 0; d < 4; ++d) check_dim(v_cache, d, k_cache.shape[d], "must match k_cache");
  check_inner_contiguous(k, 1);
  check_inner_contiguous(v, 1);
  check_inner_contiguous(k_cache, 3);
  check_inner_contiguous(v_cache, 3);
  KVCORE_CHECK_VALUE(k_cache.shape[1] > 0, k_cache.name, ": page_size must be positive");
  check_index_array(slot_mapping);
  check_dim(slot_mapping, 0, tokens, "tokens");
  for (const TensorView* t : {&v, &k_cache, &v_cache, &slot_mapping}) check_same_device(*t, k);

  AppendKVArgs a;
  a.k = k.data;
  a.v = v.data;
  a.k_cache = k_cache.data;
  a.v_cache = v_cache.data;
  a.slot_mapping = make_index_array(slot_mapping);
  a.tokens = tokens;
  a.heads = heads;
  a.head_dim = head_dim;
  a.num_pages = k_cache.shape[0];
  a.page_size = k_cache.shape[1];
  a.k_token_stride = k.strides[0];
  a.k_head_stride = k.strides[1];
  a.v_token_stride = v.strides[0];
  a.v_head_stride = v.strides[1];
  a.k_page_stride = k_cache.strides[0];
  a.v_page_stride = v_cache.strides[0];
  a.elem_bytes = k.itemsize();
  a.device = k.device;
  return a;
}

CopyPagesArgs make_copy_pages_args(const TensorView& src, const TensorView& dst,
                                   const TensorView& src_pages, const TensorView& dst_pages) {
  KVCORE_CHECK_VALUE(src.ndim >= 1, src.name, ": expected at least 1 dimension (pages first)");
  KVCORE_CHECK_VALUE(dst.ndim == src.ndim, dst.name, ": expected ", src.ndim, " dimensions like ",
                     src.name, ", got shape ", dst.shape_str());
  check_same_dtype(dst, src);
  for (int d = 1; d < src.ndim; ++d) check_dim(dst, d, src.shape[d], "page shape must match src");
  check_inner_contiguous(src, src.ndim - 1);
  check_inner_contiguous(dst, dst.ndim - 1);
  check_index_array(src_pages);
  check_index_array(dst_pages);
  check_dim(dst_pages, 0, src_pages.shape[0], "must match src_pages");
  check_same_device(dst_pages, src_pages);
  const Device& idx = src_pages.device;
  KVCORE_CHECK_VALUE(!idx.is_cuda() || idx == src.device || idx == dst.device, src_pages.name,
                     " is on ", idx.str(), ": page lists must be on the CPU or on the device of ",
                     src.name, " or ", dst.name);
  KVCORE_CHECK_VALUE(!(src.device.is_cuda() && dst.device.is_cuda()) || src.device == dst.device,
                     dst.name, " is on ", dst.device.str(), " but ", src.name, " is on ",
                     src.device.str(), ": copies between two GPUs are not supported");

  CopyPagesArgs a;
  a.src = static_cast<const char*>(src.data);
  a.dst = static_cast<char*>(dst.data);
  a.src_num_pages = src.shape[0];
  a.dst_num_pages = dst.shape[0];
  a.page_bytes = int64_t(src.itemsize());
  for (int d = 1; d < src.ndim; ++d) a.page_bytes *= src.shape[d];
  a.src_page_stride = src.strides[0] * int64_t(src.itemsize());
  a.dst_page_stride = dst.strides[0] * int64_t(dst.itemsize());
  a.src_pages = make_index_array(src_pages);
  a.dst_pages = make_index_array(dst_pages);
  a.num_copies = src_pages.shape[0];
  a.src_device = src.device;
  a.dst_device = dst.device;
  a.index_device = idx;
  return a;
}

namespace {

// A copy whose destination bytes overlap bytes another copy reads or writes would depend on the
// copy order. Sweeps the byte ranges in address order; identical source and destination (a no-op
// self copy) is exempt.
void check_copy_pages_disjoint(const CopyPagesArgs& a) {
  struct Span {
    uintptr_t begin, end;
    int64_t copy;
    bool write;
  };
  std::vector<Span> spans;
  spans.reserve(size_t(2 * a.num_copies));
  for (int64_t i = 0; i < a.num_copies; ++i) {
    const char* from = a.src + load_index(a.src_pages.data, a.src_pages.is_int64, a.src_pages.stride, i) * a.src_page_stride;
    const char* to = a.dst + load_index(a.dst_pages.data, a.dst_pages.is_int64, a.dst_pages.stride, i) * a.dst_page_stride;
    if (from == to) continue;
    spans.push_back({uintptr_t(from), uintptr_t(from) + uintptr_t(a.page_bytes), i, false});
    spans.push_back({uintptr_t(to), uintptr_t(to) + uintptr_t(a.page_bytes), i, true});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.begin < y.begin; });
  Span last_read{0, 0, -1, false}, last_write{0, 0, -1, true};  // the earlier spans reaching furthest
  for (const Span& s : spans) {
    const Span* clash = nullptr;
    if (last_write.end > s.begin) clash = &last_write;
    else if (s.write && last_read.end > s.begin) clash = &last_read;
    if (clash) {
      const Span& w = s.write ? s : *clash;
      const Span& o = s.write ? *clash : s;
      KVCORE_THROW(ErrorKind::Value, "copy_pages: the destination of copy ", w.copy, " overlaps the ",
                   o.write ? "destination" : "source", " of copy ", o.copy,
                   " in memory (src and dst share memory); the result would depend on the copy order");
    }
    Span& last = s.write ? last_write : last_read;
    if (s.end > last.end) last = s;
  }
}

}  // namespace

void validate_copy_pages_indices(const CopyPagesArgs& a) {
  std::vector<bool> dst_used(size_t(a.dst_num_pages), false);
  for (int64_t i = 0; i < a.num_copies; ++i) {
    const int64_t s = load_index(a.src_pages.data, a.src_pages.is_int64, a.src_pages.stride, i);
    const int64_t d = load_index(a.dst_pages.data, a.dst_pages.is_int64, a.dst_pages.stride, i);
    KVCORE_CHECK_INDEX(s >= 0 && s < a.src_num_pages, "copy_pages: src_pages[", i, "] = ", s,
                       " is out of range [0, ", a.src_num_pages, ")");
    KVCORE_CHECK_INDEX(d >= 0 && d < a.dst_num_pages, "copy_pages: dst_pages[", i, "] = ", d,
                       " is out of range [0, ", a.dst_num_pages, ")");
    KVCORE_CHECK_VALUE(!dst_used[size_t(d)], "copy_pages: dst_pages[", i, "] = ", d,
                       " appears more than once");
    dst_used[size_t(d)] = true;
  }
  check_copy_pages_disjoint(a);
}

}  // namespace kvcore
