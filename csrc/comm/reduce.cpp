// Reductions in a fixed input order, the arithmetic every link path shares, so a result never
// depends on which link carried which slice.
#include <algorithm>
#include <cstring>

#include "kvcore/comm.h"
#include "kvcore/detail/float16.h"
#include "kvcore/error.h"
#include "kvcore/parallel.h"

namespace kvcore::comm {
namespace {

template <typename T>
T combine(T a, T b, ReduceOp op) {
  if (op == ReduceOp::Max) return b > a ? b : a;
  if constexpr (std::is_same_v<T, int32_t>)  // wrap like two's complement instead of overflow UB
    return int32_t(uint32_t(a) + uint32_t(b));
  else
    return a + b;
}

template <typename T>
void reduce_plain(const std::vector<const void*>& inputs, T* out, int64_t begin, int64_t end, ReduceOp op) {
  const T* first = static_cast<const T*>(inputs[0]);
  if (out != first) std::memmove(out + begin, first + begin, size_t(end - begin) * sizeof(T));
  for (size_t k = 1; k < inputs.size(); ++k) {
    const T* in = static_cast<const T*>(inputs[k]);
    for (int64_t i = begin; i < end; ++i) out[i] = combine(out[i], in[i], op);
  }
}

// 16-bit floats: accumulate in float in input order, round once.
template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
void reduce_half(const std::vector<const void*>& inputs, uint16_t* out, int64_t begin, int64_t end, ReduceOp op) {
  constexpr int64_t kBlock = 2048;
  float acc[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const auto* first = static_cast<const uint16_t*>(inputs[0]) + b;
    for (int64_t i = 0; i < n; ++i) acc[i] = ToFloat(first[i]);
    for (size_t k = 1; k < inputs.size(); ++k) {
      const auto* in = static_cast<const uint16_t*>(inputs[k]) + b;
      for (int64_t i = 0; i < n; ++i) acc[i] = combine(acc[i], ToFloat(in[i]), op);
    }
    for (int64_t i = 0; i < n; ++i) out[b + i] = FromFloat(acc[i]);
  }
}

}  // namespace

void check_reduce_args(size_t num_inputs, int64_t count, DType dtype) {
  KVCORE_CHECK_VALUE(num_inputs > 0, "inputs: expected at least one array");
  KVCORE_CHECK_VALUE(count >= 0, "count: expected >= 0, got ", count);
  KVCORE_CHECK_TYPE(dtype == DType::Float32 || dtype == DType::Float16 || dtype == DType::BFloat16 ||
                        dtype == DType::Int32,
                    "dtype: expected float32, float16, bfloat16 or int32, got ", dtype_name(dtype));
}

void reduce_in_order(const std::vector<const void*>& inputs, void* out, int64_t count, DType dtype, ReduceOp op) {
  check_reduce_args(inputs.size(), count, dtype);
  // Elements are independent, so threads change nothing about the arithmetic.
  parallel_for(count, 1 << 15, [&](int64_t begin, int64_t end) {
    switch (dtype) {
      case DType::Float32: reduce_plain(inputs, static_cast<float*>(out), begin, end, op); break;
      case DType::Int32: reduce_plain(inputs, static_cast<int32_t*>(out), begin, end, op); break;
      case DType::Float16:
        reduce_half<fp16_to_float, float_to_fp16>(inputs, static_cast<uint16_t*>(out), begin, end, op);
        break;
      case DType::BFloat16:
        reduce_half<bf16_to_float, float_to_bf16>(inputs, static_cast<uint16_t*>(out), begin, end, op);
        break;
      default: break;
    }
  });
}

}  // namespace kvcore::comm
