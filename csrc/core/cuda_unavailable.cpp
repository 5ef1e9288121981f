// CPU-only builds: the CUDA entry points exist and raise KVCoreError with cuda_status()'s reason.
#include "kvcore/build_config.h"
#if !KVCORE_WITH_CUDA

#include "kvcore/attention.h"
#include "kvcore/comm.h"
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

namespace comm {
void reduce_in_order_cuda(const std::vector<const void*>&, void*, int64_t, DType, ReduceOp, StreamHandle) {
  require_cuda("comm_reduce_cuda");
}
// The constructor raises, so no other member ever runs.
NcclComm::NcclComm(const std::string&, int, int, int, double) { require_cuda("NcclComm"); }
NcclComm::~NcclComm() = default;
void NcclComm::exchange(const std::vector<std::optional<NcclBuffer>>&, const std::vector<std::optional<NcclBuffer>>&,
                        StreamHandle) {}
std::string NcclComm::async_error() { return ""; }
void NcclComm::abort() {}
}  // namespace comm

namespace cuda {
int get_device() { require_cuda("cuda_get_device"); return 0; }
void set_device(int) { require_cuda("cuda_set_device"); }
StreamHandle stream_create(int) { require_cuda("cuda_stream_create"); return 0; }
void stream_destroy(StreamHandle) { require_cuda("cuda_stream_destroy"); }
void stream_synchronize(StreamHandle) { require_cuda("cuda_stream_synchronize"); }
bool stream_is_capturing(StreamHandle) { require_cuda("cuda_stream_is_capturing"); return false; }
EventHandle event_create(int) { require_cuda("cuda_event_create"); return 0; }
void event_destroy(EventHandle) { require_cuda("cuda_event_destroy"); }
void event_record(EventHandle, StreamHandle) { require_cuda("cuda_event_record"); }
void stream_wait_event(StreamHandle, EventHandle) { require_cuda("cuda_stream_wait_event"); }
bool event_query(EventHandle) { require_cuda("cuda_event_query"); return false; }
void memcpy_async(std::uintptr_t, std::uintptr_t, std::size_t, StreamHandle) { require_cuda("cuda_memcpy_async"); }
std::uintptr_t device_malloc(int, std::size_t) { require_cuda("cuda_malloc"); return 0; }
void device_free(std::uintptr_t) { require_cuda("cuda_free"); }
bool host_register(std::uintptr_t, std::size_t) { require_cuda("cuda_host_register"); return false; }
void host_unregister(std::uintptr_t) { require_cuda("cuda_host_unregister"); }
}  // namespace cuda

}  // namespace kvcore

#endif  // !KVCORE_WITH_CUDA
