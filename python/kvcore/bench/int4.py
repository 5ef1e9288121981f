"""INT4 KV cache with block-diagonal Hadamard rotation: accuracy and speed.

int4-accuracy  No model weights are available, so the harness builds KV that looks like real models':
               per-channel lognormal scales (K and q), two RoPE pairs per KV head in the low-frequency
               half that are outlier key channels (5-20x larger, with a non-zero mean), RoPE (theta
               1e4, NeoX halves) applied to K and q, three "sink" tokens (token 0 and two more) whose
               keys are 5-10x larger, Gaussian values; q is scaled per head so that its logits have a
               standard deviation of 2 over the keys. Every method quantizes the same fp16 K/V with
               append_kv_int4 and runs kvcore's INT4 attention (paged_prefill_int4, the last 32
               queries of each sequence, causal); against float64 attention over the ORIGINAL fp16 KV
               it reports K and V SQNR (dB, energy over all tokens and heads), the attention output's
               relative L2 error and mean per-row cosine similarity, and the mean KL(p_ref || p_int4)
               of the attention probabilities (float64, from the dequantized K). Methods: fp16 (no
               quantization, kvcore paged_prefill: the kernel's own error floor), plain per-token INT4
               (block_size=1: H_1 = [1] is the identity, so this is the same quantizer without
               rotation) and Hadamard INT4 at b in {16, 32, 64, 128}, without and with random signs.
               Goals (on this outlier data): Hadamard b = 128 beats plain INT4 by >= 4 dB K SQNR and
               reaches an attention-output cosine >= 0.95. Deterministic (fixed seeds): full = 2
               sequences x 2048 tokens, Hq/Hkv = 16/4, D = 128; quick = 1 x 1024. Before any metric,
               each INT4 output is checked against float64 attention over its own dequantized KV
               (max error <= 2e-2 of the largest output), so a wrong kernel fails the run. The time
               column is one append_kv_int4 of the whole context (quantize + write).

int4           Speed. int4-append: the fused rotate + quantize + write of append_kv_int4 (b = 128, with
               and without signs) against plain INT4 quantize + write (block_size=1) as the peer (goal
               on CUDA: at most 5% slower), with GB/s = K/V read + codes/params written + slots, and
               the 16-bit append_kv of the same tokens in `extra`. int4-decode: paged_decode_int4
               (b = 128, signs) against kvcore's own 16-bit paged_decode on the same shapes as the
               peer (goal on CUDA: >= 3x faster at context >= 16K; the byte-count limit is 4096 / 1088
               = 3.76x at Hkv = 8, D = 128); GB/s counts the INT4 bytes read. Bytes per token are in
               `extra` and printed. CUDA: bf16, H = 8 / Hq = 32, D = 128, page 16; append T in {4K,
               32K, 256K} (quick: 32K), decode B in {1, 16, 64} x L in {4K, 16K, 32K} (quick: 16 x
               16K). CPU (fp16, small shapes): append T = 1024 (full: also 4096), decode 4 x 1K and
               8 x 2K (full: also 4 x 4K) with Hq/Hkv = 8/2; goal on the CPU: INT4 decode >= 2x the
               16-bit decode at context >= 2K; torch SDPA over the 16-bit KV with the gather from the
               pages counted goes to `extra` (torch_sdpa_gather_us) when torch is importable. Every case is checked before it is timed:
               codes and params bit for bit against a numpy implementation of the format (a sample of
               tokens), decode against float32/float64 attention over the dequantized KV.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import kvcore

from ._harness import Device, Row

TOL = 2e-2                    # max |out - ref| / max |ref| for the correctness checks
APPEND_GOAL_SLOWDOWN = 0.05   # fused rotate+quantize+write vs plain INT4 quantize+write (CUDA)
DECODE_GOAL_X = 3.0           # INT4 decode vs 16-bit decode at context >= 16K (CUDA)
DECODE_GOAL_CONTEXT = 16384
CPU_DECODE_GOAL_X = 2.0       # INT4 decode vs 16-bit decode at context >= 2K (CPU)
CPU_DECODE_GOAL_CONTEXT = 2048
K_SQNR_GOAL_DB = 4.0          # Hadamard b=128 over plain INT4, K SQNR
COSINE_GOAL = 0.95            # Hadamard b=128 attention-output cosine
MEMORY_LIMIT = 100 << 30

F32 = np.float32


# ---------------------------------------------------------------------------------------------------
# The documented INT4 format in numpy (quant.py / detail/int4.h), to check kernels before timing them.


def _np_rotate(x: np.ndarray, block: int, signs) -> np.ndarray:
    x = np.asarray(x, F32)
    if signs is not None:
        x = x * np.asarray(signs, F32)
    shape, d = x.shape, x.shape[-1]
    y = x.reshape(-1, d // block, block)
    h = 1
    while h < block:
        z = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        y = np.stack([z[..., 0, :] + z[..., 1, :], z[..., 0, :] - z[..., 1, :]], axis=-2).reshape(y.shape)
        h *= 2
    return (y * (F32(1) / np.sqrt(F32(block)))).reshape(shape)


def _np_quantize(x: np.ndarray, block: int, signs) -> tuple[np.ndarray, np.ndarray]:
    """x [..., D] -> (codes uint8 [..., D/2], params float16 [..., 2]) exactly as the kernels write them."""
    y = _np_rotate(x, block, signs)
    lo = np.take_along_axis(y, y.argmin(-1)[..., None], -1)[..., 0]
    hi = np.take_along_axis(y, y.argmax(-1)[..., None], -1)[..., 0]
    scale, mn = ((hi - lo) / F32(15)).astype(np.float16), lo.astype(np.float16)
    s, m = scale.astype(F32)[..., None], mn.astype(F32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(s > 0, np.clip(np.rint((y - m) / s), 0, 15), 0).astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8), np.stack([scale, mn], -1)


def _host(x) -> np.ndarray:
    """A host numpy array of a numpy / torch (uint8 or float16) array."""
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def _host_f32(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(F32)
    return x.detach().float().cpu().numpy()


def _bits(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.uint8 else x.view(f"u{x.dtype.itemsize}")


def _check_codes(what: str, k, k_codes, k_params, slots: np.ndarray, tokens: np.ndarray, block: int, signs) -> None:
    """Codes/params of `tokens` (indices into k) in their slots against the numpy format, bit for bit."""
    heads = k_codes.shape[2]
    codes = _host(k_codes).reshape(-1, heads, k_codes.shape[3])[slots[tokens]]
    params = _host(k_params).reshape(-1, heads, 2)[slots[tokens]]
    rows = k[tokens] if isinstance(k, np.ndarray) else k[_index(k, tokens)]
    want_c, want_p = _np_quantize(_host_f32(rows), block, None if signs is None else _host_f32(signs))
    if not (np.array_equal(codes, want_c) and np.array_equal(_bits(params), _bits(want_p))):
        raise AssertionError(f"{what}: codes/params differ from the documented INT4 format")


def _index(t, idx: np.ndarray):
    import torch

    return torch.as_tensor(idx, device=t.device)


def _err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max()) / max(float(np.abs(ref).max()), 1e-6)


class _Arrays:
    """numpy on the CPU, torch on CUDA."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.cuda = dev.is_cuda
        self.torch = dev.torch if dev.is_cuda else None

    def put(self, x: np.ndarray, dtype: str | None = None):
        if not self.cuda:
            return x if dtype is None else x.astype(dtype)
        t = self.torch.from_numpy(np.ascontiguousarray(x))
        if dtype is not None:
            t = t.to(getattr(self.torch, dtype))
        return t.cuda()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def caches(self, num_pages: int, page_size: int, heads: int, d: int):
        cs, ps = kvcore.int4_cache_shapes(num_pages, page_size, heads, d)
        if not self.cuda:
            return np.zeros(cs, np.uint8), np.zeros(ps, np.float16), np.zeros(cs, np.uint8), np.zeros(ps, np.float16)
        t = self.torch
        return (t.zeros(cs, dtype=t.uint8, device="cuda"), t.zeros(ps, dtype=t.float16, device="cuda"),
                t.zeros(cs, dtype=t.uint8, device="cuda"), t.zeros(ps, dtype=t.float16, device="cuda"))


# ---------------------------------------------------------------------------------------------------
# int4-accuracy


@dataclass
class _AccConfig:
    sequences: int = 2
    seq_len: int = 2048
    hq: int = 16
    hkv: int = 4
    d: int = 128
    queries: int = 32
    page: int = 16
    outlier_pairs: int = 2
    sinks: int = 3
    seed: int = 0


def _rope(x: np.ndarray, pos: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    half = x.shape[-1] // 2
    inv = theta ** (-np.arange(half) / half)
    ang = pos[:, None] * inv[None]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], -1)


def model_like_kv(cfg: _AccConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [queries, Hq, D], k [L, Hkv, D], v [L, Hkv, D]) float16 of one sequence; see the module doc."""
    rng = np.random.default_rng(seed)
    L, hkv, hq, d, nq = cfg.seq_len, cfg.hkv, cfg.hq, cfg.d, cfg.queries
    g, half = hq // hkv, d // 2
    k_scale = np.exp(0.6 * rng.standard_normal((hkv, d)))
    q_scale = np.exp(0.6 * rng.standard_normal((hkv, d)))
    k = rng.standard_normal((L, hkv, d)) * k_scale
    q = rng.standard_normal((nq, hkv, g, d)) * q_scale[:, None]
    for h in range(hkv):  # outlier channels: low-frequency RoPE pairs, so they survive the rotation
        for p in rng.choice(np.arange(half * 3 // 4, half), cfg.outlier_pairs, replace=False):
            for c in (p, p + half):
                mult = rng.uniform(5, 20)
                mean = rng.choice([-1.0, 1.0]) * mult * rng.uniform(0.5, 1.5)
                k[:, h, c] = (mean + mult * rng.standard_normal(L)) * k_scale[h, c]
                q[:, h, :, c] += rng.choice([-1.0, 1.0]) * 2.0 * q_scale[h, c]
    sinks = np.concatenate([[0], rng.choice(np.arange(1, L), cfg.sinks - 1, replace=False)])
    k[sinks] *= rng.uniform(5, 10, (cfg.sinks, 1, 1))
    k = _rope(k, np.arange(L))
    q = _rope(q.reshape(nq, hq, d), np.arange(L - nq, L))
    v = rng.standard_normal((L, hkv, d))
    for h in range(hq):  # logits with a standard deviation of ~2 over the keys
        logits = np.einsum("nd,ld->nl", q[:, h], k[:, h // g]) * d ** -0.5
        q[:, h] *= 2.0 / logits.std(axis=1).mean()
    return q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)


def _attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 causal attention of the last len(q) positions: (out [nq, Hq, D], probs [nq, Hq, L])."""
    nq, hq, d = q.shape
    L, hkv = k.shape[:2]
    g = hq // hkv  # GQA: query head h reads KV head h // g; the g heads of a KV head are rows of one matmul
    qh = q.astype(np.float64).reshape(nq, hkv, g, d).transpose(1, 0, 2, 3).reshape(hkv, nq * g, d)
    kt = np.ascontiguousarray(k.astype(np.float64).transpose(1, 2, 0))               # [Hkv, D, L]
    logits = (np.ascontiguousarray(qh) @ kt) * d ** -0.5                            # [Hkv, nq*g, L]
    visible = np.arange(L)[None, :] <= np.repeat(np.arange(L - nq, L), g)[:, None]
    logits = np.where(visible[None], logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    o = p @ np.ascontiguousarray(v.astype(np.float64).transpose(1, 0, 2))            # [Hkv, nq*g, D]
    o = o.reshape(hkv, nq, g, d).transpose(1, 0, 2, 3).reshape(nq, hq, d)
    return o, p.reshape(hkv, nq, g, L).transpose(1, 0, 2, 3).reshape(nq, hq, L)


def _time_once(dev: Device, fn) -> float:
    """Seconds of one (warm) call: the accuracy harness times its appends only for information."""
    if dev.is_cuda:
        return dev.time(fn, min_time=0.0, max_reps=5)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _sqnr_db(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def accuracy_rows(dev: Device, cfg: _AccConfig, out=None) -> list[Row]:
    import sys

    out = out or sys.stdout
    arr = _Arrays(dev)
    B, L, d, hkv, nq, ps = cfg.sequences, cfg.seq_len, cfg.d, cfg.hkv, cfg.queries, cfg.page
    data = [model_like_kv(cfg, cfg.seed + 1000 * s) for s in range(B)]
    refs = [_attention64(q, k, v) for q, k, v in data]
    pages = -(-L // ps)
    q_all = np.concatenate([q for q, _, _ in data])
    k_all = np.zeros((B * pages * ps, hkv, d), np.float16)
    v_all = np.zeros_like(k_all)
    slots = np.concatenate([s * pages * ps + np.arange(L) for s in range(B)]).astype(np.int64)
    k_all[slots] = np.concatenate([k for _, k, _ in data])
    v_all[slots] = np.concatenate([v for _, _, v in data])
    block_table = np.arange(B * pages, dtype=np.int32).reshape(B, pages)
    seq_lens = np.full(B, L, np.int32)
    cu = (np.arange(B + 1) * nq).astype(np.int32)
    q_d, k_d, v_d = arr.put(q_all), arr.put(k_all), arr.put(v_all)
    bt_d, lens_d, cu_d, slots_d = arr.put(block_table), arr.put(seq_lens), arr.put(cu), arr.put(slots)
    signs = kvcore.random_signs(d, cfg.seed)
    k_energy = sum(float((k.astype(np.float64) ** 2).sum()) for _, k, _ in data)
    v_energy = sum(float((v.astype(np.float64) ** 2).sum()) for _, _, v in data)
    ref_out = np.concatenate([o for o, _ in refs])

    methods: list[tuple[str, int | None, bool]] = [("fp16 (unquantized)", None, False), ("plain INT4 (b=1)", 1, False)]
    for b in (16, 32, 64, 128):
        methods += [(f"hadamard b={b}", b, False), (f"hadamard b={b} +signs", b, True)]
    results: list[dict[str, Any]] = []
    for name, block, use_signs in methods:
        sg = arr.put(signs) if use_signs else None
        if block is None:
            kc = k_d.reshape(B * pages, ps, hkv, d)
            vc = v_d.reshape(B * pages, ps, hkv, d)
            got = kvcore.paged_prefill(q_d, kc, vc, bt_d, lens_d, cu_d)
            arr.sync()
            got = _host_f32(got).astype(np.float64)
            k_deq, v_deq = k_all, v_all
            kw, vw = kc.clone() if arr.cuda else kc.copy(), vc.clone() if arr.cuda else vc.copy()
            t = _time_once(dev, lambda: kvcore.append_kv(k_d, v_d, kw, vw, slots_d))
        else:
            caches = arr.caches(B * pages, ps, hkv, d)

            def append():
                kvcore.append_kv_int4(k_d, v_d, *caches, slots_d, block_size=block, signs=sg)

            append()
            arr.sync()
            _check_codes(f"int4-accuracy {name}", k_all, caches[0], caches[1], slots,
                         np.linspace(0, len(slots) - 1, 64).astype(np.int64), block, signs if use_signs else None)
            t = _time_once(dev, append)
            got = kvcore.paged_prefill_int4(q_d, *caches, bt_d, lens_d, cu_d, block_size=block, signs=sg)
            k_deq = _host_f32(kvcore.dequantize_kv_int4(caches[0], caches[1], block_size=block, signs=sg))
            v_deq = _host_f32(kvcore.dequantize_kv_int4(caches[2], caches[3], block_size=block, signs=sg))
            arr.sync()
            got = _host_f32(got).astype(np.float64)
            k_deq, v_deq = k_deq.reshape(-1, hkv, d), v_deq.reshape(-1, hkv, d)
        k_noise = v_noise = 0.0
        kl, cos = [], []
        for s, (q, k, v) in enumerate(data):
            ks = k_deq[slots[s * L:(s + 1) * L]].astype(np.float64)
            vs = v_deq[slots[s * L:(s + 1) * L]].astype(np.float64)
            k_noise += float(((ks - k) ** 2).sum())
            v_noise += float(((vs - v) ** 2).sum())
            o_deq, p_deq = _attention64(q, ks, vs)
            o = got[s * nq:(s + 1) * nq]
            err = _err(o, o_deq)
            if not err <= TOL:
                raise AssertionError(f"int4-accuracy {name} on {dev.kind}: attention differs from float64 attention "
                                     f"over its own dequantized KV by {err:.3g} (relative to max |ref|) > {TOL}")
            p_ref = refs[s][1]
            with np.errstate(divide="ignore", invalid="ignore"):
                kl.append(np.where(p_ref > 0, p_ref * (np.log(p_ref) - np.log(np.maximum(p_deq, 1e-300))), 0).sum(-1))
            o_ref = refs[s][0]
            cos.append((o * o_ref).sum(-1) / (np.linalg.norm(o, axis=-1) * np.linalg.norm(o_ref, axis=-1)))
        cos_all = np.concatenate([c.ravel() for c in cos])
        results.append(dict(method=name, block_size=block, signs=use_signs, time_s=t,
                            k_sqnr_db=_sqnr_db(k_energy, k_noise), v_sqnr_db=_sqnr_db(v_energy, v_noise),
                            out_rel_l2=float(np.linalg.norm(got - ref_out) / np.linalg.norm(ref_out)),
                            out_cosine=float(cos_all.mean()), out_cosine_min=float(cos_all.min()),
                            attn_kl=float(np.mean(np.concatenate([x.ravel() for x in kl])))))

    plain = next(r for r in results if r["block_size"] == 1)
    print(f"int4-accuracy [{dev.kind}]: model-like KV, {B} sequence(s) x {L} tokens, Hq/Hkv {cfg.hq}/{hkv}, D {d}, "
          f"{nq} causal queries each; {cfg.outlier_pairs} outlier RoPE pairs per KV head, {cfg.sinks} sink tokens; "
          f"metrics vs float64 attention on the original fp16 KV", file=out)
    header = f"  {'method':<22} {'K SQNR dB':>9} {'V SQNR dB':>9} {'out relL2':>9} {'out cos':>8} {'min cos':>8} " \
             f"{'attn KL':>9}"
    print(header, file=out)
    print("  " + "-" * (len(header) - 2), file=out)
    for r in results:
        print(f"  {r['method']:<22} {r['k_sqnr_db']:9.2f} {r['v_sqnr_db']:9.2f} {r['out_rel_l2']:9.4f} "
              f"{r['out_cosine']:8.4f} {r['out_cosine_min']:8.4f} {r['attn_kl']:9.5f}", file=out)
    rows = []
    verdicts = []
    for r in results:
        extra = {k: ((round(v, 6) if np.isfinite(v) else None) if isinstance(v, float) else v)  # inf -> null
                 for k, v in r.items() if k not in ("method", "time_s")}
        extra.update(sequences=B, seq_len=L, hq=cfg.hq, hkv=hkv, head_dim=d, queries=nq)
        if r["block_size"] == 128:
            gain = r["k_sqnr_db"] - plain["k_sqnr_db"]
            met = bool(gain >= K_SQNR_GOAL_DB and r["out_cosine"] >= COSINE_GOAL)
            extra.update(goal=f"K SQNR >= plain INT4 + {K_SQNR_GOAL_DB:g} dB (got {gain:+.2f} dB) and "
                              f"attention-output cosine >= {COSINE_GOAL:g} (got {r['out_cosine']:.4f})",
                         goal_met=met, k_sqnr_gain_db=round(gain, 3))
            verdicts.append(f"  {r['method']}: K SQNR {gain:+.2f} dB over plain INT4 (goal >= +{K_SQNR_GOAL_DB:g}), "
                            f"cosine {r['out_cosine']:.4f} (goal >= {COSINE_GOAL:g}): "
                            f"{'goal met' if met else 'NOT MET'}")
        rows.append(Row("int4-acc", r["method"], dev.kind, r["time_s"] * 1e6, 0.0, extra=extra))
    for v in verdicts:
        print(v, file=out)
    return rows


def bench_int4_accuracy(dev: Device, quick: bool = False) -> list[Row]:
    cfg = _AccConfig(sequences=1, seq_len=1024, queries=16) if quick else _AccConfig()
    return accuracy_rows(dev, cfg)


# ---------------------------------------------------------------------------------------------------
# int4 (speed)


def _bytes_per_token(hkv: int, d: int) -> tuple[int, int]:
    """(16-bit, INT4) bytes of K + V per token per layer."""
    return 2 * hkv * d * 2, 2 * hkv * (d // 2 + 4)


class _SpeedBench:
    def __init__(self, dev: Device):
        self.dev = dev
        self.arr = _Arrays(dev)
        self.cuda = dev.is_cuda
        self.rng = np.random.default_rng(0)
        self.notes: list[str] = []
        if self.cuda:
            self.hq, self.hkv, self.d, self.page, self.dtype = 32, 8, 128, 16, "bfloat16"
        else:
            self.hq, self.hkv, self.d, self.page, self.dtype = 8, 2, 128, 16, "float16"
        self.signs = kvcore.random_signs(self.d, 0)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.dev.torch.cuda.empty_cache()

    def fits(self, nbytes: int, what: str) -> bool:
        limit = MEMORY_LIMIT
        if self.cuda:
            free, _ = self.dev.torch.cuda.mem_get_info()
            limit = min(limit, int(0.9 * free))
        if nbytes > limit:
            self.notes.append(f"skipped {what}: needs ~{nbytes / 2**30:.1f} GiB, limit {limit / 2**30:.1f} GiB")
            return False
        return True

    def randn(self, *shape):
        if self.cuda:
            torch = self.dev.torch
            g = torch.Generator(device="cuda")
            g.manual_seed(int(self.rng.integers(1 << 31)))
            return torch.randn(*shape, generator=g, device="cuda", dtype=getattr(torch, self.dtype))
        return self.rng.standard_normal(shape, dtype=F32).astype(np.float16)

    def dt(self) -> str:
        return "bf16" if self.dtype == "bfloat16" else "fp16"

    # -- append -------------------------------------------------------------------------------------

    def append(self, tokens: int) -> list[Row]:
        h, d, ps = 8, self.d, self.page
        num_pages = tokens // ps + 1
        if not self.fits(tokens * h * d * 2 * 2 * 3 + num_pages * ps * h * d * 4, f"int4-append T={tokens}"):
            return []
        k, v = self.randn(tokens, h, d), self.randn(tokens, h, d)
        slots_np = self.rng.permutation(num_pages * ps)[:tokens].astype(np.int64)
        slots = self.arr.put(slots_np)
        sg = self.arr.put(self.signs)
        caches = {name: self.arr.caches(num_pages, ps, h, d) for name in ("plain", "hadamard", "signs")}
        calls = {
            "plain": lambda: kvcore.append_kv_int4(k, v, *caches["plain"], slots, block_size=1),
            "hadamard": lambda: kvcore.append_kv_int4(k, v, *caches["hadamard"], slots, block_size=128),
            "signs": lambda: kvcore.append_kv_int4(k, v, *caches["signs"], slots, block_size=128, signs=sg),
        }
        sample = np.unique(np.linspace(0, tokens - 1, min(tokens, 256)).astype(np.int64))
        for name, fn in calls.items():
            fn()
            self.arr.sync()
            block = 1 if name == "plain" else 128
            signs = self.signs if name == "signs" else None
            _check_codes(f"int4-append {name} T={tokens}", k, caches[name][0], caches[name][1], slots_np, sample,
                         block, signs)
            _check_codes(f"int4-append {name} T={tokens} (v)", v, caches[name][2], caches[name][3], slots_np,
                         sample, block, signs)
        times = {name: self.dev.time(fn) for name, fn in calls.items()}
        # the 16-bit append_kv of the same tokens, for reference
        if self.cuda:
            torch = self.dev.torch
            kc = torch.empty((num_pages, ps, h, d), dtype=k.dtype, device="cuda")
        else:
            kc = np.empty((num_pages, ps, h, d), np.float16)
        vc = kc.clone() if self.cuda else kc.copy()
        t16 = self.dev.time(lambda: kvcore.append_kv(k, v, kc, vc, slots))
        in_bytes = 2 * tokens * h * d * 2
        out_bytes = 2 * tokens * h * (d // 2 + 4)
        nbytes = in_bytes + out_bytes + slots_np.nbytes
        rows = []
        plain_t = times["plain"]
        for name, label in (("hadamard", "b=128"), ("signs", "b=128 +signs")):
            t = times[name]
            slowdown = t / plain_t - 1
            extra: dict[str, Any] = {
                "tokens": tokens, "heads": h, "head_dim": d, "block_size": 128, "signs": name == "signs",
                "slowdown_vs_plain_pct": round(100 * slowdown, 2), "append_kv_16bit_us": round(t16 * 1e6, 2),
                "bytes": nbytes, "bytes_note": "K/V read + codes/params written + slot_mapping",
            }
            if self.cuda:
                extra.update(goal=f"at most {100 * APPEND_GOAL_SLOWDOWN:g}% slower than plain INT4 quantize+write "
                                  f"(got {100 * slowdown:+.1f}%)", goal_met=bool(slowdown <= APPEND_GOAL_SLOWDOWN))
            rows.append(Row("int4-append", f"T={_k(tokens)} H={h} D={d} {self.dt()} {label}", self.dev.kind, t * 1e6,
                            nbytes / t / 1e9, "plain INT4 (b=1)", plain_t * 1e6, nbytes / plain_t / 1e9, extra))
        del k, v, caches, kc, vc
        self.free()
        return rows

    # -- decode -------------------------------------------------------------------------------------

    def decode(self, batch: int, ctx: int) -> Row | None:
        hq, hkv, d, ps = self.hq, self.hkv, self.d, self.page
        case = f"B={batch} L={_k(ctx)} {hq}/{hkv} D{d} ps{ps} {self.dt()}"
        b16, b4 = _bytes_per_token(hkv, d)
        per = -(-ctx // ps)
        num_pages = batch * per + 1
        if not self.fits(num_pages * ps * (b16 + b4) + (1 << 30), f"int4-decode {case}"):
            return None
        k, v = self.randn(num_pages, ps, hkv, d), self.randn(num_pages, ps, hkv, d)
        bt_np = self.rng.permutation(num_pages)[:batch * per].reshape(batch, per).astype(np.int32)
        bt = self.arr.put(bt_np)
        lens = self.arr.put(np.full(batch, ctx, np.int32))
        q = self.randn(batch, hq, d)
        sg = self.arr.put(self.signs)
        caches = self.arr.caches(num_pages, ps, hkv, d)
        all_slots = self.arr.put(np.arange(num_pages * ps, dtype=np.int64))
        kvcore.append_kv_int4(k.reshape(-1, hkv, d), v.reshape(-1, hkv, d), *caches, all_slots, signs=sg)
        out4 = kvcore.paged_decode_int4(q, *caches, bt, lens, signs=sg)
        out16 = kvcore.paged_decode(q, k, v, bt, lens)
        self.arr.sync()
        # check a few requests against float64 attention over their dequantized KV (and the 16-bit one)
        errs = []
        for b in sorted({0, batch - 1}):
            pages = bt_np[b]
            sel = self.arr.put(pages.astype(np.int64))
            kd = _host_f32(kvcore.dequantize_kv_int4(caches[0][sel], caches[1][sel], signs=sg))
            vd = _host_f32(kvcore.dequantize_kv_int4(caches[2][sel], caches[3][sel], signs=sg))
            kd, vd = kd.reshape(-1, hkv, d)[:ctx], vd.reshape(-1, hkv, d)[:ctx]
            qb = _host_f32(q[b:b + 1])
            ref, _ = _attention64(qb, kd, vd)
            errs.append(_err(_host_f32(out4[b:b + 1]), ref))
            if not errs[-1] <= TOL:
                raise AssertionError(f"paged_decode_int4 {case} request {b} on {self.dev.kind}: max error "
                                     f"{errs[-1]:.3g} vs float64 attention over the dequantized KV exceeds {TOL}")
            kb = _host_f32(k[_sel(self, pages)]).reshape(-1, hkv, d)[:ctx]
            vb = _host_f32(v[_sel(self, pages)]).reshape(-1, hkv, d)[:ctx]
            ref16, _ = _attention64(qb, kb, vb)
            if not _err(_host_f32(out16[b:b + 1]), ref16) <= TOL:
                raise AssertionError(f"paged_decode {case} request {b} on {self.dev.kind}: wrong result")
        out = out4
        t4 = self.dev.time(lambda: kvcore.paged_decode_int4(q, *caches, bt, lens, signs=sg, out=out))
        t16 = self.dev.time(lambda: kvcore.paged_decode(q, k, v, bt, lens, out=out16))
        qo = 2 * batch * hq * d * 2
        n4, n16 = batch * ctx * b4 + qo, batch * ctx * b16 + qo
        x = t16 / t4
        extra: dict[str, Any] = {
            "batch": batch, "context": ctx, "speedup_vs_16bit": round(x, 3), "bytes_per_token_16bit": b16,
            "bytes_per_token_int4": b4, "byte_ratio": round(b16 / b4, 3), "block_size": 128, "signs": True,
            "max_rel_err": float(f"{max(errs):.3g}"),
        }
        if self.cuda and ctx >= DECODE_GOAL_CONTEXT:
            extra.update(goal=f">= {DECODE_GOAL_X:g}x faster than 16-bit paged_decode (got x{x:.2f}; byte limit "
                              f"x{b16 / b4:.2f})", goal_met=bool(x >= DECODE_GOAL_X))
        if not self.cuda and ctx >= CPU_DECODE_GOAL_CONTEXT:
            extra.update(goal=f">= {CPU_DECODE_GOAL_X:g}x faster than 16-bit paged_decode (got x{x:.2f}; byte "
                              f"limit x{b16 / b4:.2f})", goal_met=bool(x >= CPU_DECODE_GOAL_X))
        if not self.cuda and self.dev.torch is not None:
            # torch SDPA over the 16-bit KV gathered from the pages inside the timed call
            torch = self.dev.torch
            F = torch.nn.functional
            tkc, tvc, btl = torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(bt_np).long()
            tq = torch.from_numpy(q).reshape(batch, hkv, hq // hkv, d)

            def gather(cache):
                return cache[btl].reshape(batch, per * ps, hkv, d)[:, :ctx].transpose(1, 2).contiguous()

            def sdpa():
                return F.scaled_dot_product_attention(tq, gather(tkc), gather(tvc))

            got = sdpa().float().numpy().reshape(batch, hq, d)
            ref16 = _host_f32(out16)
            if _err(got, ref16.astype(np.float64)) <= TOL:
                ts = self.dev.time(sdpa)
                extra["torch_sdpa_gather_us"] = round(ts * 1e6, 1)
                extra["x_torch_sdpa_gather"] = round(ts / t4, 2)
            else:
                self.notes.append(f"torch sdpa peer of int4-decode {case} disagrees with kvcore; left out")
        del k, v, caches, q, out4, out16
        self.free()
        return Row("int4-decode", case, self.dev.kind, t4 * 1e6, n4 / t4 / 1e9, f"kvcore paged_decode {self.dt()}",
                   t16 * 1e6, n16 / t16 / 1e9, extra)

    def run(self, quick: bool) -> list[Row]:
        if self.cuda:
            appends = [32768] if quick else [4096, 32768, 262144]
            decodes = [(16, 16384)] if quick else [(b, c) for b in (1, 16, 64) for c in (4096, 16384, 32768)]
        else:
            appends = [1024] if quick else [1024, 4096]
            decodes = [(4, 1024), (8, 2048)] if quick else [(4, 1024), (8, 2048), (4, 4096)]
        rows: list[Row] = []
        for t in appends:
            rows += self.append(t)
        for b, c in decodes:
            r = self.decode(b, c)
            if r is not None:
                rows.append(r)
        b16, b4 = _bytes_per_token(self.hkv, self.d)
        print(f"int4 [{self.dev.kind}]: KV bytes per token per layer at Hkv={self.hkv}, D={self.d}: 16-bit {b16}, "
              f"INT4 {b4} (codes {self.hkv * self.d} + params {4 * self.hkv}; {b16 / b4:.2f}x smaller, "
              f"{8 * b4 / (2 * self.hkv * self.d):.2f} bits per element)")
        for n in self.notes:
            print(f"int4 [{self.dev.kind}]: {n}")
        return rows


def _sel(bench: _SpeedBench, pages: np.ndarray):
    return bench.arr.put(pages.astype(np.int64)) if bench.cuda else pages


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def bench_int4(dev: Device, quick: bool = False) -> list[Row]:
    if dev.is_cuda:
        with dev.torch.no_grad():
            return _SpeedBench(dev).run(quick)
    return _SpeedBench(dev).run(quick)


__all__ = ["bench_int4", "bench_int4_accuracy", "model_like_kv"]
