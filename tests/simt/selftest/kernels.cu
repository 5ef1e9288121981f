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
