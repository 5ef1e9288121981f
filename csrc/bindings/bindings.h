// Registration entry points of the extension's parts, called from module.cpp.
#pragma once

#include <nanobind/nanobind.h>

namespace kvcore::bindings {

namespace nb = nanobind;

void register_errors(nb::module_& m);
void register_runtime(nb::module_& m);
void register_kv_cache(nb::module_& m);
void register_memory(nb::module_& m);
void register_attention(nb::module_& m);
void register_quant(nb::module_& m);
void register_prefix_cache(nb::module_& m);
void register_comm(nb::module_& m);

}  // namespace kvcore::bindings
