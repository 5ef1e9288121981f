// The split planner and the link simulator it predicts with (see kvcore/comm.h).
#include <algorithm>
#include <cmath>
#include <limits>

#include "kvcore/comm.h"
#include "kvcore/error.h"

namespace kvcore::comm {

Collective parse_collective(const std::string& name, const char* what) {
  if (name == "all_reduce") return Collective::AllReduce;
  if (name == "all_gather") return Collective::AllGather;
  if (name == "reduce_scatter") return Collective::ReduceScatter;
  KVCORE_THROW(ErrorKind::Value, what, ": expected all_reduce, all_gather or reduce_scatter, got '", name, "'");
}

ReduceOp parse_reduce_op(const std::string& name, const char* what) {
  if (name == "sum") return ReduceOp::Sum;
  if (name == "max") return ReduceOp::Max;
  KVCORE_THROW(ErrorKind::Value, what, ": expected 'sum' or 'max', got '", name, "'");
}

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::AllReduce: return "all_reduce";
    case Collective::AllGather: return "all_gather";
    case Collective::ReduceScatter: return "reduce_scatter";
  }
  return "?";
}

double traffic_factor(Collective c, int world_size) {
  const double n = world_size;
  return c == Collective::AllReduce ? 2.0 * (n - 1) / n : (n - 1) / n;
}

namespace {

// Payload bytes per element of the split dimension.
double payload_per_elem(const PlanRequest& req) {
  return double(req.elem_size) * (req.collective == Collective::AllReduce ? 1 : req.world_size);
}

void check_request(const PlanRequest& req, size_t num_links) {
  KVCORE_CHECK_VALUE(req.world_size >= 1, "world_size: expected >= 1, got ", req.world_size);
  KVCORE_CHECK_VALUE(req.count >= 0, "count: expected >= 0, got ", req.count);
  KVCORE_CHECK_VALUE(req.elem_size >= 1, "elem_size: expected >= 1, got ", req.elem_size);
  KVCORE_CHECK_VALUE(num_links >= 1, "links: expected at least one link");
}

bool usable(const LinkModel& l) { return l.up && l.bandwidth > 0; }

// Payload each link can carry within T seconds (its busy time T - latency), with cap groups scaled
// down to their shared bandwidth.
std::vector<double> capacity_at(double T, double factor, const std::vector<LinkModel>& links,
                                const std::vector<char>& active, const std::vector<SharedCap>& caps) {
  std::vector<double> share(links.size(), 0.0);
  for (size_t i = 0; i < links.size(); ++i)
    if (active[i]) share[i] = std::max(0.0, T - links[i].latency) * links[i].bandwidth / factor;
  for (size_t g = 0; g < caps.size(); ++g) {
    double sum = 0, min_latency = std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < links.size(); ++i)
      if (active[i] && links[i].cap_group == int(g)) {
        sum += share[i];
        min_latency = std::min(min_latency, links[i].latency);
      }
    const double cap = std::max(0.0, T - min_latency) * caps[g].bandwidth / factor;
    if (sum > cap && sum > 0)
      for (size_t i = 0; i < links.size(); ++i)
        if (active[i] && links[i].cap_group == int(g)) share[i] *= cap / sum;
  }
  return share;
}

double sum_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s;
}

// Smallest T at which the active links carry `payload` (bisection; deterministic).
double solve_time(double payload, double factor, const std::vector<LinkModel>& links, const std::vector<char>& active,
                  const std::vector<SharedCap>& caps) {
  double hi = 1.0;
  while (sum_of(capacity_at(hi, factor, links, active, caps)) < payload && hi < 1e12) hi *= 2;
  double lo = 0;
  for (int it = 0; it < 200 && hi - lo > 1e-15 * hi; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (sum_of(capacity_at(mid, factor, links, active, caps)) >= payload) hi = mid;
    else lo = mid;
  }
  return hi;
}

void check_caps(const std::vector<LinkModel>& links, const std::vector<SharedCap>& caps) {
  for (const auto& l : links)
    KVCORE_CHECK_VALUE(l.cap_group >= -1 && l.cap_group < int(caps.size()), "links: link '", l.name,
                       "' has cap_group ", l.cap_group, " but there are ", caps.size(), " shared caps");
}

}  // namespace

double payload_bytes(Collective c, int world_size, int64_t count, int64_t elem_size) {
  return double(count) * double(elem_size) * (c == Collective::AllReduce ? 1 : world_size);
}

std::vector<double> simulate_link_seconds(const Plan& plan, const PlanRequest& req,
                                          const std::vector<LinkModel>& links, const std::vector<SharedCap>& caps) {
  check_request(req, links.size());
  check_caps(links, caps);
  const double factor = traffic_factor(req.collective, req.world_size);
  const double per_elem = payload_per_elem(req);
  struct Flow {
    int link;
    double start, remaining, finish = -1;
  };
  std::vector<Flow> flows;
  for (const Slice& s : plan.slices) {
    KVCORE_CHECK_INDEX(s.link >= 0 && s.link < int(links.size()), "plan: slice on link ", s.link, " of ",
                       links.size());
    flows.push_back({s.link, links[s.link].latency, double(s.count) * per_elem * factor});
  }
  double t = 0;
  while (true) {
    // Rates of the flows running now: own bandwidth, scaled down where a shared cap is exceeded.
    std::vector<double> rate(flows.size(), 0.0);
    std::vector<double> group_sum(caps.size(), 0.0);
    bool running = false, pending = false;
    double next_start = std::numeric_limits<double>::infinity();
    for (size_t f = 0; f < flows.size(); ++f) {
      if (flows[f].finish >= 0) continue;
      if (flows[f].start > t) {
        pending = true;
        next_start = std::min(next_start, flows[f].start);
        continue;
      }
      if (flows[f].remaining <= 0) {  // nothing to move: done once its latency has passed
        flows[f].finish = std::max(t, flows[f].start);
        continue;
      }
      running = true;
      rate[f] = links[flows[f].link].bandwidth;
      const int g = links[flows[f].link].cap_group;
      if (g >= 0) group_sum[g] += rate[f];
    }
    if (!running && !pending) break;
    for (size_t f = 0; f < flows.size(); ++f) {
      const int g = links[flows[f].link].cap_group;
      if (rate[f] > 0 && g >= 0 && group_sum[g] > caps[g].bandwidth) rate[f] *= caps[g].bandwidth / group_sum[g];
    }
    double dt = next_start - t;
    size_t first_done = flows.size();
    for (size_t f = 0; f < flows.size(); ++f)
      if (rate[f] > 0 && flows[f].remaining / rate[f] < dt) {
        dt = flows[f].remaining / rate[f];
        first_done = f;
      }
    KVCORE_CHECK(std::isfinite(dt), "simulate_plan: a flow can never finish (zero bandwidth)");
    t += dt;
    for (size_t f = 0; f < flows.size(); ++f) {
      if (rate[f] <= 0) continue;
      flows[f].remaining -= rate[f] * dt;
      if (f == first_done || flows[f].remaining <= rate[f] * 1e-15) {
        flows[f].remaining = 0;
        flows[f].finish = t;
      }
    }
  }
  std::vector<double> seconds(links.size(), 0.0);
  for (const Flow& f : flows) seconds[f.link] = std::max(seconds[f.link], f.finish);
  return seconds;
}

double simulate_plan(const Plan& plan, const PlanRequest& req, const std::vector<LinkModel>& links,
                     const std::vector<SharedCap>& caps) {
  const std::vector<double> s = simulate_link_seconds(plan, req, links, caps);
  return s.empty() ? 0.0 : *std::max_element(s.begin(), s.end());
}

double optimal_seconds(const PlanRequest& req, const std::vector<LinkModel>& links, const std::vector<SharedCap>& caps) {
  check_request(req, links.size());
  check_caps(links, caps);
  std::vector<char> active(links.size());
  bool any = false;
  for (size_t i = 0; i < links.size(); ++i) {
    active[i] = usable(links[i]);
    any = any || active[i];
  }
  KVCORE_CHECK(any, "optimal_seconds: no link is up");
  const double payload = double(req.count) * payload_per_elem(req);
  const double factor = traffic_factor(req.collective, req.world_size);
  if (payload == 0 || factor == 0) return 0.0;
  return solve_time(payload, factor, links, active, caps);
}

Plan plan_weights(const PlanRequest& req, const std::vector<double>& weights, const std::vector<LinkModel>& links,
                  const std::vector<SharedCap>& caps, const PlannerOptions& options) {
  check_request(req, links.size());
  KVCORE_CHECK_VALUE(weights.size() == links.size(), "weights: expected one per link (", links.size(), "), got ",
                     weights.size());
  KVCORE_CHECK_VALUE(options.align_bytes >= 1, "align_bytes: expected >= 1, got ", options.align_bytes);
  double total = 0;
  int heaviest = -1;
  for (size_t i = 0; i < links.size(); ++i) {
    KVCORE_CHECK_VALUE(weights[i] >= 0 && std::isfinite(weights[i]), "weights: expected finite values >= 0, got ",
                       weights[i], " for link '", links[i].name, "'");
    if (!links[i].up || weights[i] <= 0) continue;
    total += weights[i];
    if (heaviest < 0 || weights[i] > weights[heaviest]) heaviest = int(i);
  }
  KVCORE_CHECK(heaviest >= 0, "plan: no link that is up has a positive share");
  Plan plan;
  if (req.count == 0) return plan;
  const int64_t align = std::max<int64_t>(1, int64_t(double(options.align_bytes) / payload_per_elem(req)));
  std::vector<int64_t> counts(links.size(), 0);
  int64_t assigned = 0;
  for (size_t i = 0; i < links.size(); ++i) {
    if (!links[i].up || weights[i] <= 0) continue;
    counts[i] = int64_t(double(req.count) * (weights[i] / total) / double(align)) * align;
    assigned += counts[i];
  }
  counts[heaviest] += req.count - assigned;  // the rounding remainder goes to the heaviest link
  int64_t begin = 0;
  for (size_t i = 0; i < links.size(); ++i) {
    if (counts[i] <= 0) continue;
    plan.slices.push_back({int(i), begin, counts[i]});
    begin += counts[i];
  }
  plan.predicted_seconds = simulate_plan(plan, req, links, caps);
  return plan;
}

Plan plan_split(const PlanRequest& req, const std::vector<LinkModel>& links, const std::vector<SharedCap>& caps,
                const PlannerOptions& options) {
  check_request(req, links.size());
  check_caps(links, caps);
  std::vector<char> active(links.size());
  for (size_t i = 0; i < links.size(); ++i) active[i] = usable(links[i]);
  KVCORE_CHECK(std::count(active.begin(), active.end(), 1) > 0, "plan: no link is up");

  // The best single link (lowest predicted time; ties to the lower index) is the fallback.
  Plan best;
  for (size_t i = 0; i < links.size(); ++i) {
    if (!active[i]) continue;
    std::vector<double> only(links.size(), 0.0);
    only[i] = 1;
    Plan p = plan_weights(req, only, links, caps, options);
    if (best.slices.empty() || p.predicted_seconds < best.predicted_seconds) best = std::move(p);
  }
  const double factor = traffic_factor(req.collective, req.world_size);
  const double payload = double(req.count) * payload_per_elem(req);
  if (payload == 0 || factor == 0) return best;

  // Equal finish times over the active links; drop the smallest share below its link's minimum
  // slice and solve again until every remaining link is worth posting.
  std::vector<double> share;
  while (true) {
    const double T = solve_time(payload, factor, links, active, caps);
    share = capacity_at(T, factor, links, active, caps);
    int drop = -1;
    for (size_t i = 0; i < links.size(); ++i) {
      if (!active[i]) continue;
      const bool too_small = share[i] <= 0 || share[i] < double(links[i].min_slice_bytes);
      if (too_small && (drop < 0 || share[i] < share[drop])) drop = int(i);
    }
    if (drop < 0) break;
    active[drop] = 0;
    if (std::count(active.begin(), active.end(), 1) == 0) return best;
  }
  Plan split = plan_weights(req, share, links, caps, options);
  if (split.slices.size() <= 1 || split.predicted_seconds >= best.predicted_seconds * (1 - options.min_gain))
    return best;
  return split;
}

}  // namespace kvcore::comm
