// kvcore/kv_cache.h on the CPU backend: argument validation, and append_kv / copy_pages against
// simple reference loops on fresh random data, with poisoned destinations to catch stray writes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kvcore/kv_cache.h"
#include "test_util.h"

namespace kvcore {
namespace {

using test::count_poisoned;
using test::dtype_of;
using test::make_strided_view;
using test::poisoned;
using test::random_values;
using test::same_bytes;
using test::throws_error;

constexpr Device kCuda0{DeviceType::CUDA, 0};

// ---------------------------------------------------------------------------------------------
// make_append_kv_args validation

// Valid views of a 3-token append into a 4-page cache (no data: validation never reads it).
struct AppendViews {
  TensorView k = make_view("k", nullptr, DType::BFloat16, {3, 2, 8});
  TensorView v = make_view("v", nullptr, DType::BFloat16, {3, 2, 8});
  TensorView k_cache = make_view("k_cache", nullptr, DType::BFloat16, {4, 16, 2, 8});
  TensorView v_cache = make_view("v_cache", nullptr, DType::BFloat16, {4, 16, 2, 8});
  TensorView slots = make_view("slot_mapping", nullptr, DType::Int64, {3});

  AppendKVArgs build() const { return make_append_kv_args(k, v, k_cache, v_cache, slots); }
};

TEST(MakeAppendKVArgs, ValidViewsGiveKernelArguments) {
  AppendViews views;
  // Pages of the K and V halves of a [pages, 2, page_size, H, D] buffer; k with padded tokens.
  views.k_cache.strides[0] = views.v_cache.strides[0] = 2 * 16 * 2 * 8;
  views.k.strides[0] = 40;
  views.slots.dtype = DType::Int32;
  AppendKVArgs a = views.build();
  EXPECT_EQ(a.tokens, 3);
  EXPECT_EQ(a.heads, 2);
  EXPECT_EQ(a.head_dim, 8);
  EXPECT_EQ(a.num_pages, 4);
  EXPECT_EQ(a.page_size, 16);
  EXPECT_EQ(a.k_token_stride, 40);
  EXPECT_EQ(a.k_head_stride, 8);
  EXPECT_EQ(a.v_token_stride, 16);
  EXPECT_EQ(a.k_page_stride, 512);
  EXPECT_EQ(a.v_page_stride, 512);
  EXPECT_EQ(a.elem_bytes, 2u);
  EXPECT_FALSE(a.slot_mapping.is_int64);
  EXPECT_EQ(a.slot_mapping.size, 3);
  EXPECT_EQ(a.device, Device{});
}

TEST(MakeAppendKVArgs, RejectsUnsupportedOrMismatchedDTypes) {
  AppendViews views;
  views.k.dtype = views.v.dtype = views.k_cache.dtype = views.v_cache.dtype = DType::Int32;
  EXPECT_TRUE(throws_error([&] { views.build(); }, ErrorKind::Type, {"k: dtype int32 is not supported"}));

  for (TensorView AppendViews::*member : {&AppendViews::v, &AppendViews::k_cache, &AppendViews::v_cache}) {
    AppendViews mismatched;
    TensorView& target = mismatched.*member;
    target.dtype = DType::Float16;
    EXPECT_TRUE(throws_error([&] { mismatched.build(); }, ErrorKind::Type,
                             {std::string(target.name) + ": dtype float16 does not match k's dtype bfloat16"}));
  }
}

TEST(MakeAppendKVArgs, RejectsWrongSlotMappingDType) {
  for (DType bad : {DType::Float32, DType::UInt8, DType::BFloat16}) {
    AppendViews views;
    views.slots.dtype = bad;
    EXPECT_TRUE(throws_error([&] { views.build(); }, ErrorKind::Type,
                             {std::string("slot_mapping: dtype ") + dtype_name(bad), "expected int32, int64"}));
  }
}

TEST(MakeAppendKVArgs, RejectsMismatchedShapes) {
  struct Case {
    void (*mutate)(AppendViews&);
    std::vector<std::string> parts;
  };
  const Case cases[] = {
      {[](AppendViews& w) { w.k = make_view("k", nullptr, DType::BFloat16, {3, 16}); },
       {"k: expected 3 dimensions", "[3, 16]"}},
      {[](AppendViews& w) { w.k_cache = make_view("k_cache", nullptr, DType::BFloat16, {64, 2, 8}); },
       {"k_cache: expected 4 dimensions"}},
      {[](AppendViews& w) { w.v.shape[0] = 4; }, {"v: dimension 0 (tokens) is 4, expected 3"}},
      {[](AppendViews& w) { w.v.shape[1] = 1; }, {"v: dimension 1 (kv heads) is 1, expected 2"}},
      {[](AppendViews& w) { w.v.shape[2] = 4; }, {"v: dimension 2 (head_dim) is 4, expected 8"}},
      {[](AppendViews& w) { w.k_cache.shape[2] = 4; }, {"k_cache: dimension 2 (kv heads) is 4, expected 2"}},
      {[](AppendViews& w) { w.k_cache.shape[3] = 16; }, {"k_cache: dimension 3 (head_dim) is 16, expected 8"}},
      {[](AppendViews& w) { w.v_cache.shape[0] = 5; }, {"v_cache: dimension 0 (must match k_cache) is 5"}},
      {[](AppendViews& w) { w.v_cache.shape[1] = 8; }, {"v_cache: dimension 1 (must match k_cache) is 8"}},
      {[](AppendViews& w) { w.slots.shape[0] = 2; }, {"slot_mapping: dimension 0 (tokens) is 2, expected 3"}},
      {[](AppendViews& w) { w.slots = make_view("slot_mapping", nullptr, DType::Int64, {3, 1}); },
       {"slot_mapping: expected 1 dimensions"}},
      {[](AppendViews& w) {
         w.k_cache.shape[1] = w.v_cache.shape[1] = 0;
       },
       {"k_cache: page_size must be positive"}},
  };
  for (const Case& c : cases) {
    AppendViews views;
    c.mutate(views);
    EXPECT_TRUE(throws_error([&] { views.build(); }, ErrorKind::Value,
                             c.parts))
        << c.parts[0];
  }
}

TEST(MakeAppendKVArgs, RejectsNonContiguousLayouts) {
  {
    AppendViews views;  // page_size and heads transposed
    views.k_cache = make_strided_view("k_cache", nullptr, DType::BFloat16, {4, 16, 2, 8}, {256, 8, 128, 1});
    EXPECT_TRUE(throws_error([&] { views.build(); }, ErrorKind::Value,
                             {"k_cache: the last 3 dimensions must be contiguous"}));
  }
  {
    AppendViews views;  // a gap between rows inside a page
    views.v_cache = make_strided_view("v_cache", nullptr, DType::BFloat16, {4, 16, 2, 8}, {512, 32, 8, 1});
    EXPECT_TRUE(throws_error([&] { views.build(); }, ErrorKind::Value,
                             {"v_cache: the last 3 dimensions must be contiguous"}));
  }
  {
    AppendViews views;  // every other element of the head_dim
    views.v = make_strided_view("v", nullptr, DType::BFloat16, {3, 2, 8}, {32, 16, 2});
    EXPECT_TRUE(throws_error([&] { views.build(); }, ErrorKind::Value, {"v: the last 1 dimensions must be contiguous"}));
  }
}

TEST(MakeAppendKVArgs, RejectsMixedDevices) {
  AppendViews views;
  views.v_cache.device = kCuda0;
  EXPECT_TRUE(throws_error([&] { views.build(); }, ErrorKind::Value, {"v_cache is on cuda:0 but k is on cpu"}));
  AppendViews slots_on_gpu;
  slots_on_gpu.slots.device = kCuda0;
  EXPECT_TRUE(throws_error([&] { slots_on_gpu.build(); }, ErrorKind::Value, {"slot_mapping is on cuda:0"}));
}

// ---------------------------------------------------------------------------------------------
// append_kv_cpu

struct AppendShape {
  int64_t tokens, heads, head_dim, num_pages, page_size;
  bool interleaved;         // caches are the K/V halves of one [pages, 2, page_size, H, D] buffer
  int64_t k_token_padding;  // k rows padded: token stride > heads * head_dim
  int64_t v_head_padding;   // v heads padded: head stride > head_dim
};

std::ostream& operator<<(std::ostream& os, const AppendShape& s) {
  return os << "tokens=" << s.tokens << " heads=" << s.heads << " head_dim=" << s.head_dim
            << " pages=" << s.num_pages << " page_size=" << s.page_size << " interleaved=" << s.interleaved;
}

// Distinct slots for `tokens` tokens (so the result does not depend on write order), about one in
// five negative (skipped) except the first, so something is always written.
template <typename Index>
std::vector<Index> random_slots(int64_t tokens, int64_t capacity, std::mt19937& rng) {
  std::vector<Index> all(static_cast<size_t>(capacity));
  std::iota(all.begin(), all.end(), Index(0));
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<Index> slots(all.begin(), all.begin() + tokens);
  std::uniform_int_distribution<int> fifth(0, 4);
  for (size_t i = 1; i < slots.size(); ++i)
    if (fifth(rng) == 0) slots[i] = Index(-1 - slots[i]);  // a range of negative values, not only -1
  return slots;
}

// One cache buffer holding K and V, laid out as the shape asks, plus views of both halves.
template <typename T>
struct PagedCache {
  std::vector<T> buffer;
  int64_t page_elems, page_stride, v_offset;
  TensorView k_view, v_view;

  explicit PagedCache(const AppendShape& s) {
    page_elems = s.page_size * s.heads * s.head_dim;
    page_stride = s.interleaved ? 2 * page_elems : page_elems;
    v_offset = s.interleaved ? page_elems : s.num_pages * page_elems;
    buffer = poisoned<T>(size_t(2 * s.num_pages * page_elems));
    const int64_t row = s.heads * s.head_dim;
    k_view = make_strided_view("k_cache", buffer.data(), dtype_of<T>(), {s.num_pages, s.page_size, s.heads, s.head_dim},
                               {page_stride, row, s.head_dim, 1});
    v_view = k_view;
    v_view.name = "v_cache";
    v_view.data = buffer.data() + v_offset;
  }
};

template <typename T, typename Index>
void check_append_kv_against_reference(const AppendShape& s, std::mt19937& rng) {
  SCOPED_TRACE(::testing::Message() << s << " elem_bytes=" << sizeof(T) << " index_bytes=" << sizeof(Index));
  const int64_t k_token_stride = s.heads * s.head_dim + s.k_token_padding;
  const int64_t v_head_stride = s.head_dim + s.v_head_padding;
  const int64_t v_token_stride = s.heads * v_head_stride;
  const std::vector<T> k = random_values<T>(size_t(s.tokens * k_token_stride), rng);
  const std::vector<T> v = random_values<T>(size_t(s.tokens * v_token_stride), rng);
  std::vector<Index> slots = random_slots<Index>(s.tokens, s.num_pages * s.page_size, rng);
  PagedCache<T> cache(s);

  // Reference: element by element, straight from the layout definitions.
  std::vector<T> expected = cache.buffer;
  int64_t written_tokens = 0;
  for (int64_t t = 0; t < s.tokens; ++t) {
    const int64_t slot = int64_t(slots[size_t(t)]);
    if (slot < 0) continue;
    ++written_tokens;
    const int64_t page = slot / s.page_size, offset = slot % s.page_size;
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t d = 0; d < s.head_dim; ++d) {
        const int64_t in_page = (offset * s.heads + h) * s.head_dim + d;
        expected[size_t(page * cache.page_stride + in_page)] = k[size_t(t * k_token_stride + h * s.head_dim + d)];
        expected[size_t(cache.v_offset + page * cache.page_stride + in_page)] =
            v[size_t(t * v_token_stride + h * v_head_stride + d)];
      }
  }
  ASSERT_GT(written_tokens, 0) << "degenerate case: nothing to write";
  ASSERT_GT(count_poisoned(expected), 0u) << "degenerate case: no untouched slot to check";

  TensorView k_view = make_strided_view("k", const_cast<T*>(k.data()), dtype_of<T>(), {s.tokens, s.heads, s.head_dim},
                                        {k_token_stride, s.head_dim, 1});
  TensorView v_view = make_strided_view("v", const_cast<T*>(v.data()), dtype_of<T>(), {s.tokens, s.heads, s.head_dim},
                                        {v_token_stride, v_head_stride, 1});
  TensorView slot_view = make_view("slot_mapping", slots.data(), dtype_of<Index>(), {s.tokens});
  append_kv_cpu(make_append_kv_args(k_view, v_view, cache.k_view, cache.v_view, slot_view));
  EXPECT_TRUE(same_bytes(cache.buffer, expected));
}

const AppendShape kAppendShapes[] = {
    {5, 2, 4, 4, 3, false, 0, 0},        // tiny, page_size not a power of two
    {7, 3, 5, 3, 4, true, 3, 1},         // odd head_dim, padded inputs, interleaved pages
    {300, 4, 64, 40, 16, false, 0, 0},   // enough tokens for several parallel chunks
    {300, 8, 128, 24, 16, true, 64, 8},  // Hkv=8, D=128 (a common model shape), interleaved
    {1, 1, 1, 1, 2, true, 0, 0},         // the smallest possible case
};

template <typename T, typename Index>
void run_append_shapes() {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  std::mt19937 rng(seed);
  for (const AppendShape& s : kAppendShapes) check_append_kv_against_reference<T, Index>(s, rng);
}

TEST(AppendKVCpu, MatchesReferenceFloat32Int32Slots) { run_append_shapes<float, int32_t>(); }
TEST(AppendKVCpu, MatchesReferenceFloat32Int64Slots) { run_append_shapes<float, int64_t>(); }
TEST(AppendKVCpu, MatchesReference16BitInt32Slots) { run_append_shapes<uint16_t, int32_t>(); }
TEST(AppendKVCpu, MatchesReference16BitInt64Slots) { run_append_shapes<uint16_t, int64_t>(); }

// A small cache filled with random data, for the error and edge-case tests.
struct SmallAppend {
  static constexpr int64_t kTokens = 4, kHeads = 2, kHeadDim = 4, kPages = 3, kPageSize = 4;
  std::mt19937 rng;
  std::vector<float> k, v, k_cache, v_cache;
  std::vector<int64_t> slots = {0, 5, 6, 11};

  explicit SmallAppend(uint32_t seed) : rng(seed) {
    k = random_values<float>(kTokens * kHeads * kHeadDim, rng);
    v = random_values<float>(kTokens * kHeads * kHeadDim, rng);
    k_cache = random_values<float>(kPages * kPageSize * kHeads * kHeadDim, rng);
    v_cache = random_values<float>(kPages * kPageSize * kHeads * kHeadDim, rng);
  }
  void run() {
    append_kv_cpu(make_append_kv_args(make_view("k", k.data(), DType::Float32, {kTokens, kHeads, kHeadDim}),
                                      make_view("v", v.data(), DType::Float32, {kTokens, kHeads, kHeadDim}),
                                      make_view("k_cache", k_cache.data(), DType::Float32, {kPages, kPageSize, kHeads, kHeadDim}),
                                      make_view("v_cache", v_cache.data(), DType::Float32, {kPages, kPageSize, kHeads, kHeadDim}),
                                      make_view("slot_mapping", slots.data(), DType::Int64, {kTokens})));
  }
  // Token t's K row for head h as stored in the cache at `slot`.
  bool k_stored_at(int64_t t, int64_t slot) const {
    const size_t row = size_t(kHeads * kHeadDim);
    return std::memcmp(&k_cache[size_t(slot) * row], &k[size_t(t) * row], row * sizeof(float)) == 0;
  }
};

TEST(AppendKVCpu, OutOfRangeSlotThrowsIndexAndWritesNothing) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  for (int64_t bad : {int64_t(12), int64_t(13), int64_t(1) << 40}) {
    SmallAppend a(seed);
    a.slots[2] = bad;  // tokens 0 and 1 are valid and come first: they must not be written either
    const std::vector<float> k_before = a.k_cache, v_before = a.v_cache;
    EXPECT_TRUE(throws_error([&] { a.run(); }, ErrorKind::Index,
                             {"slot_mapping[2] = " + std::to_string(bad), "3 pages x 4 tokens (12 slots)"}));
    EXPECT_TRUE(same_bytes(a.k_cache, k_before));
    EXPECT_TRUE(same_bytes(a.v_cache, v_before));
  }
}

TEST(AppendKVCpu, LastSlotIsInRangeAndNegativeSlotsAreSkipped) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  SmallAppend a(seed);
  a.slots = {11, -1, -(int64_t(1) << 40), 0};
  const std::vector<float> k_before = a.k_cache;
  a.run();
  EXPECT_TRUE(a.k_stored_at(0, 11));
  EXPECT_TRUE(a.k_stored_at(3, 0));
  // Everything but slots 0 and 11 keeps its old contents.
  const size_t row = size_t(SmallAppend::kHeads * SmallAppend::kHeadDim);
  std::vector<float> expected = k_before;
  std::copy_n(a.k_cache.begin(), row, expected.begin());
  std::copy_n(a.k_cache.begin() + 11 * row, row, expected.begin() + 11 * row);
  EXPECT_TRUE(same_bytes(a.k_cache, expected));
}

TEST(AppendKVCpu, StridedSlotMapping) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  SmallAppend a(seed);
  // slot_mapping as every other element of a larger int32 array: slots 7, 2, 9, 4.
  std::vector<int32_t> strided = {7, 100, 2, 100, 9, 100, 4, 100};
  append_kv_cpu(make_append_kv_args(
      make_view("k", a.k.data(), DType::Float32, {4, 2, 4}), make_view("v", a.v.data(), DType::Float32, {4, 2, 4}),
      make_view("k_cache", a.k_cache.data(), DType::Float32, {3, 4, 2, 4}),
      make_view("v_cache", a.v_cache.data(), DType::Float32, {3, 4, 2, 4}),
      make_strided_view("slot_mapping", strided.data(), DType::Int32, {4}, {2})));
  EXPECT_TRUE(a.k_stored_at(0, 7));
  EXPECT_TRUE(a.k_stored_at(1, 2));
  EXPECT_TRUE(a.k_stored_at(2, 9));
  EXPECT_TRUE(a.k_stored_at(3, 4));
}

TEST(AppendKVCpu, ZeroTokensIsANoOp) {
  std::vector<float> cache = poisoned<float>(2 * 4 * 1 * 2);
  const std::vector<float> before = cache;
  float unused = 0;
  int64_t no_slots = 0;
  append_kv_cpu(make_append_kv_args(make_view("k", &unused, DType::Float32, {0, 1, 2}),
                                    make_view("v", &unused, DType::Float32, {0, 1, 2}),
                                    make_view("k_cache", cache.data(), DType::Float32, {2, 2, 1, 2}),
                                    make_view("v_cache", cache.data() + 8, DType::Float32, {2, 2, 1, 2}),
                                    make_view("slot_mapping", &no_slots, DType::Int64, {0})));
  EXPECT_TRUE(same_bytes(cache, before));
}

TEST(AppendKVCuda, UnavailableInThisBuildOrWithoutDevice) {
  if (cuda_status().available) GTEST_SKIP() << "CUDA is available: covered by the Python GPU tests";
  EXPECT_TRUE(throws_error([] { append_kv_cuda(AppendKVArgs{}, 0); }, ErrorKind::Runtime,
                           {"append_kv: CUDA is not available: " + cuda_status().reason}));
  EXPECT_TRUE(throws_error([] { copy_pages_cuda(CopyPagesArgs{}, 0); }, ErrorKind::Runtime,
                           {"copy_pages: CUDA is not available: " + cuda_status().reason}));
}

// ---------------------------------------------------------------------------------------------
// make_copy_pages_args validation

struct CopyViews {
  TensorView src = make_view("src", nullptr, DType::BFloat16, {6, 16, 8});
  TensorView dst = make_view("dst", nullptr, DType::BFloat16, {4, 16, 8});
  TensorView src_pages = make_view("src_pages", nullptr, DType::Int64, {3});
  TensorView dst_pages = make_view("dst_pages", nullptr, DType::Int64, {3});

  CopyPagesArgs build() const { return make_copy_pages_args(src, dst, src_pages, dst_pages); }
};

TEST(MakeCopyPagesArgs, ValidViewsGiveKernelArguments) {
  CopyViews views;
  views.dst.strides[0] = 2 * 16 * 8;  // dst pages are the K halves of a [pages, 2, ...] buffer
  views.dst_pages.dtype = DType::Int32;
  CopyPagesArgs a = views.build();
  EXPECT_EQ(a.src_num_pages, 6);
  EXPECT_EQ(a.dst_num_pages, 4);
  EXPECT_EQ(a.page_bytes, 16 * 8 * 2);
  EXPECT_EQ(a.src_page_stride, 16 * 8 * 2);
  EXPECT_EQ(a.dst_page_stride, 2 * 16 * 8 * 2);
  EXPECT_EQ(a.num_copies, 3);
  EXPECT_TRUE(a.src_pages.is_int64);
  EXPECT_FALSE(a.dst_pages.is_int64);
}

TEST(MakeCopyPagesArgs, RejectsBadArguments) {
  struct Case {
    void (*mutate)(CopyViews&);
    ErrorKind kind;
    std::vector<std::string> parts;
  };
  const Case cases[] = {
      {[](CopyViews& w) { w.src = make_view("src", nullptr, DType::BFloat16, {}); }, ErrorKind::Value,
       {"src: expected at least 1 dimension"}},
      {[](CopyViews& w) { w.dst = make_view("dst", nullptr, DType::BFloat16, {4, 128}); }, ErrorKind::Value,
       {"dst: expected 3 dimensions like src", "[4, 128]"}},
      {[](CopyViews& w) { w.dst.dtype = DType::Float16; }, ErrorKind::Type,
       {"dst: dtype float16 does not match src's dtype bfloat16"}},
      {[](CopyViews& w) { w.dst.shape[2] = 4; }, ErrorKind::Value,
       {"dst: dimension 2 (page shape must match src) is 4, expected 8"}},
      {[](CopyViews& w) { w.src.strides[1] = 16; }, ErrorKind::Value, {"src: the last 2 dimensions must be contiguous"}},
      {[](CopyViews& w) { w.dst.strides[2] = 2; }, ErrorKind::Value, {"dst: the last 2 dimensions must be contiguous"}},
      {[](CopyViews& w) { w.src_pages.dtype = DType::Float32; }, ErrorKind::Type, {"src_pages: dtype float32"}},
      {[](CopyViews& w) { w.dst_pages = make_view("dst_pages", nullptr, DType::Int32, {3, 1}); }, ErrorKind::Value,
       {"dst_pages: expected 1 dimensions"}},
      {[](CopyViews& w) { w.dst_pages.shape[0] = 2; }, ErrorKind::Value,
       {"dst_pages: dimension 0 (must match src_pages) is 2, expected 3"}},
      {[](CopyViews& w) { w.dst_pages.device = kCuda0; }, ErrorKind::Value, {"dst_pages is on cuda:0 but src_pages is on cpu"}},
      {[](CopyViews& w) { w.src_pages.device = w.dst_pages.device = kCuda0; }, ErrorKind::Value,
       {"src_pages is on cuda:0: page lists must be on the CPU or on the device of src or dst"}},
      {[](CopyViews& w) {
         w.src.device = kCuda0;
         w.dst.device = Device{DeviceType::CUDA, 1};
       },
       ErrorKind::Value, {"dst is on cuda:1 but src is on cuda:0: copies between two GPUs are not supported"}},
  };
  for (const Case& c : cases) {
    CopyViews views;
    c.mutate(views);
    EXPECT_TRUE(throws_error([&] { views.build(); }, c.kind, c.parts))
        << c.parts[0];
  }
}

TEST(MakeCopyPagesArgs, AcceptsPageListsOnEitherBuffersDevice) {
  CopyViews gpu_to_host;
  gpu_to_host.src.device = gpu_to_host.src_pages.device = gpu_to_host.dst_pages.device = kCuda0;
  EXPECT_EQ(gpu_to_host.build().index_device, kCuda0);
  CopyViews host_to_gpu;
  host_to_gpu.dst.device = host_to_gpu.src_pages.device = host_to_gpu.dst_pages.device = kCuda0;
  EXPECT_EQ(host_to_gpu.build().index_device, kCuda0);
}

// ---------------------------------------------------------------------------------------------
// copy_pages_cpu

// `pages` pages of page_rows x page_cols elements, `page_stride` elements apart in `buffer`.
template <typename T>
struct PageBuffer {
  std::vector<T> buffer;
  int64_t pages, page_rows, page_cols, page_stride;

  int64_t page_elems() const { return page_rows * page_cols; }
  TensorView view(const char* name) {
    return make_strided_view(name, buffer.data(), dtype_of<T>(), {pages, page_rows, page_cols},
                             {page_stride, page_cols, 1});
  }
};

template <typename T>
PageBuffer<T> random_pages(int64_t pages, int64_t rows, int64_t cols, int64_t stride, std::mt19937& rng) {
  return {random_values<T>(size_t(pages * stride), rng), pages, rows, cols, stride};
}
template <typename T>
PageBuffer<T> poisoned_pages(int64_t pages, int64_t rows, int64_t cols, int64_t stride) {
  return {poisoned<T>(size_t(pages * stride)), pages, rows, cols, stride};
}

// Reference copy: dst page dst_pages[i] becomes src page src_pages[i].
template <typename T, typename Index>
std::vector<T> reference_copy(const PageBuffer<T>& src, const PageBuffer<T>& dst, const std::vector<Index>& src_pages,
                              const std::vector<Index>& dst_pages) {
  std::vector<T> out = dst.buffer;
  for (size_t i = 0; i < src_pages.size(); ++i)
    for (int64_t e = 0; e < src.page_elems(); ++e)
      out[size_t(int64_t(dst_pages[i]) * dst.page_stride + e)] = src.buffer[size_t(int64_t(src_pages[i]) * src.page_stride + e)];
  return out;
}

template <typename Index>
TensorView index_view(const char* name, std::vector<Index>& pages) {
  return make_view(name, pages.data(), dtype_of<Index>(), {int64_t(pages.size())});
}

template <typename T, typename Index>
void check_copy_pages_against_reference(int64_t src_count, int64_t dst_count, int64_t rows, int64_t cols,
                                        int64_t stride_padding, std::mt19937& rng) {
  SCOPED_TRACE(::testing::Message() << "src_pages=" << src_count << " dst_pages=" << dst_count << " page=" << rows
                                    << "x" << cols << " padding=" << stride_padding << " elem_bytes=" << sizeof(T)
                                    << " index_bytes=" << sizeof(Index));
  const int64_t stride = rows * cols + stride_padding;
  PageBuffer<T> src = random_pages<T>(src_count, rows, cols, stride, rng);
  PageBuffer<T> dst = poisoned_pages<T>(dst_count, rows, cols, stride + 3 * stride_padding);
  const std::vector<T> src_before = src.buffer;

  // Distinct destinations covering most but not all of dst; sources may repeat.
  std::vector<Index> dst_pages(static_cast<size_t>(dst_count));
  std::iota(dst_pages.begin(), dst_pages.end(), Index(0));
  std::shuffle(dst_pages.begin(), dst_pages.end(), rng);
  dst_pages.resize(size_t(std::max<int64_t>(1, dst_count * 3 / 4)));
  std::vector<Index> src_pages(dst_pages.size());
  std::uniform_int_distribution<int64_t> any_src(0, src_count - 1);
  for (Index& p : src_pages) p = Index(any_src(rng));

  const std::vector<T> expected = reference_copy(src, dst, src_pages, dst_pages);
  ASSERT_GT(count_poisoned(expected), 0u) << "degenerate case: no untouched page to check";
  copy_pages_cpu(make_copy_pages_args(src.view("src"), dst.view("dst"), index_view("src_pages", src_pages),
                                      index_view("dst_pages", dst_pages)));
  EXPECT_TRUE(same_bytes(dst.buffer, expected));
  EXPECT_TRUE(same_bytes(src.buffer, src_before));
}

template <typename T, typename Index>
void run_copy_shapes() {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  std::mt19937 rng(seed);
  check_copy_pages_against_reference<T, Index>(5, 4, 2, 3, 0, rng);
  check_copy_pages_against_reference<T, Index>(8, 12, 1, 7, 5, rng);        // odd sizes, padded pages
  check_copy_pages_against_reference<T, Index>(64, 96, 32, 512, 0, rng);    // 32-64 KiB pages: parallel chunks
  check_copy_pages_against_reference<T, Index>(30, 40, 8, 64, 128, rng);    // strided pages on both sides
}

TEST(CopyPagesCpu, MatchesReferenceFloat32Int32Pages) { run_copy_shapes<float, int32_t>(); }
TEST(CopyPagesCpu, MatchesReferenceFloat32Int64Pages) { run_copy_shapes<float, int64_t>(); }
TEST(CopyPagesCpu, MatchesReference16BitInt32Pages) { run_copy_shapes<uint16_t, int32_t>(); }
TEST(CopyPagesCpu, MatchesReference16BitInt64Pages) { run_copy_shapes<uint16_t, int64_t>(); }

// Two small random page buffers for the error tests.
struct SmallCopy {
  std::mt19937 rng;
  PageBuffer<float> src, dst;

  explicit SmallCopy(uint32_t seed)
      : rng(seed), src(random_pages<float>(6, 2, 4, 8, rng)), dst(random_pages<float>(4, 2, 4, 8, rng)) {}

  // Expects copy_pages_cpu to fail as described and to leave both buffers unchanged.
  void expect_rejected(std::vector<int64_t> src_pages, std::vector<int64_t> dst_pages, ErrorKind kind,
                       const std::vector<std::string>& parts) {
    const std::vector<float> src_before = src.buffer, dst_before = dst.buffer;
    EXPECT_TRUE(throws_error(
        [&] {
          copy_pages_cpu(make_copy_pages_args(src.view("src"), dst.view("dst"), index_view("src_pages", src_pages),
                                              index_view("dst_pages", dst_pages)));
        },
        kind, parts));
    EXPECT_TRUE(same_bytes(src.buffer, src_before));
    EXPECT_TRUE(same_bytes(dst.buffer, dst_before));
  }
};

TEST(CopyPagesCpu, DuplicateDestinationIsAValueError) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  SmallCopy c(seed);
  c.expect_rejected({0, 1, 2}, {3, 1, 1}, ErrorKind::Value, {"copy_pages: dst_pages[2] = 1 appears more than once"});
  c.expect_rejected({0, 0}, {2, 2}, ErrorKind::Value, {"dst_pages[1] = 2 appears more than once"});
}

TEST(CopyPagesCpu, OutOfRangePagesAreIndexErrors) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  SmallCopy c(seed);
  // The bad entry is last, so earlier valid copies must not have been done either.
  c.expect_rejected({0, 1, 6}, {0, 1, 2}, ErrorKind::Index, {"copy_pages: src_pages[2] = 6 is out of range [0, 6)"});
  c.expect_rejected({0, -1}, {0, 1}, ErrorKind::Index, {"src_pages[1] = -1 is out of range [0, 6)"});
  c.expect_rejected({0, 1}, {0, 4}, ErrorKind::Index, {"dst_pages[1] = 4 is out of range [0, 4)"});
  c.expect_rejected({5, 1}, {-3, 0}, ErrorKind::Index, {"dst_pages[0] = -3 is out of range [0, 4)"});
}

TEST(CopyPagesCpu, StridedPageLists) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  SmallCopy c(seed);
  // Page lists as every other element of a larger array: copy 5 -> 0 and 2 -> 3.
  std::vector<int32_t> src_list = {5, -9, 2, -9}, dst_list = {0, -9, 3, -9};
  const std::vector<float> expected =
      reference_copy(c.src, c.dst, std::vector<int32_t>{5, 2}, std::vector<int32_t>{0, 3});
  copy_pages_cpu(make_copy_pages_args(c.src.view("src"), c.dst.view("dst"),
                                      make_strided_view("src_pages", src_list.data(), DType::Int32, {2}, {2}),
                                      make_strided_view("dst_pages", dst_list.data(), DType::Int32, {2}, {2})));
  EXPECT_TRUE(same_bytes(c.dst.buffer, expected));
}

// src and dst sharing memory (defragmenting a pool in place, or moving pages between the K and V
// halves of one buffer). validate_copy_pages_indices rejects a copy whose destination bytes
// overlap bytes another copy (or its own source) touches; a page copied onto itself is a no-op.
class CopyPagesSharedMemory : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = test::random_seed();
    std::mt19937 rng(seed_);
    pool_ = random_pages<uint16_t>(8, 4, 16, 64, rng);
    before_ = pool_.buffer;
  }
  void copy(const TensorView& src, const TensorView& dst, std::vector<int64_t> src_pages,
            std::vector<int64_t> dst_pages) {
    copy_pages_cpu(make_copy_pages_args(src, dst, index_view("src_pages", src_pages), index_view("dst_pages", dst_pages)));
  }
  void copy_within_pool(std::vector<int64_t> src_pages, std::vector<int64_t> dst_pages) {
    copy(pool_.view("src"), pool_.view("dst"), std::move(src_pages), std::move(dst_pages));
  }
  // The pool viewed from `offset` elements in, with `pages` pages `page_stride` elements apart.
  TensorView pool_view(const char* name, int64_t offset, int64_t pages, int64_t page_stride) {
    TensorView t = pool_.view(name);
    t.data = pool_.buffer.data() + offset;
    t.shape[0] = pages;
    t.strides[0] = page_stride;
    return t;
  }
  uint32_t seed_ = 0;
  PageBuffer<uint16_t> pool_;
  std::vector<uint16_t> before_;
};

TEST_F(CopyPagesSharedMemory, DisjointSourcesAndDestinationsAreAllowed) {
  SCOPED_TRACE(test::seed_trace(seed_));
  // Compact pages 5, 7, 6 into 0, 1, 2 (the lists need not be sorted).
  const std::vector<uint16_t> expected =
      reference_copy(pool_, pool_, std::vector<int64_t>{5, 7, 6}, std::vector<int64_t>{0, 1, 2});
  copy_within_pool({5, 7, 6}, {0, 1, 2});
  EXPECT_TRUE(same_bytes(pool_.buffer, expected));
}

TEST_F(CopyPagesSharedMemory, CopyingAPageOntoItselfIsAllowedAndKeepsIt) {
  SCOPED_TRACE(test::seed_trace(seed_));
  // Page 3 onto itself, and page 3 read again by another copy: both fine, 3 does not change.
  const std::vector<uint16_t> expected =
      reference_copy(pool_, pool_, std::vector<int64_t>{3, 4, 3}, std::vector<int64_t>{3, 0, 7});
  copy_within_pool({3, 4, 3}, {3, 0, 7});
  EXPECT_TRUE(same_bytes(pool_.buffer, expected));
}

TEST_F(CopyPagesSharedMemory, APageThatIsBothSourceAndDestinationIsRejected) {
  SCOPED_TRACE(test::seed_trace(seed_));
  // 1 -> 2 and 2 -> 3: the result would depend on which copy runs first.
  EXPECT_TRUE(throws_error([&] { copy_within_pool({1, 2}, {2, 3}); }, ErrorKind::Value,
                           {"copy_pages: the destination of copy 0 overlaps the source of copy 1 in memory",
                            "the result would depend on the copy order"}));
  // A swap is rejected the same way.
  EXPECT_TRUE(throws_error([&] { copy_within_pool({4, 6}, {6, 4}); }, ErrorKind::Value,
                           {"overlaps the source of copy"}));
  EXPECT_TRUE(same_bytes(pool_.buffer, before_));
}

TEST_F(CopyPagesSharedMemory, PartialOverlapWithAShiftedViewIsRejected) {
  SCOPED_TRACE(test::seed_trace(seed_));
  // dst starts half a page (32 elements) into the pool: dst page 0 straddles pool pages 0 and 1.
  TensorView shifted = pool_view("dst", 32, 7, 64);
  EXPECT_TRUE(throws_error([&] { copy(pool_.view("src"), shifted, {0}, {0}); }, ErrorKind::Value,
                           {"the destination of copy 0 overlaps the source of copy 0"}));
  EXPECT_TRUE(throws_error([&] { copy(pool_.view("src"), shifted, {7, 3}, {6, 2}); }, ErrorKind::Value,
                           {"overlaps the source of copy"}));
  EXPECT_TRUE(same_bytes(pool_.buffer, before_));
  // Nothing to copy is fine even with overlapping buffers.
  EXPECT_NO_THROW(copy(pool_.view("src"), shifted, {}, {}));
  EXPECT_TRUE(same_bytes(pool_.buffer, before_));
}

TEST_F(CopyPagesSharedMemory, DisjointBytesInAShiftedViewAreAllowed) {
  SCOPED_TRACE(test::seed_trace(seed_));
  // Shifted dst page 6 covers pool elements [416, 480); pool page 0 is [0, 64).
  TensorView shifted = pool_view("dst", 32, 7, 64);
  copy(pool_.view("src"), shifted, {0}, {6});
  std::vector<uint16_t> expected = before_;
  std::copy_n(before_.begin(), 64, expected.begin() + 416);
  EXPECT_TRUE(same_bytes(pool_.buffer, expected));
}

TEST_F(CopyPagesSharedMemory, OverlappingDestinationsAreRejected) {
  SCOPED_TRACE(test::seed_trace(seed_));
  // dst pages only half a page apart: distinct page numbers, overlapping bytes.
  std::mt19937 rng(seed_);
  PageBuffer<uint16_t> other = random_pages<uint16_t>(2, 4, 16, 64, rng);
  TensorView half_strided = pool_view("dst", 0, 15, 32);
  EXPECT_TRUE(throws_error([&] { copy(other.view("src"), half_strided, {0, 1}, {4, 5}); }, ErrorKind::Value,
                           {"the destination of copy 1 overlaps the destination of copy 0"}));
  EXPECT_TRUE(same_bytes(pool_.buffer, before_));
  copy(other.view("src"), half_strided, {0, 1}, {4, 6});  // two apart: [128, 192) and [192, 256)
  std::vector<uint16_t> expected = before_;
  std::copy_n(other.buffer.begin(), 128, expected.begin() + 128);
  EXPECT_TRUE(same_bytes(pool_.buffer, expected));
}

TEST_F(CopyPagesSharedMemory, KHalfToVHalfOfOneBuffer) {
  SCOPED_TRACE(test::seed_trace(seed_));
  // The pool as [4 pages, 2 (K, V), 4, 16]: K and V halves interleave but never share bytes.
  TensorView k_half = pool_view("src", 0, 4, 128), v_half = pool_view("dst", 64, 4, 128);
  copy(k_half, v_half, {2, 3, 0}, {2, 1, 3});
  std::vector<uint16_t> expected = before_;
  const int64_t moves[][2] = {{2, 2}, {3, 1}, {0, 3}};  // {K page, V page}
  for (const auto& move : moves) std::copy_n(before_.begin() + move[0] * 128, 64, expected.begin() + move[1] * 128 + 64);
  EXPECT_TRUE(same_bytes(pool_.buffer, expected));
}

TEST_F(CopyPagesSharedMemory, SourceViewLongerThanDestinationView) {
  SCOPED_TRACE(test::seed_trace(seed_));
  // dst is the first 2 pages of the pool, src the whole pool (same base, same stride).
  const std::vector<uint16_t> expected =
      reference_copy(pool_, pool_, std::vector<int64_t>{6, 7}, std::vector<int64_t>{0, 1});
  copy(pool_.view("src"), pool_view("dst", 0, 2, 64), {6, 7}, {0, 1});
  EXPECT_TRUE(same_bytes(pool_.buffer, expected));
}

}  // namespace
}  // namespace kvcore
