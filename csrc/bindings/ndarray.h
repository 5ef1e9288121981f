// The array boundary: nanobind ndarrays (DLPack: numpy, torch, JAX, CuPy) to kvcore::TensorView.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <optional>

#include "kvcore/tensor.h"

namespace kvcore::bindings {

namespace nb = nanobind;

// Read-only inputs accept read-only arrays too; outputs are written in place and are never
// converted (bind them with .noconvert()).
using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

// Converts dtype and device (TypeError / ValueError naming `name` when unsupported).
TensorView to_view(const InArray& a, const char* name);
TensorView to_view(const OutArray& a, const char* name);

// An optional argument: an empty view (data == nullptr, ndim == 0) when absent.
template <typename Array>
TensorView optional_view(const std::optional<Array>& a, const char* name) {
  if (a) return to_view(*a, name);
  TensorView t;
  t.name = name;
  return t;
}

}  // namespace kvcore::bindings
