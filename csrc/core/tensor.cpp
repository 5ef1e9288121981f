#include "kvcore/tensor.h"

#include <sstream>

#include "kvcore/error.h"

namespace kvcore {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
  }
  return "unknown";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: case DType::Int32: return 4;
    case DType::Float16: case DType::BFloat16: return 2;
    case DType::Int64: return 8;
    case DType::UInt8: return 1;
  }
  return 0;
}

DType parse_dtype(const std::string& name) {
  std::string n = name.rfind("torch.", 0) == 0 ? name.substr(6) : name;
  if (n == "float32" || n == "float") return DType::Float32;
  if (n == "float16" || n == "half") return DType::Float16;
  if (n == "bfloat16") return DType::BFloat16;
  if (n == "int32") return DType::Int32;
  if (n == "int64" || n == "long") return DType::Int64;
  if (n == "uint8") return DType::UInt8;
  KVCORE_THROW(ErrorKind::Type, "dtype: unsupported dtype '", name,
               "' (expected float32, float16, bfloat16, int32, int64 or uint8)");
}

Device parse_device(const std::string& name) {
  if (name == "cpu") return {DeviceType::CPU, 0};
  if (name == "cuda") return {DeviceType::CUDA, 0};
  if (name.rfind("cuda:", 0) == 0 && name.size() > 5 &&
      name.find_first_not_of("0123456789", 5) == std::string::npos && name.size() < 10)
    return {DeviceType::CUDA, std::stoi(name.substr(5))};
  KVCORE_THROW(ErrorKind::Value, "device: expected 'cpu', 'cuda' or 'cuda:N', got '", name, "'");
}

std::string Device::str() const {
  return is_cuda() ? "cuda:" + std::to_string(index) : std::string("cpu");
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::inner_contiguous(int dims) const {
  if (numel() == 0) return true;  // empty arrays carry arbitrary strides
  int64_t expected = 1;
  for (int i = ndim - 1; i >= ndim - dims && i >= 0; --i) {
    // A dimension of size 1 may carry any stride.
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

TensorView make_view(const char* name, void* data, DType dtype, std::initializer_list<int64_t> shape,
                     Device device) {
  TensorView t;
  KVCORE_CHECK_VALUE(shape.size() <= static_cast<size_t>(kMaxDims), name, ": too many dimensions");
  t.name = name;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.strides[d] = stride;
    stride *= t.shape[d];
  }
  return t;
}

TensorView as_rows(const TensorView& t) {
  KVCORE_CHECK_VALUE(t.ndim >= 1, t.name, ": expected at least 1 dimension");
  TensorView r = t;
  r.ndim = 2;
  r.shape[1] = t.shape[t.ndim - 1];
  r.strides[1] = t.strides[t.ndim - 1];
  r.shape[0] = 1;
  r.strides[0] = r.shape[1];
  bool strided = false;  // the innermost leading dim of size > 1 fixes the row stride
  for (int i = t.ndim - 2; i >= 0; --i) {
    if (t.shape[i] == 1) continue;
    if (!strided) r.strides[0] = t.strides[i];
    KVCORE_CHECK_VALUE(!strided || t.numel() == 0 || t.strides[i] == r.strides[0] * r.shape[0], t.name,
                       ": its leading dimensions cannot be viewed as rows without a copy (shape ", t.shape_str(),
                       ")");
    strided = true;
    r.shape[0] *= t.shape[i];
  }
  return r;
}

void check_dtype(const TensorView& t, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::ostringstream os;
  bool first = true;
  for (DType d : allowed) {
    os << (first ? "" : ", ") << dtype_name(d);
    first = false;
  }
  KVCORE_THROW(ErrorKind::Type, t.name, ": dtype ", dtype_name(t.dtype), " is not supported (expected ",
               os.str(), ")");
}

void check_same_dtype(const TensorView& t, const TensorView& ref) {
  KVCORE_CHECK_TYPE(t.dtype == ref.dtype, t.name, ": dtype ", dtype_name(t.dtype), " does not match ",
                    ref.name, "'s dtype ", dtype_name(ref.dtype));
}

void check_ndim(const TensorView& t, int ndim) {
  KVCORE_CHECK_VALUE(t.ndim == ndim, t.name, ": expected ", ndim, " dimensions, got shape ",
                     t.shape_str());
}

void check_dim(const TensorView& t, int dim, int64_t expected, const char* what) {
  KVCORE_CHECK_VALUE(t.size(dim) == expected, t.name, ": dimension ", dim, " (", what, ") is ",
                     t.size(dim), ", expected ", expected, " (shape ", t.shape_str(), ")");
}

void check_inner_contiguous(const TensorView& t, int dims) {
  KVCORE_CHECK_VALUE(t.inner_contiguous(dims), t.name, ": the last ", dims,
                     " dimensions must be contiguous (shape ", t.shape_str(), ")");
}

void check_same_device(const TensorView& t, const TensorView& ref) {
  KVCORE_CHECK_VALUE(t.device == ref.device, t.name, " is on ", t.device.str(), " but ", ref.name,
                     " is on ", ref.device.str(), ": all arrays must be on the same device");
}

void check_index_array(const TensorView& t) {
  check_dtype(t, {DType::Int32, DType::Int64});
  check_ndim(t, 1);
}

}  // namespace kvcore
