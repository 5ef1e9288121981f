"""Simulated 8-GPU nodes for the planner and balancer (the C++ simulate_sweep): the balancer starts
from nominal link figures and learns the achieved ones from simulated completion times.

Bandwidths are bus bandwidths per GPU and direction (nccl-tests busbw), the figure a link's
collective achieves; latencies are per collective on that link.
"""

from __future__ import annotations

from .._native import C as _C

GB = 1e9
_MIN_SLICE = 256 << 10  # below this a PCIe / NIC slice costs more in set-up than it moves


def _node(nvlink_gbps, pcie_gbps, nic_gbps, uplink_gbps, nominal=False):
    links = []
    if nvlink_gbps:
        links.append(_C.CommLink("nvlink", nvlink_gbps * GB, 20e-6, 0))
    links.append(_C.CommLink("host", pcie_gbps * GB, 30e-6, _MIN_SLICE if nvlink_gbps else 0, 0))
    if nic_gbps:
        links.append(_C.CommLink("nic", nic_gbps * GB, 25e-6, _MIN_SLICE, 0))
    return links, [_C.CommCap("uplink", uplink_gbps * GB)]


# name -> (description, true links and caps, the nominal figures the balancer starts from: link
# bandwidths off by up to 30%, the uplink cap configured at its usable value)
SCENARIOS = {
    "8xH800": ("8x H800: NVLink 160 GB/s achieved, PCIe Gen5 50 GB/s usable, 400 Gb/s NIC on the same uplink",
               _node(160, 50, 50, 50), _node(200, 64, 50, 50)),
    "8xH200": ("8x H200: NVLink 380 GB/s achieved, PCIe Gen5 50 GB/s, 400 Gb/s NIC on the same uplink",
               _node(380, 50, 50, 50), _node(450, 64, 50, 50)),
    "8xPCIe": ("8 GPUs on PCIe Gen5 only (no NVLink): host path 50 GB/s, 400 Gb/s NIC on the same uplink",
               _node(0, 50, 50, 50), _node(0, 64, 50, 50)),
}


def simulate(scenario: str, collective: str = "all_reduce", sizes=None, world_size: int = 8, elem_size: int = 2,
             iterations: int = 20) -> list[dict]:
    """Per size: simulated busbw of the balanced split, of the first link alone (the reference:
    NVLink where there is one) and of the analytic bound, in bytes/s, plus each link's share."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario: expected one of {', '.join(SCENARIOS)}, got '{scenario}'")
    _, (truth, true_caps), (estimates, caps) = SCENARIOS[scenario]
    sizes = sizes or [1 << k for k in range(18, 31)]
    points = _C.comm_simulate_sweep(collective, world_size, elem_size, list(sizes), truth, true_caps, estimates, caps,
                                    0, iterations)
    for p in points:
        p["links"] = [l.name for l in truth]
    return points
