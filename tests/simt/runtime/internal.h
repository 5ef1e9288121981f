// The SIMT runtime's internal state: fibers (one per CUDA thread), CTAs, warps, and the shared
// arena with its shadow. Not seen by kernels (they see simt/simt.h only).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "simt/simt.h"

namespace simt {

// Switches stacks: saves the running context's stack pointer to *save and resumes `next`.
extern "C" void simt_switch_context(void** save, void* next);

enum class FiberState : uint8_t { Runnable, AtBarrier, AtWarpOp, Exited };
enum class WarpOpKind : uint8_t { None, Syncwarp, Shfl, Ballot, Wmma, Ldmatrix, Mma };

// A lane's pending warp collective.
struct WarpOp {
  WarpOpKind kind = WarpOpKind::None;
  unsigned mask = 0;
  const char* file = nullptr;
  int line = 0;
  uint64_t value = 0;   // shfl: the lane's value; ballot: predicate
  ShflMode mode = ShflMode::Idx;
  int arg = 0;          // shfl: source lane / delta / lane mask
  int width = 32;
  uint64_t result = 0;
  const struct WmmaCall* wmma = nullptr;
  const void* call = nullptr;  // ldmatrix / mma: the lane's operands (ptx.cpp)
};

// A cp.async copy issued and not yet landed.
struct AsyncCopy {
  char* dst;
  const char* src;
  int bytes, src_bytes;
  uint32_t group;  // the commit group it belongs to (the fiber's commit count when issued)
  const void* pc;  // where it was issued, for reports
};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;  // lowest usable byte
  size_t stack_bytes = 0;
  Coords coords{};
  int tid = 0, warp = 0, lane = 0;
  FiberState state = FiberState::Runnable;
  const char* file = nullptr;  // where it waits
  int line = 0;
  WarpOp op;
  std::vector<AsyncCopy> async_copies;
  uint32_t async_commits = 0;
};

struct Warp {
  unsigned arrived = 0;        // lanes waiting at a warp op
  unsigned exited = 0;
  unsigned lanes = 0;          // lanes that exist (a partial last warp has fewer than 32)
  uint32_t sync_counter = 0;   // completed __syncwarp events
  uint32_t full_sync = 0;      // the last event that included every lane
  uint32_t pair_sync[32][32];  // the last event that included both lanes
};

// Per-byte race and bounds state of the shared arena.
struct ShadowByte {
  uint32_t w_bar, w_ctr, r_bar, r_ctr, r2_bar, r2_ctr;
  uint16_t w_tid, r_tid, r2_tid;
  uint8_t flags;
};
enum : uint8_t { kAddressable = 1, kWritten = 2, kHasWrite = 4, kHasRead = 8, kHasRead2 = 16, kAtomicWrite = 32, kInFlight = 64 };

struct SharedObject {
  const void* site;
  uintptr_t begin, end;
  const char* name;
  const char* file;
  int line;
};

struct Launch;

struct Cta {
  Launch* launch = nullptr;
  uint3 block_idx{};
  std::vector<Fiber>* fibers = nullptr;
  int threads = 0;
  std::vector<Warp> warps;
  int at_barrier = 0;
  int exited = 0;
  uint32_t bar_gen = 0;
  bool failed = false;
  void* scheduler_sp = nullptr;
  // Shared memory.
  char* arena = nullptr;
  size_t arena_bytes = 0;
  size_t arena_used = 0;
  std::vector<ShadowByte>* shadow = nullptr;
  std::vector<SharedObject> objects;
  char* dynamic_smem = nullptr;
};

struct Launch {
  const void* kernel;
  std::string kernel_name;
  dim3 grid, block;
  size_t dynamic_smem;
  size_t max_dynamic_smem;
  KernelBody body;
  void* context;
  std::string error;  // first error of the launch
  std::vector<std::string> warnings;
};

extern thread_local Cta* t_cta;
extern thread_local Fiber* t_fiber;

// Reports an error in the running CTA and abandons it (never returns into the fiber).
[[noreturn]] void fail(const std::string& what);
// "block (x,y,z) thread (x,y,z)" of a fiber.
std::string where(const Cta& cta, const Fiber& f);
std::string site(const char* file, int line);
// "file:line (function)" of a code address, from the harness modules' debug info.
std::string code_location(const void* pc);
// The function containing a code address.
std::string function_at(const void* pc);

// Warp collectives of ptx.cpp: the running lane arrives at `kind` with its operands `call`;
// execute_* run when the whole warp has arrived.
void arrive_collective(WarpOpKind kind, const void* call, const char* file, int line);
void execute_ldmatrix(Cta& c, int warp);
void execute_mma(Cta& c, int warp);
// Lands the fiber's cp.async copies of groups older than its newest `keep` committed ones.
void land_async_copies(Fiber& f, uint32_t keep, bool include_uncommitted);

// Shared memory (shared_memory.cpp).
void shared_begin_cta(Cta& cta);
// Records an access of the current fiber (or, collective, of its whole warp) and checks it.
void shared_access(const void* p, size_t bytes, bool write, bool atomic, bool collective, const void* pc);
// A cp.async destination from issue until it lands: written (for the race checks), unreadable.
void shared_in_flight(const void* p, size_t bytes, const void* pc);
// A kernel's access outside shared memory: fails the CTA when it touches a global red zone.
void global_access(const void* p, size_t bytes, bool write, const void* pc);

// The red-zone registry (cuda_api.cpp). The generation changes whenever a zone comes or goes.
uint64_t red_zone_generation();
// The red zone overlapping [a, a + n) (its start and size), if any.
bool find_red_zone(uintptr_t a, size_t n, uintptr_t* zone, size_t* zone_bytes);
inline bool in_shared(const Cta* c, const void* p) {
  return c && uintptr_t(p) - uintptr_t(c->arena) < c->arena_bytes;
}

// Errors that surface through the runtime API (cuda_api.cpp).
void record_launch_error(int code, const std::string& message);
size_t max_shared_per_block();
int simt_threads();

}  // namespace simt
