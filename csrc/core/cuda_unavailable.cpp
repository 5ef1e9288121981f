// CPU-only builds: the CUDA entry points exist and raise KVCoreError with cuda_status()'s reason.
#include "kvcore/build_config.h"
#if !KVCORE_WITH_CUDA

#include "kvcore/attention.h"
#include "kvcore/kv_cache.h"
#include "kvcore/quant.h"

namespace kvcore {

void append_kv_cuda(const AppendKVArgs&, StreamHandle) { require_cuda("append_kv"); }
void copy_pages_cuda(const CopyPagesArgs&, StreamHandle) { require_cuda("copy_pages"); }
void attention_cuda(const AttentionArgs&, StreamHandle) { require_cuda("attention"); }
void shared_prefix_attention_cuda(const SharedPrefixArgs&, StreamHandle) { require_cuda("shared_prefix attention"); }
void merge_states_cuda(const MergeStatesArgs&, StreamHandle) { require_cuda("merge_states"); }
void hadamard_transform_cuda(const HadamardArgs&, StreamHandle) { require_cuda("hadamard_transform"); }
void append_kv_int4_cuda(const AppendKVInt4Args&, StreamHandle) { require_cuda("append_kv_int4"); }
void dequantize_kv_int4_cuda(const DequantizeInt4Args&, StreamHandle) { require_cuda("dequantize_kv_int4"); }

}  // namespace kvcore

#endif  // !KVCORE_WITH_CUDA
