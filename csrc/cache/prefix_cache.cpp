// PrefixCache: the page-granular radix tree, the two tiers, eviction order and admission policy.
#include "kvcore/prefix_cache.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <set>
#include <unordered_map>

#include "kvcore/error.h"

namespace kvcore {
namespace {

constexpr int32_t kNone = -1;

uint64_t mix(uint64_t h) {  // splitmix64 finalizer
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

uint64_t page_hash(uint64_t parent_key, const int32_t* tokens, int64_t n) {
  uint64_t h = mix(parent_key ^ 0x9e3779b97f4a7c15ull);
  for (int64_t i = 0; i < n; ++i) h = mix(h ^ (uint64_t(uint32_t(tokens[i])) + 0x9e3779b97f4a7c15ull + (h << 6)));
  return h;
}

double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Node {
  uint64_t key = 0;                 // chained hash of the prefix through this page
  int32_t parent = kNone;
  std::vector<int32_t> tokens;      // the page's tokens (verified on lookup)
  int32_t children = 0;
  int32_t first_child = kNone, next_sibling = kNone, prev_sibling = kNone;  // intrusive child list
  int32_t gpu_children = 0;         // children resident on the GPU
  int64_t gpu_page = -1;
  int64_t host_slot = -1;
  int32_t lock = 0;
  uint32_t generation = 0;          // bumped when the node id is reused: stale handles are refused
  double hot = 0;                   // decayed hit count as of `last`
  double last = 0;                  // time of the last hit
  double pinned_until = -1;
  double rank = 0;                  // key in the eviction sets (kept to erase)
  bool in_gpu_set = false, in_host_set = false;
  bool alive = false;
  bool prefetched_unused = false;   // brought back from the host and not hit since
  bool host_hit = false;            // hit while on the host since it was admitted
  bool budgeted = false;            // first-seen page of a run admitted under the host-write budget
  bool by_history = false;          // on the host because its hotness reached the threshold
  bool reuse_pending = false;       // first-seen page not requested again yet (a label for its class)
  int32_t reuse_class = -1;         // index into the learned reuse rates
  int64_t ns = 0;
};

}  // namespace

struct PrefixCache::Impl {
  PrefixCacheConfig cfg;
  std::shared_ptr<PageMover> mover;
  std::vector<Node> nodes;
  std::vector<int32_t> free_nodes;
  std::unordered_map<uint64_t, int32_t> index;   // key -> node
  std::unordered_map<int64_t, int32_t> roots;    // namespace -> root node
  std::set<std::pair<double, int32_t>> gpu_leaves, host_leaves;

  // GPU page ids: 0 free, 1 held by the caller, 2 cached, 3 removed by a shrink.
  std::vector<uint8_t> page_state;
  std::vector<int64_t> free_pages;
  std::vector<int64_t> free_slots;
  int64_t gpu_capacity = 0;

  // GPU-resident nodes that are not locked: what eviction could free at most (pins aside).
  int64_t gpu_unlocked = 0;

  // Hot policy: admission threshold, the ghost list of recently rejected pages (key -> hotness and
  // time at rejection) and the host-write budget's balance in pages (capped: no unbounded bursts).
  struct Ghost {
    double hot, last;
    int32_t reuse_class;
    bool reuse_pending;
  };
  // Reuse rate of first-seen pages, learned online per reuse class and cache-wide; counts are halved
  // every kRateWindow pages so the rates follow a changing workload.
  struct ReuseRate {
    double pages = 0, reused = 0;
    void add_page() {
      if (++pages > kRateWindow) pages *= 0.5, reused *= 0.5;
    }
  };
  static constexpr double kRateWindow = 1 << 16;
  static constexpr double kRatePrior = 8;  // pseudo-pages at the cache-wide rate: new classes start there
  std::unordered_map<int64_t, int32_t> class_index;  // engine's reuse class -> index
  std::vector<ReuseRate> class_rates;
  ReuseRate overall_rate;
  static constexpr double kWriteBudgetCap = 1024;
  // Threshold steps: a wrongly rejected page costs a prefill, about ten times a page write over
  // PCIe, so ten history pages evicted unused weigh as much as one ghost hit.
  static constexpr double kLower = 0.9, kRaise = 1.0106;
  double threshold = 1.0;
  std::deque<uint64_t> ghost_fifo;
  std::unordered_map<uint64_t, Ghost> ghost;
  double write_tokens = 0;
  PrefixCacheStats st;

  enum PageState : uint8_t { kFree = 0, kHeld = 1, kCached = 2, kRemoved = 3 };

  double time(double now) const { return now < 0 ? steady_seconds() : now; }
  bool hot_policy() const { return cfg.policy == CachePolicy::Hot; }

  double decayed(double hot, double last, double now) const { return hot * std::exp2(-(now - last) / cfg.half_life); }
  double decayed(const Node& n, double now) const { return decayed(n.hot, n.last, now); }
  double gpu_rank(const Node& n) const {
    // Static keys: LRU by last access; hot by log2(H) + t_last / half_life (time-invariant order).
    return hot_policy() ? std::log2(std::max(n.hot, 1e-300)) + n.last / cfg.half_life : n.last;
  }

  int32_t root(int64_t ns) {
    auto it = roots.find(ns);
    if (it != roots.end()) return it->second;
    const int32_t id = new_node();
    Node& r = nodes[size_t(id)];
    r.key = mix(uint64_t(ns) * 0x9e3779b97f4a7c15ull + 1);
    r.ns = ns;
    r.lock = 1;  // roots are never evicted
    roots[ns] = id;
    return id;
  }

  int32_t new_node() {
    int32_t id;
    if (!free_nodes.empty()) {
      id = free_nodes.back();
      free_nodes.pop_back();
    } else {
      id = int32_t(nodes.size());
      nodes.emplace_back();
    }
    Node& n = nodes[size_t(id)];
    const uint32_t gen = n.generation + 1;
    n = Node{};
    n.generation = gen;
    n.alive = true;
    return id;
  }

  int64_t handle_of(int32_t id) const { return (int64_t(nodes[size_t(id)].generation) << 32) | int64_t(uint32_t(id)); }
  int32_t node_of(int64_t handle, const char* op) const {
    const int64_t id = handle & 0xffffffffll;
    const uint32_t gen = uint32_t(uint64_t(handle) >> 32);
    KVCORE_CHECK_VALUE(handle >= 0 && id < int64_t(nodes.size()) && nodes[size_t(id)].alive &&
                           nodes[size_t(id)].generation == gen,
                       "PrefixCache.", op, ": unknown or expired handle ", handle);
    return int32_t(id);
  }

  int32_t find_child(int32_t parent, const int32_t* tokens, uint64_t* key_out) const {
    const uint64_t key = page_hash(nodes[size_t(parent)].key, tokens, cfg.page_tokens);
    if (key_out) *key_out = key;
    auto it = index.find(key);
    if (it == index.end()) return kNone;
    const Node& c = nodes[size_t(it->second)];
    if (c.parent != parent || !std::equal(c.tokens.begin(), c.tokens.end(), tokens)) return kNone;  // collision
    return it->second;
  }

  // --- eviction-set membership -------------------------------------------------------------
  bool gpu_evictable(const Node& n) const { return n.alive && n.gpu_page >= 0 && n.lock == 0 && n.gpu_children == 0; }
  bool host_evictable(const Node& n) const {
    return n.alive && n.gpu_page < 0 && n.host_slot >= 0 && n.lock == 0 && n.children == 0;
  }
  void unlist(int32_t id) {
    Node& n = nodes[size_t(id)];
    if (n.in_gpu_set) gpu_leaves.erase({n.rank, id});
    if (n.in_host_set) host_leaves.erase({n.rank, id});
    n.in_gpu_set = n.in_host_set = false;
  }
  void relist(int32_t id) {
    unlist(id);
    Node& n = nodes[size_t(id)];
    if (gpu_evictable(n)) {
      n.rank = gpu_rank(n);
      gpu_leaves.insert({n.rank, id});
      n.in_gpu_set = true;
    } else if (host_evictable(n)) {
      n.rank = n.last;  // host pages: least recently used first, for both policies
      host_leaves.insert({n.rank, id});
      n.in_host_set = true;
    }
  }

  void touch(Node& n, double now) {
    if (n.last > 0 || n.hot > 0) n.hot = decayed(n, now) + 1;
    else n.hot = 1;
    n.last = std::max(n.last, now);
  }

  // --- tier changes --------------------------------------------------------------------------
  void set_gpu(int32_t id, int64_t page) {
    Node& n = nodes[size_t(id)];
    const bool had = n.gpu_page >= 0;
    if (n.lock == 0) gpu_unlocked += (page >= 0) - had;
    n.gpu_page = page;
    if (page >= 0) page_state[size_t(page)] = kCached;
    const bool has = page >= 0;
    if (had != has && n.parent != kNone) {
      nodes[size_t(n.parent)].gpu_children += has ? 1 : -1;
      relist(n.parent);
    }
    relist(id);
  }

  void add_ghost(const Node& n) {
    const size_t cap = size_t(cfg.ghost_pages > 0 ? cfg.ghost_pages : std::max<int64_t>(cfg.host_pages, 64));
    if (ghost.insert_or_assign(n.key, Ghost{n.hot, n.last, n.reuse_class, n.reuse_pending}).second)
      ghost_fifo.push_back(n.key);
    while (ghost_fifo.size() > cap) {  // stale fifo entries (already taken back by insert) just fall out
      ghost.erase(ghost_fifo.front());
      ghost_fifo.pop_front();
    }
  }

  int32_t reuse_class_of(int64_t label) {
    auto [it, added] = class_index.try_emplace(label, int32_t(class_rates.size()));
    if (added) class_rates.emplace_back();
    return it->second;
  }
  // A first-seen page (in the tree or the ghost list) requested again: one reuse for its class.
  void label_reused(bool& pending, int32_t reuse_class) {
    if (!pending) return;
    pending = false;
    class_rates[size_t(reuse_class)].reused += 1;
    overall_rate.reused += 1;
  }
  // Whether first-seen runs of this class are reused often enough to spend host writes on.
  bool class_admitted(int32_t reuse_class) const {
    if (cfg.class_gate <= 0 || overall_rate.pages <= 0) return true;
    const double mean = overall_rate.reused / overall_rate.pages;
    const ReuseRate& r = class_rates[size_t(reuse_class)];
    return (r.reused + kRatePrior * mean) / (r.pages + kRatePrior) >= cfg.class_gate * mean;
  }

  void link_child(int32_t parent, int32_t id) {
    Node& p = nodes[size_t(parent)];
    Node& n = nodes[size_t(id)];
    n.parent = parent;
    n.next_sibling = p.first_child;
    n.prev_sibling = kNone;
    if (p.first_child != kNone) nodes[size_t(p.first_child)].prev_sibling = id;
    p.first_child = id;
    p.children++;
  }

  // Removes a node that is on no tier and has no children.
  void remove_node(int32_t id) {
    Node& n = nodes[size_t(id)];
    unlist(id);
    index.erase(n.key);
    if (n.parent != kNone) {
      Node& p = nodes[size_t(n.parent)];
      if (n.prev_sibling != kNone) nodes[size_t(n.prev_sibling)].next_sibling = n.next_sibling;
      else p.first_child = n.next_sibling;
      if (n.next_sibling != kNone) nodes[size_t(n.next_sibling)].prev_sibling = n.prev_sibling;
      p.children--;
      relist(n.parent);
    }
    n.alive = false;
    n.tokens.clear();
    n.tokens.shrink_to_fit();
    free_nodes.push_back(id);
  }

  // Drops a node on no tier together with its subtree (host-only pages, unreachable without it),
  // children before parents.
  void drop_subtree(int32_t id) {
    std::vector<int32_t> stack{id}, order;
    while (!stack.empty()) {
      const int32_t x = stack.back();
      stack.pop_back();
      order.push_back(x);
      for (int32_t c = nodes[size_t(x)].first_child; c != kNone; c = nodes[size_t(c)].next_sibling) stack.push_back(c);
    }
    for (auto it = order.rbegin(); it != order.rend(); ++it) {
      const int32_t x = *it;
      Node& n = nodes[size_t(x)];
      if (n.gpu_page >= 0) {  // cannot happen (GPU residents are prefix-closed); keeps accounting sound
        const int64_t page = n.gpu_page;
        set_gpu(x, -1);
        release_gpu_page(page);
      }
      if (n.host_slot >= 0) release_host_slot(x, true);
      remove_node(x);
    }
  }

  void release_gpu_page(int64_t page) {
    page_state[size_t(page)] = kFree;
    free_pages.push_back(page);
  }

  void release_host_slot(int32_t id, bool count_eviction) {
    Node& n = nodes[size_t(id)];
    if (count_eviction) {
      st.host_evictions++;
      if (!n.host_hit) {
        st.host_evictions_unused++;
        if (hot_policy() && cfg.adaptive && n.by_history) threshold = std::min(threshold * kRaise, 1e6);  // too eager
      }
    }
    free_slots.push_back(n.host_slot);
    n.host_slot = -1;
  }

  // A host slot for an admitted page, evicting the coldest host-only leaf when full.
  int64_t take_host_slot(double now) {
    if (free_slots.empty()) {
      for (auto it = host_leaves.begin(); it != host_leaves.end(); ++it) {
        const int32_t victim = it->second;
        if (nodes[size_t(victim)].pinned_until > now) continue;
        release_host_slot(victim, true);
        remove_node(victim);
        break;
      }
    }
    if (free_slots.empty()) return -1;
    const int64_t s = free_slots.back();
    free_slots.pop_back();
    return s;
  }

  bool admit(const Node& n) const {
    if (cfg.host_pages == 0) return false;
    if (!hot_policy()) return true;  // write-everything baseline
    // Hotness as of the last access: at eviction every page has decayed below the fresh ones (that
    // is what made it the coldest), so the decayed value cannot tell reused pages apart. A page
    // with hot == 1 was never reused: only the write budget admits it.
    return (n.hot > 1 && n.hot >= threshold) || n.budgeted;
  }

  // Evicts one GPU leaf; returns its page id, or -1 when nothing is evictable.
  int64_t evict_one(double now) {
    int32_t id = kNone;
    for (auto it = gpu_leaves.begin(); it != gpu_leaves.end(); ++it)
      if (nodes[size_t(it->second)].pinned_until <= now) {
        id = it->second;
        break;
      }
    if (id == kNone) return -1;
    Node& n = nodes[size_t(id)];
    const int64_t page = n.gpu_page;
    if (n.host_slot < 0) {
      int64_t slot = -1;
      if (admit(n)) slot = take_host_slot(now);
      if (slot >= 0) {
        if (mover) {
          try {
            mover->offload({page}, {slot});
          } catch (...) {  // nothing moved: the page stays cached on the GPU
            free_slots.push_back(slot);
            throw;
          }
        }
        n.host_slot = slot;
        n.host_hit = false;
        n.by_history = n.hot > 1;
        st.host_writes++;
        st.bytes_to_host += cfg.page_bytes;
        if (hot_policy()) {
          write_tokens -= 1;  // every write spends the budget; pages with a history may overdraw it
          if (!n.by_history) st.budget_admitted++;
        }
      } else {
        st.admissions_rejected++;
        if (hot_policy()) add_ghost(n);
      }
    }
    st.gpu_evictions++;
    if (n.prefetched_unused) {
      st.prefetches_wasted++;
      n.prefetched_unused = false;
    }
    set_gpu(id, -1);
    release_gpu_page(page);
    if (n.host_slot < 0) drop_subtree(id);  // on no tier: the node and whatever hangs below go
    return page;
  }

  void lock_path(int32_t id, int delta) {
    for (int32_t x = id; x != kNone; x = nodes[size_t(x)].parent) {
      Node& n = nodes[size_t(x)];
      if (n.parent == kNone) break;  // roots stay locked
      if (n.gpu_page >= 0 && (n.lock == 0) != (n.lock + delta == 0)) gpu_unlocked += n.lock == 0 ? -1 : 1;
      n.lock += delta;
      relist(x);
    }
  }

  // Frees pages by eviction until n are free; evicts nothing when even evicting every unlocked page
  // could not get there (a failed request must not flush the cache).
  int64_t make_free(int64_t n, double now) {
    if (int64_t(free_pages.size()) >= n || int64_t(free_pages.size()) + gpu_unlocked < n)
      return int64_t(free_pages.size());
    while (int64_t(free_pages.size()) < n)
      if (evict_one(now) < 0) break;
    return int64_t(free_pages.size());
  }
};

PrefixCache::PrefixCache(const PrefixCacheConfig& config, std::shared_ptr<PageMover> mover) : impl_(new Impl) {
  KVCORE_CHECK_VALUE(config.page_tokens > 0, "PrefixCache: page_tokens must be positive, got ", config.page_tokens);
  KVCORE_CHECK_VALUE(config.gpu_pages >= 0 && config.gpu_pages < (int64_t(1) << 31),
                     "PrefixCache: gpu_pages must be in [0, 2^31), got ", config.gpu_pages);
  KVCORE_CHECK_VALUE(config.host_pages >= 0 && config.host_pages < (int64_t(1) << 31),
                     "PrefixCache: host_pages must be in [0, 2^31), got ", config.host_pages);
  KVCORE_CHECK_VALUE(config.half_life > 0, "PrefixCache: half_life must be positive, got ", config.half_life);
  KVCORE_CHECK_VALUE(config.page_bytes >= 0, "PrefixCache: page_bytes must be >= 0");
  KVCORE_CHECK_VALUE(config.host_write_budget >= 0, "PrefixCache: host_write_budget must be >= 0, got ",
                     config.host_write_budget);
  KVCORE_CHECK_VALUE(config.class_gate >= 0 && std::isfinite(config.class_gate),
                     "PrefixCache: class_gate must be a finite number >= 0, got ", config.class_gate);
  Impl& s = *impl_;
  s.cfg = config;
  s.mover = std::move(mover);
  s.gpu_capacity = config.gpu_pages;
  s.threshold = config.admission_threshold;
  s.page_state.assign(size_t(config.gpu_pages), Impl::kFree);
  for (int64_t i = config.gpu_pages - 1; i >= 0; --i) s.free_pages.push_back(i);
  for (int64_t i = config.host_pages - 1; i >= 0; --i) s.free_slots.push_back(i);
}

PrefixCache::~PrefixCache() = default;

PrefixCache::Match PrefixCache::match(const int32_t* tokens, int64_t n, int64_t ns, double now_in) {
  Impl& s = *impl_;
  KVCORE_CHECK_VALUE(n >= 0, "PrefixCache.match: negative token count");
  const double now = s.time(now_in);
  const int64_t pt = s.cfg.page_tokens, pages = n / pt;
  Match m;
  int32_t cur = s.root(ns);
  int64_t i = 0;
  bool on_gpu = true;
  for (; i < pages; ++i) {
    const int32_t c = s.find_child(cur, tokens + i * pt, nullptr);
    if (c == kNone) break;
    Node& node = s.nodes[size_t(c)];
    if (on_gpu && node.gpu_page >= 0) {
      m.gpu_pages.push_back(node.gpu_page);
      if (node.prefetched_unused) {
        s.st.prefetches_used++;
        node.prefetched_unused = false;
      }
    } else {
      on_gpu = false;
      node.host_hit = true;
    }
    s.label_reused(node.reuse_pending, node.reuse_class);
    s.touch(node, now);
    s.relist(c);
    cur = c;
  }
  m.gpu_tokens = int64_t(m.gpu_pages.size()) * pt;
  m.host_tokens = i * pt - m.gpu_tokens;
  m.handle = i > 0 ? s.handle_of(cur) : -1;
  if (s.hot_policy()) {
    if (pages > 0) s.write_tokens = std::min(s.write_tokens + s.cfg.host_write_budget * double(pages), Impl::kWriteBudgetCap);
    // Requests for recently rejected pages: the admission threshold was too high. The entries stay
    // until insert takes their history back.
    if (i < pages && !s.ghost.empty()) {
      uint64_t key = s.nodes[size_t(cur)].key;
      for (int64_t j = i; j < pages; ++j) {
        key = page_hash(key, tokens + j * pt, pt);
        auto g = s.ghost.find(key);
        if (g != s.ghost.end()) {
          s.st.ghost_hits++;
          s.label_reused(g->second.reuse_pending, g->second.reuse_class);
          // Only pages the threshold turned away say it is too high (first-seen pages answer to the budget).
          if (s.cfg.adaptive && g->second.hot > 1) s.threshold = std::max(s.threshold * Impl::kLower, 1.0);
        }
      }
    }
  }
  s.st.queried_tokens += n;
  s.st.gpu_hit_tokens += m.gpu_tokens;
  s.st.host_hit_tokens += m.host_tokens;
  return m;
}

void PrefixCache::lock(int64_t handle) {
  Impl& s = *impl_;
  s.lock_path(s.node_of(handle, "lock"), +1);
}

void PrefixCache::unlock(int64_t handle) {
  Impl& s = *impl_;
  const int32_t id = s.node_of(handle, "unlock");
  for (int32_t x = id; x != kNone && s.nodes[size_t(x)].parent != kNone; x = s.nodes[size_t(x)].parent)
    KVCORE_CHECK_VALUE(s.nodes[size_t(x)].lock > 0, "PrefixCache.unlock: the handle is not locked (unlock below zero)");
  s.lock_path(id, -1);
}

int64_t PrefixCache::insert(const int32_t* tokens, int64_t n, const int64_t* gpu_pages, int64_t num_pages, int64_t ns,
                            double now_in, int64_t reuse_class) {
  Impl& s = *impl_;
  const double now = s.time(now_in);
  const int64_t pt = s.cfg.page_tokens, pages = n / pt;
  KVCORE_CHECK_VALUE(n >= 0, "PrefixCache.insert: negative token count");
  KVCORE_CHECK_VALUE(num_pages >= pages, "PrefixCache.insert: gpu_pages has ", num_pages, " entries but the tokens fill ",
                     pages, " pages");
  // Validate before changing anything: walk the existing path, check the pages that would be adopted.
  int32_t cur = s.root(ns);
  int64_t existing = 0, cached_gpu = 0;
  for (; existing < pages; ++existing) {
    const int32_t c = s.find_child(cur, tokens + existing * pt, nullptr);
    if (c == kNone) break;
    if (s.nodes[size_t(c)].gpu_page >= 0 && cached_gpu == existing) ++cached_gpu;
    cur = c;
  }
  for (int64_t i = cached_gpu; i < pages; ++i) {
    const int64_t p = gpu_pages[i];
    KVCORE_CHECK_INDEX(p >= 0 && p < int64_t(s.page_state.size()), "PrefixCache.insert: gpu_pages[", i, "] = ", p,
                       " is out of range [0, ", s.page_state.size(), ")");
    KVCORE_CHECK_VALUE(s.page_state[size_t(p)] == Impl::kHeld, "PrefixCache.insert: gpu_pages[", i, "] = ", p,
                       " is not held by the caller (allocate pages with alloc())");
    for (int64_t j = cached_gpu; j < i; ++j)
      KVCORE_CHECK_VALUE(gpu_pages[j] != p, "PrefixCache.insert: page ", p, " is listed twice");
  }
  // Apply. The new run's first-seen pages are admitted to the host whole or not at all: without a
  // write limit always, otherwise when the budget has room and their class is reused often enough.
  const int32_t cls = s.hot_policy() ? s.reuse_class_of(reuse_class) : -1;
  const bool unlimited = std::isinf(s.cfg.host_write_budget);
  const bool class_ok = s.hot_policy() && (unlimited || s.class_admitted(cls));
  const bool run_budgeted = class_ok && (unlimited || s.write_tokens >= double(pages - existing));
  cur = s.root(ns);
  for (int64_t i = 0; i < pages; ++i) {
    const int32_t* page_tokens = tokens + i * pt;
    uint64_t key = 0;
    int32_t c = s.find_child(cur, page_tokens, &key);
    if (c == kNone) {
      c = s.new_node();
      Node& node = s.nodes[size_t(c)];
      node.key = key;
      node.ns = ns;
      node.tokens.assign(page_tokens, page_tokens + pt);
      node.hot = 1;
      node.last = now;
      auto g = s.ghost.find(key);
      if (g != s.ghost.end()) {  // requested again after a rejection: it keeps its history
        node.hot = s.decayed(g->second.hot, g->second.last, now) + 1;
        s.ghost.erase(g);
      }
      if (s.hot_policy() && node.hot <= 1) {  // first seen: a sample of its class's reuse rate
        node.budgeted = run_budgeted;
        node.reuse_class = cls;
        node.reuse_pending = true;
        s.class_rates[size_t(cls)].add_page();
        s.overall_rate.add_page();
        if (!class_ok) s.st.class_gated++;
      }
      s.index[key] = c;
      s.link_child(cur, c);
      s.relist(cur);
      s.st.inserted_tokens += pt;
    }
    if (i >= cached_gpu && s.nodes[size_t(c)].gpu_page < 0) s.set_gpu(c, gpu_pages[i]);  // adopt the caller's page
    else s.relist(c);
    cur = c;
  }
  return cached_gpu * pt;
}

std::vector<int64_t> PrefixCache::alloc(int64_t n, double now_in) {
  Impl& s = *impl_;
  KVCORE_CHECK_VALUE(n >= 0, "PrefixCache.alloc: negative page count");
  const double now = s.time(now_in);
  const int64_t available = s.make_free(n, now);
  KVCORE_CHECK_MEMORY(available >= n, "PrefixCache.alloc: ", n, " GPU pages needed but only ", available,
                      " can be freed (the rest are locked, pinned or held by callers)");
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(s.free_pages.back());
    s.free_pages.pop_back();
    s.page_state[size_t(out.back())] = Impl::kHeld;
  }
  return out;
}

void PrefixCache::free(const int64_t* pages, int64_t n) {
  Impl& s = *impl_;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = pages[i];
    KVCORE_CHECK_INDEX(p >= 0 && p < int64_t(s.page_state.size()), "PrefixCache.free: page ", p,
                       " is out of range [0, ", s.page_state.size(), ")");
    KVCORE_CHECK_VALUE(s.page_state[size_t(p)] == Impl::kHeld, "PrefixCache.free: page ", p,
                       " is not held by the caller");
    for (int64_t j = 0; j < i; ++j) KVCORE_CHECK_VALUE(pages[j] != p, "PrefixCache.free: page ", p, " is listed twice");
  }
  for (int64_t i = 0; i < n; ++i) s.release_gpu_page(pages[i]);
}

std::vector<int64_t> PrefixCache::evict(int64_t n, double now_in) {
  Impl& s = *impl_;
  KVCORE_CHECK_VALUE(n >= 0, "PrefixCache.evict: negative page count");
  const double now = s.time(now_in);
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = s.evict_one(now);
    if (p < 0) break;
    out.push_back(p);
  }
  return out;
}

PrefixCache::Prefetch PrefixCache::prefetch(int64_t handle, double now_in) {
  Impl& s = *impl_;
  const int32_t id = s.node_of(handle, "prefetch");
  const double now = s.time(now_in);
  std::vector<int32_t> path;
  for (int32_t x = id; x != kNone && s.nodes[size_t(x)].parent != kNone; x = s.nodes[size_t(x)].parent) path.push_back(x);
  std::reverse(path.begin(), path.end());
  std::vector<int32_t> todo;
  for (int32_t x : path)
    if (s.nodes[size_t(x)].gpu_page < 0) todo.push_back(x);
  Prefetch result;
  if (todo.empty()) return result;
  s.lock_path(id, +1);  // the path must not be evicted to make room for itself
  s.make_free(int64_t(todo.size()), now);
  s.lock_path(id, -1);
  std::vector<int64_t> slots, pages;
  for (int32_t x : todo) {  // in path order: a prefix of the host run
    if (s.free_pages.empty()) break;
    const int64_t page = s.free_pages.back();
    s.free_pages.pop_back();
    slots.push_back(s.nodes[size_t(x)].host_slot);
    pages.push_back(page);
    s.set_gpu(x, page);
    s.nodes[size_t(x)].prefetched_unused = true;
  }
  if (s.mover && !pages.empty()) result.token = s.mover->load(slots, pages);
  result.pages = int64_t(pages.size());
  result.gpu_pages = pages;
  s.st.prefetched_pages += result.pages;
  s.st.bytes_from_host += result.pages * s.cfg.page_bytes;
  return result;
}

bool PrefixCache::prefetch_done(const Prefetch& p) { return !p.token || !impl_->mover || impl_->mover->done(p.token); }
void PrefixCache::prefetch_wait(const Prefetch& p) {
  if (p.token && impl_->mover) impl_->mover->wait(p.token);
}

void PrefixCache::pin(int64_t handle, double ttl, double now_in) {
  Impl& s = *impl_;
  KVCORE_CHECK_VALUE(ttl >= 0, "PrefixCache.pin: ttl must be >= 0, got ", ttl);
  const int32_t id = s.node_of(handle, "pin");
  const double until = s.time(now_in) + ttl;
  for (int32_t x = id; x != kNone && s.nodes[size_t(x)].parent != kNone; x = s.nodes[size_t(x)].parent)
    s.nodes[size_t(x)].pinned_until = std::max(s.nodes[size_t(x)].pinned_until, until);
}

std::vector<int64_t> PrefixCache::resize(int64_t gpu_pages, double now_in) {
  Impl& s = *impl_;
  KVCORE_CHECK_VALUE(gpu_pages >= 0 && gpu_pages < (int64_t(1) << 31), "PrefixCache.resize: gpu_pages must be in [0, 2^31)");
  const double now = s.time(now_in);
  std::vector<int64_t> changed;
  if (gpu_pages >= s.gpu_capacity) {
    int64_t need = gpu_pages - s.gpu_capacity;
    for (size_t p = 0; p < s.page_state.size() && need > 0; ++p)  // re-add removed ids first
      if (s.page_state[p] == Impl::kRemoved) {
        s.page_state[p] = Impl::kFree;
        s.free_pages.push_back(int64_t(p));
        changed.push_back(int64_t(p));
        --need;
      }
    while (need-- > 0) {
      const int64_t p = int64_t(s.page_state.size());
      s.page_state.push_back(Impl::kFree);
      s.free_pages.push_back(p);
      changed.push_back(p);
    }
    s.gpu_capacity = gpu_pages;
    return changed;
  }
  const int64_t give_back = s.gpu_capacity - gpu_pages;
  const int64_t available = s.make_free(give_back, now);  // demotes the coldest pages first
  KVCORE_CHECK_MEMORY(available >= give_back, "PrefixCache.resize: cannot shrink to ", gpu_pages, " pages: only ",
                      available, " can be freed; capacity unchanged");
  for (int64_t i = 0; i < give_back; ++i) {
    const int64_t p = s.free_pages.back();
    s.free_pages.pop_back();
    s.page_state[size_t(p)] = Impl::kRemoved;
    changed.push_back(p);
  }
  s.gpu_capacity = gpu_pages;
  return changed;
}

PrefixCacheStats PrefixCache::stats() const {
  const Impl& s = *impl_;
  PrefixCacheStats st = s.st;
  st.gpu_capacity = s.gpu_capacity;
  st.gpu_pages_free = int64_t(s.free_pages.size());
  st.gpu_pages_cached = 0;
  st.gpu_pages_held = 0;
  for (uint8_t p : s.page_state) {
    if (p == Impl::kCached) st.gpu_pages_cached++;
    if (p == Impl::kHeld) st.gpu_pages_held++;
  }
  st.host_capacity = s.cfg.host_pages;
  st.host_pages_used = s.cfg.host_pages - int64_t(s.free_slots.size());
  st.nodes = int64_t(s.index.size());
  st.admission_threshold = s.hot_policy() ? s.threshold : 0.0;
  st.reuse_classes = int64_t(s.class_rates.size());
  return st;
}

const PrefixCacheConfig& PrefixCache::config() const { return impl_->cfg; }

const char* cache_policy_name(CachePolicy p) { return p == CachePolicy::Lru ? "lru" : "hot"; }

CachePolicy parse_cache_policy(const std::string& name) {
  if (name == "lru") return CachePolicy::Lru;
  if (name == "hot") return CachePolicy::Hot;
  KVCORE_THROW(ErrorKind::Value, "policy: expected 'lru' or 'hot', got '", name, "'");
}

}  // namespace kvcore
