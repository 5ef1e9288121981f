// The one header between kvcore's kernels and the machine: shared-memory declarations, kernel
// launches and (as kernels adopt them) every PTX instruction wrapper. Under nvcc these are the real
// CUDA constructs; in the SIMT harness build (KVCORE_SIMT, tests/simt) the harness supplies an
// emulation of each with the same meaning, so CI executes the kernel sources on the CPU.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(KVCORE_SIMT)
#include "simt/ptx.h"
#include "simt/simt.h"

#define KVCORE_SHARED(type, name, dims)                                                                   \
  static const char kvcore_shared_site_##name = 0;                                                        \
  type(&name) dims = *static_cast<type(*) dims>(                                                          \
      ::simt::shared_object(&kvcore_shared_site_##name, sizeof(type dims), alignof(type), #name, __FILE__, __LINE__))
#define KVCORE_DYNAMIC_SHARED(type, name, align) \
  type* const name = static_cast<type*>(::simt::dynamic_shared(align, #name, __FILE__, __LINE__))

namespace kvcore {
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  ::simt::launch(kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

namespace ptx {
// The harness's emulation of each instruction (tests/simt/runtime/ptx.cpp); meanings as below.
template <int Bytes>
inline void cp_async(void* smem, const void* gmem, bool pred, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  ::simt::cp_async(smem, gmem, Bytes, pred ? Bytes : 0, file, line);
}
inline void cp_async_16(void* smem, const void* gmem, bool pred, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  cp_async<16>(smem, gmem, pred, file, line);
}
inline void cp_async_commit() { ::simt::cp_async_commit(); }
template <int N>
inline void cp_async_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::cp_async_wait(N, file, line);
}
template <int Count, bool Trans = false>
inline void ldmatrix(uint32_t (&r)[Count], const void* smem, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  ::simt::ldmatrix(r, Count, Trans, smem, file, line);
}
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 or bf16 inputs");
  ::simt::mma_m16n8k16(d, a, b, c, std::is_same_v<T, __half> ? ::simt::MmaType::F16 : ::simt::MmaType::BF16, file,
                       line);
}
template <unsigned Lut>
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r = 0;
  for (int i = 0; i < 32; ++i) r |= ((Lut >> (((a >> i) & 1u) << 2 | ((b >> i) & 1u) << 1 | ((c >> i) & 1u))) & 1u) << i;
  return r;
}
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  const uint64_t bytes = uint64_t(b) << 32 | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (selector >> (4 * i)) & 0xfu;
    uint32_t byte = uint32_t(bytes >> (8 * (sel & 7u))) & 0xffu;
    if (sel & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;  // sign replication
    r |= byte << (8 * i);
  }
  return r;
}
template <typename T>
inline uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 or bf16 pairs");
  return ::simt::fma2(a, b, c, std::is_same_v<T, __half> ? ::simt::MmaType::F16 : ::simt::MmaType::BF16);
}
inline float ex2(float x) { return exp2f(x); }  // ex2.approx: a few ulp on a GPU, within the tests' tolerances
}  // namespace ptx
}  // namespace kvcore
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <utility>

// A per-CTA shared-memory object: KVCORE_SHARED(float, s_m, [4][8]) is `__shared__ float s_m[4][8]`.
#define KVCORE_SHARED(type, name, dims) __shared__ type name dims
// The dynamic shared memory of a launch as `type name[]`, aligned to `align` bytes.
#define KVCORE_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]

namespace kvcore {

// kernel<<<grid, block, smem, stream>>>(args...) as a function (template arguments of the kernel
// may contain commas, which a macro cannot take).
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}

// PTX instructions the kernels use, one wrapper each; the harness emulates every one of them.
namespace ptx {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async.cg: 16 bytes global -> shared, bypassing L1; zero-filled when !pred (source not read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(pred ? 16 : 0));
}
// cp.async of 4, 8 (.ca: the only form for them, cached in L1) or 16 bytes (.cg); zero-filled when
// !pred.
template <int Bytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool pred) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (Bytes == 16)
    cp_async_16(smem, gmem, pred);
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared_address(smem)), "l"(gmem), "n"(Bytes),
                 "r"(pred ? Bytes : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix.m8n8.x{Count}[.trans].b16: lane l gives row l % 8 of matrix l / 8; r[j] is lane l's
// pair of matrix j (row l / 4, columns 2 (l % 4) + {0, 1}; transposed: column l / 4).
template <int Count, bool Trans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[Count], const void* smem) {
  static_assert(Count == 1 || Count == 2 || Count == 4, "x1, x2 or x4");
  const uint32_t a = shared_address(smem);
  if constexpr (Count == 4 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else if constexpr (Count == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else if constexpr (Count == 2 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  else if constexpr (Count == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  else if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
}

// d = a b + c, m16n8k16, A row-major and B column-major fragments of T (__half or __nv_bfloat16).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  if constexpr (std::is_same_v<T, __half>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                   "f"(c[3]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                   "f"(c[3]));
}

// Any three-input bitwise function, given by its truth table (0xF0 = a, 0xCC = b, 0xAA = c).
template <unsigned Lut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(Lut));
  return r;
}
// Byte permute: byte i of the result is byte selector[4i..4i+2] of {b, a} (bit 3: sign-replicate).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}
// d = a * b + c on packed pairs of T (__half: fma.rn.f16x2, __nv_bfloat16: fma.rn.bf16x2).
template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (std::is_same_v<T, __half>)
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  else
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace ptx

}  // namespace kvcore
#endif
