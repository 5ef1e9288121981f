// PrefixCache: thin glue; kvcore.PrefixCache (python/kvcore/prefix_cache.py) wraps it.
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "kvcore/error.h"
#include "kvcore/prefix_cache.h"
#include "ndarray.h"

namespace kvcore::bindings {
namespace {

using Tokens = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using PageIds = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// A Python object with offload(gpu_pages, host_slots), load(host_slots, gpu_pages) -> token,
// done(token) and wait(token), called with the GIL held.
class PyPageMover final : public PageMover {
 public:
  explicit PyPageMover(nb::object obj) : obj_(std::move(obj)) {}
  ~PyPageMover() override {
    nb::gil_scoped_acquire gil;
    obj_.reset();
  }
  void offload(const std::vector<int64_t>& gpu_pages, const std::vector<int64_t>& host_slots) override {
    nb::gil_scoped_acquire gil;
    obj_.attr("offload")(gpu_pages, host_slots);
  }
  uint64_t load(const std::vector<int64_t>& host_slots, const std::vector<int64_t>& gpu_pages) override {
    nb::gil_scoped_acquire gil;
    nb::object token = obj_.attr("load")(host_slots, gpu_pages);
    return token.is_none() ? 0 : nb::cast<uint64_t>(token);
  }
  bool done(uint64_t token) override {
    nb::gil_scoped_acquire gil;
    return nb::cast<bool>(obj_.attr("done")(token));
  }
  void wait(uint64_t token) override {
    nb::gil_scoped_acquire gil;
    obj_.attr("wait")(token);
  }

 private:
  nb::object obj_;
};

nb::ndarray<nb::numpy, int64_t> to_array(std::vector<int64_t> v) {
  auto* heap = new std::vector<int64_t>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<int64_t>*>(p); });
  return nb::ndarray<nb::numpy, int64_t>(heap->data(), {heap->size()}, owner);
}

double now_or_clock(const nb::object& now) { return now.is_none() ? -1.0 : nb::cast<double>(now); }

}  // namespace

void register_prefix_cache(nb::module_& m) {
  nb::class_<PrefixCache>(m, "PrefixCache")
      .def("__init__",
           [](PrefixCache* self, int64_t page_tokens, int64_t gpu_pages, int64_t host_pages, const std::string& policy,
              double half_life, int64_t page_bytes, int64_t ghost_pages, double admission_threshold,
              bool adaptive, double host_write_budget, double class_gate, nb::object mover) {
             PrefixCacheConfig c;
             c.page_tokens = page_tokens;
             c.gpu_pages = gpu_pages;
             c.host_pages = host_pages;
             c.policy = parse_cache_policy(policy);
             c.half_life = half_life;
             c.page_bytes = page_bytes;
             c.ghost_pages = ghost_pages;
             c.admission_threshold = admission_threshold;
             c.adaptive = adaptive;
             c.host_write_budget = host_write_budget;
             c.class_gate = class_gate;
             std::shared_ptr<PageMover> m;
             if (!mover.is_none()) m = std::make_shared<PyPageMover>(mover);
             new (self) PrefixCache(c, std::move(m));
           },
           nb::arg("page_tokens"), nb::arg("gpu_pages"), nb::arg("host_pages"), nb::arg("policy"),
           nb::arg("half_life"), nb::arg("page_bytes"), nb::arg("ghost_pages"), nb::arg("admission_threshold"),
           nb::arg("adaptive"), nb::arg("host_write_budget"), nb::arg("class_gate"), nb::arg("mover").none())
      .def("match",
           [](PrefixCache& c, const Tokens& tokens, int64_t ns, nb::object now) {
             PrefixCache::Match r = c.match(tokens.data(), int64_t(tokens.shape(0)), ns, now_or_clock(now));
             return nb::make_tuple(to_array(std::move(r.gpu_pages)), r.gpu_tokens, r.host_tokens, r.handle);
           },
           nb::arg("tokens"), nb::arg("namespace"), nb::arg("now").none())
      .def("lock", &PrefixCache::lock, nb::arg("handle"))
      .def("unlock", &PrefixCache::unlock, nb::arg("handle"))
      .def("insert",
           [](PrefixCache& c, const Tokens& tokens, const PageIds& pages, int64_t ns, nb::object now,
              int64_t reuse_class) {
             return c.insert(tokens.data(), int64_t(tokens.shape(0)), pages.data(), int64_t(pages.shape(0)), ns,
                             now_or_clock(now), reuse_class);
           },
           nb::arg("tokens"), nb::arg("gpu_pages"), nb::arg("namespace"), nb::arg("now").none(), nb::arg("reuse_class"))
      .def("alloc", [](PrefixCache& c, int64_t n, nb::object now) { return to_array(c.alloc(n, now_or_clock(now))); },
           nb::arg("n"), nb::arg("now").none())
      .def("free", [](PrefixCache& c, const PageIds& pages) { c.free(pages.data(), int64_t(pages.shape(0))); },
           nb::arg("pages"))
      .def("evict", [](PrefixCache& c, int64_t n, nb::object now) { return to_array(c.evict(n, now_or_clock(now))); },
           nb::arg("n"), nb::arg("now").none())
      .def("prefetch",
           [](PrefixCache& c, int64_t handle, nb::object now) {
             PrefixCache::Prefetch p = c.prefetch(handle, now_or_clock(now));
             return nb::make_tuple(p.pages, p.token, to_array(std::move(p.gpu_pages)));
           },
           nb::arg("handle"), nb::arg("now").none())
      .def("prefetch_done",
           [](PrefixCache& c, uint64_t token) {
             PrefixCache::Prefetch p;
             p.token = token;
             return c.prefetch_done(p);
           },
           nb::arg("token"))
      .def("prefetch_wait",
           [](PrefixCache& c, uint64_t token) {
             PrefixCache::Prefetch p;
             p.token = token;
             c.prefetch_wait(p);
           },
           nb::arg("token"))
      .def("pin", [](PrefixCache& c, int64_t handle, double ttl, nb::object now) { c.pin(handle, ttl, now_or_clock(now)); },
           nb::arg("handle"), nb::arg("ttl"), nb::arg("now").none())
      .def("resize",
           [](PrefixCache& c, int64_t gpu_pages, nb::object now) { return to_array(c.resize(gpu_pages, now_or_clock(now))); },
           nb::arg("gpu_pages"), nb::arg("now").none())
      .def_prop_ro("page_tokens", [](const PrefixCache& c) { return c.config().page_tokens; })
      .def_prop_ro("policy", [](const PrefixCache& c) { return std::string(cache_policy_name(c.config().policy)); })
      .def("stats", [](const PrefixCache& c) {
        const PrefixCacheStats s = c.stats();
        nb::dict gpu, host, d;
        gpu["hit_tokens"] = s.gpu_hit_tokens;
        gpu["capacity_pages"] = s.gpu_capacity;
        gpu["cached_pages"] = s.gpu_pages_cached;
        gpu["free_pages"] = s.gpu_pages_free;
        gpu["held_pages"] = s.gpu_pages_held;
        gpu["evictions"] = s.gpu_evictions;
        host["hit_tokens"] = s.host_hit_tokens;
        host["capacity_pages"] = s.host_capacity;
        host["used_pages"] = s.host_pages_used;
        host["writes"] = s.host_writes;
        host["evictions"] = s.host_evictions;
        host["evictions_unused"] = s.host_evictions_unused;
        host["admissions_rejected"] = s.admissions_rejected;
        host["ghost_hits"] = s.ghost_hits;
        host["budget_admitted"] = s.budget_admitted;
        host["class_gated"] = s.class_gated;
        host["reuse_classes"] = s.reuse_classes;
        host["admission_threshold"] = s.admission_threshold;
        d["gpu"] = gpu;
        d["host"] = host;
        d["queried_tokens"] = s.queried_tokens;
        d["inserted_tokens"] = s.inserted_tokens;
        d["bytes_to_host"] = s.bytes_to_host;
        d["bytes_from_host"] = s.bytes_from_host;
        d["prefetched_pages"] = s.prefetched_pages;
        d["prefetches_used"] = s.prefetches_used;
        d["prefetches_wasted"] = s.prefetches_wasted;
        d["nodes"] = s.nodes;
        return d;
      });
}

}  // namespace kvcore::bindings
