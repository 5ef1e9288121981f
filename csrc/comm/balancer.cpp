// The adaptive balancer and the simulated sweep that drives it against modelled links.
#include <algorithm>

#include "kvcore/comm.h"
#include "kvcore/error.h"

namespace kvcore::comm {

Balancer::Balancer(std::vector<LinkModel> links, std::vector<SharedCap> caps, BalancerOptions options)
    : links_(std::move(links)), caps_(std::move(caps)), options_(options) {
  KVCORE_CHECK_VALUE(!links_.empty(), "links: expected at least one link");
  KVCORE_CHECK_VALUE(options_.damping > 0 && options_.damping <= 1, "damping: expected in (0, 1], got ",
                     options_.damping);
  for (const auto& l : links_) {
    KVCORE_CHECK_VALUE(l.bandwidth > 0, "links: link '", l.name, "' needs a bandwidth > 0, got ", l.bandwidth);
    KVCORE_CHECK_VALUE(l.latency >= 0, "links: link '", l.name, "' needs a latency >= 0, got ", l.latency);
    KVCORE_CHECK_VALUE(l.cap_group >= -1 && l.cap_group < int(caps_.size()), "links: link '", l.name,
                       "' has cap_group ", l.cap_group, " but there are ", caps_.size(), " shared caps");
  }
  for (const auto& c : caps_)
    KVCORE_CHECK_VALUE(c.bandwidth > 0, "caps: '", c.name, "' needs a bandwidth > 0, got ", c.bandwidth);
}

Plan Balancer::plan(const PlanRequest& req) const { return plan_split(req, links_, caps_, options_.planner); }

void Balancer::check_link(int link) const {
  KVCORE_CHECK_INDEX(link >= 0 && link < int(links_.size()), "link: expected 0..", links_.size() - 1, ", got ", link);
}

void Balancer::set_up(int link, bool up) {
  check_link(link);
  links_[link].up = up;
}

void Balancer::set_bandwidth(int link, double bandwidth) {
  check_link(link);
  KVCORE_CHECK_VALUE(bandwidth > 0, "bandwidth: expected > 0, got ", bandwidth);
  links_[link].bandwidth = bandwidth;
}

void Balancer::observe(const PlanRequest& req, const Plan& plan, const std::vector<double>& seconds) {
  KVCORE_CHECK_VALUE(seconds.size() == links_.size(), "seconds: expected one per link (", links_.size(), "), got ",
                     seconds.size());
  const double factor = traffic_factor(req.collective, req.world_size);
  if (factor == 0) return;
  std::vector<double> moved(links_.size(), 0.0);  // bytes each link put on the wire
  for (const Slice& s : plan.slices) {
    check_link(s.link);
    moved[s.link] += payload_bytes(req.collective, req.world_size, s.count, req.elem_size) * factor;
  }
  bool updated = false;
  for (size_t i = 0; i < links_.size(); ++i) {
    LinkModel& l = links_[i];
    // Latency-dominated transfers say little about bandwidth (and would divide by noise).
    if (moved[i] <= 0 || !(seconds[i] > 0) || moved[i] / l.bandwidth < l.latency) continue;
    const double busy = std::max(seconds[i] - l.latency, 0.5 * seconds[i]);
    const double observed = moved[i] / busy;
    l.bandwidth = (1 - options_.damping) * l.bandwidth + options_.damping * observed;
    updated = true;
  }
  if (updated) ++updates_;
}

double SimPoint::busbw() const {
  return seconds > 0 ? double(bytes) * traffic_factor(collective, world_size) / seconds : 0;
}
double SimPoint::reference_busbw() const {
  return reference_seconds > 0 ? double(bytes) * traffic_factor(collective, world_size) / reference_seconds : 0;
}
double SimPoint::bound_busbw() const {
  return bound_seconds > 0 ? double(bytes) * traffic_factor(collective, world_size) / bound_seconds : 0;
}

std::vector<SimPoint> simulate_sweep(Collective c, int world_size, int64_t elem_size, const std::vector<int64_t>& sizes,
                                     const std::vector<LinkModel>& truth, const std::vector<SharedCap>& true_caps,
                                     const std::vector<LinkModel>& estimates, const std::vector<SharedCap>& caps,
                                     int reference_link, int iterations, const BalancerOptions& options) {
  KVCORE_CHECK_VALUE(truth.size() == estimates.size(), "estimates: expected the same links as truth (",
                     truth.size(), "), got ", estimates.size());
  KVCORE_CHECK_INDEX(reference_link >= 0 && reference_link < int(truth.size()), "reference_link: expected 0..",
                     truth.size() - 1, ", got ", reference_link);
  KVCORE_CHECK_VALUE(iterations >= 1, "iterations: expected >= 1, got ", iterations);
  Balancer balancer(estimates, caps, options);  // one balancer for the whole sweep, as in a real job
  const int64_t per_elem = elem_size * (c == Collective::AllReduce ? 1 : world_size);
  std::vector<SimPoint> points;
  for (int64_t bytes : sizes) {
    KVCORE_CHECK_VALUE(bytes >= 0, "sizes: expected >= 0, got ", bytes);
    const PlanRequest req{c, world_size, bytes / per_elem, elem_size};
    Plan plan;
    for (int it = 0; it < iterations; ++it) {
      plan = balancer.plan(req);
      balancer.observe(req, plan, simulate_link_seconds(plan, req, truth, true_caps));
    }
    SimPoint p;
    p.collective = c;
    p.world_size = world_size;
    p.bytes = int64_t(payload_bytes(c, world_size, req.count, elem_size));
    p.seconds = simulate_plan(plan, req, truth, true_caps);
    std::vector<double> only(truth.size(), 0.0);
    only[reference_link] = 1;
    p.reference_seconds = simulate_plan(plan_weights(req, only, truth, true_caps, options.planner), req, truth, true_caps);
    p.bound_seconds = optimal_seconds(req, truth, true_caps);
    p.link_fraction.assign(truth.size(), 0.0);
    for (const Slice& s : plan.slices)
      if (req.count > 0) p.link_fraction[s.link] += double(s.count) / double(req.count);
    points.push_back(std::move(p));
  }
  return points;
}

}  // namespace kvcore::comm
