// kvcore/tensor.h: dtypes, devices, views, contiguity, and the argument checks every op relies on.
#include <gtest/gtest.h>

#include <vector>

#include "kvcore/tensor.h"
#include "test_util.h"

namespace kvcore {
namespace {

using test::make_strided_view;
using test::throws_error;

constexpr Device kCuda0{DeviceType::CUDA, 0};

TEST(DType, NamesAndSizes) {
  struct Expected {
    DType dtype;
    const char* name;
    size_t size;
  };
  for (const Expected& e : {Expected{DType::Float32, "float32", 4}, Expected{DType::Float16, "float16", 2},
                            Expected{DType::BFloat16, "bfloat16", 2}, Expected{DType::Int32, "int32", 4},
                            Expected{DType::Int64, "int64", 8}, Expected{DType::UInt8, "uint8", 1}}) {
    EXPECT_STREQ(dtype_name(e.dtype), e.name);
    EXPECT_EQ(dtype_size(e.dtype), e.size) << e.name;
  }
}

TEST(Device, StrAndEquality) {
  EXPECT_EQ(Device{}.str(), "cpu");
  EXPECT_EQ((Device{DeviceType::CUDA, 3}.str()), "cuda:3");
  EXPECT_FALSE(Device{}.is_cuda());
  EXPECT_TRUE(kCuda0.is_cuda());
  EXPECT_EQ(kCuda0, (Device{DeviceType::CUDA, 0}));
  EXPECT_NE(kCuda0, (Device{DeviceType::CUDA, 1}));
  EXPECT_NE(kCuda0, Device{});
}

TEST(MakeView, RowMajorStridesAndShape) {
  std::vector<uint16_t> buf(2 * 3 * 4 * 5);
  TensorView t = make_view("k_cache", buf.data(), DType::BFloat16, {2, 3, 4, 5}, kCuda0);
  EXPECT_STREQ(t.name, "k_cache");
  EXPECT_EQ(t.data, buf.data());
  EXPECT_EQ(t.dtype, DType::BFloat16);
  EXPECT_EQ(t.device, kCuda0);
  ASSERT_EQ(t.ndim, 4);
  const int64_t shape[] = {2, 3, 4, 5}, strides[] = {60, 20, 5, 1};
  for (int d = 0; d < 4; ++d) {
    EXPECT_EQ(t.shape[d], shape[d]) << d;
    EXPECT_EQ(t.strides[d], strides[d]) << d;
  }
  EXPECT_EQ(t.size(-1), 5);
  EXPECT_EQ(t.size(0), 2);
  EXPECT_EQ(t.stride(-2), 5);
  EXPECT_EQ(t.numel(), 120);
  EXPECT_EQ(t.itemsize(), 2u);
  EXPECT_EQ(t.shape_str(), "[2, 3, 4, 5]");
  EXPECT_TRUE(t.inner_contiguous(4));
}

TEST(MakeView, ScalarAndEmpty) {
  float x = 1.5f;
  TensorView scalar = make_view("x", &x, DType::Float32, {});
  EXPECT_EQ(scalar.ndim, 0);
  EXPECT_EQ(scalar.numel(), 1);
  EXPECT_EQ(scalar.shape_str(), "[]");
  TensorView empty = make_view("e", nullptr, DType::Int64, {0, 7});
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_EQ(empty.strides[0], 7);
  EXPECT_EQ(empty.strides[1], 1);
}

TEST(MakeView, TooManyDimensionsNamesTheArgument) {
  EXPECT_TRUE(throws_error([] { make_view("big", nullptr, DType::UInt8, {1, 1, 1, 1, 1, 1, 1, 1, 1}); },
                           ErrorKind::Value, {"big", "too many dimensions"}));
  EXPECT_EQ(make_view("max", nullptr, DType::UInt8, {1, 2, 1, 2, 1, 2, 1, 2}).ndim, kMaxDims);
}

TEST(InnerContiguous, DenseAndSlicedLayouts) {
  // A [pages, 2, page_size, H, D] buffer's K half: pages are 2x a page apart, inner 3 dims dense.
  const int64_t pages = 3, page_size = 4, heads = 2, head_dim = 8;
  const int64_t page_elems = page_size * heads * head_dim;
  TensorView k_cache = make_strided_view("k_cache", nullptr, DType::BFloat16, {pages, page_size, heads, head_dim},
                                         {2 * page_elems, heads * head_dim, head_dim, 1});
  EXPECT_TRUE(k_cache.inner_contiguous(1));
  EXPECT_TRUE(k_cache.inner_contiguous(3));
  EXPECT_FALSE(k_cache.inner_contiguous(4));

  // page_size and heads swapped (a transposed view): the last dim alone is still dense.
  TensorView transposed = make_strided_view("t", nullptr, DType::BFloat16, {pages, page_size, heads, head_dim},
                                            {page_elems, head_dim, page_size * head_dim, 1});
  EXPECT_TRUE(transposed.inner_contiguous(1));
  EXPECT_FALSE(transposed.inner_contiguous(2));
  EXPECT_FALSE(transposed.inner_contiguous(3));

  TensorView every_other = make_strided_view("e", nullptr, DType::Float32, {4, 8}, {16, 2});
  EXPECT_FALSE(every_other.inner_contiguous(1));
  EXPECT_TRUE(every_other.inner_contiguous(0));
}

TEST(InnerContiguous, SizeOneDimsMayCarryAnyStride) {
  // DLPack producers give size-1 dims arbitrary strides; they do not affect the layout.
  TensorView one_head = make_strided_view("k", nullptr, DType::Float32, {5, 1, 8}, {8, 999, 1});
  EXPECT_TRUE(one_head.inner_contiguous(3));
  TensorView one_elem = make_strided_view("s", nullptr, DType::Float32, {5, 1}, {1, 0});
  EXPECT_TRUE(one_elem.inner_contiguous(2));
  TensorView neg = make_strided_view("n", nullptr, DType::Float32, {1, 3, 1}, {-4, 1, 7});
  EXPECT_TRUE(neg.inner_contiguous(3));
  // A size-1 dim does not excuse a wrong stride elsewhere.
  TensorView gap = make_strided_view("g", nullptr, DType::Float32, {2, 1, 8}, {9, 3, 1});
  EXPECT_FALSE(gap.inner_contiguous(3));
  EXPECT_TRUE(gap.inner_contiguous(2));
}

TEST(InnerContiguous, MoreDimsThanTheViewHasMeansAll) {
  TensorView dense = make_view("d", nullptr, DType::Float32, {3, 4});
  EXPECT_TRUE(dense.inner_contiguous(5));
  TensorView sliced = make_strided_view("s", nullptr, DType::Float32, {3, 4}, {5, 1});
  EXPECT_FALSE(sliced.inner_contiguous(5));
}

TEST(Checks, DTypeNamesArgumentAndAllowedTypes) {
  TensorView k = make_view("k", nullptr, DType::Int32, {2});
  EXPECT_NO_THROW(check_dtype(k, {DType::Float32, DType::Int32}));
  EXPECT_TRUE(throws_error([&] { check_dtype(k, {DType::Float32, DType::BFloat16}); }, ErrorKind::Type,
                           {"k: dtype int32 is not supported", "expected float32, bfloat16"}));
}

TEST(Checks, SameDTypeNamesBothArguments) {
  TensorView k = make_view("k", nullptr, DType::BFloat16, {2});
  TensorView v = make_view("v", nullptr, DType::Float16, {2});
  EXPECT_NO_THROW(check_same_dtype(k, k));
  EXPECT_TRUE(throws_error([&] { check_same_dtype(v, k); }, ErrorKind::Type,
                           {"v: dtype float16 does not match k's dtype bfloat16"}));
}

TEST(Checks, NDimNamesArgumentAndShape) {
  TensorView k = make_view("k", nullptr, DType::Float32, {2, 3});
  EXPECT_NO_THROW(check_ndim(k, 2));
  EXPECT_TRUE(throws_error([&] { check_ndim(k, 3); }, ErrorKind::Value,
                           {"k: expected 3 dimensions", "[2, 3]"}));
}

TEST(Checks, DimNamesArgumentDimensionAndMeaning) {
  TensorView v = make_view("v", nullptr, DType::Float32, {6, 3, 8});
  EXPECT_NO_THROW(check_dim(v, 1, 3, "kv heads"));
  EXPECT_NO_THROW(check_dim(v, -1, 8, "head_dim"));
  EXPECT_TRUE(throws_error([&] { check_dim(v, 1, 4, "kv heads"); }, ErrorKind::Value,
                           {"v: dimension 1 (kv heads) is 3, expected 4", "[6, 3, 8]"}));
}

TEST(Checks, InnerContiguousNamesArgument) {
  TensorView c = make_strided_view("v_cache", nullptr, DType::Float32, {2, 4, 8}, {64, 16, 1});
  EXPECT_NO_THROW(check_inner_contiguous(c, 1));
  EXPECT_TRUE(throws_error([&] { check_inner_contiguous(c, 2); }, ErrorKind::Value,
                           {"v_cache: the last 2 dimensions must be contiguous", "[2, 4, 8]"}));
}

TEST(Checks, SameDeviceNamesBothArgumentsAndDevices) {
  TensorView k = make_view("k", nullptr, DType::Float32, {2});
  TensorView v = make_view("v", nullptr, DType::Float32, {2}, kCuda0);
  EXPECT_NO_THROW(check_same_device(v, v));
  EXPECT_TRUE(throws_error([&] { check_same_device(v, k); }, ErrorKind::Value,
                           {"v is on cuda:0 but k is on cpu"}));
  TensorView other_gpu = make_view("w", nullptr, DType::Float32, {2}, Device{DeviceType::CUDA, 1});
  EXPECT_TRUE(throws_error([&] { check_same_device(other_gpu, v); }, ErrorKind::Value,
                           {"w is on cuda:1 but v is on cuda:0"}));
}

TEST(Checks, IndexArrayNeeds1DInt32OrInt64) {
  EXPECT_NO_THROW(check_index_array(make_view("slots", nullptr, DType::Int32, {4})));
  EXPECT_NO_THROW(check_index_array(make_view("slots", nullptr, DType::Int64, {0})));
  EXPECT_TRUE(throws_error([] { check_index_array(make_view("slots", nullptr, DType::Float32, {4})); },
                           ErrorKind::Type, {"slots: dtype float32", "expected int32, int64"}));
  EXPECT_TRUE(throws_error([] { check_index_array(make_view("pages", nullptr, DType::UInt8, {4})); },
                           ErrorKind::Type, {"pages: dtype uint8"}));
  EXPECT_TRUE(throws_error([] { check_index_array(make_view("pages", nullptr, DType::Int64, {2, 2})); },
                           ErrorKind::Value, {"pages: expected 1 dimensions", "[2, 2]"}));
}

}  // namespace
}  // namespace kvcore
