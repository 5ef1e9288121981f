// CUDA backend of the collectives' in-order reduction (csrc/comm/reduce.cpp is the reference):
// inputs combined in rank order, 16-bit floats accumulated in float and rounded once, explicit
// round-to-nearest adds so no FMA or reassociation can change a bit. Grid-stride over the widest
// vector every pointer's alignment allows.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/device.cuh"

#include "kvcore/comm.h"
#include "kvcore/cuda_utils.h"
#include "kvcore/detail/float16.h"

namespace kvcore::comm {
namespace {

// By value in the kernel's arguments: no device-side pointer table to allocate or keep alive.
struct ReduceInputs {
  const void* ptr[kMaxCudaReduceInputs];
  int count;
};

// How each dtype is stored, accumulated and rounded back (the same conversions as the CPU).
struct Fp32Codec {
  using Storage = float;
  using Acc = float;
  __device__ static Acc load(Storage v) { return v; }
  __device__ static Storage store(Acc a) { return a; }
};
struct Int32Codec {
  using Storage = int32_t;
  using Acc = int32_t;
  __device__ static Acc load(Storage v) { return v; }
  __device__ static Storage store(Acc a) { return a; }
};
struct Fp16Codec {
  using Storage = uint16_t;
  using Acc = float;
  __device__ static Acc load(Storage v) { return fp16_to_float(v); }
  __device__ static Storage store(Acc a) { return float_to_fp16(a); }
};
struct Bf16Codec {
  using Storage = uint16_t;
  using Acc = float;
  __device__ static Acc load(Storage v) { return bf16_to_float(v); }
  __device__ static Storage store(Acc a) { return float_to_bf16(a); }
};

template <bool kMax>
__device__ float combine(float a, float b) {
  if constexpr (kMax) return b > a ? b : a;
  else return __fadd_rn(a, b);  // never contracted into an FMA
}

template <bool kMax>
__device__ int32_t combine(int32_t a, int32_t b) {
  if constexpr (kMax) return b > a ? b : a;
  else return int32_t(uint32_t(a) + uint32_t(b));  // wraps like the CPU
}

template <typename Storage, int kVec>
struct alignas(sizeof(Storage) * kVec) Pack {
  Storage v[kVec];
};

// One pack of kVec elements at pack index i, reduced over all inputs in order.
template <typename Codec, bool kMax, int kVec>
__device__ void reduce_pack(const ReduceInputs& in, void* out, int64_t i) {
  using P = Pack<typename Codec::Storage, kVec>;
  const P first = static_cast<const P*>(in.ptr[0])[i];
  typename Codec::Acc acc[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) acc[v] = Codec::load(first.v[v]);
  for (int k = 1; k < in.count; ++k) {
    const P x = static_cast<const P*>(in.ptr[k])[i];
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] = combine<kMax>(acc[v], Codec::load(x.v[v]));
  }
  P r;
#pragma unroll
  for (int v = 0; v < kVec; ++v) r.v[v] = Codec::store(acc[v]);
  static_cast<P*>(out)[i] = r;
}

template <typename Codec, bool kMax, int kVec>
__global__ void reduce_kernel(ReduceInputs in, void* out, int64_t count) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = count / kVec;
  for (int64_t i = first; i < packs; i += stride) reduce_pack<Codec, kMax, kVec>(in, out, i);
  if constexpr (kVec > 1) {  // the last count % kVec elements, one at a time
    for (int64_t e = packs * kVec + first; e < count; e += stride) reduce_pack<Codec, kMax, 1>(in, out, e);
  }
}

// Elements per vector: 16 bytes when every pointer allows it, else the widest common alignment.
int vector_width(const ReduceInputs& in, const void* out, size_t elem_size) {
  uintptr_t bits = 16 | reinterpret_cast<uintptr_t>(out);
  for (int k = 0; k < in.count; ++k) bits |= reinterpret_cast<uintptr_t>(in.ptr[k]);
  const size_t align = size_t(bits & (~bits + 1));  // lowest set bit, at most 16
  return int(std::max(align, elem_size) / elem_size);
}

template <typename Codec, bool kMax>
void launch(const ReduceInputs& in, void* out, int64_t count, int device, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int kWidest = 16 / int(sizeof(typename Codec::Storage));
  const int vec = vector_width(in, out, sizeof(typename Codec::Storage));
  int sms = 0;
  KVCORE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t work = (count + vec - 1) / vec;
  const unsigned blocks = unsigned(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, int64_t(sms) * 8));
  switch (vec) {
    case 1: launch_kernel(reduce_kernel<Codec, kMax, 1>, blocks, kThreads, 0, stream, in, out, count); break;
    case 2: launch_kernel(reduce_kernel<Codec, kMax, 2>, blocks, kThreads, 0, stream, in, out, count); break;
    case 4: launch_kernel(reduce_kernel<Codec, kMax, 4>, blocks, kThreads, 0, stream, in, out, count); break;
    default:
      if constexpr (kWidest == 8) launch_kernel(reduce_kernel<Codec, kMax, 8>, blocks, kThreads, 0, stream, in, out, count);
      break;
  }
  KVCORE_CUDA_CHECK_LAUNCH();
}

template <typename Codec>
void launch_op(const ReduceInputs& in, void* out, int64_t count, ReduceOp op, int device, cudaStream_t stream) {
  if (op == ReduceOp::Max) launch<Codec, true>(in, out, count, device, stream);
  else launch<Codec, false>(in, out, count, device, stream);
}

// The GPU a pointer lives on; ValueError naming `what` for memory a kernel cannot read.
int device_of(const void* p, const char* what, int index = -1) {
  cudaPointerAttributes attr{};
  KVCORE_CUDA_CHECK(cudaPointerGetAttributes(&attr, p));
  const std::string name = index < 0 ? std::string(what) : std::string(what) + "[" + std::to_string(index) + "]";
  KVCORE_CHECK_VALUE(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, name,
                     ": expected a pointer to CUDA device memory, got ",
                     attr.type == cudaMemoryTypeHost ? "pinned host memory" : "host memory");
  return attr.device;
}

}  // namespace

void reduce_in_order_cuda(const std::vector<const void*>& inputs, void* out, int64_t count, DType dtype, ReduceOp op,
                          StreamHandle stream_handle) {
  require_cuda("comm_reduce_cuda");
  check_reduce_args(inputs.size(), count, dtype);
  KVCORE_CHECK_VALUE(inputs.size() <= size_t(kMaxCudaReduceInputs), "inputs: at most ", kMaxCudaReduceInputs,
                     " arrays (ranks) per CUDA reduction, got ", inputs.size());
  if (count == 0) return;
  KVCORE_CHECK_VALUE(out != nullptr, "out: null pointer");
  const int device = device_of(out, "out");
  ReduceInputs in{};
  in.count = int(inputs.size());
  for (size_t k = 0; k < inputs.size(); ++k) {
    KVCORE_CHECK_VALUE(inputs[k] != nullptr, "inputs[", k, "]: null pointer");
    KVCORE_CHECK_VALUE(device_of(inputs[k], "inputs", int(k)) == device, "inputs[", k,
                       "]: on another GPU than out (cuda:", device, ")");
    in.ptr[k] = inputs[k];
  }
  CudaDeviceGuard guard(device);
  cudaStream_t stream = to_cuda_stream(stream_handle);
  switch (dtype) {
    case DType::Float32: launch_op<Fp32Codec>(in, out, count, op, device, stream); break;
    case DType::Int32: launch_op<Int32Codec>(in, out, count, op, device, stream); break;
    case DType::Float16: launch_op<Fp16Codec>(in, out, count, op, device, stream); break;
    case DType::BFloat16: launch_op<Bf16Codec>(in, out, count, op, device, stream); break;
    default: break;
  }
}

}  // namespace kvcore::comm
