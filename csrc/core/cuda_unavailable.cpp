// CPU-only builds: the CUDA entry points exist and raise KVCoreError with cuda_status()'s reason.
#include "kvcore/build_config.h"
#if !KVCORE_WITH_CUDA

#include "kvcore/attention.h"
#include "kvcore/kv_cache.h"

namespace kvcore {

void append_kv_cuda(const AppendKVArgs&, StreamHandle) { require_cuda("append_kv"); }
void copy_pages_cuda(const CopyPagesArgs&, StreamHandle) { require_cuda("copy_pages"); }
void attention_cuda(const AttentionArgs&, StreamHandle) { require_cuda("attention"); }
void shared_prefix_attention_cuda(const SharedPrefixArgs&, StreamHandle) { require_cuda("shared_prefix attention"); }
void merge_states_cuda(const MergeStatesArgs&, StreamHandle) { require_cuda("merge_states"); }

}  // namespace kvcore

#endif  // !KVCORE_WITH_CUDA
