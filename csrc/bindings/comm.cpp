// Multi-link collectives: the planner, balancer, simulator, in-order reductions (CPU and CUDA) and
// the NCCL communicator for kvcore.comm (python/kvcore/comm), which owns the links and the protocol.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "kvcore/comm.h"
#include "kvcore/error.h"
#include "ndarray.h"

namespace kvcore::bindings {
namespace {

using comm::Balancer;
using comm::LinkModel;
using comm::Plan;
using comm::PlanRequest;
using comm::SharedCap;
using SliceTuple = std::tuple<int, int64_t, int64_t>;  // (link, begin, count)
using Bytes = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using PyBuffer = std::optional<std::pair<uintptr_t, size_t>>;  // (pointer, bytes) or None

PlanRequest make_request(const std::string& collective, int world_size, int64_t count, int64_t elem_size) {
  return PlanRequest{comm::parse_collective(collective), world_size, count, elem_size};
}

std::pair<std::vector<SliceTuple>, double> to_python(const Plan& p) {
  std::vector<SliceTuple> slices;
  for (const auto& s : p.slices) slices.emplace_back(s.link, s.begin, s.count);
  return {slices, p.predicted_seconds};
}

Plan from_python(const std::vector<SliceTuple>& slices) {
  Plan p;
  for (const auto& [link, begin, count] : slices) p.slices.push_back({link, begin, count});
  return p;
}

std::vector<std::optional<comm::NcclBuffer>> to_nccl_buffers(const std::vector<PyBuffer>& buffers) {
  std::vector<std::optional<comm::NcclBuffer>> out;
  for (const auto& b : buffers) out.push_back(b ? std::optional(comm::NcclBuffer{b->first, b->second}) : std::nullopt);
  return out;
}

comm::BalancerOptions make_options(double damping, int64_t align_bytes, double min_gain) {
  comm::BalancerOptions o;
  o.damping = damping;
  o.planner.align_bytes = align_bytes;
  o.planner.min_gain = min_gain;
  return o;
}

}  // namespace

void register_comm(nb::module_& m) {
  nb::class_<LinkModel>(m, "CommLink")
      .def(
          "__init__",
          [](LinkModel* self, const std::string& name, double bandwidth, double latency, int64_t min_slice_bytes,
             int cap_group, bool up) {
            new (self) LinkModel{name, bandwidth, latency, min_slice_bytes, cap_group, up};
          },
          nb::arg("name"), nb::arg("bandwidth"), nb::arg("latency") = 0.0, nb::arg("min_slice_bytes") = 0,
          nb::arg("cap_group") = -1, nb::arg("up") = true)
      .def_rw("name", &LinkModel::name)
      .def_rw("bandwidth", &LinkModel::bandwidth)
      .def_rw("latency", &LinkModel::latency)
      .def_rw("min_slice_bytes", &LinkModel::min_slice_bytes)
      .def_rw("cap_group", &LinkModel::cap_group)
      .def_rw("up", &LinkModel::up);

  nb::class_<SharedCap>(m, "CommCap")
      .def(
          "__init__",
          [](SharedCap* self, const std::string& name, double bandwidth) { new (self) SharedCap{name, bandwidth}; },
          nb::arg("name"), nb::arg("bandwidth"))
      .def_rw("name", &SharedCap::name)
      .def_rw("bandwidth", &SharedCap::bandwidth);

  nb::class_<Balancer>(m, "CommBalancer")
      .def(
          "__init__",
          [](Balancer* self, std::vector<LinkModel> links, std::vector<SharedCap> caps, double damping,
             int64_t align_bytes, double min_gain) {
            new (self) Balancer(std::move(links), std::move(caps), make_options(damping, align_bytes, min_gain));
          },
          nb::arg("links"), nb::arg("caps"), nb::arg("damping") = 0.5, nb::arg("align_bytes") = 4096,
          nb::arg("min_gain") = 0.03)
      .def(
          "plan",
          [](const Balancer& b, const std::string& collective, int world_size, int64_t count, int64_t elem_size) {
            return to_python(b.plan(make_request(collective, world_size, count, elem_size)));
          },
          nb::arg("collective"), nb::arg("world_size"), nb::arg("count"), nb::arg("elem_size"))
      .def(
          "plan_weights",
          [](const Balancer& b, const std::string& collective, int world_size, int64_t count, int64_t elem_size,
             const std::vector<double>& weights) {
            return to_python(comm::plan_weights(make_request(collective, world_size, count, elem_size), weights,
                                                b.links(), b.caps(), b.options().planner));
          },
          nb::arg("collective"), nb::arg("world_size"), nb::arg("count"), nb::arg("elem_size"), nb::arg("weights"))
      .def(
          "observe",
          [](Balancer& b, const std::string& collective, int world_size, int64_t count, int64_t elem_size,
             const std::vector<SliceTuple>& slices, const std::vector<double>& seconds) {
            b.observe(make_request(collective, world_size, count, elem_size), from_python(slices), seconds);
          },
          nb::arg("collective"), nb::arg("world_size"), nb::arg("count"), nb::arg("elem_size"), nb::arg("slices"),
          nb::arg("seconds"))
      .def("set_up", &Balancer::set_up, nb::arg("link"), nb::arg("up"))
      .def("set_bandwidth", &Balancer::set_bandwidth, nb::arg("link"), nb::arg("bandwidth"))
      .def_prop_ro("links", [](const Balancer& b) { return b.links(); })
      .def_prop_ro("updates", &Balancer::updates);

  m.def(
      "comm_optimal_seconds",
      [](const std::string& collective, int world_size, int64_t count, int64_t elem_size,
         const std::vector<LinkModel>& links, const std::vector<SharedCap>& caps) {
        return comm::optimal_seconds(make_request(collective, world_size, count, elem_size), links, caps);
      },
      nb::arg("collective"), nb::arg("world_size"), nb::arg("count"), nb::arg("elem_size"), nb::arg("links"),
      nb::arg("caps"));

  m.def(
      "comm_simulate_sweep",
      [](const std::string& collective, int world_size, int64_t elem_size, const std::vector<int64_t>& sizes,
         const std::vector<LinkModel>& truth, const std::vector<SharedCap>& true_caps,
         const std::vector<LinkModel>& estimates, const std::vector<SharedCap>& caps, int reference_link,
         int iterations, double damping, int64_t align_bytes, double min_gain) {
        const auto points = comm::simulate_sweep(comm::parse_collective(collective), world_size, elem_size, sizes,
                                                 truth, true_caps, estimates, caps, reference_link, iterations,
                                                 make_options(damping, align_bytes, min_gain));
        nb::list out;
        for (const auto& p : points) {
          nb::dict d;
          d["bytes"] = p.bytes;
          d["seconds"] = p.seconds;
          d["reference_seconds"] = p.reference_seconds;
          d["bound_seconds"] = p.bound_seconds;
          d["busbw"] = p.busbw();
          d["reference_busbw"] = p.reference_busbw();
          d["bound_busbw"] = p.bound_busbw();
          d["link_fraction"] = p.link_fraction;
          out.append(d);
        }
        return out;
      },
      nb::arg("collective"), nb::arg("world_size"), nb::arg("elem_size"), nb::arg("sizes"), nb::arg("truth"),
      nb::arg("true_caps"), nb::arg("estimates"), nb::arg("caps"), nb::arg("reference_link"),
      nb::arg("iterations") = 20, nb::arg("damping") = 0.5, nb::arg("align_bytes") = 4096,
      nb::arg("min_gain") = 0.03);

  m.def(
      "comm_reduce",
      [](const std::vector<Bytes>& inputs, Bytes out, const std::string& dtype, const std::string& op) {
        const DType dt = parse_dtype(dtype);
        const comm::ReduceOp rop = comm::parse_reduce_op(op);
        const size_t item = dtype_size(dt);
        KVCORE_CHECK_VALUE(out.shape(0) % item == 0, "out: ", out.shape(0), " bytes is not a whole number of ",
                           dtype, " elements");
        std::vector<const void*> ptrs;
        for (size_t k = 0; k < inputs.size(); ++k) {
          KVCORE_CHECK_VALUE(inputs[k].shape(0) == out.shape(0), "inputs[", k, "]: expected ", out.shape(0),
                             " bytes like out, got ", inputs[k].shape(0));
          ptrs.push_back(inputs[k].data());
        }
        const int64_t count = int64_t(out.shape(0) / item);
        nb::gil_scoped_release release;
        comm::reduce_in_order(ptrs, out.data(), count, dt, rop);
      },
      nb::arg("inputs"), nb::arg("out"), nb::arg("dtype"), nb::arg("op"),
      "out = op(inputs[0], inputs[1], ...) element-wise in input order over raw bytes of `dtype`; out may "
      "alias inputs[0] only.");

  m.def(
      "comm_reduce_cuda",
      [](const std::vector<uintptr_t>& input_ptrs, uintptr_t out_ptr, int64_t count, const std::string& dtype,
         const std::string& op, StreamHandle stream) {
        const DType dt = parse_dtype(dtype);
        const comm::ReduceOp rop = comm::parse_reduce_op(op);
        std::vector<const void*> inputs;
        for (uintptr_t p : input_ptrs) inputs.push_back(reinterpret_cast<const void*>(p));
        nb::gil_scoped_release release;
        comm::reduce_in_order_cuda(inputs, reinterpret_cast<void*>(out_ptr), count, dt, rop, stream);
      },
      nb::arg("input_ptrs"), nb::arg("out_ptr"), nb::arg("count"), nb::arg("dtype"), nb::arg("op"), nb::arg("stream"),
      "comm_reduce on device pointers (one GPU), asynchronous on `stream`; bitwise identical to comm_reduce. "
      "out may alias an input exactly.");

  m.def(
      "comm_cuda_array",
      [](const InArray& a, const std::string& what) {
        const TensorView t = to_view(a, what.c_str());
        KVCORE_CHECK_VALUE(t.device.is_cuda(), what, ": expected a CUDA array, got one on ", t.device.str());
        KVCORE_CHECK_VALUE(t.inner_contiguous(t.ndim), what, ": expected a contiguous array");
        return std::make_tuple(reinterpret_cast<uintptr_t>(t.data), size_t(t.numel()) * t.itemsize(),
                               std::string(dtype_name(t.dtype)), t.device.index);
      },
      nb::arg("x"), nb::arg("what") = "x",
      "(pointer, bytes, dtype, device) of a contiguous CUDA array from any DLPack framework.");

  m.def("nccl_status", &comm::nccl_status, "(loadable, reason) for libnccl.so.2; never raises.");
  m.def(
      "nccl_unique_id",
      [] {
        const std::string id = comm::nccl_unique_id();
        return nb::bytes(id.data(), id.size());
      },
      "A fresh ncclUniqueId (bytes) for rank 0 to publish to the other ranks.");

  nb::class_<comm::NcclComm>(m, "NcclComm")
      .def(
          "__init__",
          [](comm::NcclComm* self, nb::bytes unique_id, int rank, int world_size, int device, double timeout) {
            const std::string id(unique_id.c_str(), unique_id.size());
            nb::gil_scoped_release release;  // waits (at most `timeout` s) until every rank has joined
            new (self) comm::NcclComm(id, rank, world_size, device, timeout);
          },
          nb::arg("unique_id"), nb::arg("rank"), nb::arg("world_size"), nb::arg("device"), nb::arg("timeout"))
      .def(
          "exchange",
          [](comm::NcclComm& c, const std::vector<PyBuffer>& sends, const std::vector<PyBuffer>& recvs,
             StreamHandle stream) {
            const auto s = to_nccl_buffers(sends), r = to_nccl_buffers(recvs);
            nb::gil_scoped_release release;
            c.exchange(s, r, stream);
          },
          nb::arg("sends"), nb::arg("recvs"), nb::arg("stream"),
          "One grouped send/receive with every peer, asynchronous on `stream`: sends[p] / recvs[p] are "
          "(pointer, bytes) or None.")
      .def("async_error", &comm::NcclComm::async_error, "NCCL's asynchronous error, or '' while healthy.")
      .def("abort", &comm::NcclComm::abort, nb::call_guard<nb::gil_scoped_release>(),
           "Ends pending operations and frees the communicator.")
      .def_prop_ro("rank", &comm::NcclComm::rank)
      .def_prop_ro("world_size", &comm::NcclComm::world_size)
      .def_prop_ro("device", &comm::NcclComm::device);
}

}  // namespace kvcore::bindings
