// Planner, balancer, simulator and in-order reduction of the multi-link collectives.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "kvcore/comm.h"
#include "kvcore/detail/float16.h"
#include "kvcore/error.h"

namespace kvcore::comm {
namespace {

constexpr double GB = 1e9;

std::vector<LinkModel> h800(double nvlink = 160, double pcie = 50, double nic = 50) {
  return {{"nvlink", nvlink * GB, 20e-6, 0, -1, true},
          {"host", pcie * GB, 30e-6, 256 << 10, 0, true},
          {"nic", nic * GB, 25e-6, 256 << 10, 0, true}};
}
const std::vector<SharedCap> kUplink{{"uplink", 50 * GB}};

int64_t total(const Plan& p) {
  int64_t n = 0;
  for (const auto& s : p.slices) n += s.count;
  return n;
}

TEST(CommPlanner, SlicesAreContiguousAlignedAndCoverEverything) {
  const PlanRequest req{Collective::AllReduce, 8, 100'000'003, 2};
  const Plan p = plan_split(req, h800(), kUplink);
  ASSERT_EQ(p.slices.size(), 3u);
  int64_t next = 0;
  for (size_t i = 0; i < p.slices.size(); ++i) {
    EXPECT_EQ(p.slices[i].begin, next);
    if (i + 1 < p.slices.size() && p.slices[i].link != 0) {
      EXPECT_EQ(p.slices[i].count * 2 % 4096, 0);
    }
    next += p.slices[i].count;
  }
  EXPECT_EQ(total(p), req.count);
}

TEST(CommPlanner, LinksFinishTogetherWithinTheCap) {
  const PlanRequest req{Collective::AllReduce, 8, 128 << 20, 2};
  const Plan p = plan_split(req, h800(), kUplink);
  const auto t = simulate_link_seconds(p, req, h800(), kUplink);
  EXPECT_NEAR(t[0], t[1], 0.01 * t[0]);
  EXPECT_NEAR(t[0], t[2], 0.01 * t[0]);
  // NVLink 160 + an uplink of 50 shared by PCIe and NIC: 210/160 faster than NVLink alone.
  const double bound = optimal_seconds(req, h800(), kUplink);
  EXPECT_NEAR(p.predicted_seconds, bound, 0.01 * bound);
  Plan nv{{{0, 0, req.count}}, 0};
  EXPECT_NEAR(simulate_plan(nv, req, h800(), kUplink) / p.predicted_seconds, 210.0 / 160.0, 0.02);
}

TEST(CommPlanner, SmallMessagesStayOnOneLink) {
  for (int64_t bytes : {0, 64, 4096, 256 << 10, 1 << 20}) {
    const PlanRequest req{Collective::AllReduce, 8, bytes / 2, 2};
    const Plan p = plan_split(req, h800(), kUplink);
    EXPECT_LE(p.slices.size(), 1u) << bytes;
    if (!p.slices.empty()) {
      EXPECT_EQ(p.slices[0].link, 0) << bytes;
    }
  }
}

TEST(CommPlanner, DropsLinksBelowTheirMinimumSliceAndDownLinks) {
  auto links = h800();
  links[2].min_slice_bytes = int64_t(1) << 40;
  links[1].up = false;
  const Plan p = plan_split({Collective::AllGather, 8, 1 << 24, 2}, links, kUplink);
  ASSERT_EQ(p.slices.size(), 1u);
  EXPECT_EQ(p.slices[0].link, 0);
  for (auto& l : links) l.up = false;
  EXPECT_THROW(plan_split({Collective::AllGather, 8, 1 << 24, 2}, links, kUplink), Error);
}

TEST(CommPlanner, WeightsAndArgumentErrors) {
  const PlanRequest req{Collective::ReduceScatter, 4, 1000, 4};
  const Plan p = plan_weights(req, {1, 3, 0}, h800(), kUplink, {64, 0.03});
  ASSERT_EQ(p.slices.size(), 2u);
  EXPECT_EQ(total(p), 1000);
  EXPECT_NEAR(double(p.slices[1].count) / 1000, 0.75, 0.02);
  EXPECT_THROW(plan_weights(req, {1, 1}, h800(), kUplink), Error);
  EXPECT_THROW(plan_weights(req, {-1, 1, 1}, h800(), kUplink), Error);
  EXPECT_THROW(plan_split({Collective::AllReduce, 0, 10, 4}, h800(), kUplink), Error);
  EXPECT_THROW(parse_collective("broadcast"), Error);
  EXPECT_THROW(parse_reduce_op("prod"), Error);
}

TEST(CommBalancer, ConvergesFromWrongEstimatesToTheOptimum) {
  const auto truth = h800();
  Balancer b(h800(200, 64, 40), kUplink);
  const PlanRequest req{Collective::AllReduce, 8, 128 << 20, 2};
  for (int i = 0; i < 20; ++i) {
    const Plan p = b.plan(req);
    b.observe(req, p, simulate_link_seconds(p, req, truth, kUplink));
  }
  const double got = simulate_plan(b.plan(req), req, truth, kUplink);
  EXPECT_LE(got, 1.05 * optimal_seconds(req, truth, kUplink));
  EXPECT_NEAR(b.links()[0].bandwidth, 160 * GB, 0.05 * 160 * GB);
}

TEST(CommBalancer, SameObservationsGiveSamePlans) {
  Balancer a(h800(), kUplink), b(h800(), kUplink);
  const PlanRequest req{Collective::AllGather, 8, 1 << 24, 2};
  for (int i = 0; i < 5; ++i) {
    const Plan pa = a.plan(req), pb = b.plan(req);
    ASSERT_EQ(pa.slices.size(), pb.slices.size());
    for (size_t k = 0; k < pa.slices.size(); ++k) EXPECT_EQ(pa.slices[k].count, pb.slices[k].count);
    const auto t = simulate_link_seconds(pa, req, h800(120, 50, 30), kUplink);
    a.observe(req, pa, t);
    b.observe(req, pb, t);
  }
}

TEST(CommSimulator, H800GoalsAndNoLossForSmallMessages) {
  std::vector<int64_t> sizes;
  for (int k = 18; k <= 30; ++k) sizes.push_back(int64_t(1) << k);
  for (Collective c : {Collective::AllReduce, Collective::AllGather}) {
    const auto points = simulate_sweep(c, 8, 2, sizes, h800(), kUplink, h800(200, 64, 50), kUplink, 0, 20);
    for (const auto& p : points) {
      if (p.bytes <= (1 << 20)) {
        EXPECT_GE(p.busbw(), 0.999 * p.reference_busbw()) << p.bytes;
      }
      if (p.bytes == (256 << 20)) {
        EXPECT_GE(p.busbw(), 1.2 * p.reference_busbw());
        EXPECT_GE(p.busbw(), 0.95 * p.bound_busbw());
      }
    }
  }
}

TEST(CommReduce, RankOrderAndRoundingOnce) {
  const float a[2] = {1e8f, 3.0f}, b[2] = {1.0f, -1.0f}, c[2] = {-1e8f, 5.0f};
  float out[2];
  reduce_in_order({a, b, c}, out, 2, DType::Float32, ReduceOp::Sum);
  EXPECT_EQ(out[0], (1e8f + 1.0f) + -1e8f);
  reduce_in_order({a, b, c}, out, 2, DType::Float32, ReduceOp::Max);
  EXPECT_EQ(out[1], 5.0f);
  // bf16: 256 + 1 + 1 accumulates to 258 in float and rounds once (pairwise bf16 rounding gives 256).
  const uint16_t x = float_to_bf16(256.f), y = float_to_bf16(1.f);
  uint16_t o = 0;
  reduce_in_order({&x, &y, &y}, &o, 1, DType::BFloat16, ReduceOp::Sum);
  EXPECT_EQ(bf16_to_float(o), 258.f);
  const int32_t big = 2147483647, one = 1;
  int32_t wrapped = 0;
  reduce_in_order({&big, &one}, &wrapped, 1, DType::Int32, ReduceOp::Sum);
  EXPECT_EQ(wrapped, int32_t(-2147483647 - 1));
  EXPECT_THROW(reduce_in_order({a}, out, 2, DType::Int64, ReduceOp::Sum), Error);
}

TEST(CommNccl, StatusExplainsItself) {
  const auto [ok, reason] = nccl_status();
  EXPECT_FALSE(reason.empty());
  (void)ok;
}

}  // namespace
}  // namespace kvcore::comm
