// Multi-link collectives: the pure, deterministic parts shared by the real communicator
// (python/kvcore/comm) and the simulator. A collective over `count` elements of the split dimension
// (all-reduce: the whole buffer; all-gather / reduce-scatter: one rank's chunk) is cut into
// contiguous element ranges, one per link, sized so that all links finish together.
//
// Every rank must compute the same plan from the same inputs, so nothing here reads clocks,
// randomness or process state.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kvcore/runtime.h"
#include "kvcore/tensor.h"

namespace kvcore::comm {

enum class Collective : uint8_t { AllReduce, AllGather, ReduceScatter };
enum class ReduceOp : uint8_t { Sum, Max };

// "all_reduce", "all_gather", "reduce_scatter"; "sum", "max" (ValueError naming `what` otherwise).
Collective parse_collective(const std::string& name, const char* what = "collective");
ReduceOp parse_reduce_op(const std::string& name, const char* what = "op");
const char* collective_name(Collective c);

// Bytes each rank moves over its link per payload byte (the nccl-tests bus factor):
// 2(n-1)/n for all-reduce, (n-1)/n for all-gather and reduce-scatter.
double traffic_factor(Collective c, int world_size);
// nccl-tests payload size: the buffer for all-reduce, the [world * n] side for the others.
double payload_bytes(Collective c, int world_size, int64_t count, int64_t elem_size);

// What the planner knows about one link. Bandwidth is the bus bandwidth the link achieves
// (bytes/s per rank and direction), so time = latency + payload * traffic_factor / bandwidth.
struct LinkModel {
  std::string name;
  double bandwidth = 0;         // bytes/s
  double latency = 0;           // seconds per collective step on this link
  int64_t min_slice_bytes = 0;  // payload below which the link is not worth posting
  int cap_group = -1;           // index of a SharedCap this link's traffic goes through, or -1
  bool up = true;
};

// A bandwidth several links share (PCIe and NIC traffic through one GPU uplink).
struct SharedCap {
  std::string name;
  double bandwidth = 0;  // bytes/s
};

struct Slice {
  int link = 0;
  int64_t begin = 0;  // elements of the split dimension
  int64_t count = 0;
};

struct Plan {
  std::vector<Slice> slices;     // contiguous, in link order, covering [0, count); empty if count == 0
  double predicted_seconds = 0;  // under the models the plan was made from
};

struct PlanRequest {
  Collective collective = Collective::AllReduce;
  int world_size = 2;
  int64_t count = 0;
  int64_t elem_size = 4;
};

struct PlannerOptions {
  int64_t align_bytes = 4096;  // slice boundaries fall on multiples of this many payload bytes
  double min_gain = 0.03;      // split only if it beats the best single link by this fraction
};

// Time of the plan when the links behave as `links` and `caps` say: a discrete-event (fluid)
// simulation where each slice starts after its link's latency and links in one cap group share
// the cap in proportion to their own bandwidths. Used both to predict and to simulate.
double simulate_plan(const Plan& plan, const PlanRequest& req, const std::vector<LinkModel>& links,
                     const std::vector<SharedCap>& caps);
// The same simulation, per link: when each link finishes its slice (0 for links that carry none).
std::vector<double> simulate_link_seconds(const Plan& plan, const PlanRequest& req,
                                          const std::vector<LinkModel>& links, const std::vector<SharedCap>& caps);

// The continuous optimum: smallest T such that the up links, each busy for T minus its latency and
// within the shared caps, carry the whole payload. The analytic bound a discrete plan approaches.
double optimal_seconds(const PlanRequest& req, const std::vector<LinkModel>& links, const std::vector<SharedCap>& caps);

// Splits so that all links finish together; drops links below their minimum slice; falls back to
// the best single link when splitting does not pay min_gain.
Plan plan_split(const PlanRequest& req, const std::vector<LinkModel>& links, const std::vector<SharedCap>& caps,
                const PlannerOptions& options = {});

// A split in given proportions (one weight per link, >= 0; down links get nothing), aligned like
// plan_split. Used for forced splits in tests and for a frozen split.
Plan plan_weights(const PlanRequest& req, const std::vector<double>& weights, const std::vector<LinkModel>& links,
                  const std::vector<SharedCap>& caps, const PlannerOptions& options = {});

struct BalancerOptions {
  double damping = 0.5;  // weight of a new observation in the bandwidth estimate
  PlannerOptions planner;
};

// Two-stage balancing: plans from the configured / measured link models, then moves each link's
// bandwidth estimate toward what completion times show. Feed every rank the same observations
// (the maximum over ranks) and every rank keeps the same estimates and makes the same plans.
class Balancer {
 public:
  Balancer(std::vector<LinkModel> links, std::vector<SharedCap> caps, BalancerOptions options = {});

  Plan plan(const PlanRequest& req) const;
  // seconds[i]: how long link i took for its slice of `plan` (slowest rank); ignored for links
  // that carried nothing or whose transfer time is dominated by latency.
  void observe(const PlanRequest& req, const Plan& plan, const std::vector<double>& seconds);
  void set_up(int link, bool up);
  void set_bandwidth(int link, double bandwidth);

  const std::vector<LinkModel>& links() const { return links_; }
  const std::vector<SharedCap>& caps() const { return caps_; }
  const BalancerOptions& options() const { return options_; }
  int64_t updates() const { return updates_; }

 private:
  void check_link(int link) const;
  std::vector<LinkModel> links_;
  std::vector<SharedCap> caps_;
  BalancerOptions options_;
  int64_t updates_ = 0;
};

// One simulated size: the balanced multi-link plan after `iterations` collectives, against the
// reference link alone and the analytic bound.
struct SimPoint {
  int64_t bytes = 0;  // payload bytes (nccl-tests size)
  double seconds = 0;
  double reference_seconds = 0;  // the reference link alone
  double bound_seconds = 0;      // optimal_seconds under the true models
  std::vector<double> link_fraction;  // payload share per link
  double busbw() const;               // bytes/s
  double reference_busbw() const;
  double bound_busbw() const;
  Collective collective = Collective::AllReduce;
  int world_size = 2;
};

// Runs the balancer against simulated links: it starts from `estimates` (configured values),
// observes the simulated completion times for `iterations` collectives of each size, and reports
// the last. `truth` and `estimates` list the same links in the same order.
std::vector<SimPoint> simulate_sweep(Collective c, int world_size, int64_t elem_size, const std::vector<int64_t>& sizes,
                                     const std::vector<LinkModel>& truth, const std::vector<SharedCap>& true_caps,
                                     const std::vector<LinkModel>& estimates, const std::vector<SharedCap>& caps,
                                     int reference_link, int iterations, const BalancerOptions& options = {});

// out[i] = op(inputs[0][i], inputs[1][i], ...) combined in input (rank) order; 16-bit floats
// accumulate in float and round once, so the result depends only on the inputs' order.
// All views 1-D, contiguous, of `dtype` (float32, float16, bfloat16, int32); int32 sums wrap.
void reduce_in_order(const std::vector<const void*>& inputs, void* out, int64_t count, DType dtype, ReduceOp op);

// The argument checks both reductions share (ValueError / TypeError naming the argument).
void check_reduce_args(size_t num_inputs, int64_t count, DType dtype);

// The most inputs (ranks) one CUDA reduction takes: their pointers travel in the kernel's arguments.
constexpr int kMaxCudaReduceInputs = 64;

// reduce_in_order on device pointers (all on one GPU), asynchronous on `stream`, bitwise identical to
// the CPU version: the same order, float accumulation with one rounding, plain adds (no FMA).
// `out` may alias an input exactly (element-wise), never partially.
void reduce_in_order_cuda(const std::vector<const void*>& inputs, void* out, int64_t count, DType dtype, ReduceOp op,
                          StreamHandle stream);

// Whether libnccl.so.2 can be loaded and has the entry points the nccl link uses; the reason when not.
std::pair<bool, std::string> nccl_status();

// A fresh ncclUniqueId (128 opaque bytes) for rank 0 to publish; KVCoreError when NCCL is unavailable.
std::string nccl_unique_id();

// A byte range on the GPU that one exchange sends or receives.
struct NcclBuffer {
  uintptr_t ptr = 0;
  size_t bytes = 0;
};

// One NCCL communicator over libnccl.so.2 (loaded at run time). It only moves bytes: the
// collectives reduce with reduce_in_order_cuda, so results match the other links bit for bit.
class NcclComm {
 public:
  // Waits until all `world_size` ranks have joined (NCCL's bootstrap), at most `timeout_s` seconds
  // (then aborts and raises KVCoreError). `device`: this rank's GPU. Later exchanges that must wait
  // for a peer (the first one connects) are bounded by the same timeout.
  NcclComm(const std::string& unique_id, int rank, int world_size, int device, double timeout_s);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // One grouped send/receive: sends[p] to rank p, recvs[p] from rank p (std::nullopt: none;
  // entries for this rank must be empty). Asynchronous on `stream`.
  void exchange(const std::vector<std::optional<NcclBuffer>>& sends,
                const std::vector<std::optional<NcclBuffer>>& recvs, StreamHandle stream);
  // NCCL's asynchronous error (e.g. a peer vanished), or "" while the communicator is healthy.
  std::string async_error();
  // Ends every pending operation and frees the communicator; later calls raise KVCoreError.
  void abort();

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int device() const { return device_; }

 private:
  void* comm_ = nullptr;  // ncclComm_t
  int rank_ = 0;
  int world_size_ = 0;
  int device_ = 0;
  double timeout_s_ = 0;
};

}  // namespace kvcore::comm
