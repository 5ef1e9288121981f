// The SIMT harness's device side: what nvcc gives a kernel (qualifiers, thread coordinates,
// barriers, warp intrinsics, atomics, math intrinsics, launches), for kernel sources compiled as
// host C++. Each CUDA thread runs as a fiber; the warp and block operations are collectives of the
// fibers that the runtime (tests/simt/runtime) schedules, checks and executes. Force-included into
// every kernel translation unit of the harness build, the way nvcc includes cuda_runtime.h.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "simt/types.h"

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// __shared__ is deliberately left undefined: kernels declare shared memory with KVCORE_SHARED /
// KVCORE_DYNAMIC_SHARED (cuda/common/device.cuh), which the harness bounds-checks and race-checks.

typedef struct CUstream_st* cudaStream_t;

namespace simt {

// The coordinates of the running CUDA thread (the current fiber).
struct Coords {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local const Coords* t_coords;

// Block and warp collectives (runtime/executor.cpp). `file`/`line` name the call site in reports.
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
enum class ShflMode { Idx, Up, Down, Xor };
uint64_t shfl(unsigned mask, uint64_t bits, ShflMode mode, int arg, int width, const char* file, int line);
unsigned vote_ballot(unsigned mask, bool predicate, const char* file, int line);
void threadfence();
[[noreturn]] void trap(const char* what, const char* file, int line);

// Shared memory of the current CTA (runtime/shared_memory.cpp): one object per declaration site
// (`site` is a static local of the declaring function), and the launch's dynamic shared memory.
void* shared_object(const void* site, size_t bytes, size_t align, const char* name, const char* file, int line);
void* dynamic_shared(size_t align, const char* name, const char* file, int line);

// Atomics on global or shared memory (shared ones are recorded as atomic accesses).
int atomic_cas(int* p, int compare, int value);
unsigned atomic_cas(unsigned* p, unsigned compare, unsigned value);
unsigned long long atomic_cas(unsigned long long* p, unsigned long long compare, unsigned long long value);
int atomic_add(int* p, int v);
unsigned atomic_add(unsigned* p, unsigned v);
unsigned long long atomic_add(unsigned long long* p, unsigned long long v);
float atomic_add(float* p, float v);
int atomic_max(int* p, int v);
int atomic_min(int* p, int v);
int atomic_exch(int* p, int v);

// Runs `body` once per CUDA thread of the grid (runtime/executor.cpp).
// Runs now, or at replay when `stream` is being captured (the context then lives in the graph).
using KernelBody = void (*)(void* context);
void run_launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
                KernelBody body, std::shared_ptr<void> context);

// What a <<<grid, block, smem, stream>>> launch does with its arguments: converts them to the
// kernel's parameter types once (the parameter buffer) and calls the kernel with copies of them in
// every thread.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  using Frame = std::tuple<void (*)(Params...), std::decay_t<Params>...>;
  auto frame = std::make_shared<Frame>(kernel, std::forward<Args>(args)...);
  run_launch(reinterpret_cast<const void*>(kernel), grid, block, smem, stream,
             [](void* f) {
               std::apply([](auto fn, const auto&... params) { fn(params...); }, *static_cast<const Frame*>(f));
             },
             frame);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move 32- or 64-bit values");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace simt

#define threadIdx (::simt::t_coords->thread_idx)
#define blockIdx (::simt::t_coords->block_idx)
#define blockDim (::simt::t_coords->block_dim)
#define gridDim (::simt::t_coords->grid_dim)
constexpr int warpSize = 32;

#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::syncwarp(mask, file, line);
}
inline void __threadfence() { ::simt::threadfence(); }
inline void __threadfence_block() { ::simt::threadfence(); }
#define __trap() ::simt::trap("__trap()", __FILE__, __LINE__)

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return simt::from_bits<T>(simt::shfl(mask, simt::to_bits(v), simt::ShflMode::Idx, src_lane, width, file, line));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return simt::from_bits<T>(simt::shfl(mask, simt::to_bits(v), simt::ShflMode::Up, int(delta), width, file, line));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return simt::from_bits<T>(simt::shfl(mask, simt::to_bits(v), simt::ShflMode::Down, int(delta), width, file, line));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return simt::from_bits<T>(simt::shfl(mask, simt::to_bits(v), simt::ShflMode::Xor, lane_mask, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return simt::vote_ballot(mask, predicate != 0, file, line);
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::vote_ballot(mask, predicate != 0, file, line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return (simt::vote_ballot(mask, predicate != 0, file, line) & mask) == mask;
}

inline int atomicCAS(int* p, int c, int v) { return simt::atomic_cas(p, c, v); }
inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) { return simt::atomic_cas(p, c, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) {
  return simt::atomic_cas(p, c, v);
}
inline int atomicAdd(int* p, int v) { return simt::atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return simt::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return simt::atomic_add(p, v); }
inline float atomicAdd(float* p, float v) { return simt::atomic_add(p, v); }
inline int atomicMax(int* p, int v) { return simt::atomic_max(p, v); }
inline int atomicMin(int* p, int v) { return simt::atomic_min(p, v); }
inline int atomicExch(int* p, int v) { return simt::atomic_exch(p, v); }

// Integer and float min/max as device code has them unqualified.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// Math intrinsics. The fast approximations (__expf, __logf) are computed exactly here; a GPU's
// ex2.approx differs by a few ulp, which the tests' tolerances already allow. The _rn operations are
// single IEEE operations (kernel TUs are compiled with -ffp-contract=off, so nothing fuses them).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __uint_as_float(unsigned u) { return simt::from_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return unsigned(simt::to_bits(f)); }
inline float __int_as_float(int i) { return simt::from_bits<float>(uint32_t(i)); }
inline int __float_as_int(float f) { return int(uint32_t(simt::to_bits(f))); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

#include "cuda_bf16.h"
#include "cuda_fp16.h"
