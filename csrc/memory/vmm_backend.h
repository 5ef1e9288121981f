// The virtual-memory primitives a PagePool is built on, with two real implementations: CUDA VMM
// (cuMem* through the run-time-resolved driver table) and host VMM (memfd pages mapped into a
// reserved range). Internal to csrc/memory.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvcore/memory.h"

namespace kvcore::memory_detail {

// Driver-call counts and latencies, keyed by call name.
class CallStats {
 public:
  void add(const char* name, double us) {
    auto& c = calls_[name];
    ++c.count;
    c.total_us += us;
  }
  const std::map<std::string, PoolStats::Calls>& calls() const { return calls_; }

 private:
  std::map<std::string, PoolStats::Calls> calls_;
};

// Times one call into CallStats when it goes out of scope.
class ScopedCall {
 public:
  ScopedCall(CallStats& stats, const char* name, int64_t count = 1)
      : stats_(stats), name_(name), count_(count), start_(std::chrono::steady_clock::now()) {}
  ~ScopedCall() {
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start_).count();
    for (int64_t i = 0; i < count_; ++i) stats_.add(name_, us / double(count_));
  }

 private:
  CallStats& stats_;
  const char* name_;
  int64_t count_;
  std::chrono::steady_clock::time_point start_;
};

// One physical page as the backend knows it (CUmemGenericAllocationHandle or memfd offset).
using PhysHandle = uint64_t;
// A recorded stream position; 0 means "already complete".
using EventId = uint64_t;

struct CopyRun {
  void* dst;
  const void* src;
  int64_t bytes;
};

class VmmBackend {
 public:
  virtual ~VmmBackend() = default;
  virtual Device device() const = 0;
  virtual int64_t granularity() const = 0;
  virtual int64_t default_page_bytes() const = 0;
  // Called once by the pool before anything else.
  virtual void set_page_bytes(int64_t page_bytes) = 0;

  // How unmapped pages read as zeros (PoolStats::zero_page_access).
  virtual std::string zero_page_access() const = 0;

  // Reserves `pages` pages of address space, all reading as zeros.
  virtual uintptr_t reserve(int64_t pages) = 0;
  virtual void release_reservation(uintptr_t va, int64_t pages) = 0;

  virtual PhysHandle create_page() = 0;
  virtual void destroy_page(PhysHandle page) = 0;

  // Maps physical pages at consecutive pages starting at va, read-write; all or nothing.
  virtual void map(uintptr_t va, const PhysHandle* pages, int64_t count) = 0;
  // Puts the zero page back under `count` pages starting at va.
  virtual void unmap(uintptr_t va, int64_t count) = 0;

  // The host tier: page-aligned memory copies can reach asynchronously (pinned on CUDA).
  virtual void* alloc_host(int64_t bytes) = 0;
  virtual void free_host(void* p, int64_t bytes) = 0;

  // Queues copies on `stream` (CPU: performs them) and returns an event after them.
  virtual EventId copy(const std::vector<CopyRun>& runs, StreamHandle stream) = 0;
  // An event after everything queued on `stream` so far (CPU: 0).
  virtual EventId record(StreamHandle stream) = 0;
  virtual bool query(EventId event) = 0;
  virtual void wait(EventId event) = 0;
  virtual void destroy_event(EventId event) = 0;
  // Makes later work on `stream` wait for `event` on the device (no host blocking).
  virtual void stream_wait(StreamHandle stream, EventId event) = 0;

  CallStats& stats() { return stats_; }

 protected:
  CallStats stats_;
};

std::unique_ptr<VmmBackend> make_host_vmm_backend();
// Throws KVCoreError when CUDA or its driver API is unavailable.
std::unique_ptr<VmmBackend> make_cuda_vmm_backend(int device);

}  // namespace kvcore::memory_detail
