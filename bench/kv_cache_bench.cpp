// CPU backend throughput of append_kv and copy_pages, each next to a plain memcpy of the same
// bytes. Bytes processed count bytes read + bytes written, so the GB/s columns compare directly.
// The ops run on kvcore's thread pool while the memcpy peer is one thread; all timings are wall
// clock (UseRealTime), since the calling thread's CPU time misses the pool's work.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvcore/kv_cache.h"
#include "kvcore/parallel.h"

namespace {

using kvcore::DType;
using kvcore::make_view;

constexpr int64_t kHeads = 8, kHeadDim = 128, kPageSize = 16;
constexpr int64_t kElemBytes = 2;  // bfloat16, stored as uint16_t: the ops only move bytes

// Page-aligned storage, as tensor allocators give. With malloc's 16-byte alignment, dst - src can
// fall a few bytes past a multiple of 4 KiB, where glibc's `rep movsb` memcpy runs ~10x slower on
// AMD EPYC; the numbers would then depend on where the allocator happened to put the buffers.
class Buffer {
 public:
  explicit Buffer(size_t count)
      : data_(static_cast<uint16_t*>(std::aligned_alloc(4096, (count * sizeof(uint16_t) + 4095) / 4096 * 4096))) {
    if (!data_) throw std::bad_alloc();
  }
  uint16_t* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<uint16_t, Free> data_;
};

// Non-zero, varying contents (cheap to make: google-benchmark reruns the setup for each run).
Buffer pattern_data(size_t count, uint32_t seed) {
  Buffer out(count);
  for (size_t i = 0; i < count; ++i) out.data()[i] = uint16_t((i * 2654435761u + seed) >> 7);
  return out;
}

void label_threads(benchmark::State& state) {
  state.SetLabel("threads=" + std::to_string(kvcore::num_threads()));
}

// ---- append_kv: `tokens` new tokens written to scattered pages of a cache twice their size.

struct AppendSetup {
  int64_t tokens, num_pages;
  Buffer k, v, k_cache, v_cache;
  std::vector<int64_t> slots;

  explicit AppendSetup(int64_t tokens_)
      : tokens(tokens_),
        num_pages(2 * ((tokens_ + kPageSize - 1) / kPageSize)),
        k(pattern_data(size_t(tokens * kHeads * kHeadDim), 1)),
        v(pattern_data(size_t(tokens * kHeads * kHeadDim), 2)),
        k_cache(pattern_data(size_t(num_pages * kPageSize * kHeads * kHeadDim), 3)),
        v_cache(pattern_data(size_t(num_pages * kPageSize * kHeads * kHeadDim), 4)) {
    // Whole pages in shuffled order, tokens in order within a page: what a paged allocator hands out.
    std::vector<int64_t> pages(static_cast<size_t>(num_pages));
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), std::mt19937(5));
    for (int64_t t = 0; t < tokens; ++t)
      slots.push_back(pages[size_t(t / kPageSize)] * kPageSize + t % kPageSize);
  }
  kvcore::AppendKVArgs args() {
    return kvcore::make_append_kv_args(
        make_view("k", k.data(), DType::BFloat16, {tokens, kHeads, kHeadDim}),
        make_view("v", v.data(), DType::BFloat16, {tokens, kHeads, kHeadDim}),
        make_view("k_cache", k_cache.data(), DType::BFloat16, {num_pages, kPageSize, kHeads, kHeadDim}),
        make_view("v_cache", v_cache.data(), DType::BFloat16, {num_pages, kPageSize, kHeads, kHeadDim}),
        make_view("slot_mapping", slots.data(), DType::Int64, {tokens}));
  }
  int64_t kv_bytes() const { return 2 * tokens * kHeads * kHeadDim * kElemBytes; }  // K and V
  int64_t read_plus_written_bytes() const { return 2 * kv_bytes() + tokens * int64_t(sizeof(int64_t)); }
};

void BM_AppendKV(benchmark::State& state) {
  AppendSetup setup(state.range(0));
  const kvcore::AppendKVArgs args = setup.args();
  for (auto _ : state) {
    kvcore::append_kv_cpu(args);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * setup.read_plus_written_bytes());
  label_threads(state);
}
BENCHMARK(BM_AppendKV)->ArgName("tokens")->Arg(16)->Arg(256)->Arg(4096)->UseRealTime();

// Peer: one memcpy of the same K+V bytes (contiguous, no slot lookups).
void BM_AppendKV_MemcpyPeer(benchmark::State& state) {
  AppendSetup setup(state.range(0));
  const size_t half = size_t(setup.kv_bytes() / 2);
  for (auto _ : state) {
    std::memcpy(setup.k_cache.data(), setup.k.data(), half);
    std::memcpy(setup.v_cache.data(), setup.v.data(), half);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * setup.kv_bytes());
}
BENCHMARK(BM_AppendKV_MemcpyPeer)->ArgName("tokens")->Arg(16)->Arg(256)->Arg(4096)->UseRealTime();

// ---- copy_pages: `count` pages of `page_bytes` between two pools of 2 * count pages each.

struct CopySetup {
  int64_t page_bytes, count, pool_pages;
  Buffer src, dst;
  std::vector<int64_t> src_pages, dst_pages;

  CopySetup(int64_t page_bytes_, int64_t count_)
      : page_bytes(page_bytes_),
        count(count_),
        pool_pages(2 * count_),
        src(pattern_data(size_t(pool_pages * page_bytes / kElemBytes), 6)),
        dst(pattern_data(size_t(pool_pages * page_bytes / kElemBytes), 7)) {
    std::mt19937 rng(8);
    for (std::vector<int64_t>* list : {&src_pages, &dst_pages}) {
      list->resize(size_t(pool_pages));
      std::iota(list->begin(), list->end(), 0);
      std::shuffle(list->begin(), list->end(), rng);
      list->resize(size_t(count));  // distinct pages, scattered over the pool
    }
  }
  kvcore::CopyPagesArgs args() {
    const int64_t page_elems = page_bytes / kElemBytes;
    return kvcore::make_copy_pages_args(make_view("src", src.data(), DType::BFloat16, {pool_pages, page_elems}),
                                        make_view("dst", dst.data(), DType::BFloat16, {pool_pages, page_elems}),
                                        make_view("src_pages", src_pages.data(), DType::Int64, {count}),
                                        make_view("dst_pages", dst_pages.data(), DType::Int64, {count}));
  }
  int64_t copied_bytes() const { return count * page_bytes; }
  int64_t read_plus_written_bytes() const { return 2 * copied_bytes() + 2 * count * int64_t(sizeof(int64_t)); }
};

// 64 KiB is one 16-token page of K and V for Hkv=8, D=128 in 16-bit; 2 MiB is a whole layer group.
void copy_pages_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"page_bytes", "count"});
  for (int64_t count : {16, 256}) b->Args({64 << 10, count});
  for (int64_t count : {4, 32}) b->Args({2 << 20, count});
}

void BM_CopyPages(benchmark::State& state) {
  CopySetup setup(state.range(0), state.range(1));
  const kvcore::CopyPagesArgs args = setup.args();
  for (auto _ : state) {
    kvcore::copy_pages_cpu(args);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * setup.read_plus_written_bytes());
  label_threads(state);
}
BENCHMARK(BM_CopyPages)->Apply(copy_pages_args)->UseRealTime();

// Peer: one memcpy of count * page_bytes contiguous bytes.
void BM_CopyPages_MemcpyPeer(benchmark::State& state) {
  CopySetup setup(state.range(0), state.range(1));
  for (auto _ : state) {
    std::memcpy(setup.dst.data(), setup.src.data(), size_t(setup.copied_bytes()));
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * setup.copied_bytes());
}
BENCHMARK(BM_CopyPages_MemcpyPeer)->Apply(copy_pages_args)->UseRealTime();

}  // namespace
