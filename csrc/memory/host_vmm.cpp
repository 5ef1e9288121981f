// Host VMM backend: the exact host analogue of cuMemCreate/cuMemMap. Physical pages are slices of
// one memfd (created with fallocate, released with a hole punch); a tensor's range is reserved with
// mmap and pages are mapped into it with mmap(MAP_FIXED | MAP_SHARED). Unmapped pages are private
// anonymous zero-fill memory: reads return zeros, a stray write is harmless (dropped at the next
// map) instead of crashing the process.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "kvcore/error.h"
#include "kvcore/parallel.h"
#include "vmm_backend.h"

namespace kvcore::memory_detail {
namespace {

std::string errno_text() { return std::strerror(errno); }

class HostVmmBackend final : public VmmBackend {
 public:
  HostVmmBackend() {
    fd_ = memfd_create("kvcore-page-pool", MFD_CLOEXEC);
    KVCORE_CHECK(fd_ >= 0, "memfd_create failed: ", errno_text());
  }
  ~HostVmmBackend() override { ::close(fd_); }

  Device device() const override { return {DeviceType::CPU, 0}; }
  std::string zero_page_access() const override { return "private"; }
  int64_t granularity() const override { return int64_t(sysconf(_SC_PAGESIZE)); }
  int64_t default_page_bytes() const override { return int64_t(2) << 20; }
  void set_page_bytes(int64_t page_bytes) override { page_bytes_ = page_bytes; }

  uintptr_t reserve(int64_t pages) override {
    ScopedCall call(stats_, "reserve");
    void* p = mmap(nullptr, size_t(pages * page_bytes_), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    KVCORE_CHECK_MEMORY(p != MAP_FAILED, "cannot reserve ", pages * page_bytes_, " bytes of address space: ",
                        errno_text());
    return reinterpret_cast<uintptr_t>(p);
  }

  void release_reservation(uintptr_t va, int64_t pages) override {
    ScopedCall call(stats_, "release_reservation");
    munmap(reinterpret_cast<void*>(va), size_t(pages * page_bytes_));
  }

  PhysHandle create_page() override {
    ScopedCall call(stats_, "create");
    int64_t offset;
    if (!free_offsets_.empty()) {
      offset = free_offsets_.back();
      free_offsets_.pop_back();
    } else {
      offset = file_pages_ * page_bytes_;
      KVCORE_CHECK(ftruncate(fd_, off_t(offset + page_bytes_)) == 0, "ftruncate of the page pool failed: ",
                   errno_text());
      ++file_pages_;
    }
    // Allocate the backing memory now, so pool capacity is real memory, as with cuMemCreate.
    if (fallocate(fd_, 0, off_t(offset), off_t(page_bytes_)) != 0) {
      const std::string why = errno_text();
      free_offsets_.push_back(offset);
      KVCORE_THROW(ErrorKind::Memory, "cannot allocate a ", page_bytes_, "-byte host page: ", why);
    }
    return PhysHandle(offset);
  }

  void destroy_page(PhysHandle page) override {
    ScopedCall call(stats_, "release");
    fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(page), off_t(page_bytes_));
    free_offsets_.push_back(int64_t(page));
  }

  void map(uintptr_t va, const PhysHandle* pages, int64_t count) override {
    int64_t done = 0;
    while (done < count) {
      // Pages adjacent in the file map with one call.
      int64_t run = 1;
      while (done + run < count && pages[done + run] == pages[done] + PhysHandle(run * page_bytes_)) ++run;
      void* at = reinterpret_cast<void*>(va + uintptr_t(done * page_bytes_));
      void* p;
      {
        ScopedCall call(stats_, "map", run);
        // MAP_POPULATE: the page-table entries are filled in one pass here, instead of one fault per
        // 4 KiB on first touch (which made a prefetch into fresh mappings ~3x slower than a memcpy).
        p = mmap(at, size_t(run * page_bytes_), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd_,
                 off_t(pages[done]));
      }
      if (p == MAP_FAILED) {
        const std::string why = errno_text();
        if (done) unmap(va, done);  // all or nothing
        KVCORE_THROW(ErrorKind::Memory, "mmap of ", run, " pool page(s) failed: ", why);
      }
      done += run;
    }
  }

  void unmap(uintptr_t va, int64_t count) override {
    ScopedCall call(stats_, "unmap", count);
    void* p = mmap(reinterpret_cast<void*>(va), size_t(count * page_bytes_), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    KVCORE_CHECK(p != MAP_FAILED, "remapping the zero page failed: ", errno_text());
  }

  void* alloc_host(int64_t bytes) override {
    void* p = mmap(nullptr, size_t(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    KVCORE_CHECK_MEMORY(p != MAP_FAILED, "cannot allocate a host tier of ", bytes, " bytes: ", errno_text());
    return p;
  }
  void free_host(void* p, int64_t bytes) override { munmap(p, size_t(bytes)); }

  EventId copy(const std::vector<CopyRun>& runs, StreamHandle) override {
    ScopedCall call(stats_, "copy", int64_t(runs.size()));
    // 1 MiB pieces, so one long run still spreads over the worker threads.
    constexpr int64_t kPiece = int64_t(1) << 20;
    std::vector<CopyRun> pieces;
    for (const CopyRun& r : runs)
      for (int64_t off = 0; off < r.bytes; off += kPiece)
        pieces.push_back({static_cast<char*>(r.dst) + off, static_cast<const char*>(r.src) + off,
                          std::min(kPiece, r.bytes - off)});
    parallel_for(int64_t(pieces.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const CopyRun& p = pieces[size_t(i)];
        std::memcpy(p.dst, p.src, size_t(p.bytes));
      }
    });
    return 0;
  }
  EventId record(StreamHandle) override { return 0; }
  bool query(EventId) override { return true; }
  void wait(EventId) override {}
  void destroy_event(EventId) override {}
  void stream_wait(StreamHandle, EventId) override {}

 private:
  int fd_ = -1;
  int64_t page_bytes_ = 0;
  int64_t file_pages_ = 0;
  std::vector<int64_t> free_offsets_;
};

}  // namespace

std::unique_ptr<VmmBackend> make_host_vmm_backend() { return std::make_unique<HostVmmBackend>(); }

}  // namespace kvcore::memory_detail
