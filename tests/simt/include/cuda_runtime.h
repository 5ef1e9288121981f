// The SIMT harness's cuda_runtime.h: the runtime API (emulated by tests/simt/runtime) plus, in kernel
// translation units, the device side (simt/simt.h).
#pragma once

#include "cuda_runtime_api.h"
#if defined(__CUDACC__)
#include "simt/simt.h"
#endif
