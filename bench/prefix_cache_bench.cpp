// kvcore::PrefixCache throughput in pages per second (items per second) on one CPU core.
//
// Workload: 16-token pages; kSystemPrompts shared system prompts of kSystemPages pages each, and
// kConversations conversations of kOwnPages pages of their own behind one of them (so every
// sequence is kSystemPages + kOwnPages pages and the tree fans out after the shared prefix).
//
//   BM_Match          match of a whole cached sequence: `gpu` = every page on the GPU; `host` = a
//                     quarter of the tree on the GPU, the rest on the host tier (a GPU run followed
//                     by a host run, as after LRU offload)
//   BM_InsertCached   insert of an already cached sequence with the tree's own page ids (the walk
//                     and token verification an engine pays after every request)
//   BM_InsertNew      alloc + insert of a sequence whose own pages are new, into a full GPU tier:
//                     every new page evicts a cold leaf (offloaded to the host tier per the policy)
//   BM_Request        the engine's whole per-request cycle: match, lock, alloc the missing pages,
//                     insert, unlock, over a working set 4x the GPU tier
//
// items_per_second counts the pages passed to match / insert. The goal (at least 1M pages per
// second) is checked after the run and printed as met / NOT MET per benchmark.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kvcore/prefix_cache.h"

namespace {

using kvcore::CachePolicy;
using kvcore::PrefixCache;
using kvcore::PrefixCacheConfig;

constexpr int64_t kPageTokens = 16;
constexpr int64_t kSystemPrompts = 32, kSystemPages = 64;  // 1024-token system prompts
constexpr int64_t kConversations = 2048, kOwnPages = 64;   // 1024 tokens of each conversation's own
constexpr int64_t kSeqPages = kSystemPages + kOwnPages, kSeqTokens = kSeqPages * kPageTokens;
constexpr double kGoalPagesPerSecond = 1e6;

// Token sequences of the workload (fixed seed: every run and policy sees the same tree).
struct Workload {
  std::vector<std::vector<int32_t>> seqs;
  Workload() {
    std::mt19937 rng(1234);
    std::uniform_int_distribution<int32_t> vocab(0, 128255);  // a Llama-3-sized vocabulary
    std::vector<std::vector<int32_t>> system(kSystemPrompts);
    for (auto& s : system)
      for (int64_t i = 0; i < kSystemPages * kPageTokens; ++i) s.push_back(vocab(rng));
    for (int64_t c = 0; c < kConversations; ++c) {
      std::vector<int32_t> seq = system[size_t(c % kSystemPrompts)];
      for (int64_t i = 0; i < kOwnPages * kPageTokens; ++i) seq.push_back(vocab(rng));
      seqs.push_back(std::move(seq));
    }
  }
  static const Workload& get() {
    static const Workload w;
    return w;
  }
  static int64_t unique_pages() { return kSystemPrompts * kSystemPages + kConversations * kOwnPages; }
};

CachePolicy policy_of(const benchmark::State& state) { return state.range(0) == 0 ? CachePolicy::Lru : CachePolicy::Hot; }

std::unique_ptr<PrefixCache> make_cache(CachePolicy policy, int64_t gpu_pages, int64_t host_pages,
                                        double admission_threshold = 1.5) {
  PrefixCacheConfig cfg;
  cfg.admission_threshold = admission_threshold;
  cfg.page_tokens = kPageTokens;
  cfg.gpu_pages = gpu_pages;
  cfg.host_pages = host_pages;
  cfg.policy = policy;
  cfg.page_bytes = 2 << 20;  // 16 tokens x 128 KiB (Llama-3-8B-like KV per token); transfer statistics only
  return std::make_unique<PrefixCache>(cfg);
}

// One request through the cache as an engine does it; returns the pages passed to match + insert.
void serve(PrefixCache& cache, const std::vector<int32_t>& seq, double now) {
  PrefixCache::Match m = cache.match(seq.data(), int64_t(seq.size()), 0, now);
  std::vector<int64_t> pages = m.gpu_pages;
  if (m.handle >= 0) {
    cache.lock(m.handle);
    if (m.host_tokens) {
      PrefixCache::Prefetch p = cache.prefetch(m.handle, now);
      pages.insert(pages.end(), p.gpu_pages.begin(), p.gpu_pages.end());
    }
  }
  const int64_t want = int64_t(seq.size()) / kPageTokens;
  std::vector<int64_t> fresh = cache.alloc(want - int64_t(pages.size()), now);
  pages.insert(pages.end(), fresh.begin(), fresh.end());
  cache.insert(seq.data(), int64_t(seq.size()), pages.data(), int64_t(pages.size()), 0, now);
  if (m.handle >= 0) cache.unlock(m.handle);
}

void label(benchmark::State& state, const std::string& extra = "") {
  state.SetLabel(std::string(kvcore::cache_policy_name(policy_of(state))) + (extra.empty() ? "" : " " + extra));
}

// ---- match ----------------------------------------------------------------------------------

void BM_Match(benchmark::State& state) {
  const Workload& w = Workload::get();
  const bool host = state.range(1) != 0;
  const int64_t total = Workload::unique_pages();
  // host: admission threshold 0, so "hot" also offloads every page and the whole tree stays reachable.
  auto cache = host ? make_cache(policy_of(state), total / 4, total, 0.0) : make_cache(policy_of(state), total, 0);
  double now = 1.0;
  for (const auto& seq : w.seqs) serve(*cache, seq, now += 1e-3);
  if (host)  // demote all but the system prompts (touched most recently): a GPU run, then a host run
    cache->evict(cache->stats().gpu_pages_cached - kSystemPrompts * kSystemPages, now);
  int64_t pages = 0, hit_pages = 0;
  size_t i = 0;
  for (auto _ : state) {
    const auto& seq = w.seqs[i];
    i = (i + 1) % w.seqs.size();
    PrefixCache::Match m = cache->match(seq.data(), kSeqTokens, 0, now += 1e-6);
    benchmark::DoNotOptimize(m.handle);
    pages += kSeqPages;
    hit_pages += (m.gpu_tokens + m.host_tokens) / kPageTokens;
  }
  state.SetItemsProcessed(pages);
  state.counters["hit_fraction"] = pages ? double(hit_pages) / double(pages) : 0.0;
  label(state, host ? "gpu+host run" : "gpu run");
}
BENCHMARK(BM_Match)->ArgNames({"hot", "host"})->Args({0, 0})->Args({1, 0})->Args({0, 1})->Args({1, 1});

// ---- insert ---------------------------------------------------------------------------------

void BM_InsertCached(benchmark::State& state) {
  const Workload& w = Workload::get();
  const int64_t total = Workload::unique_pages();
  auto cache = make_cache(policy_of(state), total, 0);
  double now = 1.0;
  for (const auto& seq : w.seqs) serve(*cache, seq, now += 1e-3);
  // The tree's page ids per sequence (what a request that matched everything passes back).
  std::vector<std::vector<int64_t>> ids;
  for (const auto& seq : w.seqs) ids.push_back(cache->match(seq.data(), kSeqTokens, 0, now).gpu_pages);
  int64_t pages = 0;
  size_t i = 0;
  for (auto _ : state) {
    const int64_t cached = cache->insert(w.seqs[i].data(), kSeqTokens, ids[i].data(), kSeqPages, 0, now += 1e-6);
    benchmark::DoNotOptimize(cached);
    i = (i + 1) % w.seqs.size();
    pages += kSeqPages;
  }
  state.SetItemsProcessed(pages);
  label(state);
}
BENCHMARK(BM_InsertCached)->ArgNames({"hot"})->Arg(0)->Arg(1);

void BM_InsertNew(benchmark::State& state) {
  const Workload& w = Workload::get();
  const int64_t gpu = Workload::unique_pages() / 4;
  auto cache = make_cache(policy_of(state), gpu, gpu);
  double now = 1.0;
  for (const auto& seq : w.seqs) serve(*cache, seq, now += 1e-3);  // the GPU tier is full from here on
  std::vector<int32_t> seq;
  std::vector<int64_t> sys_ids;
  int64_t pages = 0, fresh_pages = 0;
  int32_t serial = 1 << 30;
  size_t i = 0;
  for (auto _ : state) {
    state.PauseTiming();  // a new conversation: its first own page differs from every earlier one
    seq = w.seqs[i];
    i = (i + 1) % w.seqs.size();
    seq[size_t(kSystemPages * kPageTokens)] = serial++;
    PrefixCache::Match m = cache->match(seq.data(), kSeqTokens, 0, now += 1e-6);
    if (m.handle >= 0) cache->lock(m.handle);
    sys_ids = m.gpu_pages;
    state.ResumeTiming();
    std::vector<int64_t> fresh = cache->alloc(kSeqPages - int64_t(sys_ids.size()), now);
    sys_ids.insert(sys_ids.end(), fresh.begin(), fresh.end());
    cache->insert(seq.data(), kSeqTokens, sys_ids.data(), kSeqPages, 0, now);
    state.PauseTiming();
    if (m.handle >= 0) cache->unlock(m.handle);
    state.ResumeTiming();
    pages += kSeqPages;
    fresh_pages += int64_t(fresh.size());
  }
  state.SetItemsProcessed(pages);
  state.counters["new_pages/s"] = benchmark::Counter(double(fresh_pages), benchmark::Counter::kIsRate);
  label(state, "alloc+insert, evicting");
}
BENCHMARK(BM_InsertNew)->ArgNames({"hot"})->Arg(0)->Arg(1);

// ---- the whole per-request cycle ---------------------------------------------------------------

void BM_Request(benchmark::State& state) {
  const Workload& w = Workload::get();
  const int64_t gpu = Workload::unique_pages() / 4;
  auto cache = make_cache(policy_of(state), gpu, gpu);
  // Zipf-like reuse: conversation c is picked with weight 1 / (1 + c % 64), so some stay hot.
  std::mt19937 rng(99);
  std::vector<double> weights;
  for (size_t c = 0; c < w.seqs.size(); ++c) weights.push_back(1.0 / double(1 + c % 64));
  std::discrete_distribution<size_t> pick(weights.begin(), weights.end());
  std::vector<size_t> order(1 << 16);
  for (size_t& o : order) o = pick(rng);
  double now = 1.0;
  for (size_t k = 0; k < 4096; ++k) serve(*cache, w.seqs[order[k]], now += 1e-3);  // warm up
  int64_t pages = 0;
  size_t k = 0;
  const int64_t hits0 = cache->stats().gpu_hit_tokens + cache->stats().host_hit_tokens;
  const int64_t queried0 = cache->stats().queried_tokens;
  for (auto _ : state) {
    serve(*cache, w.seqs[order[k]], now += 1e-3);
    k = (k + 1) % order.size();
    pages += kSeqPages;
  }
  const kvcore::PrefixCacheStats s = cache->stats();
  state.SetItemsProcessed(2 * pages);  // every page goes through match and insert
  const int64_t queried = s.queried_tokens - queried0;
  state.counters["hit_rate"] = queried ? double(s.gpu_hit_tokens + s.host_hit_tokens - hits0) / double(queried) : 0.0;
  label(state, "match+lock+alloc+insert+unlock");
}
BENCHMARK(BM_Request)->ArgNames({"hot"})->Arg(0)->Arg(1);

// Console output plus a goal line per benchmark: items_per_second >= kGoalPagesPerSecond.
class GoalReporter : public benchmark::ConsoleReporter {
 public:
  GoalReporter() : benchmark::ConsoleReporter(OO_Tabular) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      if (r.error_occurred || r.run_type != Run::RT_Iteration) continue;
      auto it = r.counters.find("items_per_second");
      if (it != r.counters.end()) rates_[r.benchmark_name()] = it->second.value;
    }
  }
  void Finalize() override {
    ConsoleReporter::Finalize();
    bool all = true;
    for (const auto& [name, rate] : rates_) {
      const bool met = rate >= kGoalPagesPerSecond;
      all = all && met;
      std::printf("goal %-32s %6.2f M pages/s >= %.0f M pages/s on one core: %s\n", name.c_str(), rate / 1e6,
                  kGoalPagesPerSecond / 1e6, met ? "met" : "NOT MET");
    }
    if (!rates_.empty()) std::printf("goal (all benchmarks): %s\n", all ? "met" : "NOT MET");
  }

 private:
  std::map<std::string, double> rates_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  GoalReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
