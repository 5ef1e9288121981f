#include "ndarray.h"

#include <string>

#include "kvcore/error.h"

namespace kvcore::bindings {
namespace {

DType convert_dtype(nb::dlpack::dtype dt, const char* name) {
  using Code = nb::dlpack::dtype_code;
  if (dt.lanes == 1) {
    if (dt.code == uint8_t(Code::Float) && dt.bits == 32) return DType::Float32;
    if (dt.code == uint8_t(Code::Float) && dt.bits == 16) return DType::Float16;
    if (dt.code == uint8_t(Code::Bfloat) && dt.bits == 16) return DType::BFloat16;
    if (dt.code == uint8_t(Code::Int) && dt.bits == 32) return DType::Int32;
    if (dt.code == uint8_t(Code::Int) && dt.bits == 64) return DType::Int64;
    if (dt.code == uint8_t(Code::UInt) && dt.bits == 8) return DType::UInt8;
  }
  static const char* kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const char* kind = dt.code < sizeof(kinds) / sizeof(kinds[0]) ? kinds[dt.code] : "code";
  KVCORE_THROW(ErrorKind::Type, name, ": unsupported dtype ", kind, int(dt.bits),
               dt.lanes != 1 ? "x" + std::to_string(dt.lanes) : std::string(),
               "; kvcore takes float32, float16, bfloat16, int32, int64 and uint8");
}

Device convert_device(int type, int id, const char* name) {
  if (type == nb::device::cpu::value || type == nb::device::cuda_host::value) return {DeviceType::CPU, 0};
  if (type == nb::device::cuda::value || type == nb::device::cuda_managed::value) return {DeviceType::CUDA, id};
  KVCORE_THROW(ErrorKind::Value, name, ": unsupported device (DLPack device type ", type,
               "); kvcore takes CPU and CUDA arrays");
}

template <typename Array>
TensorView convert(const Array& a, const char* name) {
  TensorView t;
  t.name = name;
  KVCORE_CHECK_VALUE(a.ndim() <= size_t(kMaxDims), name, ": too many dimensions (", a.ndim(), ")");
  t.data = const_cast<void*>(static_cast<const void*>(a.data()));
  t.dtype = convert_dtype(a.dtype(), name);
  t.device = convert_device(a.device_type(), a.device_id(), name);
  t.ndim = int(a.ndim());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = int64_t(a.shape(size_t(i)));
    t.strides[i] = int64_t(a.stride(size_t(i)));
  }
  return t;
}

}  // namespace

TensorView to_view(const InArray& a, const char* name) { return convert(a, name); }
TensorView to_view(const OutArray& a, const char* name) { return convert(a, name); }

}  // namespace kvcore::bindings
