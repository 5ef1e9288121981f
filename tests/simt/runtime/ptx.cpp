// Emulation of the PTX instructions behind cuda/common/device.cuh: cp.async with commit groups,
// ldmatrix and mma.sync m16n8k16 (fragment layouts of the PTX ISA, "Matrix Fragments for mma").
#include "simt/ptx.h"

#include <cmath>
#include <cstring>
#include <string>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "internal.h"

namespace simt {

namespace {

[[noreturn]] void fail_at(const char* what, const char* file, int line, const std::string& why) {
  fail(std::string(what) + " at " + site(file, line) + " in " + where(*t_cta, *t_fiber) + ": " + why);
}

void land(const AsyncCopy& c) {
  shared_access(c.dst, size_t(c.bytes), true, false, false, c.pc);
  std::memcpy(c.dst, c.src, size_t(c.src_bytes));
  std::memset(c.dst + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
}

struct LdmatrixCall {
  uint32_t* regs;
  int count;
  bool trans;
  const char* row;
};

struct MmaCall {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
  MmaType type;
};

Fiber& lane_fiber(Cta& c, int warp, int lane) { return (*c.fibers)[size_t(warp * 32 + lane)]; }

double element(uint32_t pair, int half, MmaType t) {
  const uint16_t bits = uint16_t(pair >> (16 * half));
  return t == MmaType::F16 ? double(__half2float(__half{bits})) : double(__bfloat162float(__nv_bfloat16{bits}));
}

}  // namespace

void cp_async(void* dst_shared, const void* src_global, int bytes, int src_bytes, const char* file, int line) {
  const void* pc = __builtin_return_address(0);
  if (bytes != 4 && bytes != 8 && bytes != 16)
    fail_at("cp.async", file, line, "copies 4, 8 or 16 bytes, not " + std::to_string(bytes));
  if (src_bytes < 0 || src_bytes > bytes)
    fail_at("cp.async", file, line, "source size " + std::to_string(src_bytes) + " is outside [0, " +
                                        std::to_string(bytes) + "]");
  if (!in_shared(t_cta, dst_shared)) fail_at("cp.async", file, line, "the destination is not shared memory");
  if (src_bytes > 0 && in_shared(t_cta, src_global)) fail_at("cp.async", file, line, "the source is shared memory");
  if (uintptr_t(dst_shared) % size_t(bytes) || (src_bytes > 0 && uintptr_t(src_global) % size_t(bytes)))
    fail_at("cp.async", file, line, "addresses must be aligned to the copy size (" + std::to_string(bytes) + " bytes)");
  global_access(src_global, size_t(src_bytes), false, pc);
  shared_in_flight(dst_shared, size_t(bytes), pc);
  std::memset(dst_shared, 0xff, size_t(bytes));  // what a premature read would see (the checks stop it first)
  Fiber& f = *t_fiber;
  f.async_copies.push_back(
      AsyncCopy{static_cast<char*>(dst_shared), static_cast<const char*>(src_global), bytes, src_bytes, f.async_commits, pc});
}

void cp_async_commit() { ++t_fiber->async_commits; }

void cp_async_wait(int pending, const char* file, int line) {
  if (pending < 0) fail_at("cp.async.wait_group", file, line, "a negative group count");
  land_async_copies(*t_fiber, uint32_t(pending), false);
}

void land_async_copies(Fiber& f, uint32_t keep, bool include_uncommitted) {
  // Groups [0, commits - keep) land; copies after the last commit belong to no group yet.
  const uint32_t limit = include_uncommitted ? UINT32_MAX : (f.async_commits >= keep ? f.async_commits - keep : 0);
  size_t kept = 0;
  for (size_t i = 0; i < f.async_copies.size(); ++i) {
    const AsyncCopy& c = f.async_copies[i];
    if (c.group < limit) land(c);
    else f.async_copies[kept++] = c;
  }
  f.async_copies.resize(kept);
}

void ldmatrix(uint32_t* regs, int count, bool trans, const void* row_address, const char* file, int line) {
  if (count != 1 && count != 2 && count != 4)
    fail_at("ldmatrix", file, line, "loads 1, 2 or 4 matrices, not " + std::to_string(count));
  const LdmatrixCall call{regs, count, trans, static_cast<const char*>(row_address)};
  arrive_collective(WarpOpKind::Ldmatrix, &call, file, line);
}

void execute_ldmatrix(Cta& c, int w) {
  const Fiber& f0 = lane_fiber(c, w, 0);
  const auto& first = *static_cast<const LdmatrixCall*>(f0.op.call);
  for (int l = 1; l < 32; ++l) {
    const auto& o = *static_cast<const LdmatrixCall*>(lane_fiber(c, w, l).op.call);
    if (o.count != first.count || o.trans != first.trans)
      fail("ldmatrix at " + site(f0.op.file, f0.op.line) + ": lanes 0 and " + std::to_string(l) + " of warp " +
           std::to_string(w) + " ask for different shapes (all 32 lanes must agree)");
  }
  // Row r of matrix j: 8 16-bit values at the address lane 8 j + r gave.
  const char* rows[32];
  for (int l = 0; l < 8 * first.count; ++l) {
    const char* row = static_cast<const LdmatrixCall*>(lane_fiber(c, w, l).op.call)->row;
    if (!in_shared(&c, row) || uintptr_t(row) % 16)
      fail("ldmatrix at " + site(f0.op.file, f0.op.line) + ": lane " + std::to_string(l) + " of warp " +
           std::to_string(w) + " gives a row address that is not 16-byte aligned shared memory");
    shared_access(row, 16, false, false, true, nullptr);
    rows[l] = row;
  }
  for (int l = 0; l < 32; ++l) {
    uint32_t* out = static_cast<const LdmatrixCall*>(lane_fiber(c, w, l).op.call)->regs;
    for (int j = 0; j < first.count; ++j) {
      uint16_t v[2];
      for (int h = 0; h < 2; ++h) {
        const int r = first.trans ? 2 * (l % 4) + h : l / 4, col = first.trans ? l / 4 : 2 * (l % 4) + h;
        std::memcpy(&v[h], rows[8 * j + r] + 2 * col, 2);
      }
      out[j] = uint32_t(v[0]) | uint32_t(v[1]) << 16;
    }
  }
}

void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, MmaType type, const char* file,
                  int line) {
  const MmaCall call{d, a, b, c, type};
  arrive_collective(WarpOpKind::Mma, &call, file, line);
}

void execute_mma(Cta& c, int w) {
  const Fiber& f0 = lane_fiber(c, w, 0);
  const MmaType type = static_cast<const MmaCall*>(f0.op.call)->type;
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto& o = *static_cast<const MmaCall*>(lane_fiber(c, w, l).op.call);
    if (o.type != type)
      fail("mma.sync at " + site(f0.op.file, f0.op.line) + ": lanes of warp " + std::to_string(w) +
           " disagree on the input type");
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = element(o.a[0], h, type);
      A[g + 8][2 * t + h] = element(o.a[1], h, type);
      A[g][2 * t + 8 + h] = element(o.a[2], h, type);
      A[g + 8][2 * t + 8 + h] = element(o.a[3], h, type);
      B[2 * t + h][g] = element(o.b[0], h, type);
      B[2 * t + 8 + h][g] = element(o.b[1], h, type);
      C[g][2 * t + h] = o.c[h];
      C[g + 8][2 * t + h] = o.c[2 + h];
    }
  }
  // Products of 16-bit floats are exact; the sum is rounded once (a GPU rounds within fp32 too).
  for (int l = 0; l < 32; ++l) {
    float* out = static_cast<const MmaCall*>(lane_fiber(c, w, l).op.call)->d;
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i / 2), n = 2 * t + i % 2;
      double s = C[m][n];
      for (int k = 0; k < 16; ++k) s += A[m][k] * B[k][n];
      out[i] = float(s);
    }
  }
}

namespace {

// One 16-bit half of fma2, from the exact double a * b + c (16-bit products and sums fit in 53
// bits well enough: the double is rounded to odd at float precision first, so the final rounding to
// 16 bits is a single correct one).
uint16_t fma_half(uint16_t a, uint16_t b, uint16_t c, MmaType type) {
  auto value = [&](uint16_t bits) {
    return type == MmaType::F16 ? double(__half2float(__half{bits})) : double(__bfloat162float(__nv_bfloat16{bits}));
  };
  const double exact = value(a) * value(b) + value(c);
  float f = float(exact);
  if (double(f) != exact) {  // round to odd: an inexact float keeps its last mantissa bit set
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (!(u & 1u)) {
      f = std::nextafter(f, double(f) < exact ? INFINITY : -INFINITY);
    }
  }
  return type == MmaType::F16 ? __half_as_ushort(__float2half_rn(f)) : __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

}  // namespace

uint32_t fma2(uint32_t a, uint32_t b, uint32_t c, MmaType type) {
  const uint16_t lo = fma_half(uint16_t(a), uint16_t(b), uint16_t(c), type);
  const uint16_t hi = fma_half(uint16_t(a >> 16), uint16_t(b >> 16), uint16_t(c >> 16), type);
  return uint32_t(lo) | uint32_t(hi) << 16;
}

}  // namespace simt
