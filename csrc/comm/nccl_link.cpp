// The nccl link's communicator: NCCL moves bytes between GPUs (one grouped send/receive per peer);
// the arithmetic stays in reduce_in_order_cuda. CUDA builds only (see core/cuda_unavailable.cpp).
#include "kvcore/build_config.h"
#if KVCORE_WITH_CUDA

#include <chrono>
#include <cstring>
#include <thread>

#include "kvcore/comm.h"
#include "kvcore/cuda_utils.h"
#include "kvcore/error.h"
#include "nccl_api.h"

namespace kvcore::comm {
namespace {

using Clock = std::chrono::steady_clock;

nccl::Comm handle(void* comm) { return static_cast<nccl::Comm>(comm); }

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// Polls a non-blocking communicator until its pending work (init, a grouped exchange) has ended:
// that work's result, or kInProgress when the deadline came first.
nccl::Result wait_until_ready(const nccl::Api& api, nccl::Comm comm, Clock::time_point deadline) {
  for (int polls = 0;; ++polls) {
    nccl::Result state = nccl::kInProgress;
    const nccl::Result r = api.CommGetAsyncError(comm, &state);
    if (r != nccl::kSuccess) return r;
    if (state != nccl::kInProgress) return state;
    if (Clock::now() >= deadline) return nccl::kInProgress;
    std::this_thread::sleep_for(std::chrono::microseconds(polls < 1000 ? 20 : 1000));
  }
}

void check_buffers(const std::vector<std::optional<NcclBuffer>>& buffers, const char* what, int rank, int world) {
  KVCORE_CHECK_VALUE(int(buffers.size()) == world, what, ": expected one entry per rank (", world, "), got ",
                     buffers.size());
  KVCORE_CHECK_VALUE(!buffers[size_t(rank)] || buffers[size_t(rank)]->bytes == 0, what, "[", rank,
                     "]: a rank does not exchange with itself; pass None");
  for (size_t p = 0; p < buffers.size(); ++p)
    KVCORE_CHECK_VALUE(!buffers[p] || buffers[p]->bytes == 0 || buffers[p]->ptr != 0, what, "[", p,
                       "]: null pointer");
}

}  // namespace

NcclComm::NcclComm(const std::string& unique_id, int rank, int world_size, int device, double timeout_s)
    : rank_(rank), world_size_(world_size), device_(device), timeout_s_(timeout_s) {
  require_cuda("NcclComm");
  const nccl::Api& api = nccl::api();
  KVCORE_CHECK_VALUE(unique_id.size() == sizeof(nccl::UniqueId), "unique_id: expected ", sizeof(nccl::UniqueId),
                     " bytes (from nccl_unique_id()), got ", unique_id.size());
  KVCORE_CHECK_VALUE(world_size >= 1, "world_size: expected >= 1, got ", world_size);
  KVCORE_CHECK_VALUE(rank >= 0 && rank < world_size, "rank: expected 0..", world_size - 1, ", got ", rank);
  KVCORE_CHECK_VALUE(device >= 0 && device < cuda_status().device_count, "device: expected 0..",
                     cuda_status().device_count - 1, ", got ", device);
  KVCORE_CHECK_VALUE(timeout_s > 0, "timeout: expected > 0 seconds, got ", timeout_s);
  nccl::UniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  CudaDeviceGuard guard(device);  // NCCL binds the communicator to the current device
  // Non-blocking, so a rank that never joins ends the wait at the timeout instead of hanging it.
  nccl::Config config;
  config.blocking = 0;
  const Clock::time_point deadline = deadline_after(timeout_s);
  nccl::Comm comm = nullptr;
  nccl::Result r = api.CommInitRankConfig(&comm, world_size, id, rank, &config);
  if (r == nccl::kInProgress) r = wait_until_ready(api, comm, deadline);
  if (r == nccl::kInProgress) {
    api.CommAbort(comm);
    KVCORE_THROW(ErrorKind::Runtime, "ncclCommInitRank: not every rank joined within ", timeout_s, " s (rank ", rank,
                 " of ", world_size, "); the communicator was aborted");
  }
  try {
    nccl::check(r, "ncclCommInitRank", comm);  // reads NCCL's last error before the abort frees it
  } catch (...) {
    if (comm) api.CommAbort(comm);
    throw;
  }
  comm_ = comm;
}

NcclComm::~NcclComm() {
  if (!comm_) return;
  // A destructor must not throw: the device switch and NCCL's result are best effort.
  int previous = -1;
  cudaGetDevice(&previous);
  cudaSetDevice(device_);
  nccl::api().CommDestroy(handle(comm_));
  if (previous >= 0) cudaSetDevice(previous);
}

void NcclComm::exchange(const std::vector<std::optional<NcclBuffer>>& sends,
                        const std::vector<std::optional<NcclBuffer>>& recvs, StreamHandle stream) {
  KVCORE_CHECK(comm_ != nullptr, "NcclComm: the communicator was aborted");
  check_buffers(sends, "sends", rank_, world_size_);
  check_buffers(recvs, "recvs", rank_, world_size_);
  const nccl::Api& api = nccl::api();
  CudaDeviceGuard guard(device_);
  nccl::Comm comm = handle(comm_);
  auto* cuda_stream = reinterpret_cast<nccl::Stream>(stream);
  nccl::check(api.GroupStart(), "ncclGroupStart", comm);
  // Every call between GroupStart and GroupEnd only queues work; errors are reported after GroupEnd
  // closes the group, so the group is always closed.
  nccl::Result first_error = nccl::kSuccess;
  const char* failed = nullptr;
  for (int p = 0; p < world_size_; ++p) {
    if (p == rank_) continue;
    const auto& s = sends[size_t(p)];
    const auto& r = recvs[size_t(p)];
    if (s && s->bytes) {
      const nccl::Result res =
          api.Send(reinterpret_cast<const void*>(s->ptr), s->bytes, nccl::kUint8, p, comm, cuda_stream);
      if (res != nccl::kSuccess && first_error == nccl::kSuccess) first_error = res, failed = "ncclSend";
    }
    if (r && r->bytes) {
      const nccl::Result res = api.Recv(reinterpret_cast<void*>(r->ptr), r->bytes, nccl::kUint8, p, comm, cuda_stream);
      if (res != nccl::kSuccess && first_error == nccl::kSuccess) first_error = res, failed = "ncclRecv";
    }
  }
  nccl::Result end = api.GroupEnd();
  if (failed) nccl::check(first_error, failed, comm);
  // A non-blocking communicator may still be connecting to a peer (first exchange): bounded wait.
  if (end == nccl::kInProgress) end = wait_until_ready(api, comm, deadline_after(timeout_s_));
  KVCORE_CHECK(end != nccl::kInProgress, "ncclGroupEnd: the peers did not take part within ", timeout_s_, " s");
  nccl::check(end, "ncclGroupEnd", comm);
}

std::string NcclComm::async_error() {
  if (!comm_) return "the communicator was aborted";
  const nccl::Api& api = nccl::api();
  nccl::Result async = nccl::kSuccess;
  nccl::check(api.CommGetAsyncError(handle(comm_), &async), "ncclCommGetAsyncError", handle(comm_));
  if (async == nccl::kSuccess) return "";
  const char* text = api.GetErrorString(async);
  return text ? text : "unknown NCCL error";
}

void NcclComm::abort() {
  if (!comm_) return;
  CudaDeviceGuard guard(device_);
  nccl::Comm comm = handle(comm_);
  comm_ = nullptr;
  nccl::check(nccl::api().CommAbort(comm), "ncclCommAbort");
}

}  // namespace kvcore::comm

#endif  // KVCORE_WITH_CUDA
