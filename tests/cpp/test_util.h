// Helpers shared by the kvcore C++ tests: error assertions, seeded random data, poisoned buffers.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kvcore/error.h"
#include "kvcore/tensor.h"

namespace kvcore::test {

inline const char* kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::Value: return "Value";
    case ErrorKind::Type: return "Type";
    case ErrorKind::Index: return "Index";
    case ErrorKind::Memory: return "Memory";
    case ErrorKind::Runtime: return "Runtime";
  }
  return "?";
}

// Passes when fn() throws kvcore::Error of `kind` whose message contains every one of `parts`.
// Use as EXPECT_TRUE(throws_error(...)) so a failure reports what was thrown instead.
template <typename Fn>
::testing::AssertionResult throws_error(Fn&& fn, ErrorKind kind, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    if (e.kind() != kind)
      return ::testing::AssertionFailure() << "threw kind " << kind_name(e.kind()) << ", expected "
                                           << kind_name(kind) << ": " << e.what();
    for (const std::string& part : parts)
      if (e.message().find(part) == std::string::npos)
        return ::testing::AssertionFailure() << "message lacks \"" << part << "\": " << e.what();
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-kvcore exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw (expected " << kind_name(kind) << ")";
}

// A fresh seed per run (so repeated runs cover more data), or KVCORE_TEST_SEED to replay one.
// Wrap each use in SCOPED_TRACE(seed_trace(seed)) so a failure prints the seed.
inline uint32_t random_seed() {
  if (const char* env = std::getenv("KVCORE_TEST_SEED")) return uint32_t(std::strtoul(env, nullptr, 10));
  return std::random_device{}();
}
inline std::string seed_trace(uint32_t seed) {
  return "seed " + std::to_string(seed) + " (replay with KVCORE_TEST_SEED=" + std::to_string(seed) + ")";
}

// Random values that are never all zero: floats in [-1, 1), integers over their whole range.
template <typename T>
std::vector<T> random_values(size_t count, std::mt19937& rng) {
  std::vector<T> out(count);
  if constexpr (std::is_floating_point_v<T>) {
    std::uniform_real_distribution<T> dist(T(-1), T(1));
    for (T& x : out) x = dist(rng);
  } else {
    std::uniform_int_distribution<int64_t> dist(std::numeric_limits<T>::min(), std::numeric_limits<T>::max());
    for (T& x : out) x = T(dist(rng));
  }
  return out;
}

// Destinations start as this byte pattern, so bytes an op should not touch can be checked.
constexpr unsigned char kPoisonByte = 0xAB;

template <typename T>
std::vector<T> poisoned(size_t count) {
  std::vector<T> out(count);
  std::memset(out.data(), kPoisonByte, count * sizeof(T));
  return out;
}

// Count of elements of `buf` that still hold the poison pattern.
template <typename T>
size_t count_poisoned(const std::vector<T>& buf) {
  T poison;
  std::memset(&poison, kPoisonByte, sizeof(T));
  size_t n = 0;
  for (const T& x : buf) n += std::memcmp(&x, &poison, sizeof(T)) == 0;
  return n;
}

// Bitwise equality (pure-copy ops must match exactly, and NaN-safe); reports the first mismatch.
template <typename T>
::testing::AssertionResult same_bytes(const std::vector<T>& actual, const std::vector<T>& expected) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure() << "sizes differ: " << actual.size() << " vs " << expected.size();
  for (size_t i = 0; i < actual.size(); ++i)
    if (std::memcmp(&actual[i], &expected[i], sizeof(T)) != 0)
      return ::testing::AssertionFailure() << "first difference at element " << i << " of " << actual.size();
  return ::testing::AssertionSuccess();
}

// The kvcore dtype a test stores as T. 16-bit data is stored as uint16_t and tagged bfloat16:
// the ops only copy bytes, so no real bfloat16 type is needed.
template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::Float32;
  else if constexpr (std::is_same_v<T, uint16_t>) return DType::BFloat16;
  else if constexpr (std::is_same_v<T, int32_t>) return DType::Int32;
  else if constexpr (std::is_same_v<T, int64_t>) return DType::Int64;
  else static_assert(sizeof(T) == 0, "no kvcore dtype for this type");
}

// A view with explicit strides (in elements), for sliced and transposed layouts.
inline TensorView make_strided_view(const char* name, void* data, DType dtype, std::initializer_list<int64_t> shape,
                                    std::initializer_list<int64_t> strides, Device device = {}) {
  TensorView t = make_view(name, data, dtype, shape, device);
  int d = 0;
  for (int64_t s : strides) t.strides[d++] = s;
  return t;
}

}  // namespace kvcore::test
