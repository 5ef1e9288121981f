// The array boundary: nanobind ndarrays (DLPack: numpy, torch, JAX, CuPy) to kvcore::TensorView.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

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

}  // namespace kvcore::bindings
