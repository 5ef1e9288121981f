// TensorView: a non-owning description of an array crossing the API boundary (from DLPack in the
// bindings, or built by hand in C++ tests and benchmarks), plus the argument checks every op uses.
// Checks name the argument, so errors read "k_cache: expected ...".
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace kvcore {

enum class DType : uint8_t { Float32, Float16, BFloat16, Int32, Int64, UInt8 };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);
// "float16", "half", "bfloat16", "float32", "int32", "int64", "uint8" (a "torch." prefix is ignored).
DType parse_dtype(const std::string& name);

enum class DeviceType : uint8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;
};
// "cpu", "cuda" (device 0) or "cuda:N".
Device parse_device(const std::string& name);

constexpr int kMaxDims = 8;

struct TensorView {
  const char* name = "?";  // the argument name used in error messages
  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, as in DLPack

  int64_t size(int dim) const { return shape[dim < 0 ? dim + ndim : dim]; }
  int64_t stride(int dim) const { return strides[dim < 0 ? dim + ndim : dim]; }
  int64_t numel() const;
  size_t itemsize() const { return dtype_size(dtype); }
  // True when the last `dims` dimensions are laid out densely (row-major).
  bool inner_contiguous(int dims) const;
  std::string shape_str() const;

  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Builds a row-major view (handy in C++ tests and benchmarks).
TensorView make_view(const char* name, void* data, DType dtype, std::initializer_list<int64_t> shape,
                     Device device = {});

// t as [rows, last dim] without moving data: the leading dims must step by one stride (as after a
// reshape that needs no copy); raises ValueError naming t otherwise.
TensorView as_rows(const TensorView& t);

// Argument checks; each throws kvcore::Error naming the argument.
void check_dtype(const TensorView& t, std::initializer_list<DType> allowed);
void check_same_dtype(const TensorView& t, const TensorView& ref);
void check_ndim(const TensorView& t, int ndim);
void check_dim(const TensorView& t, int dim, int64_t expected, const char* what);
void check_inner_contiguous(const TensorView& t, int dims);
void check_same_device(const TensorView& t, const TensorView& ref);
// A 1-D index array of int32 or int64 (any stride).
void check_index_array(const TensorView& t);

}  // namespace kvcore
