"""kvcore.comm on CUDA: the CUDA reduction bit-identical to the CPU one on fresh random data with
poisoned outputs (on a GPU and on the SIMT harness); collectives on CUDA torch tensors across real processes (host and socket links,
two ranks sharing one GPU) bit-identical to the CPU path; the nccl link; CUDA graph capture."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

import kvcore
from arrays import POISON, bits
from kvcore import comm
from test_comm import SPLITS, _as_framework, _expected_bits, _rank_input, _reduce_reference, _spawn

DTYPES = ["float32", "float16", "bfloat16", "int32"]


@pytest.fixture
def torch():
    import torch

    return torch


def _random_tensor(rng, torch, dtype: str, count: int):
    """Fresh data with a wide range of magnitudes (so rounding order shows), never all zeros."""
    if dtype == "int32":
        return torch.from_numpy(rng.integers(-(2**31), 2**31 - 1, size=count, dtype=np.int64).astype(np.int32))
    scale = 10.0 ** rng.integers(-3, 3, size=count) if dtype == "float32" else 4.0
    x = (rng.standard_normal(count) * scale + 0.25).astype(np.float32)
    return torch.from_numpy(x).to(getattr(torch, dtype))


def _host_bytes(torch, t):
    return t.contiguous().view(torch.uint8).numpy()


def _stream(torch) -> int:
    return int(torch.cuda.current_stream().cuda_stream)


# ---- comm_reduce_cuda against comm_reduce -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "max"])
@pytest.mark.parametrize("count", [1, 7, 1001, 65537, (1 << 20) + 3])
@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
@pytest.mark.parametrize("offset", [0, 1])
def test_comm_reduce_cuda_bitwise_equals_cpu(dev, rng, torch, dtype, op, count, ranks, offset):
    """offset 1 shifts every other input by one element, so the kernel's narrower vector paths run."""
    inputs = [_random_tensor(rng, torch, dtype, count) for _ in range(ranks)]
    expected = torch.empty(count, dtype=getattr(torch, dtype))
    kvcore._C.comm_reduce([_host_bytes(torch, t) for t in inputs], _host_bytes(torch, expected), dtype, op)

    def on_gpu(t, k):
        shift = offset * (k % 2)
        padded = dev.full((count + shift,), POISON, t.dtype)
        padded[shift:] = dev.put(t)
        return padded[shift:]

    stream = _stream(torch) if dev.name == "cuda" else 0
    gpu_inputs = [on_gpu(t, k) for k, t in enumerate(inputs)]
    out = dev.full((count,), POISON, getattr(torch, dtype))
    dev.kv._C.comm_reduce_cuda([t.data_ptr() for t in gpu_inputs], out.data_ptr(), count, dtype, op, stream)
    dev.sync()
    assert np.array_equal(bits(dev.host(out)), bits(expected))

    # In place into the first input, as the collectives' own part is reduced.
    first = gpu_inputs[0]
    dev.kv._C.comm_reduce_cuda([t.data_ptr() for t in gpu_inputs], first.data_ptr(), count, dtype, op, stream)
    dev.sync()
    assert np.array_equal(bits(dev.host(first)), bits(expected))


def test_comm_reduce_cuda_argument_errors(dev, torch):
    x = dev.put(torch.ones(16))
    with pytest.raises(ValueError, match="inputs: at most 64"):
        dev.kv._C.comm_reduce_cuda([x.data_ptr()] * 65, x.data_ptr(), 16, "float32", "sum", 0)
    with pytest.raises(ValueError, match="inputs: expected at least one"):
        dev.kv._C.comm_reduce_cuda([], x.data_ptr(), 16, "float32", "sum", 0)
    host = np.ones(16, np.float32)
    with pytest.raises(ValueError, match=r"inputs\[1\]: expected a pointer to CUDA device memory"):
        dev.kv._C.comm_reduce_cuda([x.data_ptr(), host.ctypes.data], x.data_ptr(), 16, "float32", "sum", 0)
    with pytest.raises(TypeError, match="dtype"):
        dev.kv._C.comm_reduce_cuda([x.data_ptr()], x.data_ptr(), 16, "int64", "sum", 0)
    with pytest.raises(ValueError, match="op"):
        dev.kv._C.comm_reduce_cuda([x.data_ptr()], x.data_ptr(), 16, "float32", "prod", 0)


# ---- collectives on CUDA tensors (spawned ranks) -----------------------------------------------------------


def _float64_reference(arrays: list[np.ndarray], dtype: str, op: str) -> np.ndarray:
    if dtype == "int32":  # sums wrap like two's complement
        wide = np.stack([a.astype(np.int64) for a in arrays])
        return (wide.max(0) if op == "max" else wide.sum(0)).astype(np.int32).astype(np.float64)
    wide = np.stack([a.astype(np.float64) for a in arrays])
    return wide.max(0) if op == "max" else wide.sum(0)


TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2, "int32": 0.0}


def _close_to(got_bits: np.ndarray, dtype: str, reference: np.ndarray, world: int) -> bool:
    import torch

    if dtype == "bfloat16":
        values = torch.from_numpy(got_bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    else:
        values = got_bits.view(dtype)
    values = values.astype(np.float64)
    scale = world * np.abs(reference).max(initial=1.0)
    return bool(np.all(np.abs(values - reference) <= TOLERANCE[dtype] * scale))


def _shared_seed(c) -> int:
    """Rank 0's fresh seed, agreed over the communicator's CPU path."""
    seed = int(c.all_gather(np.array([secrets.randbits(31)], np.int32))[0])
    print(f"rank seed {seed}")
    return seed


def scenario_cuda_collectives(c, rank, world):
    """Every collective, dtype, op and split on CUDA tensors (all ranks on cuda:0): bitwise equal to the
    CPU path on the same data and to the rank-order reference, and close to a float64 reference."""
    import torch

    torch.cuda.set_device(0)
    seed = _shared_seed(c)
    checked = 0
    for dtype in DTYPES:
        for count in (1, 1001, 20011, 300_007):
            inputs = [_rank_input(seed + count, r, dtype, count * world) for r in range(world)]
            for op in ("sum", "max"):
                reduced = _expected_bits(_reduce_reference(inputs, dtype, op), dtype)
                wide = _float64_reference(inputs, dtype, op)
                for split in SPLITS:
                    c.force_split(split)
                    on_cpu = _as_framework(inputs[rank], dtype)
                    c.all_reduce(on_cpu, op=op)
                    x = torch.as_tensor(_as_framework(inputs[rank], dtype)).cuda()
                    assert c.all_reduce(x, op=op) is x
                    torch.cuda.synchronize()
                    got = bits(x)
                    assert np.array_equal(got, bits(on_cpu)), ("all_reduce vs the CPU path", dtype, count, op, split)
                    assert np.array_equal(got.view(np.uint8), reduced.view(np.uint8)), ("all_reduce", dtype, count)
                    assert _close_to(got, dtype, wide, world), ("all_reduce float64", dtype, count, op)
                    rs = c.reduce_scatter(torch.as_tensor(_as_framework(inputs[rank], dtype)).cuda(), op=op)
                    assert rs.is_cuda and rs.shape == (count,)
                    torch.cuda.synchronize()
                    assert np.array_equal(bits(rs).view(np.uint8),
                                          reduced[rank * count:(rank + 1) * count].view(np.uint8)), \
                        ("reduce_scatter", dtype, count, op, split)
                    checked += 2
            mine = torch.as_tensor(_as_framework(inputs[rank][:count], dtype)).cuda()
            expected = np.concatenate([_expected_bits(i[:count], dtype) for i in inputs])
            for split in SPLITS:
                c.force_split(split)
                got = c.all_gather(mine)
                torch.cuda.synchronize()
                assert got.is_cuda and got.shape == (world * count,)
                assert np.array_equal(bits(got).view(np.uint8), expected.view(np.uint8)), ("all_gather", dtype, split)
                checked += 1
    c.force_split(None)
    stats = c.stats()["links"]
    assert stats["host"]["slices"] > 0 and stats["socket"]["slices"] > 0
    return checked


@pytest.mark.cuda
def test_cuda_collectives_host_and_socket(tmp_path):
    checked = _spawn(tmp_path, "scenario_cuda_collectives", 2, scenarios="test_comm_cuda", timeout=30.0,
                     join_timeout=300)
    assert checked[0] == checked[1] > 0


def scenario_cuda_balanced_split(c, rank, world):
    """The balancer's own split (no forced weights) over many sizes: still the reference's bits."""
    import torch

    torch.cuda.set_device(0)
    seed = _shared_seed(c)
    for i, count in enumerate((4096, 1 << 16, 1 << 20, 3 << 20)):
        inputs = [_rank_input(seed + i, r, "float32", count) for r in range(world)]
        x = torch.from_numpy(inputs[rank]).cuda()
        c.all_reduce(x)
        torch.cuda.synchronize()
        assert np.array_equal(x.cpu().numpy(), _reduce_reference(inputs, "float32", "sum")), count
    return c.stats()["balancer_updates"]


@pytest.mark.cuda
def test_cuda_balanced_split(tmp_path):
    updates = _spawn(tmp_path, "scenario_cuda_balanced_split", 2, scenarios="test_comm_cuda", timeout=30.0,
                     join_timeout=120)
    assert updates[0] == updates[1]


# ---- graph capture and the nccl link ----------------------------------------------------------------------


@pytest.mark.cuda
def test_capture_without_nccl_is_refused(tmp_path, torch):
    store = comm.FileStore(str(tmp_path / "s"), timeout=5)
    with comm.Communicator(0, 1, store, links=["host", "socket"]) as c:
        x = torch.ones(1024, device="cuda")
        c.all_reduce(x)  # outside capture: fine
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                with pytest.raises(kvcore.KVCoreError, match="only the nccl link can join; .* host, socket"):
                    c.all_reduce(x)
            finally:
                graph.capture_end()


def _needs_nccl():
    ok, reason = comm.nccl_status()
    if not ok:
        pytest.skip(f"nccl link unavailable: {reason}")


@pytest.mark.cuda
def test_nccl_single_rank(tmp_path, torch, rng):
    _needs_nccl()
    store = comm.FileStore(str(tmp_path / "s"), timeout=10)
    with comm.Communicator(0, 1, store, links=["nccl"]) as c:
        x0 = _random_tensor(rng, torch, "float32", 10_001).cuda()
        x = x0.clone()
        assert c.all_reduce(x) is x
        assert torch.equal(c.all_gather(x), x0) and torch.equal(c.reduce_scatter(x), x0)
        torch.cuda.synchronize()
        assert torch.equal(x, x0)
        with pytest.raises(ValueError, match="nccl link carries CUDA arrays only"):
            c.all_reduce(np.ones(4, np.float32))
        # Captured into a CUDA graph: queued on nccl alone, replayed later.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            c.all_reduce(x, op="max")
        x.copy_(x0 * 2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(x, x0 * 2)
        assert c.stats()["links"]["nccl"]["slices"] >= 4


def scenario_nccl_collectives(c, rank, world):
    """nccl (one GPU per rank) next to the host link: the result is the rank-order reference's bits."""
    import torch

    torch.cuda.set_device(rank)
    for dtype in DTYPES:
        for split in ({"nccl": 1.0}, {"nccl": 1.0, "host": 1.0}):
            c.force_split(split)
            inputs = [_rank_input(11, r, dtype, 50_003 * world) for r in range(world)]
            reduced = _expected_bits(_reduce_reference(inputs, dtype, "sum"), dtype)
            x = torch.as_tensor(_as_framework(inputs[rank], dtype)).cuda()
            c.all_reduce(x)
            torch.cuda.synchronize()
            assert np.array_equal(bits(x).view(np.uint8), reduced.view(np.uint8)), (dtype, split)
            ag = c.all_gather(x[:777])
            expected = np.concatenate([reduced[:777]] * world)
            torch.cuda.synchronize()
            assert np.array_equal(bits(ag).view(np.uint8), expected.view(np.uint8)), (dtype, split)
    return c.stats()["links"]["nccl"]["slices"]


@pytest.mark.cuda
@pytest.mark.parametrize("world", [2, 4])
def test_nccl_multi_rank(tmp_path, torch, world):
    _needs_nccl()
    if torch.cuda.device_count() < world:
        pytest.skip(f"NCCL needs one GPU per rank ({world} ranks); this machine has {torch.cuda.device_count()}")
    links = [{"kind": "nccl", "device": "per-rank"}, "host"]
    slices = _spawn(tmp_path, "scenario_nccl_collectives", world, links=links, scenarios="test_comm_cuda",
                    timeout=60.0, join_timeout=300)
    assert all(s > 0 for s in slices)
