// kvcore/memory.h on the CPU backend (memfd pages mapped into a fixed reservation): map / unmap /
// alias / offload / prefetch / resize, the kind of every error, rollback on MemoryError, and the
// reclaim callbacks.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "kvcore/memory.h"
#include "test_util.h"

namespace kvcore {
namespace {

constexpr int64_t kPage = 4096;  // the host granularity on x86-64 Linux
const Device kCpu{DeviceType::CPU, 0};

PagePool make_pool(int64_t pages, int64_t host_pages = 0) {
  return PagePool(kCpu, pages * kPage, host_pages * kPage, kPage);
}

unsigned char* page_ptr(const VirtualTensor& t, int64_t page) {
  return static_cast<unsigned char*>(t.data()) + page * t.page_bytes();
}

// A page of random bytes, none of them zero.
std::vector<unsigned char> random_page(std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(1, 255);
  std::vector<unsigned char> out(static_cast<size_t>(kPage));
  for (auto& b : out) b = static_cast<unsigned char>(dist(rng));
  return out;
}

std::vector<unsigned char> fill(const VirtualTensor& t, int64_t page, std::mt19937& rng) {
  std::vector<unsigned char> data = random_page(rng);
  std::memcpy(page_ptr(t, page), data.data(), data.size());
  return data;
}

std::vector<unsigned char> read(const VirtualTensor& t, int64_t page) {
  const unsigned char* p = page_ptr(t, page);
  return std::vector<unsigned char>(p, p + kPage);
}

bool is_zero(const VirtualTensor& t, int64_t page) {
  const unsigned char* p = page_ptr(t, page);
  for (int64_t i = 0; i < kPage; ++i)
    if (p[i]) return false;
  return true;
}

// free + mapped + releasing == total, and the other counters agree with the pool's accessors.
void expect_consistent(const PagePool& pool) {
  const PoolStats s = pool.stats();
  EXPECT_EQ(s.pages_total, pool.capacity_pages());
  EXPECT_EQ(s.pages_free, pool.free_pages());
  EXPECT_EQ(s.pages_free + s.pages_mapped + s.pages_releasing, s.pages_total);
  EXPECT_EQ(s.pages_releasing, 0);
  EXPECT_LE(s.pages_shared, s.pages_mapped);
  EXPECT_EQ(s.host_pages_total, pool.host_capacity_pages());
  EXPECT_EQ(s.host_pages_free, pool.host_free_pages());
  EXPECT_EQ(s.pages_offloaded, s.host_pages_total - s.host_pages_free);
}

TEST(PagePool, PropertiesAndRounding) {
  PagePool pool(kCpu, 3 * kPage + 1, kPage + 1, kPage);
  EXPECT_EQ(pool.device(), kCpu);
  EXPECT_EQ(pool.granularity(), kPage);
  EXPECT_EQ(pool.page_bytes(), kPage);
  EXPECT_EQ(pool.capacity_pages(), 4);
  EXPECT_EQ(pool.free_pages(), 4);
  EXPECT_EQ(pool.host_capacity_pages(), 2);
  EXPECT_EQ(pool.host_free_pages(), 2);
  const PoolStats s = pool.stats();
  EXPECT_EQ(s.granularity, kPage);
  EXPECT_EQ(s.driver_calls.at("create").count, 4);
  expect_consistent(pool);
  EXPECT_EQ(PagePool(kCpu, 1).page_bytes(), int64_t(2) << 20);  // the CPU default
}

TEST(PagePool, BadArgumentsThrowValueError) {
  EXPECT_TRUE(test::throws_error([] { PagePool(kCpu, kPage, 0, 6000); }, ErrorKind::Value, {"granularity"}));
  EXPECT_TRUE(test::throws_error([] { PagePool(kCpu, kPage, 0, kPage / 2); }, ErrorKind::Value, {"granularity"}));
  EXPECT_TRUE(test::throws_error([] { PagePool(kCpu, -1, 0, kPage); }, ErrorKind::Value, {"capacity_bytes"}));
  EXPECT_TRUE(test::throws_error([] { PagePool(kCpu, kPage, -1, kPage); }, ErrorKind::Value, {"host_capacity_bytes"}));
  EXPECT_TRUE(test::throws_error([] { PagePool(kCpu, kPage, 0, -kPage); }, ErrorKind::Value, {"page_bytes"}));
  PagePool pool = make_pool(1);
  EXPECT_TRUE(test::throws_error([&] { pool.resize(-1); }, ErrorKind::Value, {"resize"}));
  EXPECT_TRUE(test::throws_error([&] { VirtualTensor(pool, {}, DType::UInt8); }, ErrorKind::Value, {"shape"}));
  EXPECT_TRUE(test::throws_error([&] { VirtualTensor(pool, {4, 0}, DType::UInt8); }, ErrorKind::Value, {"positive"}));
  EXPECT_TRUE(test::throws_error([&] { VirtualTensor(pool, {-3}, DType::UInt8); }, ErrorKind::Value, {"positive"}));
  EXPECT_EQ(pool.stats().tensors, 0);
}

TEST(VirtualTensor, ReservesWithoutMapping) {
  PagePool pool = make_pool(2);
  VirtualTensor t(pool, {3, 1000}, DType::Float32);  // 12000 bytes -> 3 pages
  EXPECT_NE(t.data(), nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % kPage, 0u);
  EXPECT_EQ(t.shape(), (std::vector<int64_t>{3, 1000}));
  EXPECT_EQ(t.dtype(), DType::Float32);
  EXPECT_EQ(t.device(), kCpu);
  EXPECT_EQ(t.nbytes(), 12000);
  EXPECT_EQ(t.num_pages(), 3);
  EXPECT_EQ(t.page_bytes(), kPage);
  EXPECT_TRUE(t.mapped_pages().empty());
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_FALSE(t.is_mapped(i));
    EXPECT_EQ(t.physical_page(i), -1);
    EXPECT_TRUE(is_zero(t, i));
  }
  EXPECT_EQ(pool.free_pages(), 2);
  EXPECT_EQ(pool.stats().tensors, 1);
  EXPECT_EQ(pool.stats().reserved_bytes, 3 * kPage);
}

TEST(VirtualTensor, MapWriteUnmapKeepsAddressAndZeroes) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  std::mt19937 rng(seed);
  PagePool pool = make_pool(4);
  VirtualTensor t(pool, {4 * kPage}, DType::UInt8);
  void* const base = t.data();
  t.map(0, 3);
  EXPECT_EQ(t.mapped_pages(), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(pool.free_pages(), 1);
  std::vector<std::vector<unsigned char>> want;
  for (int64_t i = 0; i < 3; ++i) want.push_back(fill(t, i, rng));
  for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(read(t, i), want[size_t(i)]);
  EXPECT_TRUE(is_zero(t, 3));
  t.unmap(1, 1);
  EXPECT_TRUE(is_zero(t, 1));
  EXPECT_EQ(read(t, 0), want[0]);
  EXPECT_EQ(read(t, 2), want[2]);
  EXPECT_EQ(pool.free_pages(), 2);
  EXPECT_EQ(t.data(), base);
  const PoolStats s = pool.stats();
  EXPECT_GT(s.driver_calls.at("map").count, 0);
  EXPECT_GT(s.driver_calls.at("map").total_us, 0.0);
  EXPECT_GT(s.driver_calls.at("unmap").count, 0);
  EXPECT_GT(s.driver_calls.at("unmap").total_us, 0.0);
  expect_consistent(pool);
}

TEST(VirtualTensor, ErrorKinds) {
  PagePool pool = make_pool(2, 1);
  PagePool other_pool = make_pool(1);
  VirtualTensor t(pool, {3 * kPage}, DType::UInt8);
  VirtualTensor foreign(other_pool, {kPage}, DType::UInt8);
  foreign.map(0, 1);
  t.map(0, 1);
  // Out of range: IndexError.
  EXPECT_TRUE(test::throws_error([&] { t.map(2, 2); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.map(-1, 1); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.unmap(0, -1); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.offload(3, 1); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.prefetch(0, 4); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.is_mapped(3); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.physical_page(-1); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.ensure(3 * kPage + 1); }, ErrorKind::Index, {"out of range"}));
  // Wrong page state: ValueError.
  EXPECT_TRUE(test::throws_error([&] { t.map(0, 2); }, ErrorKind::Value, {"already mapped"}));
  EXPECT_TRUE(test::throws_error([&] { t.unmap(1, 1); }, ErrorKind::Value, {"not mapped"}));
  EXPECT_TRUE(test::throws_error([&] { t.offload(1, 1); }, ErrorKind::Value, {"not mapped"}));
  EXPECT_TRUE(test::throws_error([&] { t.prefetch(0, 1); }, ErrorKind::Value, {"not offloaded"}));
  EXPECT_TRUE(test::throws_error([&] { t.alias(0, t, 0); }, ErrorKind::Value, {"already mapped"}));
  EXPECT_TRUE(test::throws_error([&] { t.alias(1, t, 2); }, ErrorKind::Value, {"not mapped"}));
  EXPECT_TRUE(test::throws_error([&] { t.alias(1, foreign, 0); }, ErrorKind::Value, {"different pools"}));
  // Exhaustion: MemoryError.
  EXPECT_TRUE(test::throws_error([&] { t.map(1, 2); }, ErrorKind::Memory, {"exhausted"}));
  t.map(1, 1);
  EXPECT_TRUE(test::throws_error([&] { t.offload(0, 2); }, ErrorKind::Memory, {"host tier is full"}));
  EXPECT_EQ(t.mapped_pages(), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(pool.free_pages(), 0);
  EXPECT_EQ(pool.host_free_pages(), 1);
  // Freed: Runtime (KVCoreError), reported before anything else.
  t.free();
  EXPECT_TRUE(t.is_freed());
  EXPECT_EQ(pool.free_pages(), 2);
  EXPECT_TRUE(test::throws_error([&] { t.map(0, 1); }, ErrorKind::Runtime, {"freed"}));
  EXPECT_TRUE(test::throws_error([&] { t.map(99, 1); }, ErrorKind::Runtime, {"freed"}));
  EXPECT_TRUE(test::throws_error([&] { t.unmap(0, 1); }, ErrorKind::Runtime, {"freed"}));
  EXPECT_TRUE(test::throws_error([&] { t.offload(0, 1); }, ErrorKind::Runtime, {"freed"}));
  EXPECT_TRUE(test::throws_error([&] { t.prefetch(0, 1); }, ErrorKind::Runtime, {"freed"}));
  EXPECT_TRUE(test::throws_error([&] { t.ensure(1); }, ErrorKind::Runtime, {"freed"}));
  EXPECT_TRUE(test::throws_error([&] { t.mapped_pages(); }, ErrorKind::Runtime, {"freed"}));
  EXPECT_TRUE(test::throws_error([&] { t.retain_view(); }, ErrorKind::Runtime, {"freed"}));
  EXPECT_TRUE(test::throws_error([&] { t.free(); }, ErrorKind::Runtime, {"freed"}));
  VirtualTensor u(pool, {kPage}, DType::UInt8);
  EXPECT_TRUE(test::throws_error([&] { u.alias(0, t, 0); }, ErrorKind::Runtime, {"freed"}));
}

TEST(VirtualTensor, MapExhaustionRollsBack) {
  PagePool pool = make_pool(3);
  VirtualTensor a(pool, {2 * kPage}, DType::UInt8);
  a.map(0, 2);
  VirtualTensor t(pool, {4 * kPage}, DType::UInt8);
  EXPECT_TRUE(test::throws_error([&] { t.map(0, 2); }, ErrorKind::Memory, {"exhausted", "2 page(s) needed"}));
  EXPECT_TRUE(t.mapped_pages().empty());
  EXPECT_EQ(pool.free_pages(), 1);
  // ensure is all or nothing too.
  EXPECT_TRUE(test::throws_error([&] { t.ensure(3 * kPage); }, ErrorKind::Memory, {"exhausted"}));
  EXPECT_TRUE(t.mapped_pages().empty());
  EXPECT_EQ(pool.free_pages(), 1);
  t.map(3, 1);  // the pool is intact
  EXPECT_EQ(pool.free_pages(), 0);
  expect_consistent(pool);
}

TEST(VirtualTensor, EnsureMapsOnlyTheMissingPages) {
  PagePool pool = make_pool(6);
  VirtualTensor t(pool, {5 * kPage}, DType::UInt8);
  t.map(2, 1);
  t.ensure(kPage + 1);
  EXPECT_EQ(t.mapped_pages(), (std::vector<int64_t>{0, 1, 2}));
  t.ensure(3 * kPage);
  EXPECT_EQ(pool.free_pages(), 3);
  t.ensure(5 * kPage);
  EXPECT_EQ(t.mapped_pages(), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(pool.free_pages(), 1);
}

TEST(VirtualTensor, AliasSharesAndIsRefcounted) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  std::mt19937 rng(seed);
  PagePool pool = make_pool(3);
  VirtualTensor a(pool, {2 * kPage}, DType::UInt8);
  VirtualTensor b(pool, {3 * kPage}, DType::UInt8);
  a.map(0, 2);
  b.alias(2, a, 1);
  b.alias(0, b, 2);
  EXPECT_EQ(b.physical_page(2), a.physical_page(1));
  EXPECT_EQ(b.physical_page(0), a.physical_page(1));
  EXPECT_NE(a.physical_page(0), a.physical_page(1));
  PoolStats s = pool.stats();
  EXPECT_EQ(s.pages_mapped, 2);
  EXPECT_EQ(s.pages_shared, 1);
  EXPECT_EQ(pool.free_pages(), 1);
  const auto w = fill(a, 1, rng);
  EXPECT_EQ(read(b, 2), w);
  EXPECT_EQ(read(b, 0), w);
  const auto w2 = fill(b, 0, rng);
  EXPECT_EQ(read(a, 1), w2);
  a.unmap(1, 1);
  EXPECT_TRUE(is_zero(a, 1));
  b.unmap(2, 1);
  EXPECT_EQ(pool.free_pages(), 1);  // b's page 0 still maps it
  EXPECT_EQ(read(b, 0), w2);
  b.unmap(0, 1);
  EXPECT_EQ(pool.free_pages(), 2);
  s = pool.stats();
  EXPECT_EQ(s.pages_mapped, 1);
  EXPECT_EQ(s.pages_shared, 0);
  expect_consistent(pool);
}

TEST(VirtualTensor, OffloadPrefetchRoundTrip) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  std::mt19937 rng(seed);
  PagePool pool = make_pool(4, 2);
  VirtualTensor t(pool, {3 * kPage}, DType::UInt8);
  void* const base = t.data();
  t.map(0, 3);
  std::vector<std::vector<unsigned char>> want;
  for (int64_t i = 0; i < 3; ++i) want.push_back(fill(t, i, rng));
  Transfer tr = t.offload(1, 2);
  EXPECT_TRUE(tr.done());
  EXPECT_EQ(tr.bytes(), 2 * kPage);
  tr.wait();
  EXPECT_TRUE(t.is_offloaded(1));
  EXPECT_TRUE(t.is_offloaded(2));
  EXPECT_FALSE(t.is_mapped(1));
  EXPECT_EQ(t.physical_page(1), -1);
  EXPECT_TRUE(is_zero(t, 1));
  EXPECT_TRUE(is_zero(t, 2));
  EXPECT_EQ(pool.free_pages(), 3);
  EXPECT_EQ(pool.host_free_pages(), 0);
  EXPECT_EQ(pool.stats().pages_offloaded, 2);
  // Scribble over every free physical page: the offloaded contents live in the host tier.
  {
    VirtualTensor scratch(pool, {3 * kPage}, DType::UInt8);
    scratch.map(0, 3);
    for (int64_t i = 0; i < 3; ++i) fill(scratch, i, rng);
  }  // destroyed without free(): its pages return
  EXPECT_EQ(pool.free_pages(), 3);
  Transfer back = t.prefetch(1, 2);
  EXPECT_TRUE(back.done());
  EXPECT_EQ(back.bytes(), 2 * kPage);
  for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(read(t, i), want[size_t(i)]) << "page " << i;
  EXPECT_EQ(t.data(), base);
  EXPECT_EQ(pool.free_pages(), 1);
  EXPECT_EQ(pool.host_free_pages(), 2);
  expect_consistent(pool);
}

TEST(VirtualTensor, PrefetchExhaustionRollsBack) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  std::mt19937 rng(seed);
  PagePool pool = make_pool(2, 2);
  VirtualTensor t(pool, {2 * kPage}, DType::UInt8);
  t.map(0, 2);
  const auto w0 = fill(t, 0, rng), w1 = fill(t, 1, rng);
  t.offload(0, 2);
  VirtualTensor hog(pool, {kPage}, DType::UInt8);
  hog.map(0, 1);
  EXPECT_TRUE(test::throws_error([&] { t.prefetch(0, 2); }, ErrorKind::Memory, {"exhausted"}));
  EXPECT_TRUE(t.is_offloaded(0));
  EXPECT_TRUE(t.is_offloaded(1));
  EXPECT_EQ(pool.free_pages(), 1);
  EXPECT_EQ(pool.host_free_pages(), 0);
  t.prefetch(1, 1);  // one page fits
  EXPECT_EQ(read(t, 1), w1);
  hog.unmap(0, 1);
  t.prefetch(0, 1);
  EXPECT_EQ(read(t, 0), w0);
  EXPECT_EQ(pool.host_free_pages(), 2);
  // Unmapping an offloaded page discards its slot.
  t.offload(0, 1);
  t.unmap(0, 1);
  EXPECT_FALSE(t.is_offloaded(0));
  EXPECT_EQ(pool.host_free_pages(), 2);
  expect_consistent(pool);
}

TEST(PagePool, ResizeGrowsAndShrinksFreePages) {
  PagePool pool = make_pool(2);
  VirtualTensor t(pool, {5 * kPage}, DType::UInt8);
  t.map(0, 2);
  pool.resize(5);
  EXPECT_EQ(pool.capacity_pages(), 5);
  EXPECT_EQ(pool.free_pages(), 3);
  t.map(2, 3);
  t.unmap(0, 2);
  pool.resize(3);
  EXPECT_EQ(pool.capacity_pages(), 3);
  EXPECT_EQ(pool.free_pages(), 0);
  EXPECT_EQ(t.mapped_pages(), (std::vector<int64_t>{2, 3, 4}));
  expect_consistent(pool);
}

TEST(PagePool, ReclaimCalledWithShortfallNewestFirst) {
  PagePool pool = make_pool(5);
  VirtualTensor t(pool, {5 * kPage}, DType::UInt8);
  t.map(0, 4);
  std::vector<std::pair<char, int64_t>> calls;
  pool.on_reclaim([&](int64_t n) {
    calls.emplace_back('o', n);
    t.unmap(0, 1);
    return int64_t(1);
  });
  const int newer = pool.on_reclaim([&](int64_t n) {
    calls.emplace_back('n', n);
    t.unmap(3, 1);
    return int64_t(1);
  });
  pool.resize(2);  // need 3, 1 free: short by 2; the newer frees 1, the older the other
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0], std::make_pair('n', int64_t(2)));
  EXPECT_EQ(calls[1], std::make_pair('o', int64_t(1)));
  EXPECT_EQ(pool.capacity_pages(), 2);
  EXPECT_EQ(t.mapped_pages(), (std::vector<int64_t>{1, 2}));
  pool.remove_reclaim(newer);
  EXPECT_TRUE(test::throws_error([&] { pool.remove_reclaim(newer); }, ErrorKind::Value, {"no callback"}));
  calls.clear();
  pool.resize(4);
  pool.resize(2);  // two free pages: no callback
  EXPECT_TRUE(calls.empty());
  EXPECT_TRUE(test::throws_error([&] { pool.on_reclaim(PagePool::ReclaimFn()); }, ErrorKind::Type, {"callable"}));
}

TEST(PagePool, ResizeShortfallThrowsWithCapacityUnchanged) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  std::mt19937 rng(seed);
  PagePool pool = make_pool(4);
  VirtualTensor t(pool, {4 * kPage}, DType::UInt8);
  t.map(0, 3);
  const auto w = fill(t, 0, rng);
  std::vector<int64_t> asked;
  pool.on_reclaim([&](int64_t n) {
    asked.push_back(n);
    return int64_t(0);
  });
  EXPECT_TRUE(test::throws_error([&] { pool.resize(1); }, ErrorKind::Memory, {"capacity unchanged"}));
  EXPECT_EQ(asked, (std::vector<int64_t>{2}));
  EXPECT_EQ(pool.capacity_pages(), 4);
  EXPECT_EQ(pool.free_pages(), 1);
  EXPECT_EQ(t.mapped_pages(), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(read(t, 0), w);
  expect_consistent(pool);
}

TEST(VirtualTensor, FreeRefusedWhileViewsLive) {
  PagePool pool = make_pool(2);
  VirtualTensor t(pool, {kPage}, DType::UInt8);
  t.map(0, 1);
  {
    std::shared_ptr<void> view = t.retain_view();
    std::shared_ptr<void> view2 = t.retain_view();
    EXPECT_TRUE(test::throws_error([&] { t.free(); }, ErrorKind::Runtime, {"2 exported view(s)"}));
    EXPECT_FALSE(t.is_freed());
    EXPECT_TRUE(t.is_mapped(0));
  }
  t.free();
  EXPECT_EQ(pool.free_pages(), 2);
  EXPECT_EQ(pool.stats().tensors, 0);
  EXPECT_EQ(pool.stats().reserved_bytes, 0);
}

TEST(VirtualTensor, ViewTokenOutlivesTheTensorObject) {
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  std::mt19937 rng(seed);
  PagePool pool = make_pool(2);
  std::shared_ptr<void> token;
  unsigned char* p = nullptr;
  std::vector<unsigned char> w;
  {
    VirtualTensor t(pool, {kPage}, DType::UInt8);
    t.map(0, 1);
    w = fill(t, 0, rng);
    token = t.retain_view();
    p = page_ptr(t, 0);
  }
  EXPECT_EQ(pool.free_pages(), 1);  // still mapped behind the token
  EXPECT_EQ(std::vector<unsigned char>(p, p + kPage), w);
  token.reset();
  EXPECT_EQ(pool.free_pages(), 2);
  EXPECT_EQ(pool.stats().tensors, 0);
}

TEST(VirtualTensor, ThreadsShareOnePool) {
  constexpr int kThreads = 6, kRounds = 50, kPages = 3;
  PagePool pool = make_pool(kThreads * kPages, kThreads);
  const uint32_t seed = test::random_seed();
  SCOPED_TRACE(test::seed_trace(seed));
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      std::mt19937 rng(seed + uint32_t(i));
      for (int r = 0; r < kRounds; ++r) {
        VirtualTensor t(pool, {kPages * kPage}, DType::UInt8);
        t.map(0, kPages);
        std::vector<std::vector<unsigned char>> want;
        for (int64_t p = 0; p < kPages; ++p) want.push_back(fill(t, p, rng));
        t.offload(1, 1);
        if (!is_zero(t, 1)) failures++;
        t.prefetch(1, 1);
        for (int64_t p = 0; p < kPages; ++p)
          if (read(t, p) != want[size_t(p)]) failures++;
        t.unmap(0, kPages);
        if (r % 2) t.free();
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(pool.free_pages(), kThreads * kPages);
  EXPECT_EQ(pool.host_free_pages(), kThreads);
  EXPECT_EQ(pool.stats().tensors, 0);
  expect_consistent(pool);
}

// Huge counts must not overflow the range check (first + count once wrapped around, so an unmap
// like this silently did nothing).
TEST(VirtualTensor, HugeCountIsAnIndexError) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  PagePool pool = make_pool(2, 1);
  VirtualTensor t(pool, {2 * kPage}, DType::UInt8);
  t.map(0, 1);
  EXPECT_TRUE(test::throws_error([&] { t.unmap(0, kMax); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.map(0, kMax); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.offload(0, kMax); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.prefetch(0, kMax); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.ensure(kMax); }, ErrorKind::Index, {"out of range"}));
  EXPECT_EQ(t.mapped_pages(), (std::vector<int64_t>{0}));
  EXPECT_EQ(pool.free_pages(), 1);
  EXPECT_EQ(pool.host_free_pages(), 1);
}

// Library bug: VirtualTensorState::check_range (csrc/memory/page_pool.cpp:236-237) puts
// `first + count` in its message, which is signed overflow (UB) once the sum exceeds INT64_MAX:
// the ASan+UBSan build of test_native.py aborts here. The range test itself is overflow-safe.
// Enable once the message reports first and count without adding them.
TEST(VirtualTensor, HugeFirstPageIsAnIndexErrorWithoutOverflow) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  PagePool pool = make_pool(2);
  VirtualTensor t(pool, {2 * kPage}, DType::UInt8);
  t.map(0, 1);
  EXPECT_TRUE(test::throws_error([&] { t.unmap(1, kMax); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.map(kMax, 1); }, ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(test::throws_error([&] { t.is_mapped(kMax); }, ErrorKind::Index, {"out of range"}));
  EXPECT_EQ(t.mapped_pages(), (std::vector<int64_t>{0}));
}

}  // namespace
}  // namespace kvcore
