// Virtual-memory tensors over one pool of physical pages (after vTensor and eLLM).
//
// A PagePool owns physical pages of `page_bytes` each (CUDA: cuMemCreate handles of the device's
// granularity or a multiple; CPU: slices of one memfd) plus an optional host tier of page-sized
// slots for offload. A VirtualTensor reserves its whole address range once (the address never
// changes, so CUDA graphs may capture it) and maps pool pages into it on demand. Pages can be shared
// between tensors (reference-counted), offloaded to the host tier with their contents, prefetched
// back into any free page, and the pool can grow and shrink at run time.
//
// Where nothing is mapped, a zero page is: reads return zeros. On CUDA it is one read-only physical
// page mapped under every unmapped page, so a stray write faults instead of corrupting data; on the
// CPU it is private anonymous memory, so a stray write is harmless (it is dropped at the next map).
//
// Thread-safe: one mutex per pool guards the pool and all its tensors. Releases that kernels may
// still be reading are ordered behind an event recorded on the caller's stream, never behind a
// device-wide or stream-wide synchronization.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvcore/runtime.h"
#include "kvcore/tensor.h"

namespace kvcore {

class PoolState;          // csrc/memory/page_pool.cpp
class VirtualTensorState;

// An asynchronous offload or prefetch. CPU transfers complete before the call returns.
class Transfer {
 public:
  Transfer() = default;
  bool done() const;
  void wait() const;  // blocks on the transfer's event only (no device or stream synchronization)
  int64_t bytes() const { return bytes_; }

 private:
  friend class VirtualTensor;
  std::shared_ptr<PoolState> pool_;
  uint64_t ticket_ = 0;  // 0: already complete
  int64_t bytes_ = 0;
};

struct PoolStats {
  int64_t page_bytes = 0;
  int64_t granularity = 0;       // the device's VMM allocation granularity
  int64_t pages_total = 0;       // capacity_pages
  int64_t pages_free = 0;
  int64_t pages_mapped = 0;      // physical pages with at least one mapping
  int64_t pages_shared = 0;      // physical pages mapped more than once
  int64_t pages_releasing = 0;   // unmapped or offloaded, waiting for in-flight work on their stream
  int64_t host_pages_total = 0;
  int64_t host_pages_free = 0;
  int64_t pages_offloaded = 0;   // host slots holding offloaded contents
  int64_t tensors = 0;           // live virtual tensors
  int64_t reserved_bytes = 0;    // virtual address space reserved by live tensors
  // What unmapped pages read through: "read-only" zero page (a stray write faults), "read-write"
  // (the driver refused read-only access: a stray write would change what every unmapped page
  // reads), or "private" (host backend: anonymous zero-fill memory, a stray write stays local).
  std::string zero_page_access;
  struct Calls {
    int64_t count = 0;
    double total_us = 0;
  };
  std::map<std::string, Calls> driver_calls;  // e.g. "map", "unmap", "set_access", "create"
};

class PagePool {
 public:
  // device: CPU or CUDA; capacity_bytes and host_capacity_bytes are rounded up to whole pages;
  // page_bytes = 0 picks the device granularity (CUDA) or 2 MiB (CPU); it must be a multiple of the
  // granularity.
  PagePool(Device device, int64_t capacity_bytes, int64_t host_capacity_bytes = 0, int64_t page_bytes = 0);

  Device device() const;
  int64_t page_bytes() const;
  int64_t granularity() const;
  int64_t capacity_pages() const;
  int64_t free_pages() const;
  int64_t host_capacity_pages() const;
  int64_t host_free_pages() const;
  PoolStats stats() const;

  // Grows or shrinks the physical pool to `pages`. Shrinking takes free pages first, then asks the
  // reclaim callbacks (newest first) to give back the rest; if it still cannot, it throws MemoryError
  // and the capacity is unchanged.
  void resize(int64_t pages);
  // fn(pages_needed) -> pages it freed (by unmapping or offloading). Returns an id for removal.
  using ReclaimFn = std::function<int64_t(int64_t)>;
  int on_reclaim(ReclaimFn fn);
  void remove_reclaim(int id);

  const std::shared_ptr<PoolState>& state() const { return state_; }

 private:
  std::shared_ptr<PoolState> state_;
};

class VirtualTensor {
 public:
  // Reserves ceil(prod(shape) * itemsize / page_bytes) pages of address space; maps nothing.
  VirtualTensor(const PagePool& pool, std::vector<int64_t> shape, DType dtype);

  void* data() const;                  // fixed for the tensor's lifetime
  const std::vector<int64_t>& shape() const;
  DType dtype() const;
  Device device() const;
  int64_t num_pages() const;
  int64_t page_bytes() const;
  int64_t nbytes() const;              // prod(shape) * itemsize

  // Maps `count` free pool pages at pages [first, first + count). Every page must be unmapped
  // (ValueError otherwise); MemoryError when the pool has too few free pages (nothing changes).
  void map(int64_t first, int64_t count);
  // Unmaps mapped or offloaded pages; their physical pages return to the pool once the work queued
  // on `stream` so far has completed (host slots of offloaded pages are discarded).
  void unmap(int64_t first, int64_t count, StreamHandle stream = 0);
  // Maps whatever is still unmapped among the pages covering the first `nbytes` bytes.
  void ensure(int64_t nbytes);
  // Maps the physical page behind other's page `other_page` at this tensor's page `page`.
  void alias(int64_t page, const VirtualTensor& other, int64_t other_page);
  // Copies mapped pages to free host-tier slots and returns their physical pages to the pool.
  Transfer offload(int64_t first, int64_t count, StreamHandle stream = 0);
  // Maps free pages at offloaded pages and copies their contents back.
  Transfer prefetch(int64_t first, int64_t count, StreamHandle stream = 0);

  bool is_mapped(int64_t page) const;
  bool is_offloaded(int64_t page) const;
  std::vector<int64_t> mapped_pages() const;
  // Physical page id behind `page` (-1 when not mapped): equal ids mean shared memory.
  int64_t physical_page(int64_t page) const;

  // A token held by every exported view (DLPack): the tensor cannot be freed while one lives, and
  // its state lives as long as the token.
  std::shared_ptr<void> retain_view() const;

  // Unmaps everything and releases the address range; any later use throws KVCoreError. Refused
  // (KVCoreError) while views exported with retain_view() are alive.
  void free(StreamHandle stream = 0);
  // Records that work on `stream` uses this tensor's memory (DLPack exports and unmap / offload /
  // prefetch record theirs): a tensor destroyed without free() releases its pages only after the
  // work queued so far on every recorded stream (the legacy default stream when none was).
  void use_stream(StreamHandle stream);
  bool is_freed() const;

  const std::shared_ptr<VirtualTensorState>& state() const { return state_; }

 private:
  std::shared_ptr<VirtualTensorState> state_;
};

}  // namespace kvcore
