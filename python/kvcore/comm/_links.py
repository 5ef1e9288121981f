"""Links: the transports a collective's slices travel over. Each offers one primitive, exchange():
send a buffer to every peer and receive one from every peer, all ranks calling it in the same
order. The collectives (_communicator.py) are built on it, so every link does the same arithmetic.

- host: the PCIe path. A named shared-memory segment (/dev/shm) that every rank of the node maps:
  each rank owns an area with one region per destination, and two counters (posted, done) order
  the rounds. GPU buffers go GPU -> the segment (page-locked for DMA when the system allows) -> peer GPU.
- socket: TCP between every pair of ranks, the network path on machines without RDMA; GPU buffers
  are staged through a page-locked host buffer.
- nccl: NCCL send/receive between GPUs (NVLink, or whatever NCCL finds); it only moves bytes.

Buffers are numpy uint8 arrays or DeviceBytes (GPU memory, see _device.py); for GPU buffers the
copies are queued on the stream passed to exchange().

Every wait is bounded by the link's timeout; a link that fails or times out is killed (its peers
see it at once: a dead flag, or closed sockets) and raises LinkDown.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import sys
import time
import uuid

import numpy as np

from .._native import C as _C
from ._device import DeviceBytes, DeviceScratch, PinnedBuffer, carve, copy_bytes

MiB = 1 << 20


class LinkDown(RuntimeError):
    """The link failed or timed out; its slice must be re-sent on another link."""


def _wait(ready, deadline: float, what: str, dead=None) -> None:
    """Polls ready() (yielding the CPU for the first 2 ms, then sleeping in growing steps);
    LinkDown when dead() while still not ready, or at the deadline."""
    spin_until = time.monotonic() + 2e-3
    delay = 5e-5
    while not ready():
        # A peer may finish and close right after making us ready: check ready() once more.
        if dead is not None and dead() and not ready():
            raise LinkDown(f"{what}: a peer marked the link down")
        now = time.monotonic()
        if now > deadline:
            raise LinkDown(f"{what}: timed out")
        if now < spin_until:
            os.sched_yield()
        else:
            time.sleep(delay)
            delay = min(delay * 1.5, 5e-4)


class Link:
    """Common options: delay_s_per_mib (an artificial slowdown per MiB sent, for tests and
    benchmarks), fail_at / fail_rank (this rank kills the link at its fail_at-th exchange)."""

    kind = "?"
    # Whether _exchange takes GPU buffers itself; otherwise exchange() stages them through host memory.
    carries_device_memory = False

    def __init__(self, rank: int, world_size: int, timeout: float, options: dict):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.delay_s_per_mib = float(options.get("delay_s_per_mib", 0.0))
        self.fail_at = options.get("fail_at")
        self.fail_rank = int(options.get("fail_rank", 0))
        self.exchanges = 0
        self.up = True
        self._staging_out = self._staging_in = None  # PinnedBuffers, made on the first GPU exchange

    def exchange(self, sends: list, recvs: list, max_bytes: int, stream: int = 0) -> None:
        """Sends sends[p] to each peer p and receives recvs[p] (uint8 arrays or DeviceBytes, None for
        this rank). max_bytes: the largest message of this exchange on any rank (every rank passes the
        same). stream: the CUDA stream that orders copies of GPU buffers."""
        if not self.up:
            raise LinkDown(f"{self.kind}: link is down")
        self.exchanges += 1
        if self.delay_s_per_mib > 0:
            sent = sum(len(s) for s in sends if s is not None)
            time.sleep(self.delay_s_per_mib * sent / MiB)
        staged = not self.carries_device_memory and _on_device(sends, recvs)
        if staged:
            device_recvs = recvs
            sends, recvs = self._stage(sends, recvs, stream)
        if self.fail_at is not None and self.exchanges > int(self.fail_at) and self.rank == self.fail_rank:
            self._fail_partway(sends)
            self.kill()
            raise LinkDown(f"{self.kind}: killed by fail_at={self.fail_at} (fault injection)")
        try:
            self._exchange(sends, recvs, max_bytes, stream)
        except LinkDown:
            self.kill()
            raise
        except OSError as e:
            self.kill()
            raise LinkDown(f"{self.kind}: {e}") from e
        if staged:
            for dst, src in zip(device_recvs, recvs):
                if dst is not None:
                    copy_bytes(dst, src, stream)
            _C.cuda_stream_synchronize(stream)  # the staging buffer is reused by the next exchange

    def _stage(self, sends: list, recvs: list, stream: int) -> tuple[list, list]:
        """Host copies of GPU sends (complete on return) and host buffers for GPU receives."""
        if self._staging_out is None:
            self._staging_out, self._staging_in = PinnedBuffer(), PinnedBuffer()
        host_sends = carve(self._staging_out.get(sum(len(s) for s in sends if s is not None)), sends)
        host_recvs = carve(self._staging_in.get(sum(len(r) for r in recvs if r is not None)), recvs)
        for host, s in zip(host_sends, sends):
            if s is not None:
                copy_bytes(host, s, stream)
        _C.cuda_stream_synchronize(stream)
        return host_sends, host_recvs

    def finish(self, stream: int) -> None:
        """Waits until the GPU work queued on `stream` (copies, reductions) has completed."""
        _C.cuda_stream_synchronize(stream)

    def _fail_partway(self, sends: list) -> None:
        """Fault injection sends part of the data first, so the peers fail mid-transfer."""

    def _exchange(self, sends: list, recvs: list, max_bytes: int, stream: int) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        self.up = False

    def close(self) -> None:
        self.kill()
        for staging in (self._staging_out, self._staging_in):
            if staging is not None:
                staging.close()
        self._staging_out = self._staging_in = None


def _on_device(sends: list, recvs: list) -> bool:
    return any(isinstance(b, DeviceBytes) for b in (*sends, *recvs))


class HostLink(Link):
    """Shared memory on one node. Segment: world * 64 bytes of counters (posted, done, dead per
    rank), then one area per rank split into world regions (region p: what the owner sends to p).
    Messages longer than a region go in rounds; round k of rank r: wait until every rank finished
    reading round k-1, write, post k, read every peer's round k, mark done k."""

    kind = "host"
    carries_device_memory = True  # copies GPU buffers straight to and from the segment
    _HEADER = 64

    def __init__(self, rank, world_size, timeout, options, store, prefix):
        super().__init__(rank, world_size, timeout, options)
        area = int(options.get("area_bytes", 4 * MiB))
        self.region = max(64, area // world_size // 64 * 64)
        size = world_size * self._HEADER + world_size * world_size * self.region
        key = f"{prefix}/host/segment"
        if rank == 0:
            name = f"kvcore-comm-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, size)
            store.set(key, name)
        else:
            name = store.get(key).decode()
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._bytes = np.frombuffer(self._map, np.uint8)
        self._ctr = np.frombuffer(self._map, np.int64, count=world_size * self._HEADER // 8)
        # Once every rank has mapped it, the name goes: nothing leaks, whatever happens later.
        store.set(f"{prefix}/host/attached/{rank}", b"1")
        if rank == 0:
            for p in range(1, world_size):
                store.get(f"{prefix}/host/attached/{p}")
            os.unlink(f"/dev/shm/{name}")
        self._round = 0
        self._registered = None  # whether the segment is page-locked for the GPU; decided on first use

    def _counter(self, rank: int, which: int) -> int:  # which: 0 posted, 1 done, 2 dead
        return rank * (self._HEADER // 8) + which

    def _region(self, owner: int, dest: int) -> np.ndarray:
        start = self.world_size * self._HEADER + (owner * self.world_size + dest) * self.region
        return self._bytes[start:start + self.region]

    def _any_dead(self) -> bool:
        return any(self._ctr[self._counter(p, 2)] for p in range(self.world_size))

    def _exchange(self, sends, recvs, max_bytes, stream):
        R, me, ctr = self.region, self.rank, self._ctr
        peers = [p for p in range(self.world_size) if p != me]
        deadline = time.monotonic() + self.timeout
        on_gpu = _on_device(sends, recvs)
        if on_gpu and self._registered is None:
            self._registered = _C.cuda_host_register(self._bytes.ctypes.data, self._bytes.size)
        for start in range(0, max_bytes, R):
            k = self._round + 1
            _wait(lambda: all(ctr[self._counter(p, 1)] >= k - 1 for p in peers), deadline, "host", self._any_dead)
            for p in peers:
                piece = sends[p][start:start + R]
                copy_bytes(self._region(me, p)[:len(piece)], piece, stream)
            if on_gpu:
                _C.cuda_stream_synchronize(stream)  # the data is in the segment before it is posted
            ctr[self._counter(me, 0)] = k  # x86 keeps stores in order: the data is visible first
            for p in peers:
                _wait(lambda: ctr[self._counter(p, 0)] >= k, deadline, "host", self._any_dead)
                piece = recvs[p][start:start + R]
                copy_bytes(piece, self._region(p, me)[:len(piece)], stream)
            if on_gpu:
                _C.cuda_stream_synchronize(stream)  # read out before the peers may overwrite it
            ctr[self._counter(me, 1)] = k
            self._round = k

    def kill(self):
        if self.up and hasattr(self, "_ctr"):
            self._ctr[self._counter(self.rank, 2)] = 1
        super().kill()

    def close(self):
        super().close()
        if getattr(self, "_registered", None):
            self._registered = None
            _C.cuda_host_unregister(self._bytes.ctypes.data)
        if hasattr(self, "_map"):
            self._bytes = self._ctr = None
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the mapping goes with the process
                pass


class SocketLink(Link):
    """TCP between every pair of ranks (rank r connects to each lower rank); non-blocking sends and
    receives to all peers at once, so no pair waits on another. Option: host (the address to listen
    on and publish, default 127.0.0.1)."""

    kind = "socket"
    _CHUNK = 1 << 20

    def __init__(self, rank, world_size, timeout, options, store, prefix):
        super().__init__(rank, world_size, timeout, options)
        host = options.get("host", "127.0.0.1")
        deadline = time.monotonic() + timeout
        listener = socket.create_server((host, 0), backlog=world_size)
        listener.settimeout(timeout)
        store.set(f"{prefix}/socket/{rank}", f"{host}:{listener.getsockname()[1]}")
        self._socks: dict[int, socket.socket] = {}
        try:
            for p in range(rank):
                addr, port = store.get(f"{prefix}/socket/{p}").decode().rsplit(":", 1)
                while True:
                    try:
                        s = socket.create_connection((addr, int(port)), timeout=timeout)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.01)
                s.sendall(struct.pack("!i", rank))
                self._socks[p] = s
            for _ in range(rank + 1, world_size):
                s, _ = listener.accept()
                s.settimeout(timeout)
                peer = struct.unpack("!i", self._recv_exact(s, 4))[0]
                self._socks[peer] = s
        finally:
            listener.close()
        for s in self._socks.values():
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)

    @staticmethod
    def _recv_exact(s, n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("socket: peer closed during setup")
            buf += chunk
        return buf

    def _exchange(self, sends, recvs, max_bytes, stream):
        sent = {p: 0 for p in self._socks if len(sends[p])}
        got = {p: 0 for p in self._socks if len(recvs[p])}
        by_sock = {s: p for p, s in self._socks.items()}
        deadline = time.monotonic() + self.timeout
        while sent or got:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LinkDown("socket: timed out")
            readable, writable, _ = select.select([self._socks[p] for p in got], [self._socks[p] for p in sent], [],
                                                  min(remaining, 0.5))
            for s in writable:
                p = by_sock[s]
                try:
                    sent[p] += s.send(sends[p][sent[p]:sent[p] + self._CHUNK])
                except BlockingIOError:
                    continue
                if sent[p] == len(sends[p]):
                    del sent[p]
            for s in readable:
                p = by_sock[s]
                try:
                    n = s.recv_into(recvs[p][got[p]:got[p] + self._CHUNK])
                except BlockingIOError:
                    continue
                if n == 0:
                    raise LinkDown(f"socket: rank {p} closed the connection")
                got[p] += n
                if got[p] == len(recvs[p]):
                    del got[p]

    def _fail_partway(self, sends):
        for p, s in self._socks.items():
            if sends[p] is not None and len(sends[p]) > 1:
                try:
                    s.send(sends[p][:len(sends[p]) // 2])
                except OSError:
                    pass
                return

    def kill(self):
        for s in getattr(self, "_socks", {}).values():
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._socks = {}
        super().kill()


class NcclLink(Link):
    """NCCL between GPUs: one grouped send/receive per exchange, queued on the caller's stream
    (asynchronous; finish() waits, bounded by the timeout, and aborts NCCL on expiry). Setup is
    bounded by the same timeout: the communicator is non-blocking, so a rank that never joins (or
    never makes the first, connecting exchange) raises instead of hanging the others. Rank 0
    publishes the NCCL unique id through the store. Option: device (this rank's GPU; default the
    current one). Host buffers (the communicator's status agreement) are staged through the GPU."""

    kind = "nccl"
    carries_device_memory = True

    def __init__(self, rank, world_size, timeout, options, store, prefix):
        super().__init__(rank, world_size, timeout, options)
        self.device = int(options["device"]) if "device" in options else _current_device()
        key = f"{prefix}/nccl/unique_id"
        if rank == 0:
            unique_id = _C.nccl_unique_id()
            store.set(key, unique_id)
        else:
            unique_id = bytes(store.get(key))
        self._comm = _C.NcclComm(unique_id, rank, world_size, self.device, timeout)
        self._stream = _C.cuda_stream_create(self.device)  # for host-buffer exchanges
        self._done = _C.cuda_event_create(self.device)
        self._staging = DeviceScratch(self.device)
        try:
            # NCCL connects two ranks on their first send/receive and blocks until both arrive: do it
            # now, while every rank is here, so later exchanges only queue work.
            probe = np.zeros(1, np.uint8)
            self._exchange([None if p == rank else probe for p in range(world_size)],
                           [None if p == rank else np.zeros(1, np.uint8) for p in range(world_size)], 1,
                           self._stream)
        except BaseException:
            self.close()
            raise

    def _exchange(self, sends, recvs, max_bytes, stream):
        try:
            self._queue(sends, recvs, stream)
        except _C.KVCoreError as e:  # NCCL refused the operation: the link is unusable
            raise LinkDown(f"nccl: {e}") from e

    def _queue(self, sends, recvs, stream):
        if not any(isinstance(b, np.ndarray) for b in (*sends, *recvs)):
            self._comm.exchange([None if s is None else (s.ptr, s.nbytes) for s in sends],
                                [None if r is None else (r.ptr, r.nbytes) for r in recvs], stream)
            return
        # Host buffers: up to the GPU, across, and back, on the link's own stream.
        staged = carve(self._staging.get(sum(len(b) for b in (*sends, *recvs) if b is not None)), [*sends, *recvs])
        dev_sends, dev_recvs = staged[:len(sends)], staged[len(sends):]
        for dev, s in zip(dev_sends, sends):
            if s is not None:
                copy_bytes(dev, s, self._stream)
        self._comm.exchange([None if s is None else (s.ptr, s.nbytes) for s in dev_sends],
                            [None if r is None else (r.ptr, r.nbytes) for r in dev_recvs], self._stream)
        for host, dev in zip(recvs, dev_recvs):
            if host is not None:
                copy_bytes(host, dev, self._stream)
        self.finish(self._stream)

    def finish(self, stream: int) -> None:
        """Polls the queued work and NCCL's error state until done; LinkDown (NCCL aborted) on an
        NCCL error or at the timeout."""
        _C.cuda_event_record(self._done, stream)
        deadline = time.monotonic() + self.timeout

        def dead():
            return bool(self._comm is None or self._comm.async_error())

        try:
            _wait(lambda: _C.cuda_event_query(self._done), deadline, "nccl", dead)
        except LinkDown as e:
            reason = self._comm.async_error() if self._comm is not None else ""
            self.kill()
            raise LinkDown(f"{e}{f' ({reason})' if reason else ''}") from None

    def kill(self):
        comm, self._comm = getattr(self, "_comm", None), None
        if comm is not None:
            try:
                comm.abort()
            except _C.KVCoreError:
                pass  # already failed; nothing more to end
        super().kill()

    def close(self):
        comm, self._comm = getattr(self, "_comm", None), None
        del comm  # a healthy communicator is destroyed, not aborted
        super().close()
        if hasattr(self, "_staging"):
            self._staging.close()
            _C.cuda_event_destroy(self._done)
            _C.cuda_stream_destroy(self._stream)
            del self._staging


def _current_device() -> int:
    """The caller's current GPU: torch's when torch has set one up, else the CUDA runtime's."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_device())
    return _C.cuda_get_device()


LINK_TYPES = {"nccl": NcclLink, "host": HostLink, "socket": SocketLink}
# Starting estimates (bus bandwidth in bytes/s, latency in s per step); the balancer corrects them
# from completion times. Configure per link with bandwidth_gbps= / latency_us=.
DEFAULT_MODELS = {"nccl": (100e9, 30e-6), "host": (4e9, 100e-6), "socket": (1e9, 200e-6)}
