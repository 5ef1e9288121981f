// Executes a kernel launch: CTAs spread over a few OS threads, each CTA's threads as fibers that
// run until they reach a barrier or a warp collective. A collective executes when the last lane
// it names arrives; a barrier when every thread of the CTA has. What a GPU leaves undefined (a
// barrier some threads never reach, a shuffle naming a lane that never comes or reading one outside
// its mask, lanes of one warp waiting at different collectives) is reported as an error.
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#include "internal.h"
#include "mma.h"

namespace simt {

void* prepare_stack(char* stack, size_t bytes, void (*entry)(void*), void* arg);

thread_local const Coords* t_coords = nullptr;
thread_local Cta* t_cta = nullptr;
thread_local Fiber* t_fiber = nullptr;

namespace {

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kGuardBytes = 4096;
constexpr unsigned kFullMask = 0xffffffffu;

std::string hex(unsigned v) {
  std::ostringstream s;
  s << "0x" << std::hex << v;
  return s.str();
}

std::string demangle(const char* name) {
  int status = 0;
  char* out = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string r = status == 0 && out ? out : name;
  std::free(out);
  return r;
}

// The kernel's name (for reports only: kernels in anonymous namespaces need the debug info).
std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) && info.dli_sname && info.dli_saddr == kernel) return demangle(info.dli_sname);
  return function_at(kernel);
}

const char* op_name(WarpOpKind k) {
  switch (k) {
    case WarpOpKind::Syncwarp: return "__syncwarp";
    case WarpOpKind::Shfl: return "__shfl_*_sync";
    case WarpOpKind::Ballot: return "__ballot_sync/__any_sync/__all_sync";
    case WarpOpKind::Wmma: return "wmma";
    case WarpOpKind::Ldmatrix: return "ldmatrix";
    case WarpOpKind::Mma: return "mma.sync";
    default: return "?";
  }
}

// The fibers and stacks of one OS thread, reused by the CTAs it runs.
struct Worker {
  std::vector<Fiber> fibers;
  std::vector<ShadowByte> shadow;
  char* stacks = nullptr;
  size_t stack_count = 0;

  ~Worker() {
    if (stacks) munmap(stacks, stack_count * (kStackBytes + kGuardBytes));
  }
  void ensure(size_t threads) {
    if (threads <= stack_count) return;
    if (stacks) munmap(stacks, stack_count * (kStackBytes + kGuardBytes));
    const size_t span = threads * (kStackBytes + kGuardBytes);
    void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    stacks = static_cast<char*>(p);
    for (size_t i = 0; i < threads; ++i) mprotect(stacks + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
    stack_count = threads;
  }
};
thread_local std::unique_ptr<Worker> t_worker;

std::mutex g_launch_mu;  // serializes launches (one device, one queue of work)

[[noreturn]] void back_to_scheduler() {
  Cta* c = t_cta;
  Fiber* f = t_fiber;
  simt_switch_context(&f->sp, c->scheduler_sp);
  __builtin_unreachable();
}

// Suspends the running fiber until the scheduler resumes it.
void yield() {
  Cta* c = t_cta;
  Fiber* f = t_fiber;
  simt_switch_context(&f->sp, c->scheduler_sp);
  t_coords = &f->coords;
  if (c->failed) back_to_scheduler();
}

void fiber_main(void* arg) {
  auto* f = static_cast<Fiber*>(arg);
  Cta* c = t_cta;
  t_coords = &f->coords;
  c->launch->body(c->launch->context);
  land_async_copies(*f, 0, true);  // a GPU completes copies still in flight at exit
  // Exit: nothing may be waiting for this thread.
  f->state = FiberState::Exited;
  ++c->exited;
  Warp& w = c->warps[size_t(f->warp)];
  w.exited |= 1u << f->lane;
  if (c->at_barrier > 0) {
    const Fiber* waiting = nullptr;
    for (const Fiber& o : *c->fibers)
      if (o.state == FiberState::AtBarrier) waiting = &o;
    fail("barrier divergence: " + where(*c, *f) + " exited while " + std::to_string(c->at_barrier) +
         " thread(s) wait at __syncthreads (" + site(waiting->file, waiting->line) +
         "): every thread of the block must reach each __syncthreads");
  }
  for (int l = 0; l < 32; ++l) {
    const Fiber* o = nullptr;
    if ((w.arrived >> l) & 1u) o = &(*c->fibers)[size_t(f->warp * 32 + l)];
    if (o && (o->op.mask >> f->lane) & 1u)
      fail(std::string("warp divergence: ") + where(*c, *f) + " exited while lane " + std::to_string(l) + " waits at " +
           op_name(o->op.kind) + " (" + site(o->op.file, o->op.line) + ") with mask " + hex(o->op.mask) +
           ", which names the exited lane");
  }
  back_to_scheduler();
}

std::string describe_waits(const Cta& c) {
  std::ostringstream s;
  int shown = 0;
  for (const Fiber& f : *c.fibers) {
    if (f.state == FiberState::Exited || f.state == FiberState::Runnable) continue;
    if (shown++ == 6) {
      s << "; ...";
      break;
    }
    s << (shown > 1 ? "; " : "") << "lane " << f.lane << " of warp " << f.warp << " at ";
    if (f.state == FiberState::AtBarrier) s << "__syncthreads (" << site(f.file, f.line) << ")";
    else s << op_name(f.op.kind) << " mask " << hex(f.op.mask) << " (" << site(f.op.file, f.op.line) << ")";
  }
  return s.str();
}

// Runs one CTA to completion (or to its first error) on this OS thread.
void run_cta(Launch& launch, uint3 block_idx) {
  if (!t_worker) t_worker = std::make_unique<Worker>();
  Worker& wk = *t_worker;
  const int threads = int(launch.block.x * launch.block.y * launch.block.z);
  wk.ensure(size_t(threads));
  wk.fibers.assign(size_t(threads), Fiber{});
  Cta cta;
  cta.launch = &launch;
  cta.block_idx = block_idx;
  cta.fibers = &wk.fibers;
  cta.threads = threads;
  cta.warps.assign(size_t((threads + 31) / 32), Warp{});
  for (size_t w = 0; w < cta.warps.size(); ++w) {
    const int n = std::min(32, threads - int(w) * 32);
    cta.warps[w].lanes = n == 32 ? kFullMask : (1u << n) - 1;
    cta.warps[w].exited = ~cta.warps[w].lanes;
    std::memset(cta.warps[w].pair_sync, 0, sizeof(cta.warps[w].pair_sync));
  }
  cta.shadow = &wk.shadow;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = wk.fibers[size_t(t)];
    f.tid = t;
    f.warp = t / 32;
    f.lane = t % 32;
    f.coords.thread_idx = uint3{unsigned(t) % launch.block.x, (unsigned(t) / launch.block.x) % launch.block.y,
                                unsigned(t) / (launch.block.x * launch.block.y)};
    f.coords.block_idx = block_idx;
    f.coords.block_dim = launch.block;
    f.coords.grid_dim = launch.grid;
    f.stack = wk.stacks + size_t(t) * (kStackBytes + kGuardBytes) + kGuardBytes;
    f.stack_bytes = kStackBytes;
    f.sp = prepare_stack(f.stack, f.stack_bytes, &fiber_main, &f);
  }
  t_cta = &cta;
  shared_begin_cta(cta);
  for (;;) {
    bool ran = false;
    for (Fiber& f : wk.fibers) {
      if (f.state != FiberState::Runnable) continue;
      ran = true;
      t_fiber = &f;
      t_coords = &f.coords;
      simt_switch_context(&cta.scheduler_sp, f.sp);
      if (cta.failed) break;
    }
    if (cta.failed || cta.exited == threads) break;
    if (!ran) {  // everybody waits for somebody
      std::lock_guard<std::mutex> lock(g_launch_mu);
      if (launch.error.empty())
        launch.error = "deadlock in block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
                       std::to_string(block_idx.z) + "): no thread can proceed: " + describe_waits(cta) +
                       " (a barrier or collective that some named threads never reach)";
      break;
    }
  }
  t_cta = nullptr;
  t_fiber = nullptr;
  t_coords = nullptr;
}

// A fixed pool of OS threads that run the CTAs of a launch (the launching thread helps).
class Pool {
 public:
  explicit Pool(int n) {
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  // Calls job(i) for i in [0, n), in parallel; returns when all are done.
  void run(int64_t n, const std::function<void(int64_t)>& job) {
    std::unique_lock<std::mutex> lock(mu_);
    job_ = &job;
    next_ = 0;
    total_ = n;
    busy_ = int(workers_.size());
    ++generation_;
    lock.unlock();
    cv_.notify_all();
    work();
    lock.lock();
    done_cv_.wait(lock, [this] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  void work() {
    for (;;) {
      const int64_t i = next_.fetch_add(1);
      if (i >= total_) return;
      (*job_)(i);
    }
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      lock.unlock();
      work();
      lock.lock();
      if (--busy_ == 0) done_cv_.notify_all();
    }
  }
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* job_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t total_ = 0;
  int busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool p(std::max(0, simt_threads() - 1));
  return p;
}

}  // namespace

std::string site(const char* file, int line) {
  if (!file) return "?";
  const char* slash = std::strrchr(file, '/');
  std::string s = slash ? slash + 1 : file;
  // Keep the folder for kernel sources (attention/attention.cu), not the full path.
  if (slash && slash != file) {
    const char* prev = slash - 1;
    while (prev > file && *prev != '/') --prev;
    s = std::string(*prev == '/' ? prev + 1 : prev, size_t(slash - (*prev == '/' ? prev + 1 : prev))) + "/" + s;
  }
  return s + ":" + std::to_string(line);
}

std::string where(const Cta& cta, const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.coords.thread_idx.x << "," << f.coords.thread_idx.y << "," << f.coords.thread_idx.z
    << ") of block (" << cta.block_idx.x << "," << cta.block_idx.y << "," << cta.block_idx.z << ")";
  return s.str();
}

void fail(const std::string& what) {
  Cta* c = t_cta;
  {
    std::lock_guard<std::mutex> lock(g_launch_mu);
    if (c->launch->error.empty()) c->launch->error = what;
  }
  c->failed = true;
  back_to_scheduler();
}

void trap(const char* what, const char* file, int line) {
  fail(std::string(what) + " at " + site(file, line) + " in " + where(*t_cta, *t_fiber));
}

void threadfence() {}

void syncthreads(const char* file, int line) {
  Cta* c = t_cta;
  Fiber* f = t_fiber;
  if (c->exited > 0) {
    const Fiber* gone = nullptr;
    for (const Fiber& o : *c->fibers)
      if (o.state == FiberState::Exited) gone = &o;
    fail("barrier divergence: __syncthreads at " + site(file, line) + " reached by " + where(*c, *f) + ", but " +
         where(*c, *gone) + " has exited without reaching it");
  }
  if (c->at_barrier > 0) {
    for (const Fiber& o : *c->fibers)
      if (o.state == FiberState::AtBarrier && (o.file != file || o.line != line))
        fail("barrier divergence: " + where(*c, *f) + " waits at __syncthreads " + site(file, line) + " while " +
             where(*c, o) + " waits at " + site(o.file, o.line));
  }
  f->state = FiberState::AtBarrier;
  f->file = file;
  f->line = line;
  if (++c->at_barrier == c->threads) {
    for (Fiber& o : *c->fibers) o.state = FiberState::Runnable;
    c->at_barrier = 0;
    ++c->bar_gen;
  }
  yield();
}

namespace {

// Executes a completed collective of `lanes` of warp `w`; each lane's op is in its fiber.
void execute_warp_op(Cta& c, int w, unsigned lanes);

// Registers the running lane at a warp op and waits for the lanes of its mask.
void arrive(WarpOp op) {
  Cta* c = t_cta;
  Fiber* f = t_fiber;
  Warp& w = c->warps[size_t(f->warp)];
  const unsigned me = 1u << f->lane;
  if (!(op.mask & me))
    fail(std::string(op_name(op.kind)) + " at " + site(op.file, op.line) + ": " + where(*c, *f) +
         " calls it with mask " + hex(op.mask) + ", which does not include its own lane " + std::to_string(f->lane));
  if (op.mask & ~w.lanes)
    fail(std::string(op_name(op.kind)) + " at " + site(op.file, op.line) + ": mask " + hex(op.mask) +
         " names lanes the block does not have (" + std::to_string(__builtin_popcount(w.lanes)) + " lanes in this warp)");
  if (op.mask & w.exited)
    fail(std::string(op_name(op.kind)) + " at " + site(op.file, op.line) + ": mask " + hex(op.mask) +
         " names exited lanes " + hex(op.mask & w.exited) + " (" + where(*c, *f) + ")");
  for (int l = 0; l < 32; ++l) {
    if (!((w.arrived >> l) & 1u)) continue;
    const Fiber& o = (*c->fibers)[size_t(f->warp * 32 + l)];
    const bool overlaps = (o.op.mask & op.mask) != 0;
    if (overlaps && (o.op.kind != op.kind || o.op.mask != op.mask))
      fail(std::string("warp divergence: ") + where(*c, *f) + " is at " + op_name(op.kind) + " (" +
           site(op.file, op.line) + ", mask " + hex(op.mask) + ") while lane " + std::to_string(l) + " is at " +
           op_name(o.op.kind) + " (" + site(o.op.file, o.op.line) + ", mask " + hex(o.op.mask) + ")");
  }
  f->op = op;
  f->state = FiberState::AtWarpOp;
  w.arrived |= me;
  if ((w.arrived & op.mask) == op.mask) {
    execute_warp_op(*c, f->warp, op.mask);
    w.arrived &= ~op.mask;
    for (int l = 0; l < 32; ++l)
      if ((op.mask >> l) & 1u) (*c->fibers)[size_t(f->warp * 32 + l)].state = FiberState::Runnable;
  }
  yield();
}

float element(const void* base, WmmaType t, size_t i) {
  switch (t) {
    case WmmaType::F16: return __half2float(static_cast<const __half*>(base)[i]);
    case WmmaType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}
size_t type_bytes(WmmaType t) { return t == WmmaType::F32 ? 4 : 2; }

void execute_wmma(Cta& c, int w) {
  Fiber* lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = &(*c.fibers)[size_t(w * 32 + l)];
  const WmmaCall& first = *lanes[0]->op.wmma;
  for (int l = 1; l < 32; ++l) {
    const WmmaCall& o = *lanes[l]->op.wmma;
    if (o.kind != first.kind || o.mem != first.mem || o.ldm != first.ldm || o.col_major != first.col_major ||
        o.type != first.type)
      fail("wmma at " + site(lanes[0]->op.file, lanes[0]->op.line) + ": lanes 0 and " + std::to_string(l) +
           " of warp " + std::to_string(w) + " pass different operations, pointers or strides (all 32 lanes must agree)");
  }
  // Element e = 8 l + i of the row-major 16x16 tile lives in lane l, slot i.
  if (first.kind == WmmaKind::Mma) {
    float a[16][16], b[16][16], acc[16][16];
    for (int e = 0; e < 256; ++e) {
      const WmmaCall& o = *lanes[e / 8]->op.wmma;
      a[e / 16][e % 16] = element(o.a, first.type, size_t(e % 8));
      b[e / 16][e % 16] = element(o.b, first.type, size_t(e % 8));
      acc[e / 16][e % 16] = static_cast<const float*>(o.c)[e % 8];
    }
    for (int e = 0; e < 256; ++e) {
      const int m = e / 16, n = e % 16;
      float s = acc[m][n];
      for (int k = 0; k < 16; ++k) s += a[m][k] * b[k][n];
      static_cast<float*>(lanes[e / 8]->op.wmma->frag)[e % 8] = s;
    }
    return;
  }
  if (first.ldm % (16 / type_bytes(first.type)) != 0)
    fail("wmma at " + site(lanes[0]->op.file, lanes[0]->op.line) + ": ldm " + std::to_string(first.ldm) +
         " is not a multiple of 16 bytes");
  if (reinterpret_cast<uintptr_t>(first.mem) % 32 != 0)
    fail("wmma at " + site(lanes[0]->op.file, lanes[0]->op.line) + ": pointer " +
         std::to_string(reinterpret_cast<uintptr_t>(first.mem)) + " is not 256-bit aligned");
  const size_t es = type_bytes(first.type);
  for (int e = 0; e < 256; ++e) {
    const int r = e / 16, col = e % 16;
    // Matrix element (r, col) of A (m, k), B (k, n) or C (m, n) in memory.
    const size_t idx = first.col_major ? size_t(col) * first.ldm + size_t(r) : size_t(r) * first.ldm + size_t(col);
    char* addr = static_cast<char*>(const_cast<void*>(first.mem)) + idx * es;
    void* slot = static_cast<char*>(lanes[e / 8]->op.wmma->frag) + size_t(e % 8) * es;
    const bool store = first.kind == WmmaKind::StoreC;
    if (in_shared(&c, addr)) shared_access(addr, es, store, false, true, nullptr);
    if (store) std::memcpy(addr, slot, es);
    else std::memcpy(slot, addr, es);
  }
}

void execute_warp_op(Cta& c, int w, unsigned mask) {
  Fiber* first = nullptr;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) {
      first = &(*c.fibers)[size_t(w * 32 + l)];
      break;
    }
  switch (first->op.kind) {
    case WarpOpKind::Syncwarp: {
      Warp& wp = c.warps[size_t(w)];
      const uint32_t ev = ++wp.sync_counter;
      if (mask == wp.lanes) {
        wp.full_sync = ev;
      } else {
        for (int i = 0; i < 32; ++i)
          if ((mask >> i) & 1u)
            for (int j = 0; j < 32; ++j)
              if ((mask >> j) & 1u) wp.pair_sync[i][j] = ev;
      }
      break;
    }
    case WarpOpKind::Ballot: {
      unsigned bits = 0;
      for (int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u && (*c.fibers)[size_t(w * 32 + l)].op.value) bits |= 1u << l;
      for (int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) (*c.fibers)[size_t(w * 32 + l)].op.result = bits;
      break;
    }
    case WarpOpKind::Shfl: {
      for (int l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        Fiber& f = (*c.fibers)[size_t(w * 32 + l)];
        const int width = f.op.width;
        if (width < 1 || width > 32 || (width & (width - 1)))
          fail("__shfl_*_sync at " + site(f.op.file, f.op.line) + ": width " + std::to_string(width) +
               " is not a power of two in [1, 32]");
        const int base = l & ~(width - 1);
        int src = l;
        switch (f.op.mode) {
          case ShflMode::Idx: src = base + (f.op.arg & (width - 1)); break;
          case ShflMode::Up: src = l - f.op.arg >= base ? l - f.op.arg : l; break;
          case ShflMode::Down: src = l + f.op.arg < base + width ? l + f.op.arg : l; break;
          case ShflMode::Xor: {
            const int x = l ^ f.op.arg;
            src = x >= base && x < base + width ? x : l;
            break;
          }
        }
        if (!((mask >> src) & 1u))
          fail("__shfl_*_sync at " + site(f.op.file, f.op.line) + ": lane " + std::to_string(l) + " of warp " +
               std::to_string(w) + " reads lane " + std::to_string(src) + ", which is missing from the mask " +
               hex(mask) + " (the value would be undefined on a GPU)");
        f.op.result = (*c.fibers)[size_t(w * 32 + src)].op.value;
      }
      break;
    }
    case WarpOpKind::Wmma:
      if (mask != kFullMask)
        fail("wmma at " + site(first->op.file, first->op.line) + ": needs all 32 lanes of the warp");
      execute_wmma(c, w);
      break;
    case WarpOpKind::Ldmatrix:
    case WarpOpKind::Mma:
      if (mask != kFullMask)
        fail(std::string(op_name(first->op.kind)) + " at " + site(first->op.file, first->op.line) +
             ": needs all 32 lanes of the warp (.sync.aligned)");
      if (first->op.kind == WarpOpKind::Ldmatrix) execute_ldmatrix(c, w);
      else execute_mma(c, w);
      break;
    default: break;
  }
}

}  // namespace

namespace {
WarpOp warp_op(WarpOpKind kind, unsigned mask, const char* file, int line) {
  WarpOp op;
  op.kind = kind;
  op.mask = mask;
  op.file = file;
  op.line = line;
  return op;
}
}  // namespace

void syncwarp(unsigned mask, const char* file, int line) { arrive(warp_op(WarpOpKind::Syncwarp, mask, file, line)); }

uint64_t shfl(unsigned mask, uint64_t bits, ShflMode mode, int arg, int width, const char* file, int line) {
  WarpOp op = warp_op(WarpOpKind::Shfl, mask, file, line);
  op.value = bits;
  op.mode = mode;
  op.arg = arg;
  op.width = width;
  arrive(op);
  return t_fiber->op.result;
}

unsigned vote_ballot(unsigned mask, bool predicate, const char* file, int line) {
  WarpOp op = warp_op(WarpOpKind::Ballot, mask, file, line);
  op.value = predicate;
  arrive(op);
  return unsigned(t_fiber->op.result);
}

void wmma(const WmmaCall& call, const char* file, int line) {
  WarpOp op = warp_op(WarpOpKind::Wmma, kFullMask, file, line);
  op.wmma = &call;
  arrive(op);
}

void arrive_collective(WarpOpKind kind, const void* call, const char* file, int line) {
  WarpOp op = warp_op(kind, kFullMask, file, line);
  op.call = call;
  arrive(op);
}

// Atomics: one lock-free host atomic each; shared-memory targets are recorded as atomic accesses.
namespace {
template <typename T>
void note_atomic(T* p) {
  if (in_shared(t_cta, p)) shared_access(p, sizeof(T), true, true, false, __builtin_return_address(0));
}
template <typename T, typename F>
T atomic_update(T* p, F&& f) {
  note_atomic(p);
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(p, &old, f(old), true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
  }
  return old;
}
}  // namespace

int atomic_cas(int* p, int c, int v) {
  note_atomic(p);
  __atomic_compare_exchange_n(p, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return c;
}
unsigned atomic_cas(unsigned* p, unsigned c, unsigned v) {
  note_atomic(p);
  __atomic_compare_exchange_n(p, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return c;
}
unsigned long long atomic_cas(unsigned long long* p, unsigned long long c, unsigned long long v) {
  note_atomic(p);
  __atomic_compare_exchange_n(p, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return c;
}
int atomic_add(int* p, int v) {
  return atomic_update(p, [v](int o) { return int(unsigned(o) + unsigned(v)); });
}
unsigned atomic_add(unsigned* p, unsigned v) {
  return atomic_update(p, [v](unsigned o) { return o + v; });
}
unsigned long long atomic_add(unsigned long long* p, unsigned long long v) {
  return atomic_update(p, [v](unsigned long long o) { return o + v; });
}
float atomic_add(float* p, float v) {
  note_atomic(p);
  auto* u = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(u, __ATOMIC_RELAXED);
  for (;;) {
    float f;
    std::memcpy(&f, &old, 4);
    f += v;
    uint32_t nu;
    std::memcpy(&nu, &f, 4);
    if (__atomic_compare_exchange_n(u, &old, nu, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
      std::memcpy(&f, &old, 4);
      return f;
    }
  }
}
int atomic_max(int* p, int v) {
  return atomic_update(p, [v](int o) { return o > v ? o : v; });
}
int atomic_min(int* p, int v) {
  return atomic_update(p, [v](int o) { return o < v ? o : v; });
}
int atomic_exch(int* p, int v) {
  return atomic_update(p, [v](int) { return v; });
}

size_t max_dynamic_smem_attribute(const void* kernel);

// The launch itself (after the runtime API has decided it runs now rather than into a graph).
void execute_launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, KernelBody body, void* context) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0 || threads > 1024 || block.z > 64 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 0x7fffffffu) {
    record_launch_error(9, "invalid launch configuration of " + kernel_name(kernel) + ": grid (" + std::to_string(grid.x) + "," +
                               std::to_string(grid.y) + "," + std::to_string(grid.z) + "), block (" +
                               std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                               std::to_string(block.z) + ")");
    return;
  }
  const size_t allowed = std::max<size_t>(48 << 10, max_dynamic_smem_attribute(kernel));
  if (dynamic_smem > allowed) {
    record_launch_error(9, kernel_name(kernel) + ": " + std::to_string(dynamic_smem) + " bytes of dynamic shared memory exceed " +
                               std::to_string(allowed) +
                               " (above 48 KiB a kernel needs cudaFuncAttributeMaxDynamicSharedMemorySize)");
    return;
  }
  Launch launch{kernel, "", grid, block, dynamic_smem, allowed, body, context, {}, {}};
  const int64_t ctas = int64_t(grid.x) * grid.y * grid.z;
  auto run_one = [&](int64_t i) {
    {
      std::lock_guard<std::mutex> lock(g_launch_mu);
      if (!launch.error.empty()) return;  // stop at the first error, like a faulting GPU
    }
    const uint3 b{unsigned(i % grid.x), unsigned((i / grid.x) % grid.y), unsigned(i / (int64_t(grid.x) * grid.y))};
    run_cta(launch, b);
  };
  static std::mutex serial;
  std::lock_guard<std::mutex> one_at_a_time(serial);
  if (ctas == 1 || simt_threads() <= 1) {
    for (int64_t i = 0; i < ctas; ++i) run_one(i);
  } else {
    pool().run(ctas, run_one);
  }
  if (!launch.error.empty()) record_launch_error(719, "kernel " + kernel_name(kernel) + ": " + launch.error);
}

}  // namespace simt
