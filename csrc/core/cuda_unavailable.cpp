// CPU-only builds: the CUDA entry points exist and raise KVCoreError with cuda_status()'s reason.
#include "kvcore/build_config.h"
#if !KVCORE_WITH_CUDA

#include "kvcore/kv_cache.h"

namespace kvcore {

void append_kv_cuda(const AppendKVArgs&, StreamHandle) { require_cuda("append_kv"); }
void copy_pages_cuda(const CopyPagesArgs&, StreamHandle) { require_cuda("copy_pages"); }

}  // namespace kvcore

#endif  // !KVCORE_WITH_CUDA
