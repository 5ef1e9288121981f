// Shared memory of a CTA: a guarded arena per OS thread in which each __shared__ object (and the
// dynamic shared memory) gets its own range between unaddressable red zones, filled with 0xff
// (NaN in every float type) at the start of each CTA. Every load and store of the kernel
// translation units reaches shared_access(): they are compiled with -fsanitize=thread, whose
// instrumentation calls the __tsan_* hooks defined below (no TSan runtime is linked; these hooks
// are the whole runtime). The checks: out-of-bounds (a red zone or past the last object), reads of
// bytes never written, and races: two threads touching a byte between the same pair of barriers,
// one of them writing, with no __syncwarp ordering them when they share a warp.
#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <iterator>
#include <memory>
#include <sstream>

#include "internal.h"

namespace simt {

namespace {
// addr2line's "function\nfile:line" for a code address of a harness module.
std::pair<std::string, std::string> symbolize(const void* pc) {
  Dl_info info{};
  if (!dladdr(pc, &info) || !info.dli_fname) return {"?", "?"};
  const uintptr_t offset = uintptr_t(pc) - uintptr_t(info.dli_fbase);
  std::ostringstream cmd;
  cmd << "addr2line -Cfi -e '" << info.dli_fname << "' 0x" << std::hex << offset << " 2>/dev/null";
  std::string out;
  if (FILE* f = popen(cmd.str().c_str(), "r")) {
    char buf[512];
    while (fgets(buf, sizeof(buf), f)) out += buf;
    pclose(f);
  }
  std::istringstream lines(out);  // innermost inlined frame first
  std::string fn, loc;
  std::getline(lines, fn);
  std::getline(lines, loc);
  const size_t cut = loc.find(" (discriminator");
  if (cut != std::string::npos) loc.resize(cut);
  return {fn.empty() ? "?" : fn, loc.empty() ? "?" : loc};
}
}  // namespace

std::string code_location(const void* pc) {
  if (!pc) return "a warp-wide matrix operation (wmma, ldmatrix)";
  // A return address points after the call: look one byte back.
  auto [fn, loc] = symbolize(static_cast<const char*>(pc) - 1);
  const size_t slash = loc.rfind('/');
  if (slash != std::string::npos) {
    const size_t prev = loc.rfind('/', slash - 1);
    loc = loc.substr(prev == std::string::npos ? 0 : prev + 1);
  }
  return loc + " (" + fn + ")";
}

std::string function_at(const void* pc) { return symbolize(pc).first; }

namespace {

constexpr size_t kRedZone = 64;
constexpr size_t kArenaBytes = 512 << 10;  // > the 227 KiB a block may use, plus red zones
constexpr size_t kPage = 4096;
constexpr uint16_t kCollective = 0x8000;   // tid bit: an access of a whole warp (wmma)

struct ArenaMemory {
  char* base = nullptr;
  ArenaMemory() {
    void* p = mmap(nullptr, kArenaBytes + 2 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base = static_cast<char*>(p) + kPage;
    mprotect(p, kPage, PROT_NONE);
    mprotect(base + kArenaBytes, kPage, PROT_NONE);
  }
  ~ArenaMemory() { munmap(base - kPage, kArenaBytes + 2 * kPage); }
};
thread_local std::unique_ptr<ArenaMemory> t_arena;

// The object holding address a, or the nearest one (for out-of-bounds reports).
std::string describe_address(const Cta& c, uintptr_t a) {
  const SharedObject* best = nullptr;
  size_t distance = SIZE_MAX;
  for (const SharedObject& o : c.objects) {
    if (a >= o.begin && a < o.end) {
      best = &o;
      distance = 0;
      break;
    }
    const size_t d = a >= o.end ? a - o.end : o.begin - a;
    if (d < distance) {
      distance = d;
      best = &o;
    }
  }
  std::ostringstream s;
  if (!best) {
    s << "shared offset " << (a - uintptr_t(c.arena));
    return s.str();
  }
  if (a >= best->begin && a < best->end) s << "`" << best->name << "` + " << (a - best->begin);
  else if (a >= best->end) s << "byte " << distance << " past the end of `" << best->name << "`";
  else s << "byte " << distance << " before `" << best->name << "`";
  s << " (declared at " << site(best->file, best->line) << ", " << (best->end - best->begin) << " bytes)";
  return s.str();
}

std::string who(const Cta& c, uint16_t tid) {
  if (tid & kCollective) return "warp " + std::to_string(tid & ~kCollective) + " (wmma)";
  return where(c, (*c.fibers)[tid]);
}

// Whether an earlier access (tid, bar, ctr) is ordered before one by `now` in the current epoch.
bool ordered(const Cta& c, uint16_t tid, uint32_t bar, uint32_t ctr, uint16_t now) {
  if (bar != c.bar_gen || tid == now) return true;
  const int w_then = tid & kCollective ? tid & ~kCollective : tid / 32;
  const int w_now = now & kCollective ? now & ~kCollective : now / 32;
  if (w_then != w_now) return false;
  const Warp& w = c.warps[size_t(w_now)];
  if (w.full_sync > ctr) return true;
  if ((tid | now) & kCollective) return false;
  return w.pair_sync[tid % 32][now % 32] > ctr;
}

[[noreturn]] void report(const Cta& c, const std::string& what, uintptr_t a, const void* pc) {
  fail(what + " of " + describe_address(c, a) + " at " + code_location(pc));
}

}  // namespace

void shared_begin_cta(Cta& c) {
  if (!t_arena) t_arena = std::make_unique<ArenaMemory>();
  c.arena = t_arena->base;
  c.arena_bytes = kArenaBytes;
  c.arena_used = kRedZone;
  c.objects.clear();
  if (c.shadow->size() < kArenaBytes) c.shadow->resize(kArenaBytes);
  c.dynamic_smem = nullptr;
  if (c.launch->dynamic_smem) c.dynamic_smem = static_cast<char*>(shared_object(&c.launch->dynamic_smem,
                                                 c.launch->dynamic_smem, 128, "dynamic shared memory", nullptr, 0));
}

void* shared_object(const void* site_key, size_t bytes, size_t align, const char* name, const char* file, int line) {
  Cta* c = t_cta;
  for (const SharedObject& o : c->objects)
    if (o.site == site_key) return reinterpret_cast<void*>(o.begin);
  align = std::max<size_t>(align, 16);
  const size_t begin = (c->arena_used + align - 1) / align * align;
  const size_t end = begin + bytes;
  size_t total = 0;
  for (const SharedObject& o : c->objects) total += o.end - o.begin;
  if (total + bytes > max_shared_per_block() || end + kRedZone > c->arena_bytes)
    fail(std::string("too much shared memory: `") + name + "` (" + std::to_string(bytes) + " bytes) brings the block to " +
         std::to_string(total + bytes) + " bytes, above the " + std::to_string(max_shared_per_block()) +
         " a block may use");
  // Red zone before the object (from the previous end), the object, poisoned contents.
  for (size_t i = c->arena_used; i < begin; ++i) (*c->shadow)[i] = ShadowByte{};
  for (size_t i = begin; i < end; ++i) {
    ShadowByte& s = (*c->shadow)[i];
    s = ShadowByte{};
    s.flags = kAddressable;
  }
  for (size_t i = end; i < end + kRedZone; ++i) (*c->shadow)[i] = ShadowByte{};
  std::memset(c->arena + begin, 0xff, bytes);
  c->arena_used = end + kRedZone;
  c->objects.push_back(SharedObject{site_key, uintptr_t(c->arena + begin), uintptr_t(c->arena + end), name, file, line});
  return c->arena + begin;
}

void* dynamic_shared(size_t align, const char* name, const char* file, int line) {
  Cta* c = t_cta;
  if (!c->dynamic_smem)
    fail(std::string("`") + name + "` (" + site(file, line) +
         ") uses dynamic shared memory, but the launch gave none (its smem argument is 0)");
  if (reinterpret_cast<uintptr_t>(c->dynamic_smem) % align)
    fail(std::string("dynamic shared memory is not aligned to ") + std::to_string(align));
  return c->dynamic_smem;
}

void shared_access(const void* p, size_t bytes, bool write, bool atomic, bool collective, const void* pc) {
  Cta& c = *t_cta;
  if (c.failed) return;
  const Fiber& f = *t_fiber;
  const uint16_t me = collective ? uint16_t(kCollective | f.warp) : uint16_t(f.tid);
  const uint32_t ctr = c.warps[size_t(f.warp)].sync_counter;
  const uintptr_t a0 = uintptr_t(p);
  const size_t off0 = a0 - uintptr_t(c.arena);
  if (off0 + bytes > c.arena_used)
    report(c, std::string("out-of-bounds shared-memory ") + (write ? "write" : "read") + " by " + who(c, me), a0, pc);
  for (size_t i = 0; i < bytes; ++i) {
    ShadowByte& s = (*c.shadow)[off0 + i];
    const uintptr_t a = a0 + i;
    if (!(s.flags & kAddressable))
      report(c, std::string("out-of-bounds shared-memory ") + (write ? "write" : "read") + " by " + who(c, me), a, pc);
    if (write) {
      if ((s.flags & kHasWrite) && !(atomic && (s.flags & kAtomicWrite)) && !ordered(c, s.w_tid, s.w_bar, s.w_ctr, me))
        report(c, "shared-memory race: " + who(c, me) + " writes after an unsynchronized write by " + who(c, s.w_tid),
               a, pc);
      if ((s.flags & kHasRead) && !ordered(c, s.r_tid, s.r_bar, s.r_ctr, me))
        report(c, "shared-memory race: " + who(c, me) + " writes after an unsynchronized read by " + who(c, s.r_tid), a,
               pc);
      if ((s.flags & kHasRead2) && !ordered(c, s.r2_tid, s.r2_bar, s.r2_ctr, me))
        report(c, "shared-memory race: " + who(c, me) + " writes after an unsynchronized read by " + who(c, s.r2_tid),
               a, pc);
      s.w_tid = me;
      s.w_bar = c.bar_gen;
      s.w_ctr = ctr;
      s.flags = uint8_t((s.flags & ~(kHasRead | kHasRead2 | kAtomicWrite | kInFlight)) | kHasWrite | kWritten |
                        (atomic ? kAtomicWrite : 0));
    } else {
      if (s.flags & kInFlight)
        report(c, "read by " + who(c, me) + " of shared memory whose cp.async has not landed (no cp.async.wait_group " +
                      "retired its group, or no barrier followed the wait)", a, pc);
      if (!(s.flags & kWritten))
        report(c, "read of uninitialized shared memory by " + who(c, me), a, pc);
      if ((s.flags & kHasWrite) && !ordered(c, s.w_tid, s.w_bar, s.w_ctr, me))
        report(c, "shared-memory race: " + who(c, me) + " reads what " + who(c, s.w_tid) +
                      " wrote without a barrier between them", a, pc);
      // Keep up to two readers of the current epoch: the latest, and another thread's.
      const bool r1_live = (s.flags & kHasRead) && s.r_bar == c.bar_gen;
      if (!r1_live || s.r_tid == me) {
        s.r_tid = me;
        s.r_bar = c.bar_gen;
        s.r_ctr = ctr;
        s.flags |= kHasRead;
      } else {
        s.r2_tid = me;
        s.r2_bar = c.bar_gen;
        s.r2_ctr = ctr;
        s.flags |= kHasRead2;
      }
    }
  }
}

void shared_in_flight(const void* p, size_t bytes, const void* pc) {
  shared_access(p, bytes, true, false, false, pc);  // the copy may land any time from now: a write
  const size_t off0 = uintptr_t(p) - uintptr_t(t_cta->arena);
  for (size_t i = 0; i < bytes; ++i) (*t_cta->shadow)[off0 + i].flags |= kInFlight;
}

// 64-byte lines known to hold no red zone, per OS thread (direct-mapped), so that the common global
// access costs a compare; flushed whenever the red zones change.
constexpr int kLineBits = 6, kCleanLines = 1024;
struct CleanLines {
  uint64_t generation = 0;
  uintptr_t line[kCleanLines];
};
thread_local CleanLines t_clean;

void global_access(const void* p, size_t bytes, bool write, const void* pc) {
  Cta& c = *t_cta;
  if (c.failed || bytes == 0) return;
  const uintptr_t a = uintptr_t(p), first = a >> kLineBits, last = (a + bytes - 1) >> kLineBits;
  const uint64_t generation = red_zone_generation();
  if (t_clean.generation != generation) {
    std::fill(std::begin(t_clean.line), std::end(t_clean.line), ~uintptr_t(0));
    t_clean.generation = generation;
  }
  if (first == last && t_clean.line[first % kCleanLines] == first) return;
  uintptr_t zone;
  size_t zone_bytes;
  if (find_red_zone(a, bytes, &zone, &zone_bytes)) {
    std::ostringstream s;
    s << "out-of-bounds global-memory " << (write ? "write" : "read") << " by " << who(c, uint16_t(t_fiber->tid))
      << ": " << bytes << " byte(s) at 0x" << std::hex << a << std::dec << ", inside a " << zone_bytes
      << "-byte red zone next to an allocation (" << (a - zone) << " byte(s) into it) at " << code_location(pc);
    fail(s.str());
  }
  for (uintptr_t line = first; line <= last; ++line)
    if (!find_red_zone(line << kLineBits, size_t(1) << kLineBits, &zone, &zone_bytes))
      t_clean.line[line % kCleanLines] = line;
}

}  // namespace simt

// The TSan instrumentation ABI, implemented as the harness's access hook.
namespace {
inline void hook(const void* p, size_t n, bool write, const void* pc) {
  simt::Cta* c = simt::t_cta;
  if (__builtin_expect(c == nullptr, 1)) return;
  if (uintptr_t(p) - uintptr_t(c->arena) >= c->arena_bytes) return simt::global_access(p, n, write, pc);
  simt::shared_access(p, n, write, false, false, pc);
}
}  // namespace

#define SIMT_ACCESS_HOOKS(n)                                                                            \
  extern "C" void __tsan_read##n(void* p) { hook(p, n, false, __builtin_return_address(0)); }           \
  extern "C" void __tsan_write##n(void* p) { hook(p, n, true, __builtin_return_address(0)); }           \
  extern "C" void __tsan_unaligned_read##n(void* p) { hook(p, n, false, __builtin_return_address(0)); } \
  extern "C" void __tsan_unaligned_write##n(void* p) { hook(p, n, true, __builtin_return_address(0)); } \
  extern "C" void __tsan_volatile_read##n(void* p) { hook(p, n, false, __builtin_return_address(0)); }  \
  extern "C" void __tsan_volatile_write##n(void* p) { hook(p, n, true, __builtin_return_address(0)); }
SIMT_ACCESS_HOOKS(1)
SIMT_ACCESS_HOOKS(2)
SIMT_ACCESS_HOOKS(4)
SIMT_ACCESS_HOOKS(8)
SIMT_ACCESS_HOOKS(16)
#undef SIMT_ACCESS_HOOKS

extern "C" void __tsan_read_range(void* p, unsigned long n) { hook(p, n, false, __builtin_return_address(0)); }
extern "C" void __tsan_write_range(void* p, unsigned long n) { hook(p, n, true, __builtin_return_address(0)); }
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// Host code in the kernel translation units (launchers, static locals) uses atomics: real ones.
#define SIMT_ATOMIC_HOOKS(bits, T)                                                                                    \
  extern "C" T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  extern "C" void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                                             \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                               \
  }                                                                                                                   \
  extern "C" T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                                            \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                                \
  }                                                                                                                   \
  extern "C" T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) {                                            \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                                \
  }                                                                                                                   \
  extern "C" T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) {                                            \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                                \
  }                                                                                                                   \
  extern "C" T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) {                                             \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                                 \
  }                                                                                                                   \
  extern "C" T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) {                                            \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                                \
  }                                                                                                                   \
  extern "C" T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) {                                           \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                               \
  }                                                                                                                   \
  extern "C" int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                 \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                          \
  }                                                                                                                   \
  extern "C" int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                   \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                           \
  }                                                                                                                   \
  extern "C" T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                       \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                                \
    return c;                                                                                                         \
  }
SIMT_ATOMIC_HOOKS(8, unsigned char)
SIMT_ATOMIC_HOOKS(16, unsigned short)
SIMT_ATOMIC_HOOKS(32, unsigned int)
SIMT_ATOMIC_HOOKS(64, unsigned long long)
#undef SIMT_ATOMIC_HOOKS
