// CUDA VMM backend: cuMemAddressReserve / cuMemCreate / cuMemMap / cuMemSetAccess / cuMemUnmap /
// cuMemRelease through the run-time-resolved driver table (libcuda is never linked). Physical pages
// are created once into the pool and reused; a run of pages gets one cuMemSetAccess call. A single
// zero-filled physical page is mapped under every unmapped page, read-only where the driver allows
// it, so padded reads (CUDA-graph batches) never fault.
#include "kvcore/build_config.h"
#if KVCORE_WITH_CUDA

#include <cuda_runtime_api.h>

#include <mutex>
#include <unordered_map>

#include "kvcore/cuda_driver.h"
#include "kvcore/cuda_utils.h"
#include "vmm_backend.h"

namespace kvcore::memory_detail {
namespace {

class CudaVmmBackend final : public VmmBackend {
 public:
  explicit CudaVmmBackend(int device) : device_(device), api_(require_driver_api()) {
    require_cuda("PagePool");
    CudaDeviceGuard guard(device_);
    KVCORE_CUDA_CHECK(cudaFree(nullptr));  // binds the device's primary context for the driver calls
    prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop_.location.id = device_;
    size_t granularity = 0;
    KVCORE_CU_CHECK(api_.cuMemGetAllocationGranularity(&granularity, &prop_, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    granularity_ = int64_t(granularity);
    read_write_.location = prop_.location;
    read_write_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    zero_access_ = read_write_;
    zero_access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
  }

  ~CudaVmmBackend() override {
    CudaDeviceGuard guard(device_);
    for (auto& [id, ev] : events_) cudaEventDestroy(ev);
    if (zero_page_) api_.cuMemRelease(zero_page_);
  }

  Device device() const override { return {DeviceType::CUDA, device_}; }
  int64_t granularity() const override { return granularity_; }
  int64_t default_page_bytes() const override { return granularity_; }

  std::string zero_page_access() const override {
    return zero_access_.flags == CU_MEM_ACCESS_FLAGS_PROT_READ ? "read-only" : "read-write";
  }

  void set_page_bytes(int64_t page_bytes) override {
    page_bytes_ = page_bytes;
    CudaDeviceGuard guard(device_);
    zero_page_ = create_page();
    // Zero it once through a temporary mapping.
    CUdeviceptr va = 0;
    KVCORE_CU_CHECK(api_.cuMemAddressReserve(&va, size_t(page_bytes_), size_t(granularity_), 0, 0));
    KVCORE_CU_CHECK(api_.cuMemMap(va, size_t(page_bytes_), 0, zero_page_, 0));
    KVCORE_CU_CHECK(api_.cuMemSetAccess(va, size_t(page_bytes_), &read_write_, 1));
    // On a private stream, so pool creation does not synchronize anybody else's work.
    cudaStream_t s = nullptr;
    KVCORE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaError_t err = cudaMemsetAsync(reinterpret_cast<void*>(va), 0, size_t(page_bytes_), s);
    if (err == cudaSuccess) err = cudaStreamSynchronize(s);
    cudaStreamDestroy(s);
    KVCORE_CUDA_CHECK(err);
    KVCORE_CU_CHECK(api_.cuMemUnmap(va, size_t(page_bytes_)));
    KVCORE_CU_CHECK(api_.cuMemAddressFree(va, size_t(page_bytes_)));
  }

  uintptr_t reserve(int64_t pages) override {
    CudaDeviceGuard guard(device_);
    CUdeviceptr va = 0;
    {
      ScopedCall call(stats_, "reserve");
      KVCORE_CU_CHECK(api_.cuMemAddressReserve(&va, size_t(pages * page_bytes_), size_t(granularity_), 0, 0));
    }
    int64_t mapped = 0;
    try {
      for (; mapped < pages; ++mapped) map_zero(va + CUdeviceptr(mapped * page_bytes_));
      set_zero_access(va, pages);
    } catch (...) {
      for (int64_t i = 0; i < mapped; ++i) api_.cuMemUnmap(va + CUdeviceptr(i * page_bytes_), size_t(page_bytes_));
      api_.cuMemAddressFree(va, size_t(pages * page_bytes_));
      throw;
    }
    return uintptr_t(va);
  }

  void release_reservation(uintptr_t va, int64_t pages) override {
    CudaDeviceGuard guard(device_);
    {
      ScopedCall call(stats_, "unmap_zero", pages);
      for (int64_t i = 0; i < pages; ++i)
        KVCORE_CU_CHECK(api_.cuMemUnmap(CUdeviceptr(va) + CUdeviceptr(i * page_bytes_), size_t(page_bytes_)));
    }
    ScopedCall call(stats_, "release_reservation");
    KVCORE_CU_CHECK(api_.cuMemAddressFree(CUdeviceptr(va), size_t(pages * page_bytes_)));
  }

  PhysHandle create_page() override {
    CudaDeviceGuard guard(device_);
    ScopedCall call(stats_, "create");
    CUmemGenericAllocationHandle handle = 0;
    KVCORE_CU_CHECK(api_.cuMemCreate(&handle, size_t(page_bytes_), &prop_, 0));
    return PhysHandle(handle);
  }

  void destroy_page(PhysHandle page) override {
    CudaDeviceGuard guard(device_);
    ScopedCall call(stats_, "release");
    KVCORE_CU_CHECK(api_.cuMemRelease(CUmemGenericAllocationHandle(page)));
  }

  // Page by page: the zero page comes off, the real page goes on and gets access at once, so an
  // address is without access only between those calls (the pool waits for the tensor's streams
  // first, so no kernel of this tensor is reading it then). A failed map puts the zero page back
  // readable.
  void map(uintptr_t va, const PhysHandle* pages, int64_t count) override {
    CudaDeviceGuard guard(device_);
    int64_t done = 0;
    try {
      for (; done < count; ++done) {
        const CUdeviceptr at = CUdeviceptr(va) + CUdeviceptr(done * page_bytes_);
        {
          ScopedCall call(stats_, "unmap_zero");
          KVCORE_CU_CHECK(api_.cuMemUnmap(at, size_t(page_bytes_)));  // the zero page
        }
        CUresult r;
        {
          ScopedCall call(stats_, "map");
          r = api_.cuMemMap(at, size_t(page_bytes_), 0, CUmemGenericAllocationHandle(pages[done]), 0);
        }
        if (r != CUDA_SUCCESS) {
          map_zero(at);
          set_zero_access(at, 1);
          KVCORE_CU_CHECK(r);
        }
        ScopedCall call(stats_, "set_access");
        r = api_.cuMemSetAccess(at, size_t(page_bytes_), &read_write_, 1);
        if (r != CUDA_SUCCESS) {
          api_.cuMemUnmap(at, size_t(page_bytes_));
          map_zero(at);
          set_zero_access(at, 1);
          KVCORE_CU_CHECK(r);
        }
      }
    } catch (...) {
      if (done) unmap(va, done);  // all or nothing
      throw;
    }
  }

  void unmap(uintptr_t va, int64_t count) override {
    CudaDeviceGuard guard(device_);
    for (int64_t i = 0; i < count; ++i) {
      const CUdeviceptr at = CUdeviceptr(va) + CUdeviceptr(i * page_bytes_);
      {
        ScopedCall call(stats_, "unmap");
        KVCORE_CU_CHECK(api_.cuMemUnmap(at, size_t(page_bytes_)));
      }
      map_zero(at);
    }
    set_zero_access(CUdeviceptr(va), count);
  }

  void* alloc_host(int64_t bytes) override {
    CudaDeviceGuard guard(device_);
    void* p = nullptr;
    KVCORE_CUDA_CHECK(cudaHostAlloc(&p, size_t(bytes), cudaHostAllocPortable));
    return p;
  }
  void free_host(void* p, int64_t) override { cudaFreeHost(p); }

  EventId copy(const std::vector<CopyRun>& runs, StreamHandle stream) override {
    CudaDeviceGuard guard(device_);
    {
      ScopedCall call(stats_, "copy", int64_t(runs.size()));
      for (const CopyRun& r : runs)
        KVCORE_CUDA_CHECK(cudaMemcpyAsync(r.dst, r.src, size_t(r.bytes), cudaMemcpyDefault, to_cuda_stream(stream)));
    }
    return record(stream);
  }

  EventId record(StreamHandle stream) override {
    CudaDeviceGuard guard(device_);
    cudaEvent_t ev = nullptr;
    KVCORE_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    const cudaError_t err = cudaEventRecord(ev, to_cuda_stream(stream));
    if (err != cudaSuccess) cudaEventDestroy(ev);
    KVCORE_CUDA_CHECK(err);
    std::lock_guard<std::mutex> lock(events_mu_);
    events_[++last_event_] = ev;
    return last_event_;
  }

  bool query(EventId id) override {
    const cudaError_t err = cudaEventQuery(event(id));
    if (err == cudaErrorNotReady) return false;
    KVCORE_CUDA_CHECK(err);
    return true;
  }
  void wait(EventId id) override { KVCORE_CUDA_CHECK(cudaEventSynchronize(event(id))); }
  void destroy_event(EventId id) override {
    std::lock_guard<std::mutex> lock(events_mu_);
    auto it = events_.find(id);
    if (it == events_.end()) return;
    cudaEventDestroy(it->second);
    events_.erase(it);
  }
  void stream_wait(StreamHandle stream, EventId id) override {
    KVCORE_CUDA_CHECK(cudaStreamWaitEvent(to_cuda_stream(stream), event(id), 0));
  }

 private:
  cudaEvent_t event(EventId id) {
    std::lock_guard<std::mutex> lock(events_mu_);
    auto it = events_.find(id);
    KVCORE_CHECK(it != events_.end(), "unknown CUDA event ", id);
    return it->second;
  }

  void map_zero(CUdeviceptr at) {
    ScopedCall call(stats_, "map_zero");
    KVCORE_CU_CHECK(api_.cuMemMap(at, size_t(page_bytes_), 0, zero_page_, 0));
  }

  // Read-only where the driver supports it (a stray write then faults instead of changing what
  // every unmapped page reads); otherwise read-write, which stats() reports (zero_page_access).
  void set_zero_access(CUdeviceptr va, int64_t pages) {
    ScopedCall call(stats_, "set_access_zero");
    CUresult r = api_.cuMemSetAccess(va, size_t(pages * page_bytes_), &zero_access_, 1);
    if (r != CUDA_SUCCESS && zero_access_.flags == CU_MEM_ACCESS_FLAGS_PROT_READ) {
      zero_access_ = read_write_;
      r = api_.cuMemSetAccess(va, size_t(pages * page_bytes_), &zero_access_, 1);
    }
    KVCORE_CU_CHECK(r);
  }

  int device_;
  const DriverApi& api_;
  CUmemAllocationProp prop_{};
  CUmemAccessDesc read_write_{}, zero_access_{};
  int64_t granularity_ = 0, page_bytes_ = 0;
  CUmemGenericAllocationHandle zero_page_ = 0;
  std::mutex events_mu_;
  std::unordered_map<EventId, cudaEvent_t> events_;
  EventId last_event_ = 0;
};

}  // namespace

std::unique_ptr<VmmBackend> make_cuda_vmm_backend(int device) { return std::make_unique<CudaVmmBackend>(device); }

}  // namespace kvcore::memory_detail

#else  // !KVCORE_WITH_CUDA

#include "kvcore/error.h"
#include "vmm_backend.h"

namespace kvcore::memory_detail {
std::unique_ptr<VmmBackend> make_cuda_vmm_backend(int) {
  require_cuda("PagePool");
  return nullptr;
}
}  // namespace kvcore::memory_detail

#endif  // KVCORE_WITH_CUDA
