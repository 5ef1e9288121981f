// Virtual-memory tensors (kvcore/memory.h): per-page latency of map + unmap (one page per call and
// 64-page runs), alias and page creation, and offload + prefetch bandwidth next to a plain memcpy
// of the same bytes (CUDA: pinned host memory). Each runs on the CPU (memfd host backend) and on
// CUDA device 0; the CUDA cases are skipped with the reason when CUDA is unusable here.
//
// Latency counters are microseconds per page (map_us, unmap_us, alias_us, create_us, release_us);
// items are pages. Offload + prefetch bytes count each byte moved once per direction (to the host
// tier and back), and so does the memcpy peer, so the bytes_per_second columns compare directly.
// All timings are wall clock (UseRealTime): the CPU copies run on kvcore's thread pool and CUDA work
// runs on the device.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvcore/build_config.h"
#include "kvcore/memory.h"
#include "kvcore/runtime.h"
#include "kvcore/tensor.h"

#if KVCORE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

using kvcore::DType;
using kvcore::Device;
using kvcore::DeviceType;
using Clock = std::chrono::steady_clock;

const Device kCpu{DeviceType::CPU, 0};
const Device kCuda{DeviceType::CUDA, 0};
constexpr int64_t kPages = 64;  // pages mapped and unmapped per iteration in the latency cases

double us_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

// False (and the benchmark skipped with the reason) when `device` cannot run here.
bool usable(benchmark::State& state, Device device) {
  if (!device.is_cuda()) return true;
  const kvcore::CudaStatus status = kvcore::cuda_status();
  if (status.available) return true;
  state.SkipWithError(("CUDA unavailable: " + status.reason).c_str());
  return false;
}

// Waits for the device (the benchmark's own checks; kvcore itself never synchronizes the device).
void sync(Device device) {
#if KVCORE_WITH_CUDA
  if (device.is_cuda()) cudaDeviceSynchronize();
#endif
}

// A counter reported per iteration and per page: total / (iterations * pages).
benchmark::Counter per_page(double total, int64_t pages) {
  return benchmark::Counter(total / double(pages), benchmark::Counter::kAvgIterations);
}

// Fills `bytes` at `p` (host or device memory of `device`) with a byte pattern, or checks it.
void fill(Device device, void* p, int64_t bytes, unsigned char value) {
#if KVCORE_WITH_CUDA
  if (device.is_cuda()) {
    if (cudaMemset(p, value, size_t(bytes)) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess)
      throw std::runtime_error("cudaMemset failed");
    return;
  }
#endif
  std::memset(p, value, size_t(bytes));
}

// Whether the first and last bytes of every page hold `value`.
bool holds(Device device, const void* p, int64_t pages, int64_t page_bytes, unsigned char value) {
  for (int64_t i = 0; i < pages; ++i) {
    for (int64_t offset : {int64_t(0), page_bytes - 64}) {
      unsigned char head[64];
      const char* at = static_cast<const char*>(p) + i * page_bytes + offset;
#if KVCORE_WITH_CUDA
      if (device.is_cuda()) {
        if (cudaMemcpy(head, at, sizeof head, cudaMemcpyDeviceToHost) != cudaSuccess) return false;
      } else
#endif
        std::memcpy(head, at, sizeof head);
      for (unsigned char c : head)
        if (c != value) return false;
    }
  }
  return true;
}

// ---- map + unmap: kPages pages mapped `pages_per_call` at a time, then unmapped the same way.

void BM_MapUnmap(benchmark::State& state, Device device, bool touch) {
  if (!usable(state, device)) return;
  const int64_t per_call = state.range(0);
  kvcore::PagePool pool(device, 0);
  pool.resize(kPages);
  const int64_t pb = pool.page_bytes();
  kvcore::VirtualTensor t(pool, {kPages * pb}, DType::UInt8);
  char* base = static_cast<char*>(t.data());
  double map_us = 0, unmap_us = 0;
  for (auto _ : state) {
    Clock::time_point t0 = Clock::now();
    for (int64_t first = 0; first < kPages; first += per_call) t.map(first, per_call);
    map_us += us_since(t0);
    if (touch) {  // CPU: fault the pages in, so unmap tears down populated mappings as after real use
      state.PauseTiming();
      for (int64_t off = 0; off < kPages * pb; off += 4096) base[off] = 1;
      state.ResumeTiming();
    }
    t0 = Clock::now();
    for (int64_t first = 0; first < kPages; first += per_call) t.unmap(first, per_call);
    unmap_us += us_since(t0);
  }
  sync(device);
  if (pool.free_pages() != kPages) state.SkipWithError("unmapped pages did not return to the pool");
  state.SetItemsProcessed(state.iterations() * kPages);
  state.counters["map_us"] = per_page(map_us, kPages);
  state.counters["unmap_us"] = per_page(unmap_us, kPages);
  state.SetLabel(std::to_string(pb >> 20) + " MiB pages");
}
BENCHMARK_CAPTURE(BM_MapUnmap, cpu, kCpu, false)->ArgName("pages_per_call")->Arg(1)->Arg(kPages)->UseRealTime();
BENCHMARK_CAPTURE(BM_MapUnmap, cpu_touched, kCpu, true)
    ->ArgName("pages_per_call")->Arg(1)->Arg(kPages)->UseRealTime();
BENCHMARK_CAPTURE(BM_MapUnmap, cuda, kCuda, false)->ArgName("pages_per_call")->Arg(1)->Arg(kPages)->UseRealTime();

// ---- alias: map the physical pages of one tensor into another, one page per call.

void BM_Alias(benchmark::State& state, Device device) {
  if (!usable(state, device)) return;
  kvcore::PagePool pool(device, 0);
  pool.resize(kPages);
  const int64_t pb = pool.page_bytes();
  kvcore::VirtualTensor owner(pool, {kPages * pb}, DType::UInt8);
  kvcore::VirtualTensor other(pool, {kPages * pb}, DType::UInt8);
  owner.map(0, kPages);
  fill(device, owner.data(), kPages * pb, 0x5a);
  double alias_us = 0;
  for (auto _ : state) {
    const Clock::time_point t0 = Clock::now();
    for (int64_t i = 0; i < kPages; ++i) other.alias(i, owner, i);
    alias_us += us_since(t0);
    state.PauseTiming();
    if (!holds(device, other.data(), kPages, pb, 0x5a)) {
      state.SkipWithError("aliased pages do not show the owner's contents");
      break;
    }
    other.unmap(0, kPages);
    state.ResumeTiming();
  }
  state.SetItemsProcessed(state.iterations() * kPages);
  state.counters["alias_us"] = per_page(alias_us, kPages);
}
BENCHMARK_CAPTURE(BM_Alias, cpu, kCpu)->UseRealTime();
BENCHMARK_CAPTURE(BM_Alias, cuda, kCuda)->UseRealTime();

// ---- page creation: grow the pool by `pages` (cuMemCreate / memfd fallocate), then shrink it back.

void BM_CreateRelease(benchmark::State& state, Device device) {
  if (!usable(state, device)) return;
  const int64_t pages = state.range(0);
  kvcore::PagePool pool(device, 0);
  double create_us = 0, release_us = 0;
  for (auto _ : state) {
    Clock::time_point t0 = Clock::now();
    pool.resize(pages);
    create_us += us_since(t0);
    t0 = Clock::now();
    pool.resize(0);
    release_us += us_since(t0);
  }
  state.SetItemsProcessed(state.iterations() * pages);
  state.counters["create_us"] = per_page(create_us, pages);
  state.counters["release_us"] = per_page(release_us, pages);
}
BENCHMARK_CAPTURE(BM_CreateRelease, cpu, kCpu)->ArgName("pages")->Arg(16)->UseRealTime();
BENCHMARK_CAPTURE(BM_CreateRelease, cuda, kCuda)->ArgName("pages")->Arg(16)->UseRealTime();

// ---- offload + prefetch: `pages` mapped pages to the host tier and back, waiting for each.

void BM_OffloadPrefetch(benchmark::State& state, Device device) {
  if (!usable(state, device)) return;
  const int64_t mib2 = int64_t(2) << 20;
  kvcore::PagePool pool(device, state.range(0) * mib2, state.range(0) * mib2);
  const int64_t pages = pool.capacity_pages(), pb = pool.page_bytes();
  kvcore::VirtualTensor t(pool, {pages * pb}, DType::UInt8);
  t.map(0, pages);
  fill(device, t.data(), pages * pb, 0xa7);
  t.offload(0, pages).wait();  // warm-up: faults in the host tier (CPU), as the peer's memset does
  t.prefetch(0, pages).wait();
  double offload_us = 0, prefetch_us = 0;
  for (auto _ : state) {
    Clock::time_point t0 = Clock::now();
    t.offload(0, pages).wait();
    offload_us += us_since(t0);
    t0 = Clock::now();
    t.prefetch(0, pages).wait();
    prefetch_us += us_since(t0);
  }
  if (!holds(device, t.data(), pages, pb, 0xa7)) state.SkipWithError("prefetched pages differ from the offloaded ones");
  const double bytes = double(pages * pb) * double(state.iterations());
  state.SetBytesProcessed(2 * int64_t(bytes));
  state.counters["offload_GBps"] = benchmark::Counter(offload_us > 0 ? bytes / offload_us / 1e3 : 0);
  state.counters["prefetch_GBps"] = benchmark::Counter(prefetch_us > 0 ? bytes / prefetch_us / 1e3 : 0);
}
BENCHMARK_CAPTURE(BM_OffloadPrefetch, cpu, kCpu)->ArgName("pages")->Arg(8)->Arg(64)->UseRealTime();
BENCHMARK_CAPTURE(BM_OffloadPrefetch, cuda, kCuda)->ArgName("pages")->Arg(8)->Arg(64)->UseRealTime();

// Peer: the same bytes copied to a (pinned) host buffer and back with plain memcpy, contiguous.

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

void BM_OffloadPrefetch_MemcpyPeer(benchmark::State& state, Device device) {
  if (!usable(state, device)) return;
  const int64_t bytes = state.range(0) * (int64_t(2) << 20);
  double offload_us = 0, prefetch_us = 0;
  if (device.is_cuda()) {
#if KVCORE_WITH_CUDA
    void* dev = nullptr;
    void* host = nullptr;
    if (cudaMalloc(&dev, size_t(bytes)) != cudaSuccess || cudaHostAlloc(&host, size_t(bytes), cudaHostAllocPortable) != cudaSuccess) {
      cudaFree(dev);
      state.SkipWithError("cudaMalloc / cudaHostAlloc failed");
      return;
    }
    fill(device, dev, bytes, 0xa7);
    std::memset(host, 0, size_t(bytes));
    for (auto _ : state) {
      Clock::time_point t0 = Clock::now();
      cudaMemcpyAsync(host, dev, size_t(bytes), cudaMemcpyDeviceToHost, nullptr);
      cudaStreamSynchronize(nullptr);
      offload_us += us_since(t0);
      t0 = Clock::now();
      cudaMemcpyAsync(dev, host, size_t(bytes), cudaMemcpyHostToDevice, nullptr);
      cudaStreamSynchronize(nullptr);
      prefetch_us += us_since(t0);
    }
    cudaFreeHost(host);
    cudaFree(dev);
#endif
  } else {
    // Page-aligned, like the pool's pages and host tier.
    std::unique_ptr<char, AlignedFree> dev(static_cast<char*>(std::aligned_alloc(4096, size_t(bytes))));
    std::unique_ptr<char, AlignedFree> host(static_cast<char*>(std::aligned_alloc(4096, size_t(bytes))));
    if (!dev || !host) throw std::bad_alloc();
    std::memset(dev.get(), 0xa7, size_t(bytes));
    std::memset(host.get(), 0, size_t(bytes));
    for (auto _ : state) {
      Clock::time_point t0 = Clock::now();
      std::memcpy(host.get(), dev.get(), size_t(bytes));
      benchmark::ClobberMemory();
      offload_us += us_since(t0);
      t0 = Clock::now();
      std::memcpy(dev.get(), host.get(), size_t(bytes));
      benchmark::ClobberMemory();
      prefetch_us += us_since(t0);
    }
  }
  const double total = double(bytes) * double(state.iterations());
  state.SetBytesProcessed(2 * int64_t(total));
  state.counters["offload_GBps"] = benchmark::Counter(offload_us > 0 ? total / offload_us / 1e3 : 0);
  state.counters["prefetch_GBps"] = benchmark::Counter(prefetch_us > 0 ? total / prefetch_us / 1e3 : 0);
}
BENCHMARK_CAPTURE(BM_OffloadPrefetch_MemcpyPeer, cpu, kCpu)->ArgName("pages")->Arg(8)->Arg(64)->UseRealTime();
BENCHMARK_CAPTURE(BM_OffloadPrefetch_MemcpyPeer, cuda, kCuda)->ArgName("pages")->Arg(8)->Arg(64)->UseRealTime();

}  // namespace
