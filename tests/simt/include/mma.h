// nvcuda::wmma for the SIMT harness: 16x16x16 fragments of half / bfloat16 inputs and float
// accumulators. Every operation is a warp collective (all 32 lanes, the same pointer and stride),
// executed by the runtime on the whole matrix; shared-memory reads and writes it makes are checked
// and race-tracked as accesses of the warp. A fragment's element order is opaque in CUDA; here
// lane l holds elements [8 l, 8 l + 8) of the row-major 16x16 tile.
#pragma once

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "simt/simt.h"

namespace simt {

enum class WmmaType : uint8_t { F16, BF16, F32 };
enum class WmmaKind : uint8_t { LoadA, LoadB, LoadC, StoreC, Mma };

// One lane's part of a wmma call; the runtime gathers the warp's 32 of them.
struct WmmaCall {
  WmmaKind kind;
  WmmaType type;       // element type of the memory operand (load/store) or of A and B (mma)
  bool col_major;      // memory layout of the load/store
  void* frag;          // load destination / store source / mma D
  const void* a;       // mma A
  const void* b;       // mma B
  const void* c;       // mma C
  const void* mem;     // load source / store destination
  unsigned ldm;        // leading dimension in elements
};
void wmma(const WmmaCall& call, const char* file, int line);

template <typename T>
constexpr WmmaType wmma_type() {
  if constexpr (std::is_same_v<T, __half>) return WmmaType::F16;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return WmmaType::BF16;
  else {
    static_assert(std::is_same_v<T, float>, "wmma fragments of half, bfloat16 or float");
    return WmmaType::F32;
  }
}

}  // namespace simt

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the harness emulates the 16x16x16 shape");
  static constexpr int num_elements = 8;
  T x[num_elements];
};

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(!std::is_same_v<Layout, void>, "matrix_a/matrix_b fragments carry their layout");
  simt::WmmaCall call{std::is_same_v<Use, matrix_a> ? simt::WmmaKind::LoadA : simt::WmmaKind::LoadB,
                      simt::wmma_type<T>(), std::is_same_v<Layout, col_major>, f.x, nullptr, nullptr, nullptr, p, ldm};
  simt::wmma(call, file, line);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::WmmaCall call{simt::WmmaKind::LoadC, simt::WmmaType::F32, layout == mem_col_major, f.x, nullptr, nullptr,
                      nullptr, p, ldm};
  simt::wmma(call, file, line);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::WmmaCall call{simt::WmmaKind::StoreC, simt::WmmaType::F32, layout == mem_col_major,
                      const_cast<float*>(f.x), nullptr, nullptr, nullptr, p, ldm};
  simt::wmma(call, file, line);
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::WmmaCall call{simt::WmmaKind::Mma, simt::wmma_type<T>(), false, d.x, a.x, b.x, c.x, nullptr, 0};
  simt::wmma(call, file, line);
}

template <typename Use, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& v) {
  for (int i = 0; i < fragment<Use, 16, 16, 16, T, Layout>::num_elements; ++i) f.x[i] = T(v);
}

}  // namespace wmma
}  // namespace nvcuda
