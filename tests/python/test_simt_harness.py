"""The SIMT harness itself: its warp and tensor-core emulation computes what the CUDA documentation
says (checked against numpy), and deliberately broken kernels (a dropped __syncthreads or
__syncwarp, a shifted index, a barrier or shuffle some threads never reach) are reported with the
check, the thread and the source line."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.simt


@pytest.fixture(scope="module")
def ctl():
    import os

    import simt_device

    try:
        simt_device.build()
    except RuntimeError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    return simt_device.control()


def fresh(rng, n=512) -> np.ndarray:
    return (rng.standard_normal(n) + 0.25).astype(np.float32)


def test_block_sum(ctl, rng):
    x = fresh(rng)
    got = ctl.selftest("block_sum", x.tolist())
    np.testing.assert_allclose(got[0], x[:128].astype(np.float64).sum(), rtol=1e-5, atol=1e-5)


def test_warp_shuffles_and_ballot(ctl, rng):
    x = fresh(rng)[:128]
    got = np.array(ctl.selftest("warp_ops", x.tolist())).reshape(128, 5)
    lane = np.arange(128) % 32
    base = np.arange(128) - lane
    np.testing.assert_allclose(got[:, 0], np.repeat(x.reshape(4, 32).astype(np.float64).sum(1), 32), rtol=1e-5)
    np.testing.assert_array_equal(got[:, 1], np.where(lane >= 1, x[np.maximum(np.arange(128) - 1, 0)], x))
    np.testing.assert_array_equal(got[:, 2], np.where(lane + 3 < 32, x[np.minimum(np.arange(128) + 3, 127)], x))
    np.testing.assert_array_equal(got[:, 3], x[base + 5])
    np.testing.assert_array_equal(got[:, 4], np.repeat((x.reshape(4, 32) > 0).sum(1), 32))


def test_warp_exchange_with_syncwarp(ctl, rng):
    x = fresh(rng)[:128]
    got = np.array(ctl.selftest("warp_exchange", x.tolist()))
    np.testing.assert_array_equal(got, x.reshape(4, 32)[:, ::-1].reshape(-1))


def test_wmma_matches_a_float64_product(ctl, rng):
    """C = A B + 0.5 with A row-major and B column-major in memory (inputs rounded to float16)."""
    x = fresh(rng)
    a = x[:256].astype(np.float16).astype(np.float64).reshape(16, 16)
    b = x[256:512].astype(np.float16).astype(np.float64).reshape(16, 16).T  # col-major storage
    got = np.array(ctl.selftest("wmma_gemm", x.tolist())).reshape(16, 16)
    np.testing.assert_allclose(got, a @ b + 0.5, rtol=1e-5, atol=1e-4)


def to_bits16(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the 16-bit type (round to nearest even) -> float64."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ldmatrix_and_mma_compute_the_isa_product(ctl, rng, dtype):
    """The FA2 operand idiom (A by ldmatrix.x4, B by ldmatrix.x2 from [n][k] rows and by .trans from
    [k][n] rows, staged with cp.async) gives D = A B + C through mma.sync m16n8k16."""
    x = fresh(rng)
    a = to_bits16(x[:256], dtype).reshape(16, 16)
    b = to_bits16(x[256:384], dtype).reshape(8, 16).T  # stored as [n][k]
    c = x[384:512].astype(np.float64).reshape(16, 8)
    want = a @ b + c
    got = np.array(ctl.selftest("ldmatrix_mma_" + ("f16" if dtype == "float16" else "bf16"), x.tolist()))
    np.testing.assert_allclose(got[:128].reshape(16, 8), want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got[128:].reshape(16, 8), want, rtol=1e-6, atol=1e-5)


def test_cp_async_groups_land_in_order_and_zero_fill(ctl, rng):
    x = fresh(rng)
    got = np.array(ctl.selftest("cp_async_groups", x.tolist()))
    t = (np.arange(128) + 1) % 128
    np.testing.assert_array_equal(got[:128], np.where(t % 2 == 0, x[4 * (t % 64)], 0.0).astype(np.float32))
    np.testing.assert_array_equal(got[128:256], x[256 + 4 * (t % 64) + 3])  # a 4-byte copy
    np.testing.assert_array_equal(got[256:], x[256 + 4 * (t % 64) + 1])  # an 8-byte copy


def test_lop3_and_prmt_follow_the_isa(ctl, rng):
    x = fresh(rng)
    a, b, c = (x[i * 128:(i + 1) * 128].view(np.uint32).astype(np.uint64) for i in range(3))
    both = (b << 32) | a  # prmt's byte source: a is bytes 0-3, b bytes 4-7

    def byte(k):
        return (both >> (8 * k)) & 0xFF

    sign0 = np.where(byte(0) & 0x80, 0xFF, 0).astype(np.uint64)
    want = [a ^ b ^ c, (a & b) | (a & c) | (b & c),
            byte(1) | byte(5) << 8 | byte(3) << 16 | byte(7) << 24,
            byte(0) | sign0 << 8 | sign0 << 16 | sign0 << 24]
    got = np.array(ctl.selftest("bit_ops", x.tolist())).reshape(128, 4, 2).astype(np.uint64)
    for i, w in enumerate(want):
        np.testing.assert_array_equal(got[:, i, 0] | got[:, i, 1] << 16, w, err_msg=f"result {i}")


def round_bits16(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 -> the bits of the nearest float16 / bfloat16 (ties to even), computed independently
    of the harness: numpy's float16 cast, or bf16 by rounding the 8-bit significand with np.rint."""
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint16).astype(np.uint64)
    m, e = np.frexp(x)  # x = m 2^e, 0.5 <= |m| < 1
    r = np.ldexp(np.rint(np.ldexp(m, 8)), e - 8).astype(np.float32)  # exact in float32
    return (r.view(np.uint32) >> 16).astype(np.uint64)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fma2_rounds_once_to_nearest_even(ctl, rng, dtype):
    x = fresh(rng, 768).astype(np.float64)
    v = np.array([x[i * 128:(i + 1) * 128] for i in range(6)])  # a lo, a hi, b lo, b hi, c lo, c hi
    bits = round_bits16(v, dtype)
    vals = (bits.astype(np.uint16).view(np.float16).astype(np.float64) if dtype == "float16"
            else (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64))
    want_lo = round_bits16(vals[0] * vals[2] + vals[4], dtype)
    want_hi = round_bits16(vals[1] * vals[3] + vals[5], dtype)
    got = np.array(ctl.selftest("fma2_" + ("f16" if dtype == "float16" else "bf16"), x.astype(np.float32).tolist()))
    got = got.reshape(128, 2).astype(np.uint64)
    np.testing.assert_array_equal(got[:, 0], want_lo)
    np.testing.assert_array_equal(got[:, 1], want_hi)


def test_shared_atomics_are_not_races(ctl, rng):
    x = fresh(rng)
    assert ctl.selftest("shared_atomics", x.tolist())[0] == (x[:128] > 0).sum()


BROKEN = {
    "block_sum_missing_barrier": r"shared-memory race: thread \(64,0,0\) .* unsynchronized read by thread \(0,0,0\)"
                                 r".* `s` \+ 256 .* at selftest/kernels.cu:\d+",
    "warp_exchange_missing_syncwarp": r"shared-memory race: .* unsynchronized read",
    "shifted_index": r"out-of-bounds shared-memory write by thread \(127,0,0\) .* byte 0 past the end of `s`",
    "barrier_in_branch": r"barrier divergence: thread \(64,0,0\) .* exited while 64 thread\(s\) wait at __syncthreads",
    "shuffle_partial_warp": r"warp divergence: thread \(16,0,0\) .* exited while lane 0 waits at __shfl_\*_sync"
                            r" .* mask 0xffffffff",
    "shuffle_outside_mask": r"lane 0 of warp 0 reads lane 16, which is missing from the mask 0xffff",
    "uninitialized_shared": r"read of uninitialized shared memory by thread \(0,0,0\)",
    "dynamic_without_smem": r"uses dynamic shared memory, but the launch gave none",
    "cp_async_read_before_wait": r"read by thread \(0,0,0\) .* of shared memory whose cp.async has not landed .* `s`",
    "ldmatrix_misaligned": r"ldmatrix at selftest/kernels.cu:\d+: lane 0 of warp 0 gives a row address that is not "
                           r"16-byte aligned shared memory",
    "global_write_past_end": r"out-of-bounds global-memory write by thread \(127,0,0\) .* 4 byte\(s\) at 0x[0-9a-f]+, "
                             r"inside a 256-byte red zone next to an allocation \(0 byte\(s\) into it\)"
                             r" at .*selftest/kernels.cu:\d+",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_kernels_are_reported(ctl, rng, name):
    with pytest.raises(RuntimeError, match=BROKEN[name]):
        ctl.selftest(name, fresh(rng).tolist())
    ctl.take_kernel_errors()


def test_every_self_test_kernel_is_covered(ctl):
    correct = {"block_sum", "warp_ops", "warp_exchange", "wmma_gemm", "shared_atomics", "ldmatrix_mma_f16",
               "ldmatrix_mma_bf16", "cp_async_groups", "bit_ops", "fma2_f16", "fma2_bf16"}
    assert set(ctl.selftest_names()) == correct | set(BROKEN)
