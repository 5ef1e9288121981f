"""The nccl link on the SIMT harness, over its in-process NCCL (tests/simt/nccl: the ranks are
threads of one process): communicator setup and the first exchange are bounded by the link's
timeout when a rank never shows up (NCCL's own bootstrap waits forever), and collectives over the
link are bit-identical to the rank-order reference. Each scenario runs in a fresh process, since
the NCCL a process loads is fixed at its first use (and must never reach a real kvcore)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.simt

HERE = Path(__file__).resolve().parent


def run_scenario(name: str, timeout: float = 120) -> None:
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_nccl_link_simt as t; t.{name}()"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{name} hung for {timeout} s:\n{e.stdout or ''}{e.stderr or ''}")
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}{done.stderr}"


def _kvcore_simt():
    import simt_device

    kv = simt_device.build()
    simt_device.load_in_process_nccl()
    importlib.import_module("kvcore_simt.comm")
    ok, reason = kv.comm.nccl_status()
    assert ok and "NCCL 2.27.3" in reason, reason
    return kv


def _in_threads(world: int, fn):
    """fn(rank) on `world` threads; their results (or the first exception, re-raised)."""
    results, errors = [None] * world, []

    def run(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --- scenarios (run in their own process) ---------------------------------------------------------

def scenario_init_bounded_when_a_rank_never_joins():
    kv = _kvcore_simt()
    uid = kv._C.nccl_unique_id()
    start = time.monotonic()
    with pytest.raises(kv.KVCoreError, match=r"not every rank joined within 0.5 s \(rank 0 of 2\)"):
        kv._C.NcclComm(uid, 0, 2, 0, 0.5)
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="timeout: expected > 0 seconds"):
        kv._C.NcclComm(kv._C.nccl_unique_id(), 0, 1, 0, 0.0)
    # The aborted rank left nothing behind: the same id forms a full communicator afterwards.
    comms = _in_threads(2, lambda r: kv._C.NcclComm(uid, r, 2, 0, 10.0))
    assert [c.rank for c in comms] == [0, 1] and all(c.async_error() == "" for c in comms)


def scenario_link_setup_bounded_when_a_peer_never_exchanges():
    """Both ranks join the communicator, but rank 1 never makes the first exchange: rank 0's link
    setup (which connects with a first send/receive) gives up at the timeout."""
    kv = _kvcore_simt()
    uid = kv._C.nccl_unique_id()
    comms = _in_threads(2, lambda r: kv._C.NcclComm(uid, r, 2, 0, 0.5))
    buf = kv._C.cuda_malloc(0, 8)
    stream = kv._C.cuda_stream_create(0)
    try:
        start = time.monotonic()
        with pytest.raises(kv.KVCoreError, match="ncclGroupEnd: the peers did not take part within 0.5 s"):
            comms[0].exchange([None, (buf, 4)], [None, (buf + 4, 4)], stream)
        assert time.monotonic() - start < 10
    finally:
        for c in comms:
            c.abort()
        kv._C.cuda_stream_destroy(stream)
        kv._C.cuda_free(buf)


def scenario_collectives_over_the_nccl_link():
    """Communicators of 3 ranks on the nccl link alone and next to the host link: all_reduce of
    emulated-device arrays equals the rank-order reference bit for bit."""
    import tempfile

    import simt_device
    from arrays import bits
    from test_comm import _as_framework, _expected_bits, _rank_input, _reduce_reference

    kv = _kvcore_simt()
    world = 3
    with tempfile.TemporaryDirectory() as tmp:
        store = kv.comm.FileStore(tmp + "/store", timeout=30)

        def rank_main(rank):
            checked = 0
            with kv.comm.Communicator(rank, world, store, links=[{"kind": "nccl", "device": 0}, "host"],
                                      timeout=30) as c:
                for dtype in ("float32", "bfloat16", "int32"):
                    for split in ({"nccl": 1.0}, {"nccl": 1.0, "host": 1.0}):
                        c.force_split(split)
                        inputs = [_rank_input(5, r, dtype, 30_011) for r in range(world)]
                        want = _expected_bits(_reduce_reference(inputs, dtype, "sum"), dtype)
                        x = simt_device.to_device(_as_framework(inputs[rank], dtype))
                        assert c.all_reduce(x) is x
                        assert np.array_equal(bits(x.host).view(np.uint8), want.view(np.uint8)), (dtype, split)
                        checked += 1
                slices = c.stats()["links"]["nccl"]["slices"]
            return checked, slices

        results = _in_threads(world, rank_main)
    assert all(checked == 6 and slices > 0 for checked, slices in results), results


# --- tests ----------------------------------------------------------------------------------------

# simt_dev builds the harness (and its NCCL) in the test process before a scenario needs it.

def test_nccl_init_is_bounded_by_the_timeout(simt_dev):
    run_scenario("scenario_init_bounded_when_a_rank_never_joins")


def test_nccl_first_exchange_is_bounded_by_the_timeout(simt_dev):
    run_scenario("scenario_link_setup_bounded_when_a_peer_never_exchanges")


def test_nccl_link_collectives_bit_identical(simt_dev):
    run_scenario("scenario_collectives_over_the_nccl_link", timeout=300)
