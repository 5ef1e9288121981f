// Row conversions of 16-bit floats to float32 for the CPU kernels: F16C when the CPU has it
// (checked at run time, so the binary still runs on any x86-64), the exact scalar path otherwise.
#pragma once

#include <cstdint>

namespace kvcore::cpu {

void half_row_to_float(const uint16_t* src, float* dst, int64_t n, bool is_bf16);

}  // namespace kvcore::cpu
