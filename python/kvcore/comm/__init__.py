"""Multi-link collectives: one all-reduce / all-gather / reduce-scatter split across several links
(NCCL, host shared memory, TCP sockets) in proportion to their bandwidth, with an adaptive balancer
that every rank runs identically. CPU arrays travel over host and socket; CUDA arrays over all three.

    store = kvcore.comm.FileStore("/tmp/rendezvous")          # or TCPStore, or torch's TCPStore
    comm = kvcore.comm.Communicator(rank, world_size, store, links=["host", "socket"])
    comm.all_reduce(x)                      # in place, bitwise identical whatever the split
    # CUDA tensors: links=["nccl", "host"]; results equal the CPU path's bit for bit

`simulate(...)` runs the same planner and balancer against modelled links (kvcore.bench comm-sim).
"""

from __future__ import annotations

from .._C import CommBalancer, CommCap, CommLink, comm_optimal_seconds, nccl_status
from ._communicator import DTYPES, Communicator
from ._links import LinkDown
from ._store import FileStore, TCPStore
from ._sim import SCENARIOS, simulate

__all__ = ["CommBalancer", "CommCap", "CommLink", "Communicator", "DTYPES", "FileStore", "LinkDown", "SCENARIOS",
           "TCPStore", "comm_optimal_seconds", "nccl_status", "simulate"]
