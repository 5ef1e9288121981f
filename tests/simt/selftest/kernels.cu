// The harness's self-test kernels: small correct kernels whose results are checked against numpy,
// and deliberately broken variants (a dropped __syncthreads, a shifted index, a barrier or shuffle
// some threads never reach) that the harness must report. Built like kvcore's kernels.
#include <mma.h>

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/device.cuh"

namespace simt::selftest {
namespace {

constexpr int kThreads = 128;

// Tree sum of 128 values in shared memory (zeroed first, so a missing barrier is a race, not a read
// of uninitialized memory); kSyncAfterStore false drops the barrier after the store.
template <bool kSyncAfterStore>
__global__ void block_sum(const float* in, float* out) {
  KVCORE_SHARED(float, s, [kThreads]);
  s[threadIdx.x] = 0.f;
  __syncthreads();
  s[threadIdx.x] = in[threadIdx.x];
  if (kSyncAfterStore) __syncthreads();
  for (int h = kThreads / 2; h > 0; h /= 2) {
    if (int(threadIdx.x) < h) s[threadIdx.x] += s[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = s[0];
}

__global__ void shifted_index(const float* in, float* out) {
  KVCORE_SHARED(float, s, [kThreads]);
  s[threadIdx.x + 1] = in[threadIdx.x];  // thread 127 writes one past the end
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void barrier_in_branch(const float* in, float* out) {
  if (threadIdx.x < 64) __syncthreads();  // half the block never arrives
  out[threadIdx.x] = in[threadIdx.x];
}

__global__ void shuffle_partial_warp(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // names lanes that never come
  out[threadIdx.x] = v;
}

__global__ void shuffle_outside_mask(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);  // reads lanes 16-31
  out[threadIdx.x] = v;
}

// Lanes swap values through shared memory; without the __syncwarp it is a race.
template <bool kSyncwarp>
__global__ void warp_exchange(const float* in, float* out) {
  KVCORE_SHARED(float, s, [kThreads]);
  const int lane = threadIdx.x % 32, base = threadIdx.x - lane;
  s[threadIdx.x] = 0.f;
  __syncthreads();
  s[threadIdx.x] = in[threadIdx.x];
  if (kSyncwarp) __syncwarp();
  out[threadIdx.x] = s[base + 31 - lane];
}

__global__ void uninitialized_shared(const float* in, float* out) {
  KVCORE_SHARED(float, s, [kThreads]);
  out[threadIdx.x] = s[threadIdx.x] + in[threadIdx.x];
}

// out = [xor-butterfly sum, shfl_up 1, shfl_down 3, shfl idx 5, ballot(in > 0) popcount] per thread.
__global__ void warp_ops(const float* in, float* out) {
  const float v = in[threadIdx.x];
  float sum = v;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float up = __shfl_up_sync(0xffffffffu, v, 1);
  const float down = __shfl_down_sync(0xffffffffu, v, 3);
  const float idx = __shfl_sync(0xffffffffu, v, 5);
  const unsigned ballot = __ballot_sync(0xffffffffu, v > 0.f);
  float* o = out + threadIdx.x * 5;
  o[0] = sum;
  o[1] = up;
  o[2] = down;
  o[3] = idx;
  o[4] = float(__popc(ballot));
}

// C = A B for 16x16 float16 A (row-major) and B (col-major) through shared memory and wmma.
__global__ void wmma_gemm(const float* in, float* out) {
  namespace wmma = nvcuda::wmma;
  KVCORE_SHARED(__half, a, [256]);
  KVCORE_SHARED(__half, b, [256]);
  KVCORE_SHARED(float, c, [256]);
  for (int i = threadIdx.x; i < 256; i += 32) {
    a[i] = __float2half_rn(in[i]);
    b[i] = __float2half_rn(in[256 + i]);
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.5f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int i = threadIdx.x; i < 256; i += 32) out[i] = c[i];
}

// D = A B + C on tensor cores the way attention kernels feed them: operands staged into shared
// memory with cp.async from global memory, A (16x16, row-major) by ldmatrix.x4, B once as [n][k] rows by ldmatrix.x2
// and once as [k][n] rows by ldmatrix.x2.trans. out: both D (16x8 each, row-major).
template <typename T>
__global__ void ldmatrix_mma(const float* in, float* out) {
  KVCORE_SHARED(T, a, [16][16]);
  KVCORE_SHARED(T, b_nk, [8][16]);
  KVCORE_SHARED(T, b_kn, [16][8]);
  // A and B converted to T in global memory (out's 1024 bytes, overwritten with D at the end).
  T* global = reinterpret_cast<T*>(out);
  const int lane = threadIdx.x;
  for (int i = lane; i < 384; i += 32) {
    if constexpr (std::is_same_v<T, __half>) global[i] = __float2half_rn(in[i]);
    else global[i] = __float2bfloat16_rn(in[i]);
  }
  __syncwarp();
  for (int i = lane; i < 32; i += 32) kvcore::ptx::cp_async_16(&a[i / 2][(i % 2) * 8], &global[i * 8], true);
  kvcore::ptx::cp_async_commit();
  for (int i = lane; i < 16; i += 32) kvcore::ptx::cp_async_16(&b_nk[i / 2][(i % 2) * 8], &global[256 + i * 8], true);
  kvcore::ptx::cp_async_commit();
  kvcore::ptx::cp_async_wait<0>();
  __syncwarp();
  for (int i = lane; i < 128; i += 32) b_kn[i % 16][i / 16] = b_nk[i / 16][i % 16];
  __syncwarp();
  uint32_t fa[4], fb[2], fbt[2];
  kvcore::ptx::ldmatrix<4>(fa, &a[lane % 16][(lane / 16) * 8]);
  kvcore::ptx::ldmatrix<2>(fb, &b_nk[lane % 8][((lane / 8) % 2) * 8]);
  kvcore::ptx::ldmatrix<2, true>(fbt, &b_kn[lane % 16][0]);
  const int g = lane / 4, t = lane % 4;
  const float c[4] = {in[384 + g * 8 + 2 * t], in[384 + g * 8 + 2 * t + 1], in[384 + (g + 8) * 8 + 2 * t],
                      in[384 + (g + 8) * 8 + 2 * t + 1]};
  float d[4], dt[4];
  kvcore::ptx::mma_m16n8k16<T>(d, fa, fb, c);
  kvcore::ptx::mma_m16n8k16<T>(dt, fa, fbt, c);
  __syncwarp();  // every lane's global loads are done before out is overwritten
  for (int i = 0; i < 4; ++i) {
    const int m = g + 8 * (i / 2), n = 2 * t + i % 2;
    out[m * 8 + n] = d[i];
    out[128 + m * 8 + n] = dt[i];
  }
}

// Two cp.async groups: wait<1> lands the first (16-byte copies, odd threads zero-fill), wait<0>
// the second (one 8-byte and two 4-byte copies per thread). kWaitAll false reads the second group
// after wait<1> only (not landed yet).
template <bool kWaitAll>
__global__ void cp_async_groups(const float* in, float* out) {
  KVCORE_SHARED(float, s, [2][kThreads * 4]);
  const int t = threadIdx.x;
  kvcore::ptx::cp_async_16(&s[0][4 * t], in + 4 * (t % 64), t % 2 == 0);
  kvcore::ptx::cp_async_commit();
  const float* src = in + 256 + 4 * (t % 64);
  kvcore::ptx::cp_async<8>(&s[1][4 * t], src, true);
  kvcore::ptx::cp_async<4>(&s[1][4 * t + 2], src + 2, true);
  kvcore::ptx::cp_async<4>(&s[1][4 * t + 3], src + 3, true);
  kvcore::ptx::cp_async_commit();
  kvcore::ptx::cp_async_wait<1>();
  __syncthreads();
  out[t] = s[0][4 * ((t + 1) % kThreads)];  // another thread's copy: needs the barrier
  if (kWaitAll) kvcore::ptx::cp_async_wait<0>();
  __syncthreads();
  out[kThreads + t] = s[1][4 * ((t + 1) % kThreads) + 3];
  out[2 * kThreads + t] = s[1][4 * ((t + 1) % kThreads) + 1];
}

// Each thread's three words (bits of in[t], in[t + 128], in[t + 256]) through lop3 (xor3 and
// majority) and prmt (selector 0x7351: bytes 1, 5, 3, 7 of {b, a}; 0x8880: byte 0, then its sign x3);
// out: the 16-bit halves of each result as exact integers.
__global__ void bit_ops(const float* in, float* out) {
  const int t = threadIdx.x;
  const uint32_t a = __float_as_uint(in[t]), b = __float_as_uint(in[t + 128]), c = __float_as_uint(in[t + 256]);
  const uint32_t r[4] = {kvcore::ptx::lop3<0x96>(a, b, c), kvcore::ptx::lop3<0xE8>(a, b, c),
                         kvcore::ptx::prmt(a, b, 0x7351), kvcore::ptx::prmt(a, b, 0x8880)};
  for (int i = 0; i < 4; ++i) {
    out[t * 8 + 2 * i] = float(r[i] & 0xffffu);
    out[t * 8 + 2 * i + 1] = float(r[i] >> 16);
  }
}

// fma2 on packed pairs of T: thread t computes a * b + c with a = (in[t], in[t + 128]), b = (in[t + 256],
// in[t + 384]), c = (in[t + 512], in[t + 640]) rounded to T; out: the result's two halves as bits.
template <typename T>
__global__ void fma2_pairs(const float* in, float* out) {
  const int t = threadIdx.x;
  auto bits = [](float x) -> uint32_t {
    if constexpr (std::is_same_v<T, __half>) return __half_as_ushort(__float2half_rn(x));
    else return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  };
  auto pair = [&](int i) { return bits(in[i]) | bits(in[i + 128]) << 16; };
  const uint32_t d = kvcore::ptx::fma2<T>(pair(t), pair(t + 256), pair(t + 512));
  out[2 * t] = float(d & 0xffffu);
  out[2 * t + 1] = float(d >> 16);
}

__global__ void ldmatrix_misaligned(const float* in, float* out) {
  KVCORE_SHARED(__half, a, [16][24]);
  for (int i = threadIdx.x; i < 16 * 24; i += 32) a[i / 24][i % 24] = __float2half_rn(in[i]);
  __syncwarp();
  uint32_t r[4];
  kvcore::ptx::ldmatrix<4>(r, &a[threadIdx.x % 16][1 + (threadIdx.x / 16) * 8]);  // 2-byte offset rows
  out[threadIdx.x] = float(r[0] & 0xffffu);
}

__global__ void shared_atomics(const float* in, float* out) {
  KVCORE_SHARED(int, count, );
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  if (in[threadIdx.x] > 0.f) atomicAdd(&count, 1);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = float(count);
}

__global__ void dynamic_without_smem(const float* in, float* out) {
  KVCORE_DYNAMIC_SHARED(float, smem, 16);
  smem[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = smem[threadIdx.x];
}

__global__ void global_write_past_end(const float* in, float* out) {
  out[threadIdx.x + 1] = in[threadIdx.x];  // thread 127 writes one past the end of out
}

struct Case {
  void (*kernel)(const float*, float*);
  unsigned threads;
  size_t outputs;
};

const std::map<std::string, Case>& cases() {
  static const std::map<std::string, Case> c = {
      {"block_sum", {block_sum<true>, kThreads, 1}},
      {"block_sum_missing_barrier", {block_sum<false>, kThreads, 1}},
      {"shifted_index", {shifted_index, kThreads, kThreads}},
      {"barrier_in_branch", {barrier_in_branch, kThreads, kThreads}},
      {"shuffle_partial_warp", {shuffle_partial_warp, kThreads, kThreads}},
      {"shuffle_outside_mask", {shuffle_outside_mask, kThreads, kThreads}},
      {"warp_exchange", {warp_exchange<true>, kThreads, kThreads}},
      {"warp_exchange_missing_syncwarp", {warp_exchange<false>, kThreads, kThreads}},
      {"uninitialized_shared", {uninitialized_shared, kThreads, kThreads}},
      {"warp_ops", {warp_ops, kThreads, kThreads * 5}},
      {"wmma_gemm", {wmma_gemm, 32, 256}},
      {"shared_atomics", {shared_atomics, kThreads, 1}},
      {"ldmatrix_mma_f16", {ldmatrix_mma<__half>, 32, 256}},
      {"ldmatrix_mma_bf16", {ldmatrix_mma<__nv_bfloat16>, 32, 256}},
      {"cp_async_groups", {cp_async_groups<true>, kThreads, 3 * kThreads}},
      {"cp_async_read_before_wait", {cp_async_groups<false>, kThreads, 3 * kThreads}},
      {"bit_ops", {bit_ops, kThreads, kThreads * 8}},
      {"fma2_f16", {fma2_pairs<__half>, kThreads, kThreads * 2}},
      {"fma2_bf16", {fma2_pairs<__nv_bfloat16>, kThreads, kThreads * 2}},
      {"ldmatrix_misaligned", {ldmatrix_misaligned, 32, 32}},
      {"dynamic_without_smem", {dynamic_without_smem, kThreads, kThreads}},
      {"global_write_past_end", {global_write_past_end, kThreads, kThreads}},
  };
  return c;
}

}  // namespace

std::vector<std::string> names() {
  std::vector<std::string> n;
  for (const auto& [name, c] : cases()) n.push_back(name);
  return n;
}

std::vector<float> run(const std::string& name, std::vector<float> input) {
  auto it = cases().find(name);
  if (it == cases().end()) throw std::invalid_argument("no self-test kernel named " + name);
  const Case& c = it->second;
  input.resize(std::max<size_t>(input.size(), 512), 0.f);
  std::vector<float> out(c.outputs, -777.f);
  // Device memory of exactly these sizes (between red zones), as a kernel would get it.
  float *d_in = nullptr, *d_out = nullptr;
  cudaMalloc(reinterpret_cast<void**>(&d_in), input.size() * sizeof(float));
  cudaMalloc(reinterpret_cast<void**>(&d_out), out.size() * sizeof(float));
  cudaMemcpy(d_in, input.data(), input.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(d_out, out.data(), out.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaGetLastError();
  kvcore::launch_kernel(c.kernel, 1, c.threads, 0, nullptr, static_cast<const float*>(d_in), d_out);
  const cudaError_t err = cudaGetLastError();
  cudaMemcpy(out.data(), d_out, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(d_in);
  cudaFree(d_out);
  if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
  return out;
}

}  // namespace simt::selftest
