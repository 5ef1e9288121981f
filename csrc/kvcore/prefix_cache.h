// Hotness-aware prefix cache with a GPU and a host tier (after HotPrefix).
//
// A radix tree over token sequences in units of page_tokens tokens: one node per full page, keyed
// by a chained hash of the prefix up to that page (and verified against the page's tokens), with
// one root per namespace (model, adapter, tenant). A partial last page is never cached. Every node
// lives on the GPU (a page id), on the host (a slot id), or both; the GPU-resident nodes form a
// prefix-closed subtree, so a match is a GPU run followed by a host run.
//
// Eviction is tree-constrained (leaves first) and ordered in O(log n) sets by a static rank:
// LRU uses the last access time; "hot" ranks GPU pages by log2(H) + t_last / half_life for the
// decayed hit count H = H * 2^(-dt / half_life) + 1 (the rank of a decayed score does not change as
// time passes) and host pages by last access (reuse on the host tier is recency-driven).
// On GPU eviction, "lru" writes every page to the host (the SGLang-style baseline). "hot" admits:
// - pages with a reuse history whose hotness reaches a threshold (optionally adaptive: a request for
//   a recently rejected page, found in the ghost list, lowers it, a host page evicted without ever
//   being hit raises it). The ghost list also keeps a rejected page's hotness, so a page requested
//   again after its rejection comes back with its history instead of as a new page;
// - first-seen pages only while a host-write budget (writes per queried page) has room, decided once
//   per inserted run so a run is admitted whole or not at all (a page is useless on the host
//   without its parent), and only for runs whose reuse class (a label the engine gives insert:
//   application, endpoint, an output-length bucket) has shown a reuse rate of at least
//   `class_gate` times the cache-wide rate. The rates are learned online: a first-seen page counts
//   as reused when it is requested again, from either tier or from the ghost list.
// The cache owns the GPU page-id space [0, gpu_pages): ids are free, held by the caller (from
// alloc), or cached in the tree. A PageMover moves the bytes when the pages are real; without one
// the cache works standalone over abstract ids (simulation, trace replay).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace kvcore {

enum class CachePolicy { Lru, Hot };

struct PrefixCacheConfig {
  int64_t page_tokens = 16;
  int64_t gpu_pages = 0;
  int64_t host_pages = 0;
  CachePolicy policy = CachePolicy::Hot;
  double half_life = 600.0;   // seconds, for the hotness decay
  int64_t page_bytes = 0;     // bytes per page, for the transfer statistics
  int64_t ghost_pages = 0;    // size of the ghost list of rejected pages (0: host_pages)
  double admission_threshold = 1.5;  // hot policy: initial decayed hotness needed for host admission
  bool adaptive = false;      // hot policy: adapt the threshold (ghost hits lower it, unused evictions raise it)
  double host_write_budget = 0.3;  // hot policy: host writes per queried page that first-seen pages may use
                                   // (infinity: admit every first-seen page; 0: only pages with a history)
  double class_gate = 0.5;    // hot policy: first-seen runs of a reuse class whose learned reuse rate is
                              // below class_gate x the cache-wide rate are not admitted (0: no gate)
};

// Moves page contents between the tiers, ordered with the work that reads them (e.g. one CUDA
// stream). load() may return a token to wait on (0: complete).
class PageMover {
 public:
  virtual ~PageMover() = default;
  virtual void offload(const std::vector<int64_t>& gpu_pages, const std::vector<int64_t>& host_slots) = 0;
  virtual uint64_t load(const std::vector<int64_t>& host_slots, const std::vector<int64_t>& gpu_pages) = 0;
  virtual bool done(uint64_t token) = 0;
  virtual void wait(uint64_t token) = 0;
};

struct PrefixCacheStats {
  int64_t queried_tokens = 0;
  int64_t gpu_hit_tokens = 0;
  int64_t host_hit_tokens = 0;
  int64_t inserted_tokens = 0;
  int64_t bytes_to_host = 0;
  int64_t bytes_from_host = 0;
  int64_t host_writes = 0;            // pages written to the host tier
  int64_t admissions_rejected = 0;
  int64_t ghost_hits = 0;             // requests for recently rejected pages
  int64_t budget_admitted = 0;        // first-seen pages written to the host under the write budget
  int64_t class_gated = 0;            // first-seen pages refused because their reuse class is rarely reused
  int64_t reuse_classes = 0;          // reuse classes seen
  int64_t gpu_evictions = 0;
  int64_t host_evictions = 0;
  int64_t host_evictions_unused = 0;  // host pages evicted without a hit
  int64_t prefetched_pages = 0;
  int64_t prefetches_used = 0;        // prefetched pages later hit on the GPU
  int64_t prefetches_wasted = 0;      // prefetched pages evicted from the GPU without a hit
  int64_t gpu_pages_cached = 0, gpu_pages_free = 0, gpu_pages_held = 0, gpu_capacity = 0;
  int64_t host_pages_used = 0, host_capacity = 0;
  int64_t nodes = 0;
  double admission_threshold = 0;
};

class PrefixCache {
 public:
  struct Match {
    std::vector<int64_t> gpu_pages;  // the GPU run's page ids
    int64_t gpu_tokens = 0;
    int64_t host_tokens = 0;          // cached on the host right after the GPU run
    int64_t handle = -1;              // the deepest matched node, -1 when nothing matched
  };
  struct Prefetch {
    int64_t pages = 0;                // host pages brought to the GPU
    uint64_t token = 0;               // PageMover token (0: complete)
    std::vector<int64_t> gpu_pages;   // the GPU page ids they now occupy, in path order
  };

  explicit PrefixCache(const PrefixCacheConfig& config, std::shared_ptr<PageMover> mover = nullptr);
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // `now` is in seconds on any monotonic clock; a negative value means "use the steady clock".
  Match match(const int32_t* tokens, int64_t n, int64_t ns = 0, double now = -1);
  void lock(int64_t handle);
  void unlock(int64_t handle);
  // Caches the full pages of tokens; gpu_pages[i] backs page i (ids from alloc, or the tree's own
  // ids for pages already cached). Returns the tokens that were already cached on the GPU; where
  // gpu_pages differs from the tree's page for those, the caller frees its duplicate.
  // reuse_class: the engine's label for requests that are reused alike (hot policy admission).
  int64_t insert(const int32_t* tokens, int64_t n, const int64_t* gpu_pages, int64_t num_pages, int64_t ns = 0,
                 double now = -1, int64_t reuse_class = 0);
  // n free GPU page ids for the caller, evicting cached pages as needed (MemoryError if impossible).
  std::vector<int64_t> alloc(int64_t n, double now = -1);
  void free(const int64_t* pages, int64_t n);
  // Evicts up to n cached GPU pages (offloading those the policy admits); returns their ids, which
  // are free afterwards.
  std::vector<int64_t> evict(int64_t n, double now = -1);
  // Brings the host-resident pages of the handle's path back to the GPU (as many as fit).
  Prefetch prefetch(int64_t handle, double now = -1);
  bool prefetch_done(const Prefetch& p);
  void prefetch_wait(const Prefetch& p);
  // Keeps the handle's path from eviction until now + ttl seconds.
  void pin(int64_t handle, double ttl, double now = -1);
  // Grows (returns the new ids) or shrinks (evicts the coldest pages; returns the ids given back)
  // the GPU tier; MemoryError, capacity unchanged, when locked pages prevent a shrink.
  std::vector<int64_t> resize(int64_t gpu_pages, double now = -1);

  PrefixCacheStats stats() const;
  const PrefixCacheConfig& config() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

const char* cache_policy_name(CachePolicy p);
CachePolicy parse_cache_policy(const std::string& name);

}  // namespace kvcore
