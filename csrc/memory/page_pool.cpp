// PagePool and VirtualTensor: page accounting, sharing, offload/prefetch and ordered release over a
// VmmBackend. Every operation validates first and changes nothing when it throws.
#include <algorithm>
#include <deque>
#include <mutex>
#include <numeric>
#include <unordered_map>

#include "kvcore/error.h"
#include "kvcore/memory.h"
#include "vmm_backend.h"

namespace kvcore {

using memory_detail::CopyRun;
using memory_detail::EventId;
using memory_detail::PhysHandle;
using memory_detail::VmmBackend;

namespace {

struct PhysPage {
  PhysHandle handle = 0;
  bool alive = false;
  int refs = 0;   // live mappings
  int stale = 0;  // mappings awaiting ordered release
};

// A tensor page. `stale_phys` is a physical page still mapped at this address after an unmap or
// offload, until the work queued before it has completed.
struct VPage {
  enum class State : uint8_t { Unmapped, Mapped, Offloaded };
  State state = State::Unmapped;
  int64_t phys = -1;        // Mapped: pool page id
  int64_t host = -1;        // Offloaded: host-tier slot
  int64_t stale_phys = -1;
  EventId stale_event = 0;
};

}  // namespace

// Work deferred until all `events` complete: drop stale mappings, free host slots.
struct Pending {
  std::vector<EventId> events;
  VirtualTensorState* tensor = nullptr;
  // Keeps the tensor alive until processed; empty when the tensor is being destroyed, which then
  // waits for its own entries before it finishes.
  std::shared_ptr<VirtualTensorState> keep;
  std::vector<int64_t> vpages;
  std::vector<int64_t> host_slots;
};

class PoolState {
 public:
  std::recursive_mutex mu;
  std::unique_ptr<VmmBackend> backend;
  Device device;
  int64_t page_bytes = 0;

  std::vector<PhysPage> pages;
  std::vector<int64_t> free_pages;  // ids of alive pages with no mapping
  std::vector<int64_t> dead_ids;    // ids of destroyed pages, reused by create_pages
  int64_t capacity = 0;

  char* host_base = nullptr;
  int64_t host_slots = 0;
  std::vector<int64_t> host_free;
  std::vector<EventId> host_writer;  // per slot: the copy that last wrote it (alive while pending)

  std::deque<Pending> pending;
  std::unordered_map<EventId, int> event_refs;

  std::vector<std::pair<int, PagePool::ReclaimFn>> reclaimers;
  int next_reclaim_id = 1;
  int64_t live_tensors = 0, reserved_bytes = 0;

  ~PoolState() {
    // Tensors hold the pool alive, so none is left; finish outstanding copies, then free memory.
    try {
      while (!pending.empty()) wait_oldest();
    } catch (...) {
    }
    for (PhysPage& p : pages)
      if (p.alive) backend->destroy_page(p.handle);
    if (host_base) backend->free_host(host_base, host_slots * page_bytes);
  }

  bool event_alive(EventId e) const { return e != 0 && event_refs.count(e); }
  void retain(EventId e) {
    if (e) ++event_refs[e];
  }
  void release(EventId e) {
    if (!e) return;
    auto it = event_refs.find(e);
    if (it != event_refs.end() && --it->second == 0) {
      event_refs.erase(it);
      backend->destroy_event(e);
    }
  }
  bool complete(const Pending& p) {
    for (EventId e : p.events)
      if (e && !backend->query(e)) return false;
    return true;
  }

  void add_pending(Pending p) {
    for (EventId e : p.events) retain(e);
    ++queue_version;
    if (complete(p)) {  // CPU work (and CUDA work already finished) is processed at once
      process(p);
      return;
    }
    pending.push_back(std::move(p));
  }

  void process(Pending& p);

  // Processes every completed entry; entries are independent, so order does not matter.
  void drain() {
    for (size_t i = 0; i < pending.size();) {
      if (!complete(pending[i])) {
        ++i;
        continue;
      }
      const uint64_t before = ++queue_version;
      {
        Pending p = std::move(pending[i]);
        pending.erase(pending.begin() + std::ptrdiff_t(i));
        process(p);
      }  // dropping p may run a tensor's destructor, which queues and drains entries itself
      if (queue_version != before) i = 0;
    }
  }
  uint64_t queue_version = 0;  // bumped by every change of `pending`

  void wait_oldest() {
    for (EventId e : pending.front().events)
      if (e) backend->wait(e);
    drain();
  }

  // Makes n pages free, waiting for ordered releases if needed; MemoryError (nothing changed) if
  // the pool cannot.
  void reserve_free_pages(int64_t n, const char* what) {
    drain();
    while (int64_t(free_pages.size()) < n && !pending.empty()) wait_oldest();
    KVCORE_CHECK_MEMORY(int64_t(free_pages.size()) >= n, what, ": the page pool is exhausted: ", n,
                        " page(s) needed, ", free_pages.size(), " free of ", capacity, " (", page_bytes,
                        " bytes each)");
  }

  int64_t take_page() {
    const int64_t id = free_pages.back();
    free_pages.pop_back();
    return id;
  }

  void unref(int64_t id, bool stale) {
    PhysPage& p = pages[size_t(id)];
    (stale ? p.stale : p.refs)--;
    if (p.refs == 0 && p.stale == 0) free_pages.push_back(id);
  }

  void create_pages(int64_t n) {
    std::vector<int64_t> created;
    try {
      for (int64_t i = 0; i < n; ++i) {
        const PhysHandle h = backend->create_page();
        int64_t id;
        if (!dead_ids.empty()) {
          id = dead_ids.back();
          dead_ids.pop_back();
        } else {
          id = int64_t(pages.size());
          pages.emplace_back();
        }
        pages[size_t(id)] = PhysPage{h, true, 0, 0};
        created.push_back(id);
      }
    } catch (...) {
      for (int64_t id : created) {
        backend->destroy_page(pages[size_t(id)].handle);
        pages[size_t(id)].alive = false;
        dead_ids.push_back(id);
      }
      throw;
    }
    // Lowest ids on top of the free stack, so fresh pools hand out pages in address order.
    free_pages.insert(free_pages.end(), created.rbegin(), created.rend());
    capacity += n;
  }

  void destroy_free_pages(int64_t n) {
    // Highest ids first, keeping the low, likely-contiguous pages; the rest stay lowest-on-top.
    std::sort(free_pages.begin(), free_pages.end(), std::greater<int64_t>());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = free_pages[size_t(i)];
      backend->destroy_page(pages[size_t(id)].handle);
      pages[size_t(id)].alive = false;
      dead_ids.push_back(id);
    }
    free_pages.erase(free_pages.begin(), free_pages.begin() + std::ptrdiff_t(n));
    capacity -= n;
  }
};

class VirtualTensorState {
 public:
  std::shared_ptr<PoolState> pool;
  uintptr_t va = 0;
  std::vector<int64_t> shape;
  DType dtype = DType::UInt8;
  int64_t nbytes = 0;
  std::vector<VPage> pages;
  bool freed = false;
  int64_t views = 0;  // live exported views (guarded by pool->mu)

  ~VirtualTensorState() {
    if (freed || !pool) return;
    try {
      std::lock_guard<std::recursive_mutex> lock(pool->mu);
      release_all(join_streams());
    } catch (...) {
      // Destructors must not throw; the pool reclaims its pages when it dies.
    }
  }

  // Streams work on this tensor's memory was queued on (see VirtualTensor::use_stream).
  std::vector<StreamHandle> used_streams;
  void note_stream(StreamHandle s) {
    if (std::find(used_streams.begin(), used_streams.end(), s) == used_streams.end()) used_streams.push_back(s);
  }
  // One stream ordered after the work queued so far on every used stream: the first of them,
  // made to wait for the others (stream-ordered, no host synchronization).
  StreamHandle join_streams() {
    if (used_streams.empty()) return 0;
    const StreamHandle main = used_streams.front();
    for (size_t i = 1; i < used_streams.size(); ++i) {
      const EventId e = pool->backend->record(used_streams[i]);
      pool->backend->stream_wait(main, e);
      pool->backend->destroy_event(e);
    }
    return main;
  }

  uintptr_t page_va(int64_t i) const { return va + uintptr_t(i * pool->page_bytes); }
  int64_t num_pages() const { return int64_t(pages.size()); }

  void check_alive(const char* op) const {
    KVCORE_CHECK(!freed, "VirtualTensor.", op, ": the tensor was freed");
  }
  void check_range(const char* op, int64_t first, int64_t count) const {
    // Written (check and message) so huge arguments cannot overflow.
    KVCORE_CHECK_INDEX(first >= 0 && count >= 0 && first <= num_pages() && count <= num_pages() - first,
                       "VirtualTensor.", op, ": ", count, " page(s) from page ", first,
                       " are out of range for a tensor of ", num_pages(), " pages");
  }

  // Waits until nothing stale is mapped at page i (ordered release of an earlier unmap/offload).
  void settle(int64_t i) {
    while (pages[size_t(i)].stale_phys >= 0) {
      pool->backend->wait(pages[size_t(i)].stale_event);
      pool->drain();
    }
  }

  // Maps fresh pool pages at [first, first + count); all must be unmapped and settled.
  void map_fresh(int64_t first, int64_t count, const char* op, bool wait_readers = true) {
    if (count == 0) return;
    pool->reserve_free_pages(count, op);
    std::vector<int64_t> ids(static_cast<size_t>(count));
    std::vector<PhysHandle> handles(static_cast<size_t>(count));
    // Ascending ids map adjacent physical pages with fewer calls on the host backend.
    for (int64_t i = 0; i < count; ++i) ids[size_t(i)] = pool->take_page();
    std::sort(ids.begin(), ids.end());
    for (int64_t i = 0; i < count; ++i) handles[size_t(i)] = pool->pages[size_t(ids[size_t(i)])].handle;
    // Kernels already queued may read these pages (as zeros, e.g. padded CUDA-graph batches): the
    // remap waits for them, since an address has no access for a moment while it changes. (A
    // prefetch is asynchronous on its stream and does not wait.)
    for (StreamHandle s : wait_readers ? used_streams : std::vector<StreamHandle>{}) {
      const EventId e = pool->backend->record(s);
      pool->backend->wait(e);
      pool->backend->destroy_event(e);
    }
    try {
      pool->backend->map(page_va(first), handles.data(), count);
    } catch (...) {
      for (auto it = ids.rbegin(); it != ids.rend(); ++it) pool->free_pages.push_back(*it);
      throw;
    }
    for (int64_t i = 0; i < count; ++i) {
      VPage& p = pages[size_t(first + i)];
      p.state = VPage::State::Mapped;
      p.phys = ids[size_t(i)];
      pool->pages[size_t(p.phys)].refs++;
    }
  }

  // A mapped page gives up its physical page logically now and physically once the work queued
  // before the release has completed (its address stays mapped to it until then).
  void retire_mapping(VPage& v) {
    pool->pages[size_t(v.phys)].refs--;
    pool->pages[size_t(v.phys)].stale++;
    v.stale_phys = v.phys;
    v.phys = -1;
  }

  // Throws ValueError naming the first page of [first, first + count) not in `state`.
  void require_state(const char* op, int64_t first, int64_t count, VPage::State state, const char* what) const {
    for (int64_t i = first; i < first + count; ++i)
      KVCORE_CHECK_VALUE(pages[size_t(i)].state == state, "VirtualTensor.", op, ": page ", i, " is ", what);
  }

  // Puts the zero page back under freshly mapped pages no work has touched yet.
  void unmap_now(int64_t first, int64_t count) { pool->backend->unmap(page_va(first), count); }

  void unmap_range(int64_t first, int64_t count, StreamHandle stream) {
    Pending p;
    p.tensor = this;
    p.keep = self.lock();
    for (int64_t i = first; i < first + count; ++i) {
      VPage& v = pages[size_t(i)];
      if (v.state == VPage::State::Offloaded) {
        // The slot may still be being written by its offload copy.
        if (pool->event_alive(pool->host_writer[size_t(v.host)])) p.events.push_back(pool->host_writer[size_t(v.host)]);
        p.host_slots.push_back(v.host);
        v.host = -1;
      } else if (v.state == VPage::State::Mapped) {
        settle(i);
        retire_mapping(v);
        p.vpages.push_back(i);
      }
      v.state = VPage::State::Unmapped;
    }
    if (p.vpages.empty() && p.host_slots.empty()) return;
    const EventId e = pool->backend->record(stream);
    p.events.push_back(e);
    for (int64_t i : p.vpages) pages[size_t(i)].stale_event = e;
    pool->add_pending(std::move(p));
  }

  // Unmaps everything, waits for the ordered releases, releases the address range.
  void release_all(StreamHandle stream) {
    unmap_range(0, num_pages(), stream);
    for (int64_t i = 0; i < num_pages(); ++i) settle(i);
    pool->backend->release_reservation(va, num_pages());
    pool->live_tensors--;
    pool->reserved_bytes -= num_pages() * pool->page_bytes;
    freed = true;
  }

  std::weak_ptr<VirtualTensorState> self;
};

void PoolState::process(Pending& p) {
  if (p.tensor && !p.vpages.empty()) {
    VirtualTensorState& t = *p.tensor;
    std::sort(p.vpages.begin(), p.vpages.end());
    // Put the zero page back under runs of adjacent pages with one call each.
    for (size_t i = 0; i < p.vpages.size();) {
      size_t j = i + 1;
      while (j < p.vpages.size() && p.vpages[j] == p.vpages[j - 1] + 1) ++j;
      backend->unmap(t.page_va(p.vpages[i]), int64_t(j - i));
      i = j;
    }
    for (int64_t i : p.vpages) {
      VPage& v = t.pages[size_t(i)];
      unref(v.stale_phys, /*stale=*/true);
      v.stale_phys = -1;
      v.stale_event = 0;
    }
  }
  if (!p.host_slots.empty()) {
    host_free.insert(host_free.end(), p.host_slots.begin(), p.host_slots.end());
    // Lowest slots on top of the stack, so runs of pages offload into runs of slots (one copy).
    std::sort(host_free.begin(), host_free.end(), std::greater<int64_t>());
  }
  for (EventId e : p.events) release(e);
}

// Appends one page copy, extending the last run when both sides continue it (one copy per run).
void add_copy(std::vector<CopyRun>& runs, char* dst, const char* src, int64_t bytes) {
  if (!runs.empty() && static_cast<char*>(runs.back().dst) + runs.back().bytes == dst &&
      static_cast<const char*>(runs.back().src) + runs.back().bytes == src)
    runs.back().bytes += bytes;
  else
    runs.push_back({dst, src, bytes});
}

// --- Transfer --------------------------------------------------------------------------------

bool Transfer::done() const {
  if (!pool_ || !ticket_) return true;
  std::lock_guard<std::recursive_mutex> lock(pool_->mu);
  if (!pool_->event_alive(ticket_)) return true;
  if (!pool_->backend->query(ticket_)) return false;
  pool_->drain();
  return true;
}

void Transfer::wait() const {
  if (!pool_ || !ticket_) return;
  std::lock_guard<std::recursive_mutex> lock(pool_->mu);
  if (!pool_->event_alive(ticket_)) return;
  pool_->backend->wait(ticket_);
  pool_->drain();
}

// --- PagePool --------------------------------------------------------------------------------

PagePool::PagePool(Device device, int64_t capacity_bytes, int64_t host_capacity_bytes, int64_t page_bytes)
    : state_(std::make_shared<PoolState>()) {
  KVCORE_CHECK_VALUE(capacity_bytes >= 0, "PagePool: capacity_bytes must be >= 0, got ", capacity_bytes);
  KVCORE_CHECK_VALUE(host_capacity_bytes >= 0, "PagePool: host_capacity_bytes must be >= 0, got ",
                     host_capacity_bytes);
  KVCORE_CHECK_VALUE(page_bytes >= 0, "PagePool: page_bytes must be positive, got ", page_bytes);
  PoolState& s = *state_;
  s.backend = device.is_cuda() ? memory_detail::make_cuda_vmm_backend(device.index)
                               : memory_detail::make_host_vmm_backend();
  s.device = device;
  const int64_t g = s.backend->granularity();
  if (page_bytes == 0) page_bytes = s.backend->default_page_bytes();
  KVCORE_CHECK_VALUE(page_bytes % g == 0, "PagePool: page_bytes (", page_bytes,
                     ") must be a multiple of the device's allocation granularity (", g, " bytes)");
  s.page_bytes = page_bytes;
  s.backend->set_page_bytes(page_bytes);
  auto pages_for = [&](int64_t bytes) { return bytes / page_bytes + (bytes % page_bytes != 0); };  // no overflow
  const int64_t host_slots = pages_for(host_capacity_bytes);
  if (host_slots) {
    s.host_base = static_cast<char*>(s.backend->alloc_host(host_slots * page_bytes));
    s.host_slots = host_slots;
    s.host_writer.assign(size_t(host_slots), 0);
    for (int64_t i = host_slots - 1; i >= 0; --i) s.host_free.push_back(i);
  }
  s.create_pages(pages_for(capacity_bytes));
}

Device PagePool::device() const { return state_->device; }
int64_t PagePool::page_bytes() const { return state_->page_bytes; }
int64_t PagePool::granularity() const { return state_->backend->granularity(); }

int64_t PagePool::capacity_pages() const {
  std::lock_guard<std::recursive_mutex> lock(state_->mu);
  return state_->capacity;
}
int64_t PagePool::free_pages() const {
  std::lock_guard<std::recursive_mutex> lock(state_->mu);
  state_->drain();
  return int64_t(state_->free_pages.size());
}
int64_t PagePool::host_capacity_pages() const { return state_->host_slots; }
int64_t PagePool::host_free_pages() const {
  std::lock_guard<std::recursive_mutex> lock(state_->mu);
  state_->drain();
  return int64_t(state_->host_free.size());
}

PoolStats PagePool::stats() const {
  std::lock_guard<std::recursive_mutex> lock(state_->mu);
  PoolState& s = *state_;
  s.drain();
  PoolStats st;
  st.page_bytes = s.page_bytes;
  st.granularity = s.backend->granularity();
  st.pages_total = s.capacity;
  st.pages_free = int64_t(s.free_pages.size());
  for (const PhysPage& p : s.pages) {
    if (!p.alive) continue;
    if (p.refs > 0) st.pages_mapped++;
    if (p.refs > 1) st.pages_shared++;
    if (p.refs == 0 && p.stale > 0) st.pages_releasing++;
  }
  st.host_pages_total = s.host_slots;
  st.host_pages_free = int64_t(s.host_free.size());
  st.pages_offloaded = s.host_slots - st.host_pages_free;
  st.tensors = s.live_tensors;
  st.reserved_bytes = s.reserved_bytes;
  st.zero_page_access = s.backend->zero_page_access();
  st.driver_calls = s.backend->stats().calls();
  return st;
}

void PagePool::resize(int64_t target) {
  KVCORE_CHECK_VALUE(target >= 0, "PagePool.resize: capacity_pages must be >= 0, got ", target);
  PoolState& s = *state_;
  {
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    s.drain();
    if (target >= s.capacity) {
      s.create_pages(target - s.capacity);
      return;
    }
    while (int64_t(s.free_pages.size()) < s.capacity - target && !s.pending.empty()) s.wait_oldest();
    if (int64_t(s.free_pages.size()) >= s.capacity - target) {
      s.destroy_free_pages(s.capacity - target);
      return;
    }
  }
  // Ask the consumers (newest first) without holding the lock: they call back into the pool.
  std::vector<std::pair<int, ReclaimFn>> reclaimers;
  {
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    reclaimers = s.reclaimers;
  }
  for (auto it = reclaimers.rbegin(); it != reclaimers.rend(); ++it) {
    int64_t short_by;
    {
      std::lock_guard<std::recursive_mutex> lock(s.mu);
      s.drain();
      short_by = (s.capacity - target) - int64_t(s.free_pages.size());
    }
    if (short_by <= 0) break;
    it->second(short_by);
  }
  std::lock_guard<std::recursive_mutex> lock(s.mu);
  while (int64_t(s.free_pages.size()) < s.capacity - target && !s.pending.empty()) s.wait_oldest();
  const int64_t need = s.capacity - target;
  KVCORE_CHECK_MEMORY(need <= 0 || int64_t(s.free_pages.size()) >= need, "PagePool.resize: cannot shrink to ",
                      target, " pages: only ", s.free_pages.size(), " of ", s.capacity,
                      " pages are free after the reclaim callbacks ran; capacity unchanged");
  if (need > 0) s.destroy_free_pages(need);
}

int PagePool::on_reclaim(ReclaimFn fn) {
  KVCORE_CHECK_TYPE(bool(fn), "PagePool.on_reclaim: fn must be callable");
  std::lock_guard<std::recursive_mutex> lock(state_->mu);
  state_->reclaimers.emplace_back(state_->next_reclaim_id, std::move(fn));
  return state_->next_reclaim_id++;
}

void PagePool::remove_reclaim(int id) {
  std::lock_guard<std::recursive_mutex> lock(state_->mu);
  auto& r = state_->reclaimers;
  auto it = std::find_if(r.begin(), r.end(), [&](const auto& e) { return e.first == id; });
  KVCORE_CHECK_VALUE(it != r.end(), "PagePool.remove_reclaim: no callback with id ", id);
  r.erase(it);
}

// --- VirtualTensor ---------------------------------------------------------------------------

VirtualTensor::VirtualTensor(const PagePool& pool, std::vector<int64_t> shape, DType dtype)
    : state_(std::make_shared<VirtualTensorState>()) {
  KVCORE_CHECK_VALUE(!shape.empty() && shape.size() <= size_t(kMaxDims), "VirtualTensor: shape must have 1 to ",
                     kMaxDims, " dimensions");
  int64_t n = 1;
  for (int64_t d : shape) {
    KVCORE_CHECK_VALUE(d > 0, "VirtualTensor: shape dimensions must be positive, got ", d);
    KVCORE_CHECK_VALUE(n <= (int64_t(1) << 50) / d, "VirtualTensor: shape is too large");
    n *= d;
  }
  VirtualTensorState& t = *state_;
  t.self = state_;
  t.pool = pool.state();
  t.shape = std::move(shape);
  t.dtype = dtype;
  t.nbytes = n * int64_t(dtype_size(dtype));
  const int64_t pb = t.pool->page_bytes;
  const int64_t num_pages = (t.nbytes + pb - 1) / pb;
  std::lock_guard<std::recursive_mutex> lock(t.pool->mu);
  t.va = t.pool->backend->reserve(num_pages);
  t.pages.resize(size_t(num_pages));
  t.pool->live_tensors++;
  t.pool->reserved_bytes += num_pages * pb;
}

void* VirtualTensor::data() const { return reinterpret_cast<void*>(state_->va); }
const std::vector<int64_t>& VirtualTensor::shape() const { return state_->shape; }
DType VirtualTensor::dtype() const { return state_->dtype; }
Device VirtualTensor::device() const { return state_->pool->device; }
int64_t VirtualTensor::num_pages() const { return state_->num_pages(); }
int64_t VirtualTensor::page_bytes() const { return state_->pool->page_bytes; }
int64_t VirtualTensor::nbytes() const { return state_->nbytes; }

void VirtualTensor::map(int64_t first, int64_t count) {
  VirtualTensorState& t = *state_;
  std::lock_guard<std::recursive_mutex> lock(t.pool->mu);
  t.check_alive("map");
  t.check_range("map", first, count);
  for (int64_t i = first; i < first + count; ++i) {
    const VPage& p = t.pages[size_t(i)];
    KVCORE_CHECK_VALUE(p.state != VPage::State::Mapped, "VirtualTensor.map: page ", i, " is already mapped");
    KVCORE_CHECK_VALUE(p.state != VPage::State::Offloaded, "VirtualTensor.map: page ", i,
                       " is offloaded; prefetch() it, or unmap() it to drop its contents");
  }
  for (int64_t i = first; i < first + count; ++i) t.settle(i);
  if (count) t.map_fresh(first, count, "VirtualTensor.map");
}

void VirtualTensor::unmap(int64_t first, int64_t count, StreamHandle stream) {
  VirtualTensorState& t = *state_;
  std::lock_guard<std::recursive_mutex> lock(t.pool->mu);
  t.check_alive("unmap");
  t.note_stream(stream);
  t.check_range("unmap", first, count);
  for (int64_t i = first; i < first + count; ++i)
    KVCORE_CHECK_VALUE(t.pages[size_t(i)].state != VPage::State::Unmapped, "VirtualTensor.unmap: page ", i,
                       " is not mapped");
  t.unmap_range(first, count, stream);
}

void VirtualTensor::ensure(int64_t nbytes) {
  VirtualTensorState& t = *state_;
  std::lock_guard<std::recursive_mutex> lock(t.pool->mu);
  t.check_alive("ensure");
  KVCORE_CHECK_INDEX(nbytes >= 0 && nbytes <= t.num_pages() * t.pool->page_bytes, "VirtualTensor.ensure: ", nbytes,
                     " bytes is out of range for a tensor of ", t.num_pages() * t.pool->page_bytes, " reserved bytes");
  const int64_t last = (nbytes + t.pool->page_bytes - 1) / t.pool->page_bytes;
  std::vector<std::pair<int64_t, int64_t>> runs;  // unmapped runs to map
  int64_t needed = 0;
  for (int64_t i = 0; i < last; ++i) {
    if (t.pages[size_t(i)].state != VPage::State::Unmapped) continue;
    if (!runs.empty() && runs.back().first + runs.back().second == i) runs.back().second++;
    else runs.emplace_back(i, 1);
    ++needed;
  }
  for (int64_t i = 0; i < last; ++i)
    KVCORE_CHECK_VALUE(t.pages[size_t(i)].state != VPage::State::Offloaded, "VirtualTensor.ensure: page ", i,
                       " is offloaded; prefetch() it first");
  t.pool->reserve_free_pages(needed, "VirtualTensor.ensure");  // all or nothing
  for (auto [first, count] : runs) {
    for (int64_t i = first; i < first + count; ++i) t.settle(i);
    t.map_fresh(first, count, "VirtualTensor.ensure");
  }
}

void VirtualTensor::alias(int64_t page, const VirtualTensor& other, int64_t other_page) {
  VirtualTensorState& t = *state_;
  const VirtualTensorState& o = *other.state_;
  KVCORE_CHECK_VALUE(t.pool == o.pool, "VirtualTensor.alias: the tensors belong to different pools");
  std::lock_guard<std::recursive_mutex> lock(t.pool->mu);
  t.check_alive("alias");
  KVCORE_CHECK(!o.freed, "VirtualTensor.alias: the other tensor was freed");
  t.check_range("alias", page, 1);
  o.check_range("alias", other_page, 1);
  KVCORE_CHECK_VALUE(t.pages[size_t(page)].state == VPage::State::Unmapped, "VirtualTensor.alias: page ", page,
                     " is already mapped or offloaded; unmap it first");
  const VPage& src = o.pages[size_t(other_page)];
  KVCORE_CHECK_VALUE(src.state == VPage::State::Mapped, "VirtualTensor.alias: page ", other_page,
                     " of the other tensor is not mapped");
  t.settle(page);
  const PhysHandle h = t.pool->pages[size_t(src.phys)].handle;
  t.pool->backend->map(t.page_va(page), &h, 1);
  VPage& dst = t.pages[size_t(page)];
  dst.state = VPage::State::Mapped;
  dst.phys = src.phys;
  t.pool->pages[size_t(src.phys)].refs++;
}

Transfer VirtualTensor::offload(int64_t first, int64_t count, StreamHandle stream) {
  VirtualTensorState& t = *state_;
  PoolState& pool = *t.pool;
  std::lock_guard<std::recursive_mutex> lock(pool.mu);
  t.check_alive("offload");
  t.note_stream(stream);
  t.check_range("offload", first, count);
  t.require_state("offload", first, count, VPage::State::Mapped, "not mapped");
  pool.drain();
  KVCORE_CHECK_MEMORY(int64_t(pool.host_free.size()) >= count, "VirtualTensor.offload: the host tier is full: ",
                      count, " slot(s) needed, ", pool.host_free.size(), " free of ", pool.host_slots);
  Transfer result;
  if (count == 0) return result;
  std::vector<int64_t> slots(static_cast<size_t>(count));
  for (auto& s : slots) {
    s = pool.host_free.back();
    pool.host_free.pop_back();
  }
  std::vector<CopyRun> runs;
  for (int64_t i = 0; i < count; ++i) {
    char* dst = pool.host_base + slots[size_t(i)] * pool.page_bytes;
    const char* src = reinterpret_cast<const char*>(t.page_va(first + i));
    add_copy(runs, dst, src, pool.page_bytes);
  }
  EventId e;
  try {
    e = pool.backend->copy(runs, stream);
  } catch (...) {
    for (int64_t s : slots) pool.host_free.push_back(s);
    throw;
  }
  Pending p;
  p.tensor = &t;
  p.keep = t.self.lock();
  p.events.push_back(e);
  for (int64_t i = 0; i < count; ++i) {
    VPage& v = t.pages[size_t(first + i)];
    t.retire_mapping(v);
    v.stale_event = e;
    v.state = VPage::State::Offloaded;
    v.host = slots[size_t(i)];
    pool.host_writer[size_t(v.host)] = e;
    p.vpages.push_back(first + i);
  }
  result.pool_ = t.pool;
  result.ticket_ = e;
  result.bytes_ = count * pool.page_bytes;
  pool.add_pending(std::move(p));
  return result;
}

Transfer VirtualTensor::prefetch(int64_t first, int64_t count, StreamHandle stream) {
  VirtualTensorState& t = *state_;
  PoolState& pool = *t.pool;
  std::lock_guard<std::recursive_mutex> lock(pool.mu);
  t.check_alive("prefetch");
  t.note_stream(stream);
  t.check_range("prefetch", first, count);
  t.require_state("prefetch", first, count, VPage::State::Offloaded, "not offloaded");
  Transfer result;
  if (count == 0) return result;
  for (int64_t i = first; i < first + count; ++i) t.settle(i);
  std::vector<int64_t> slots;
  for (int64_t i = first; i < first + count; ++i) slots.push_back(t.pages[size_t(i)].host);
  // Pages become Mapped here; on failure they go back to Offloaded with their slots.
  t.map_fresh(first, count, "VirtualTensor.prefetch", false);
  std::vector<CopyRun> runs;
  for (int64_t i = 0; i < count; ++i) {
    const char* src = pool.host_base + slots[size_t(i)] * pool.page_bytes;
    char* dst = reinterpret_cast<char*>(t.page_va(first + i));
    const EventId writer = pool.host_writer[size_t(slots[size_t(i)])];
    if (pool.event_alive(writer)) pool.backend->stream_wait(stream, writer);  // offload copy still running
    add_copy(runs, dst, src, pool.page_bytes);
  }
  EventId e;
  try {
    e = pool.backend->copy(runs, stream);
  } catch (...) {
    for (int64_t i = 0; i < count; ++i) {
      VPage& v = t.pages[size_t(first + i)];
      pool.unref(v.phys, false);
      v.phys = -1;
      v.state = VPage::State::Offloaded;
    }
    t.unmap_now(first, count);
    throw;
  }
  Pending p;
  p.events.push_back(e);
  p.host_slots = slots;
  for (int64_t i = first; i < first + count; ++i) t.pages[size_t(i)].host = -1;
  result.pool_ = t.pool;
  result.ticket_ = e;
  result.bytes_ = count * pool.page_bytes;
  pool.add_pending(std::move(p));
  return result;
}

bool VirtualTensor::is_mapped(int64_t page) const {
  std::lock_guard<std::recursive_mutex> lock(state_->pool->mu);
  state_->check_alive("is_mapped");
  state_->check_range("is_mapped", page, 1);
  return state_->pages[size_t(page)].state == VPage::State::Mapped;
}

bool VirtualTensor::is_offloaded(int64_t page) const {
  std::lock_guard<std::recursive_mutex> lock(state_->pool->mu);
  state_->check_alive("is_offloaded");
  state_->check_range("is_offloaded", page, 1);
  return state_->pages[size_t(page)].state == VPage::State::Offloaded;
}

std::vector<int64_t> VirtualTensor::mapped_pages() const {
  std::lock_guard<std::recursive_mutex> lock(state_->pool->mu);
  state_->check_alive("mapped_pages");
  std::vector<int64_t> out;
  for (int64_t i = 0; i < state_->num_pages(); ++i)
    if (state_->pages[size_t(i)].state == VPage::State::Mapped) out.push_back(i);
  return out;
}

int64_t VirtualTensor::physical_page(int64_t page) const {
  std::lock_guard<std::recursive_mutex> lock(state_->pool->mu);
  state_->check_alive("physical_page");
  state_->check_range("physical_page", page, 1);
  return state_->pages[size_t(page)].phys;
}

std::shared_ptr<void> VirtualTensor::retain_view() const {
  std::shared_ptr<VirtualTensorState> t = state_;
  std::lock_guard<std::recursive_mutex> lock(t->pool->mu);
  t->check_alive("view");
  t->views++;
  return std::shared_ptr<void>(t.get(), [t](void*) {
    std::lock_guard<std::recursive_mutex> lock(t->pool->mu);
    t->views--;
  });
}

void VirtualTensor::free(StreamHandle stream) {
  VirtualTensorState& t = *state_;
  std::lock_guard<std::recursive_mutex> lock(t.pool->mu);
  t.check_alive("free");
  KVCORE_CHECK(t.views == 0, "VirtualTensor.free: ", t.views,
               " exported view(s) (DLPack / torch / numpy) of this tensor are still alive; drop them first");
  t.release_all(stream);
}

void VirtualTensor::use_stream(StreamHandle stream) {
  VirtualTensorState& t = *state_;
  std::lock_guard<std::recursive_mutex> lock(t.pool->mu);
  t.check_alive("use_stream");
  t.note_stream(stream);
}

bool VirtualTensor::is_freed() const {
  std::lock_guard<std::recursive_mutex> lock(state_->pool->mu);
  return state_->freed;
}

}  // namespace kvcore
