// The one header between kvcore's kernels and the machine: shared-memory declarations, kernel
// launches and (as kernels adopt them) every PTX instruction wrapper. Under nvcc these are the real
// CUDA constructs; in the SIMT harness build (KVCORE_SIMT, tests/simt) the harness supplies an
// emulation of each with the same meaning, so CI executes the kernel sources on the CPU.
#pragma once

#if defined(KVCORE_SIMT)
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
}  // namespace kvcore
#else
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

}  // namespace kvcore
#endif
