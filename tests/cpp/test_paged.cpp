// kvcore/detail/paged.h (the addressing both backends share) and make_index_array.
#include <gtest/gtest.h>

#include <vector>

#include "kvcore/detail/paged.h"
#include "kvcore/kv_cache.h"
#include "test_util.h"

namespace kvcore {
namespace {

TEST(PagedRowOffset, DenseCache) {
  // [pages, page_size=16, heads=4, head_dim=8]: a page is 512 elements.
  EXPECT_EQ(paged_row_offset(0, 0, 16, 4, 8, 512), 0);
  EXPECT_EQ(paged_row_offset(0, 3, 16, 4, 8, 512), 24);
  EXPECT_EQ(paged_row_offset(1, 0, 16, 4, 8, 512), 32);
  EXPECT_EQ(paged_row_offset(15, 3, 16, 4, 8, 512), 15 * 32 + 24);
  EXPECT_EQ(paged_row_offset(16, 0, 16, 4, 8, 512), 512);  // first slot of page 1
  EXPECT_EQ(paged_row_offset(2 * 16 + 3, 1, 16, 4, 8, 512), 2 * 512 + (3 * 4 + 1) * 8);
}

TEST(PagedRowOffset, PageStrideLargerThanAPage) {
  // K half of a [pages, 2, 16, 4, 8] buffer: pages are 1024 elements apart.
  EXPECT_EQ(paged_row_offset(2 * 16 + 3, 1, 16, 4, 8, 1024), 2 * 1024 + (3 * 4 + 1) * 8);
  EXPECT_EQ(paged_row_offset(16, 0, 16, 4, 8, 1024), 1024);
  // page_size 3 (not a power of two): slot 7 is page 2, offset 1.
  EXPECT_EQ(paged_row_offset(7, 1, 3, 2, 5, 100), 2 * 100 + (1 * 2 + 1) * 5);
}

TEST(PagedRowOffset, LargeOffsetsDoNotOverflow32Bits) {
  const int64_t page_stride = int64_t(1) << 20;
  EXPECT_EQ(paged_row_offset(int64_t(5000) * 16, 0, 16, 8, 128, page_stride), int64_t(5000) << 20);
}

TEST(LoadIndex, Int32SignExtendsAndHonoursStride) {
  const std::vector<int32_t> values = {5, -1, 7, 2147483647, -2147483647 - 1, 3};
  EXPECT_EQ(load_index(values.data(), false, 1, 0), 5);
  EXPECT_EQ(load_index(values.data(), false, 1, 1), -1);
  EXPECT_EQ(load_index(values.data(), false, 1, 3), 2147483647);
  EXPECT_EQ(load_index(values.data(), false, 1, 4), int64_t(-2147483647) - 1);
  EXPECT_EQ(load_index(values.data(), false, 2, 1), 7);
  EXPECT_EQ(load_index(values.data(), false, 3, 1), 2147483647);
  EXPECT_EQ(load_index(values.data() + 5, false, -1, 2), 2147483647);  // a reversed view
}

TEST(LoadIndex, Int64KeepsFullRange) {
  const std::vector<int64_t> values = {int64_t(1) << 40, -3, 9, -(int64_t(1) << 50)};
  EXPECT_EQ(load_index(values.data(), true, 1, 0), int64_t(1) << 40);
  EXPECT_EQ(load_index(values.data(), true, 1, 1), -3);
  EXPECT_EQ(load_index(values.data(), true, 2, 1), 9);
  EXPECT_EQ(load_index(values.data(), true, 3, 1), -(int64_t(1) << 50));
}

TEST(MakeIndexArray, CopiesLayoutFromTheView) {
  std::vector<int32_t> storage = {4, 0, 8, 0, 15, 0};
  IndexArray a = make_index_array(test::make_strided_view("pages", storage.data(), DType::Int32, {3}, {2}));
  EXPECT_EQ(a.data, storage.data());
  EXPECT_FALSE(a.is_int64);
  EXPECT_EQ(a.stride, 2);
  EXPECT_EQ(a.size, 3);
  EXPECT_EQ(load_index(a.data, a.is_int64, a.stride, 2), 15);
  std::vector<int64_t> wide = {1, 2};
  EXPECT_TRUE(make_index_array(make_view("slots", wide.data(), DType::Int64, {2})).is_int64);
  EXPECT_TRUE(test::throws_error([] { make_index_array(make_view("slots", nullptr, DType::Float16, {2})); },
                                 ErrorKind::Type, {"slots: dtype float16"}));
}

}  // namespace
}  // namespace kvcore
