// Row conversions between 16-bit floats and float32 for the CPU kernels: F16C when the CPU has it
// (checked at run time, so the binary still runs on any x86-64), the exact scalar path otherwise.
// Both directions round exactly as detail/float16.h does (round to nearest even).
#pragma once

#include <cstdint>

namespace kvcore::cpu {

void half_row_to_float(const uint16_t* src, float* dst, int64_t n, bool is_bf16);
void float_row_to_half(const float* src, uint16_t* dst, int64_t n, bool is_bf16);

}  // namespace kvcore::cpu
