// kvcore/prefix_cache.h: the radix tree over whole pages, both tiers, lock / pin / eviction order,
// host admission, prefetch through a PageMover, resize, statistics and every argument check, plus a
// seeded random run that checks the page ledger after every operation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kvcore/prefix_cache.h"
#include "test_util.h"

namespace kvcore {
namespace {

using test::throws_error;

constexpr int64_t kPT = 4;  // tokens per page

// Tokens of pages with the given values (page v = v, v+1000, v+2000, v+3000) and `partial` more.
std::vector<int32_t> toks(std::initializer_list<int32_t> pages, int partial = 0) {
  std::vector<int32_t> out;
  for (int32_t v : pages)
    for (int j = 0; j < kPT; ++j) out.push_back(v + 1000 * j);
  for (int i = 0; i < partial; ++i) out.push_back(777);
  return out;
}

PrefixCacheConfig config(int64_t gpu, int64_t host, CachePolicy policy = CachePolicy::Lru) {
  PrefixCacheConfig c;
  c.page_tokens = kPT;
  c.gpu_pages = gpu;
  c.host_pages = host;
  c.policy = policy;
  return c;
}

PrefixCache::Match match(PrefixCache& c, const std::vector<int32_t>& t, double now, int64_t ns = 0) {
  return c.match(t.data(), int64_t(t.size()), ns, now);
}

// An engine's request: match, lock, prefetch, alloc the rest, insert, unlock. Returns the page ids.
std::vector<int64_t> serve(PrefixCache& c, const std::vector<int32_t>& t, double now, int64_t ns = 0,
                           int64_t reuse_class = 0) {
  PrefixCache::Match m = match(c, t, now, ns);
  std::vector<int64_t> pages = m.gpu_pages;
  if (m.handle >= 0) {
    c.lock(m.handle);
    if (m.host_tokens) {
      PrefixCache::Prefetch p = c.prefetch(m.handle, now);
      pages.insert(pages.end(), p.gpu_pages.begin(), p.gpu_pages.end());
    }
  }
  std::vector<int64_t> fresh = c.alloc(int64_t(t.size()) / kPT - int64_t(pages.size()), now);
  pages.insert(pages.end(), fresh.begin(), fresh.end());
  // Everything but the fresh pages (the matched run and the prefetched pages) was cached already.
  EXPECT_EQ(c.insert(t.data(), int64_t(t.size()), pages.data(), int64_t(pages.size()), ns, now, reuse_class),
            int64_t(pages.size() - fresh.size()) * kPT);
  if (m.handle >= 0) c.unlock(m.handle);
  return pages;
}

void expect_ledger(const PrefixCache& c) {
  const PrefixCacheStats s = c.stats();
  EXPECT_EQ(s.gpu_pages_free + s.gpu_pages_held + s.gpu_pages_cached, s.gpu_capacity);
  EXPECT_LE(s.host_pages_used, s.host_capacity);
}

// Records every transfer; load() returns increasing tokens that complete when waited on.
class RecordingMover final : public PageMover {
 public:
  struct Call {
    std::string op;
    std::vector<int64_t> a, b;
  };
  std::vector<Call> calls;
  std::set<uint64_t> pending;
  uint64_t next = 1;

  void offload(const std::vector<int64_t>& gpu_pages, const std::vector<int64_t>& host_slots) override {
    calls.push_back({"offload", gpu_pages, host_slots});
  }
  uint64_t load(const std::vector<int64_t>& host_slots, const std::vector<int64_t>& gpu_pages) override {
    calls.push_back({"load", host_slots, gpu_pages});
    pending.insert(next);
    return next++;
  }
  bool done(uint64_t token) override { return !pending.count(token); }
  void wait(uint64_t token) override { pending.erase(token); }
};

// ---------------------------------------------------------------------------------------------

TEST(PrefixCacheConfig, RejectsBadValues) {
  auto make = [](PrefixCacheConfig c) { return [c] { PrefixCache cache(c); }; };
  PrefixCacheConfig c = config(4, 0);
  c.page_tokens = 0;
  EXPECT_TRUE(throws_error(make(c), ErrorKind::Value, {"page_tokens"}));
  c = config(-1, 0);
  EXPECT_TRUE(throws_error(make(c), ErrorKind::Value, {"gpu_pages"}));
  c = config(int64_t(1) << 31, 0);
  EXPECT_TRUE(throws_error(make(c), ErrorKind::Value, {"gpu_pages"}));
  c = config(4, -1);
  EXPECT_TRUE(throws_error(make(c), ErrorKind::Value, {"host_pages"}));
  c = config(4, 0);
  c.half_life = 0;
  EXPECT_TRUE(throws_error(make(c), ErrorKind::Value, {"half_life"}));
  c = config(4, 0);
  c.page_bytes = -1;
  EXPECT_TRUE(throws_error(make(c), ErrorKind::Value, {"page_bytes"}));
}

TEST(PrefixCacheConfig, PolicyNames) {
  EXPECT_EQ(parse_cache_policy("lru"), CachePolicy::Lru);
  EXPECT_EQ(parse_cache_policy("hot"), CachePolicy::Hot);
  EXPECT_STREQ(cache_policy_name(CachePolicy::Lru), "lru");
  EXPECT_STREQ(cache_policy_name(CachePolicy::Hot), "hot");
  EXPECT_TRUE(throws_error([] { parse_cache_policy("fifo"); }, ErrorKind::Value, {"policy", "fifo"}));
  EXPECT_TRUE(throws_error([] { parse_cache_policy(""); }, ErrorKind::Value, {"policy"}));
}

TEST(PrefixCache, EmptyCacheMatchesNothing) {
  PrefixCache c(config(4, 2, CachePolicy::Hot));
  PrefixCache::Match m = match(c, toks({1, 2}), 1);
  EXPECT_EQ(m.handle, -1);
  EXPECT_TRUE(m.gpu_pages.empty());
  EXPECT_EQ(m.gpu_tokens, 0);
  EXPECT_EQ(m.host_tokens, 0);
  const PrefixCacheStats s = c.stats();
  EXPECT_EQ(s.queried_tokens, 2 * kPT);
  EXPECT_EQ(s.gpu_capacity, 4);
  EXPECT_EQ(s.gpu_pages_free, 4);
  EXPECT_EQ(s.host_capacity, 2);
  EXPECT_EQ(s.nodes, 0);
  EXPECT_DOUBLE_EQ(s.admission_threshold, 1.5);
  EXPECT_EQ(c.config().gpu_pages, 4);
}

TEST(PrefixCache, CachesWholePagesOnly) {
  PrefixCache c(config(8, 0));
  const std::vector<int32_t> t = toks({1, 2}, 3);
  std::vector<int64_t> pages = c.alloc(2, 1);
  EXPECT_EQ(c.insert(t.data(), int64_t(t.size()), pages.data(), 2, 0, 1), 0);
  EXPECT_EQ(c.stats().inserted_tokens, 2 * kPT);
  EXPECT_EQ(c.stats().nodes, 2);

  PrefixCache::Match m = match(c, t, 2);
  EXPECT_EQ(m.gpu_pages, pages);
  EXPECT_EQ(m.gpu_tokens, 2 * kPT);
  EXPECT_GE(m.handle, 0);
  EXPECT_EQ(match(c, toks({1, 2, 3}), 2).gpu_tokens, 2 * kPT);
  EXPECT_EQ(match(c, toks({1, 9}), 2).gpu_tokens, kPT);
  EXPECT_EQ(match(c, toks({2}), 2).handle, -1);  // page 2 exists only behind page 1
  std::vector<int32_t> partial(t.begin(), t.begin() + kPT - 1);
  EXPECT_EQ(match(c, partial, 2).handle, -1);
  std::vector<int32_t> diverge = toks({1, 2});
  diverge[kPT + 1] = 4242;  // one token of the second page differs
  EXPECT_EQ(match(c, diverge, 2).gpu_tokens, kPT);
  expect_ledger(c);
}

TEST(PrefixCache, InsertReturnsTheCachedTokensAndKeepsItsOwnPages) {
  PrefixCache c(config(8, 0));
  const std::vector<int32_t> ab = toks({1, 2}), abc = toks({1, 2, 3});
  std::vector<int64_t> first = c.alloc(2, 1);
  c.insert(ab.data(), int64_t(ab.size()), first.data(), 2, 0, 1);
  std::vector<int64_t> dup = c.alloc(3, 2);
  EXPECT_EQ(c.insert(abc.data(), int64_t(abc.size()), dup.data(), 3, 0, 2), 2 * kPT);
  EXPECT_EQ(match(c, abc, 3).gpu_pages, (std::vector<int64_t>{first[0], first[1], dup[2]}));
  EXPECT_EQ(c.stats().gpu_pages_held, 2);  // the duplicates stay with the caller
  c.free(dup.data(), 2);
  EXPECT_EQ(c.stats().gpu_pages_held, 0);
  EXPECT_EQ(c.stats().gpu_pages_cached, 3);
  expect_ledger(c);
}

TEST(PrefixCache, NamespacesAreSeparate) {
  PrefixCache c(config(8, 0));
  std::vector<int64_t> p0 = serve(c, toks({1, 2}), 1, 0);
  EXPECT_EQ(match(c, toks({1, 2}), 2, 1).handle, -1);
  std::vector<int64_t> p1 = serve(c, toks({1, 2}), 2, 1);
  EXPECT_EQ(match(c, toks({1, 2}), 3, 0).gpu_pages, p0);
  EXPECT_EQ(match(c, toks({1, 2}), 3, 1).gpu_pages, p1);
  EXPECT_NE(p0, p1);
  EXPECT_EQ(c.stats().nodes, 4);
}

TEST(PrefixCache, LockedPathsAreNeverEvicted) {
  for (CachePolicy policy : {CachePolicy::Lru, CachePolicy::Hot}) {
    SCOPED_TRACE(cache_policy_name(policy));
    PrefixCache c(config(4, 0, policy));
    std::vector<int64_t> a = serve(c, toks({1, 2}), 1);
    std::vector<int64_t> b = serve(c, toks({3, 4}), 2);
    const int64_t h = match(c, toks({1, 2}), 3).handle;
    c.lock(h);
    std::vector<int64_t> got = c.alloc(2, 4);
    std::sort(got.begin(), got.end());
    std::sort(b.begin(), b.end());
    EXPECT_EQ(got, b);
    EXPECT_TRUE(throws_error([&] { c.alloc(1, 5); }, ErrorKind::Memory, {"alloc"}));
    EXPECT_EQ(match(c, toks({1, 2}), 6).gpu_pages, a);
    c.unlock(h);
    EXPECT_TRUE(throws_error([&] { c.unlock(h); }, ErrorKind::Value, {"not locked"}));
    EXPECT_EQ(c.alloc(1, 7), std::vector<int64_t>{a[1]});  // the leaf first
    expect_ledger(c);
  }
}

TEST(PrefixCache, LruEvictsTheLeastRecentlyUsedLeafFirst) {
  PrefixCache c(config(6, 0));
  std::vector<int64_t> a = serve(c, toks({1, 2}), 1);
  std::vector<int64_t> b = serve(c, toks({3, 4}), 2);
  std::vector<int64_t> d = serve(c, toks({5, 6}), 3);
  match(c, toks({1, 2}), 4);
  EXPECT_EQ(c.evict(2, 5), (std::vector<int64_t>{b[1], b[0]}));
  EXPECT_EQ(c.evict(1, 5), (std::vector<int64_t>{d[1]}));
  EXPECT_EQ(match(c, toks({3, 4}), 6).handle, -1);
  EXPECT_EQ(c.stats().gpu_evictions, 3);
  EXPECT_EQ(c.stats().nodes, 3);
}

TEST(PrefixCache, HotKeepsFrequentlyHitPrefixes) {
  PrefixCacheConfig cfg = config(4, 0, CachePolicy::Hot);
  cfg.half_life = 100;
  PrefixCache c(cfg);
  serve(c, toks({1, 2}), 1);
  for (int t = 2; t < 8; ++t) match(c, toks({1, 2}), t);
  std::vector<int64_t> cold = serve(c, toks({3, 4}), 9);
  std::vector<int64_t> out = c.evict(2, 10);
  std::sort(out.begin(), out.end());
  std::sort(cold.begin(), cold.end());
  EXPECT_EQ(out, cold);
}

TEST(PrefixCache, PinKeepsAPathUntilTheTtlPasses) {
  PrefixCache c(config(2, 0));
  std::vector<int64_t> a = serve(c, toks({1, 2}), 1);
  const int64_t h = match(c, toks({1, 2}), 2).handle;
  c.pin(h, 10, 2);
  EXPECT_TRUE(c.evict(2, 11.5).empty());
  c.pin(h, 0, 3);  // a shorter pin does not shorten it
  EXPECT_TRUE(c.evict(2, 11.9).empty());
  EXPECT_EQ(c.evict(2, 12), (std::vector<int64_t>{a[1], a[0]}));
  EXPECT_TRUE(throws_error([&] { c.pin(h, -1, 13); }, ErrorKind::Value, {"ttl"}));
}

TEST(PrefixCacheHost, LruOffloadsAndPrefetchBringsThePagesBack) {
  auto mover = std::make_shared<RecordingMover>();
  PrefixCacheConfig cfg = config(3, 4);
  cfg.page_bytes = 100;
  PrefixCache c(cfg, mover);
  std::vector<int64_t> a = serve(c, toks({1, 2, 3}), 1);
  EXPECT_EQ(c.evict(2, 2), (std::vector<int64_t>{a[2], a[1]}));
  ASSERT_EQ(mover->calls.size(), 2u);
  EXPECT_EQ(mover->calls[0].op, "offload");
  EXPECT_EQ(mover->calls[0].a, std::vector<int64_t>{a[2]});
  EXPECT_EQ(mover->calls[1].a, std::vector<int64_t>{a[1]});
  const int64_t slot2 = mover->calls[0].b.at(0), slot1 = mover->calls[1].b.at(0);
  EXPECT_NE(slot1, slot2);
  PrefixCacheStats s = c.stats();
  EXPECT_EQ(s.host_writes, 2);
  EXPECT_EQ(s.bytes_to_host, 200);
  EXPECT_EQ(s.host_pages_used, 2);

  PrefixCache::Match m = match(c, toks({1, 2, 3}), 3);
  EXPECT_EQ(m.gpu_pages, std::vector<int64_t>{a[0]});
  EXPECT_EQ(m.host_tokens, 2 * kPT);
  c.lock(m.handle);
  PrefixCache::Prefetch p = c.prefetch(m.handle, 3);
  c.unlock(m.handle);
  EXPECT_EQ(p.pages, 2);
  ASSERT_EQ(mover->calls.size(), 3u);
  EXPECT_EQ(mover->calls[2].op, "load");
  EXPECT_EQ(mover->calls[2].a, (std::vector<int64_t>{slot1, slot2}));  // path order
  EXPECT_EQ(mover->calls[2].b, p.gpu_pages);
  EXPECT_FALSE(c.prefetch_done(p));
  c.prefetch_wait(p);
  EXPECT_TRUE(c.prefetch_done(p));
  m = match(c, toks({1, 2, 3}), 4);
  EXPECT_EQ(m.gpu_pages, (std::vector<int64_t>{a[0], p.gpu_pages[0], p.gpu_pages[1]}));
  s = c.stats();
  EXPECT_EQ(s.prefetched_pages, 2);
  EXPECT_EQ(s.prefetches_used, 2);
  EXPECT_EQ(s.bytes_from_host, 200);
  EXPECT_EQ(s.host_hit_tokens, 2 * kPT);
  expect_ledger(c);
}

TEST(PrefixCacheHost, PrefetchBringsBackAsManyPagesAsFit) {
  PrefixCache c(config(3, 4));
  serve(c, toks({1, 2, 3}), 1);
  c.evict(3, 2);
  std::vector<int64_t> held = c.alloc(2, 3);
  PrefixCache::Match m = match(c, toks({1, 2, 3}), 4);
  EXPECT_EQ(m.host_tokens, 3 * kPT);
  PrefixCache::Prefetch p = c.prefetch(m.handle, 4);
  EXPECT_EQ(p.pages, 1);
  EXPECT_EQ(p.token, 0u);  // no mover: complete
  m = match(c, toks({1, 2, 3}), 5);
  EXPECT_EQ(m.gpu_pages, p.gpu_pages);
  EXPECT_EQ(m.host_tokens, 2 * kPT);
  c.free(held.data(), int64_t(held.size()));
  expect_ledger(c);
}

TEST(PrefixCacheHost, HotAdmitsOnlyHotPagesAndAdapts) {
  PrefixCacheConfig cfg = config(2, 4, CachePolicy::Hot);
  cfg.adaptive = true;
  PrefixCache c(cfg);
  serve(c, toks({1}), 1);
  serve(c, toks({2}), 1);
  match(c, toks({1}), 2);  // hotness ~2 >= 1.5
  c.evict(2, 3);
  PrefixCacheStats s = c.stats();
  EXPECT_EQ(s.host_writes, 1);
  EXPECT_EQ(s.admissions_rejected, 1);
  EXPECT_EQ(match(c, toks({1}), 4).host_tokens, kPT);
  EXPECT_EQ(match(c, toks({2}), 4).handle, -1);  // dropped: a ghost hit, but of a first-seen page
  s = c.stats();
  EXPECT_EQ(s.ghost_hits, 1);
  EXPECT_DOUBLE_EQ(s.admission_threshold, 1.5);  // first-seen pages answer to the write budget
  serve(c, toks({2}), 5);  // back with its history (hotness ~2): admitted at its next eviction
  c.evict(2, 6);
  s = c.stats();
  EXPECT_EQ(s.host_writes, 2);
  EXPECT_EQ(s.budget_admitted, 0);
  EXPECT_EQ(match(c, toks({2}), 7).host_tokens, kPT);
}

TEST(PrefixCacheHost, HotGhostHitOfAHistoryPageLowersTheThreshold) {
  PrefixCacheConfig cfg = config(1, 4, CachePolicy::Hot);
  cfg.adaptive = true;
  cfg.admission_threshold = 3.0;
  cfg.host_write_budget = 0;
  PrefixCache c(cfg);
  serve(c, toks({1}), 1);
  serve(c, toks({1}), 1);  // hotness 2 < 3
  c.evict(1, 2);
  EXPECT_EQ(c.stats().admissions_rejected, 1);
  EXPECT_EQ(match(c, toks({1}), 3).handle, -1);
  EXPECT_NEAR(c.stats().admission_threshold, 2.7, 1e-12);
}

TEST(PrefixCacheHost, HotWriteBudgetAdmitsWholeRuns) {
  PrefixCacheConfig cfg = config(4, 8, CachePolicy::Hot);
  cfg.adaptive = false;
  cfg.host_write_budget = 0.5;
  PrefixCache c(cfg);
  serve(c, toks({1, 2}), 1);  // 1 page of budget for a 2-page run: rejected whole
  c.evict(2, 2);
  EXPECT_EQ(c.stats().host_writes, 0);
  serve(c, toks({3, 4}), 3);  // balance 2: this run fits
  c.evict(2, 4);
  PrefixCacheStats s = c.stats();
  EXPECT_EQ(s.host_writes, 2);
  EXPECT_EQ(s.budget_admitted, 2);
  cfg.host_write_budget = -1;
  EXPECT_TRUE(throws_error([&] { PrefixCache bad(cfg); }, ErrorKind::Value, {"host_write_budget"}));
}

TEST(PrefixCacheHost, HotClassGateLearnsWhichClassesAreReused) {
  // Class 1's pages are requested again right away, class 2's never: after a few samples class 2's
  // rate is far below the cache-wide one and its fresh runs are not written to the host.
  PrefixCacheConfig cfg = config(3, 64, CachePolicy::Hot);
  cfg.host_write_budget = 100;
  cfg.class_gate = 0.5;
  PrefixCache c(cfg);
  double t = 0;
  for (int32_t i = 0; i < 30; ++i, t += 1) {
    serve(c, toks({100 + i}), t, 0, 1);
    serve(c, toks({500 + i}), t + 0.1, 0, 2);
    PrefixCache::Match m = match(c, toks({100 + i}), t + 0.2);
    EXPECT_EQ(m.gpu_tokens + m.host_tokens, kPT);
  }
  PrefixCacheStats s = c.stats();
  EXPECT_EQ(s.reuse_classes, 2);
  EXPECT_GE(s.class_gated, 10);
  EXPECT_LE(s.class_gated, 22);
  serve(c, toks({900}), t, 0, 1);
  serve(c, toks({901}), t, 0, 2);
  c.evict(3, t + 1);
  EXPECT_EQ(match(c, toks({900}), t + 2).host_tokens, kPT);
  EXPECT_EQ(match(c, toks({901}), t + 2).handle, -1);
  expect_ledger(c);
  cfg.class_gate = -1;
  EXPECT_TRUE(throws_error([&] { PrefixCache bad(cfg); }, ErrorKind::Value, {"class_gate"}));
}

TEST(PrefixCacheHost, FullHostTierEvictsTheColdestHostPage) {
  PrefixCache c(config(1, 2));
  for (int v = 1; v <= 3; ++v) {
    serve(c, toks({v}), v);
    c.evict(1, v + 0.5);
  }
  const PrefixCacheStats s = c.stats();
  EXPECT_EQ(s.host_writes, 3);
  EXPECT_EQ(s.host_pages_used, 2);
  EXPECT_EQ(s.host_evictions, 1);
  EXPECT_EQ(s.host_evictions_unused, 1);
  EXPECT_EQ(match(c, toks({1}), 9).handle, -1);
  EXPECT_EQ(match(c, toks({3}), 9).host_tokens, kPT);
}

TEST(PrefixCache, ResizeGrowsAndShrinks) {
  PrefixCache c(config(4, 0));
  EXPECT_EQ(c.resize(6, 1), (std::vector<int64_t>{4, 5}));
  std::vector<int64_t> a = serve(c, toks({1, 2}), 2);
  std::vector<int64_t> b = serve(c, toks({3, 4}), 3);
  std::vector<int64_t> held = c.alloc(2, 4);
  std::vector<int64_t> gone = c.resize(3, 5);
  std::sort(gone.begin(), gone.end());
  std::vector<int64_t> want{a[0], a[1], b[1]};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(gone, want);
  EXPECT_EQ(c.stats().gpu_capacity, 3);
  expect_ledger(c);
  EXPECT_TRUE(throws_error([&] { c.free(&gone[0], 1); }, ErrorKind::Value, {"not held"}));
  c.free(held.data(), 2);
  EXPECT_EQ(c.resize(5, 6), (std::vector<int64_t>{gone[0], gone[1]}));
  EXPECT_EQ(c.resize(7, 6), (std::vector<int64_t>{gone[2], 6}));

  const int64_t h = match(c, toks({3}), 7).handle;
  c.lock(h);
  EXPECT_TRUE(throws_error([&] { c.resize(0, 8); }, ErrorKind::Memory, {"capacity unchanged"}));
  EXPECT_EQ(c.stats().gpu_capacity, 7);
  c.unlock(h);
  EXPECT_EQ(c.resize(0, 9).size(), 7u);
  EXPECT_TRUE(throws_error([&] { c.resize(-1, 9); }, ErrorKind::Value, {"gpu_pages"}));
}

TEST(PrefixCacheErrors, HandlesUnknownExpiredAndUnlockedBelowZero) {
  PrefixCache c(config(2, 0));
  serve(c, toks({1, 2}), 1);
  const int64_t h = match(c, toks({1, 2}), 2).handle;
  for (int64_t bad : {int64_t(-1), int64_t(0), int64_t(12345), h + (int64_t(1) << 32), (int64_t(999) << 32)}) {
    SCOPED_TRACE(bad);
    EXPECT_TRUE(throws_error([&] { c.lock(bad); }, ErrorKind::Value, {"unknown or expired handle"}));
    EXPECT_TRUE(throws_error([&] { c.unlock(bad); }, ErrorKind::Value, {"unknown or expired handle"}));
    EXPECT_TRUE(throws_error([&] { c.prefetch(bad, 3); }, ErrorKind::Value, {"unknown or expired handle"}));
    EXPECT_TRUE(throws_error([&] { c.pin(bad, 1, 3); }, ErrorKind::Value, {"unknown or expired handle"}));
  }
  EXPECT_TRUE(throws_error([&] { c.unlock(h); }, ErrorKind::Value, {"below zero"}));
  c.evict(2, 3);
  serve(c, toks({5, 6}), 4);  // reuses the node slots
  EXPECT_TRUE(throws_error([&] { c.lock(h); }, ErrorKind::Value, {"unknown or expired handle"}));
}

TEST(PrefixCacheErrors, PageIdsAndCounts) {
  PrefixCache c(config(4, 0));
  std::vector<int64_t> a = serve(c, toks({1}), 1);
  std::vector<int64_t> held = c.alloc(2, 2);
  const PrefixCacheStats before = c.stats();
  const std::vector<int32_t> t = toks({2, 3});
  auto insert = [&](std::vector<int64_t> pages) {
    return [&c, &t, pages] { c.insert(t.data(), int64_t(t.size()), pages.data(), int64_t(pages.size()), 0, 3); };
  };
  auto free_ = [&](std::vector<int64_t> pages) { return [&c, pages] { c.free(pages.data(), int64_t(pages.size())); }; };
  EXPECT_TRUE(throws_error(free_({4}), ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(throws_error(free_({-1}), ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(throws_error(free_({a[0]}), ErrorKind::Value, {"not held"}));
  EXPECT_TRUE(throws_error(free_({held[0], held[0]}), ErrorKind::Value, {"twice"}));
  EXPECT_TRUE(throws_error(insert({held[0], 9}), ErrorKind::Index, {"out of range"}));
  EXPECT_TRUE(throws_error(insert({held[0], a[0]}), ErrorKind::Value, {"not held"}));
  EXPECT_TRUE(throws_error(insert({held[0], held[0]}), ErrorKind::Value, {"twice"}));
  EXPECT_TRUE(throws_error(insert({held[0]}), ErrorKind::Value, {"entries"}));
  EXPECT_TRUE(throws_error([&] { c.alloc(-1, 3); }, ErrorKind::Value, {"negative"}));
  EXPECT_TRUE(throws_error([&] { c.evict(-1, 3); }, ErrorKind::Value, {"negative"}));
  EXPECT_TRUE(throws_error([&] { c.match(t.data(), -1, 0, 3); }, ErrorKind::Value, {"negative"}));
  const PrefixCacheStats after = c.stats();
  EXPECT_EQ(after.gpu_pages_held, before.gpu_pages_held);
  EXPECT_EQ(after.gpu_pages_cached, before.gpu_pages_cached);
  EXPECT_EQ(after.nodes, before.nodes);
  EXPECT_EQ(after.inserted_tokens, before.inserted_tokens);
}

// Random requests, evictions, frees and resizes: after every step the page ledger adds up, no id is
// handed out while held or cached, every matched GPU run consists of distinct cached pages, and at
// the end everything can be given back.
TEST(PrefixCacheRandom, LedgerHoldsUnderRandomOperations) {
  for (CachePolicy policy : {CachePolicy::Lru, CachePolicy::Hot}) {
    const uint32_t seed = test::random_seed();
    SCOPED_TRACE(test::seed_trace(seed));
    SCOPED_TRACE(cache_policy_name(policy));
    std::mt19937 rng(seed);
    PrefixCacheConfig cfg = config(10, 6, policy);
    cfg.admission_threshold = 1.2;
    cfg.page_bytes = 10;
    PrefixCache c(cfg);
    std::set<int64_t> held;
    int64_t capacity = 10;
    double now = 1;
    for (int step = 0; step < 2000; ++step) {
      now += 0.25;
      const int op = int(rng() % 10);
      if (op < 6) {  // a request of a few pages from a small alphabet (many shared prefixes)
        std::vector<int32_t> pages;
        const int n = 1 + int(rng() % 4);
        for (int i = 0; i < n; ++i) pages.push_back(int32_t(rng() % 3));
        std::vector<int32_t> t;
        for (int32_t v : pages)
          for (int j = 0; j < kPT; ++j) t.push_back(v + 1000 * j);
        PrefixCache::Match m = match(c, t, now);
        std::set<int64_t> run(m.gpu_pages.begin(), m.gpu_pages.end());
        ASSERT_EQ(run.size(), m.gpu_pages.size());
        for (int64_t p : m.gpu_pages) ASSERT_FALSE(held.count(p)) << "a cached page is also held";
        if (m.handle >= 0) c.lock(m.handle);
        std::vector<int64_t> ids = m.gpu_pages;
        if (m.handle >= 0 && m.host_tokens && rng() % 2) {
          PrefixCache::Prefetch p = c.prefetch(m.handle, now);
          ids.insert(ids.end(), p.gpu_pages.begin(), p.gpu_pages.end());
        }
        const int64_t need = n - int64_t(ids.size());
        try {
          std::vector<int64_t> fresh = c.alloc(need, now);
          for (int64_t p : fresh) {
            ASSERT_TRUE(p >= 0 && p < 64);
            ASSERT_TRUE(held.insert(p).second) << "page " << p << " handed out twice";
            ASSERT_FALSE(run.count(p)) << "page " << p << " of a locked run handed out";
          }
          ids.insert(ids.end(), fresh.begin(), fresh.end());
          const int64_t cached = c.insert(t.data(), int64_t(t.size()), ids.data(), int64_t(ids.size()), 0, now);
          ASSERT_GE(cached, int64_t(m.gpu_pages.size()) * kPT);
          for (int64_t p : fresh) held.erase(p);
        } catch (const Error& e) {
          ASSERT_EQ(e.kind(), ErrorKind::Memory) << e.what();
        }
        if (m.handle >= 0) c.unlock(m.handle);
      } else if (op == 6) {
        c.evict(int64_t(rng() % 4), now);
      } else if (op == 7) {
        for (int64_t p : c.alloc(std::min<int64_t>(int64_t(rng() % 2), c.stats().gpu_pages_free), now))
          ASSERT_TRUE(held.insert(p).second);
      } else if (op == 8 && !held.empty()) {
        const int64_t p = *held.begin();
        c.free(&p, 1);
        held.erase(p);
      } else if (op == 9) {
        const int64_t target = std::max<int64_t>(int64_t(held.size()) + 4, 6 + int64_t(rng() % 8));
        try {
          for (int64_t p : c.resize(target, now)) ASSERT_FALSE(held.count(p));
          capacity = target;
        } catch (const Error& e) {
          ASSERT_EQ(e.kind(), ErrorKind::Memory) << e.what();
        }
      }
      const PrefixCacheStats s = c.stats();
      ASSERT_EQ(s.gpu_capacity, capacity);
      ASSERT_EQ(s.gpu_pages_held, int64_t(held.size()));
      ASSERT_EQ(s.gpu_pages_free + s.gpu_pages_held + s.gpu_pages_cached, s.gpu_capacity);
      ASSERT_LE(s.host_pages_used, s.host_capacity);
      ASSERT_LE(s.gpu_hit_tokens + s.host_hit_tokens, s.queried_tokens);
      ASSERT_EQ(s.bytes_to_host, 10 * s.host_writes);
      ASSERT_EQ(s.bytes_from_host, 10 * s.prefetched_pages);
    }
    std::vector<int64_t> rest(held.begin(), held.end());
    c.free(rest.data(), int64_t(rest.size()));
    c.evict(1000, now + 1e6);
    const PrefixCacheStats s = c.stats();
    EXPECT_EQ(s.gpu_pages_cached, 0);
    EXPECT_EQ(s.nodes, s.host_pages_used);  // every node left is on the host, one slot each
    EXPECT_EQ(int64_t(c.resize(0, now).size()), capacity);
  }
}

}  // namespace
}  // namespace kvcore
