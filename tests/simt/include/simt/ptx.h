// The harness's emulation of the PTX instructions kvcore's kernels use beyond plain C++: cp.async
// (asynchronous global-to-shared copies in commit groups), ldmatrix and mma.sync (warp collectives
// on 8x8 / 16x8x16 fragments) and packed 16-bit fma, called through the wrappers of cuda/common/device.cuh. The
// fragment layouts are the PTX ISA's, so a kernel that indexes fragments wrongly computes wrong
// results here as on a GPU.
#pragma once

#include <cstdint>

namespace simt {

// cp.async.cg.shared.global: `bytes` (4, 8 or 16) into shared memory, of which the first
// `src_bytes` come from global memory and the rest are zero. The copy lands when a wait retires
// its group; until then the destination holds poison (0xff), so a read before the wait is wrong.
void cp_async(void* dst_shared, const void* src_global, int bytes, int src_bytes, const char* file, int line);
void cp_async_commit();
// cp.async.wait_group: lands every committed group but the newest `pending` ones.
void cp_async_wait(int pending, const char* file, int line);

enum class MmaType : uint8_t { F16, BF16 };
// ldmatrix.sync.aligned.m8n8.x{count}[.trans].shared.b16: lane l passes the address of row l % 8
// of matrix l / 8 (lanes past 8 * count pass any address); regs[j] receives lane l's pair of
// matrix j: row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (transposed: the pair of column l / 4).
void ldmatrix(uint32_t* regs, int count, bool trans, const void* row_address, const char* file, int line);
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d = a b + c with the ISA's fragments
// (a: 4 registers of 2 values, b: 2, c and d: 4 floats).
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, MmaType type, const char* file,
                  int line);

// fma.rn.{f16,bf16}x2: d = a * b + c for each 16-bit half of the packed pairs, rounded once to
// nearest even.
uint32_t fma2(uint32_t a, uint32_t b, uint32_t c, MmaType type);

}  // namespace simt
