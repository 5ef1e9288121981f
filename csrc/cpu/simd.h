// SIMD kernels of the CPU backend, compiled once per instruction set and chosen at run time, so one
// binary uses AVX-512 or AVX2 where the CPU has them and still runs on any x86-64 (and aarch64,
// where only the portable build of the same kernels exists; it is written so the compiler can
// vectorize it).
//
// The instruction set is picked once per process: the best one the CPU (and OS) supports, or the
// one named by KVCORE_CPU_ISA (generic, avx2, avx512, amx: AVX-512 plus AMX-INT8 tiles for INT4
// decode) when that is supported (a request for an unsupported one falls back to the best below it).
// Within a process results are deterministic and independent of the thread count; different
// instruction sets round differently (fused multiply-add, vector widths, INT4 queries and weights
// as 24-bit integers on AMX), all within the float32-accumulation tolerances.
#pragma once

#include <cstdint>

#include "kvcore/attention.h"

namespace kvcore::cpu {

enum class Isa { Generic = 0, Avx2 = 1, Avx512 = 2, Avx512Amx = 3 };
Isa cpu_isa();
const char* isa_name(Isa isa);

// One attention work item: `rows` query rows sharing KV head `kv_head` against keys [k_lo, k_hi) of
// one KV sequence. Produces the partial state of each row: the running max m, the sum l of
// exp(logit - m) and acc = sum of exp(logit - m) * V rows (not normalized), so items over disjoint
// key ranges merge exactly (merge order fixed by the caller).
struct AttendTask {
  const AttentionParams* p = nullptr;
  const PagedKV* kv = nullptr;
  const int32_t* pages = nullptr;  // the sequence's page list, or nullptr: the sequence is page `page0`
  int64_t page0 = 0;
  int64_t key_base = 0;            // position of key 0
  int64_t kv_head = 0;
  int64_t k_lo = 0, k_hi = 0;      // key indices (within the sequence) to attend to
  int64_t rows = 0;
  const float* q = nullptr;        // [rows, D] float32 queries (rotated basis for INT4), not scaled
  const int64_t* pos = nullptr;    // [rows] query positions
  float* m = nullptr;              // [rows] out
  float* l = nullptr;              // [rows] out
  float* acc = nullptr;            // [rows, D] out (rotated basis for INT4)
};

// Runs the task with the selected instruction set.
void attend_partial(const AttendTask& task);

// The per-ISA builds (namespaces generic, avx2, avx512 of attention_simd.cpp).
namespace generic {
void attend_partial(const AttendTask& task);
}
#if defined(__x86_64__)
namespace avx2 {
void attend_partial(const AttendTask& task);
}
namespace avx512 {
void attend_partial(const AttendTask& task);
namespace amx_int4 {
void attend(const AttendTask& task);  // INT4, rows < 16: AMX-INT8 tile products
}
}
#endif

}  // namespace kvcore::cpu
