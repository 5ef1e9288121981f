"""Benchmarks of the attention family: paged decode, prefill/extend, shared-prefix (cascade) decode.

CUDA (bf16, Hq/Hkv = 32/8, D = 128, page 16; the cache pages of each request are scattered at random):
  attn-decode   B in {1, 16, 64, 256} x context in {1K, 4K, 16K, 32K} (quick: 16 x 1K, 64 x 4K).
                GB/s counts the K and V bytes actually read (sum of seq_lens x Hkv x D x 2 bytes x 2)
                plus q and out; `extra.pct_copy` is that as % of the measured device-to-device copy
                bandwidth. Goals on an H200: >= 85% of copy at B x context >= 64 x 4K, >= 60% at
                16 x 1K, and never slower than the best peer.
  attn-prefill  B=4 x 4K new tokens on an empty cache (causal) and B=4 x 1K new on 7K cached (extend)
                (quick: B=1). FLOPs = 4 * Hq * D * sum over queries of visible keys (causal halves);
                TFLOP/s and % of a measured dense bf16 matmul (8192^3) go to `extra` and to the goal
                line (>= 50% of the matmul rate, not slower than the best peer).
  attn-shared   B=256 requests sharing a 16K prefix, each with its own 256-token suffix (quick: B=64,
                4K prefix, 64-token suffixes): kvcore.shared_prefix_decode, with kvcore.paged_decode of
                the same requests (block table = prefix pages + suffix pages) as the peer, so `x peer`
                is the speed-up from sharing (goal >= 10x). GB/s counts the distinct KV bytes.
  Peers, each checked against the same reference before it is timed (a peer that disagrees or fails
  is left out with a note): torch SDPA on the KV gathered into contiguous [B, Hkv, L, D] tensors
  (flash / cuDNN / efficient backends only; GQA as packed query rows or enable_gqa; the gather is
  excluded from the time), torch FlexAttention compiled once per shape on the same gathered KV, and
  FlashInfer's paged decode / prefill wrappers on kvcore's own paged cache when `import flashinfer`
  works. Each row's peer is the fastest correct one; all peer times are in `extra.peers_us`.
  Shapes whose memory would exceed ~100 GiB (or the free device memory) are skipped with a note.

CPU (Hq/Hkv = 8/2, D = 128, page 16): decode B=4 x 1K fp16, 8 x 2K fp16, bf16 and fp32 (full: also 16 x 1K,
4 x 4K, 16 x 2K fp16/bf16); attn-tiny (B=1, 16 keys, numpy arrays: per-call overhead); prefill 256 and
512 causal, extend 64 on 192 cached (full: also 256 on 1792); shared prefix B=16 with a 1K prefix and
16-token suffixes. Decode peers: torch SDPA with the gather of the paged KV into contiguous
[B, Hkv, L, D] counted in its time ("torch sdpa+gather"; the same without the gather is in
`extra.peers_us`) and numpy float32 on KV gathered beforehand. Prefill peers: numpy and torch SDPA on
contiguous KV. References: the copy bandwidth (np.copyto, printed first) and a float32 numpy matmul
(1024^3). Goals: decode at B x context >= 8 x 2K >= 70% of the copy bandwidth and >= 1.5x torch
sdpa+gather; prefill 512 causal >= 50% of the matmul rate and >= 1x torch SDPA; attn-tiny within 2x
of one torch SDPA call. float32 KV runs on the CPU backend only (the CUDA kernels are 16-bit).

Every case is checked first: kvcore's output against a reference computed in float32 (CUDA, on a few
requests for the large shapes) or float64 numpy (CPU) from the same 16-bit inputs, with a maximum
error of 2e-2 relative to the largest output magnitude, so a wrong kernel is never timed.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import kvcore

from ._harness import Device, Row, copy_bandwidth

TOL = 2e-2                   # max |out - ref| / max |ref|
MEMORY_LIMIT = 100 << 30     # bytes a case may allocate
DECODE_GOAL_PCT = 85.0       # % of copy bandwidth at B x context >= 64 x 4K
SMALL_DECODE_GOAL_PCT = 60.0  # ... at 16 x 1K
PREFILL_GOAL_PCT = 50.0      # % of the dense bf16 matmul rate
SHARED_GOAL_X = 10.0         # shared-prefix decode vs the same requests unshared
# CPU goals (issue 16): decode at B x context >= 8 x 2K, prefill at 512 causal, a tiny decode's overhead
DECODE_CPU_GOAL_TOKENS = 8 * 2048
DECODE_CPU_GOAL_PCT = 70.0   # % of the measured copy bandwidth
DECODE_CPU_GOAL_X = 1.5      # x torch sdpa with the gather counted
PREFILL_CPU_GOAL_TOKENS = 512
PREFILL_CPU_GOAL_PCT = 50.0  # % of the float32 numpy matmul rate
TINY_GOAL_X = 2.0            # B=1, 16 keys: at most this many times a torch sdpa call
GATHER_NOTE = "sdpa / flex peers run on KV pre-gathered into contiguous [B, Hkv, L, D]; gather not timed"


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _err(got, ref) -> float:
    """max |got - ref| / max |ref| as a float (numpy or torch arrays)."""
    if isinstance(ref, np.ndarray):
        got = np.asarray(got, dtype=np.float64)
        scale = max(float(np.abs(ref).max()), 1e-6)
        return float(np.abs(got - ref).max()) / scale
    got, ref = got.float(), ref.float()
    scale = max(float(ref.abs().max()), 1e-6)
    return float((got - ref).abs().max()) / scale


@dataclass
class _Shape:
    hq: int
    hkv: int
    d: int
    page: int

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def scale(self) -> float:
        return self.d ** -0.5

    def desc(self) -> str:
        return f"{self.hq}/{self.hkv} D{self.d}"


# ---------------------------------------------------------------------------------------------------
# torch path (CUDA; also runs on torch CPU tensors with a small _TorchConfig, which is how it is tested)


@dataclass
class _TorchConfig:
    shape: _Shape = field(default_factory=lambda: _Shape(32, 8, 128, 16))
    dtype: str = "bfloat16"
    decode: list = field(default_factory=lambda: [(b, c) for b in (1, 16, 64, 256)
                                                  for c in (1024, 4096, 16384, 32768)])
    decode_quick: list = field(default_factory=lambda: [(16, 1024), (64, 4096)])
    # (batch, new tokens, cached tokens before them)
    prefill: list = field(default_factory=lambda: [(4, 4096, 0), (4, 1024, 7168)])
    prefill_quick: list = field(default_factory=lambda: [(1, 4096, 0), (1, 1024, 7168)])
    # (batch, shared prefix tokens, suffix tokens per request)
    shared: tuple = (256, 16384, 256)
    shared_quick: tuple = (64, 4096, 64)
    matmul_n: int = 8192
    verify_requests: int = 4      # requests checked against the float32 reference
    verify_rows: int = 64         # prefill query rows checked per verified request
    goals: bool = True
    flashinfer: bool = True
    flex: bool = True


class _TorchBench:
    def __init__(self, dev: Device, device: str, cfg: _TorchConfig):
        import torch
        import torch.nn.functional as F

        self.dev, self.device, self.cfg, self.s = dev, device, cfg, cfg.shape
        self.torch, self.F = torch, F
        self.dtype = getattr(torch, cfg.dtype)
        self.cuda = device.startswith("cuda")
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(0)
        self.notes: list[str] = []
        self._flex_fn = None
        self._flashinfer = None
        self._matmul_tflops: float | None = None
        self._copy_gbps: float | None = None

    # -- helpers ------------------------------------------------------------------------------------

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def randn(self, *shape):
        return self.torch.randn(*shape, generator=self.gen, device=self.device, dtype=self.dtype)

    def fits(self, nbytes: int, what: str) -> bool:
        limit = MEMORY_LIMIT
        if self.cuda:
            free, _ = self.torch.cuda.mem_get_info()
            limit = min(limit, int(0.9 * free))
        if nbytes > limit:
            self.note(f"skipped {what}: needs ~{nbytes / 2**30:.1f} GiB, limit {limit / 2**30:.1f} GiB")
            return False
        return True

    def copy_gbps(self) -> float:
        if self._copy_gbps is None:
            self._copy_gbps = copy_bandwidth(self.dev)
        return self._copy_gbps

    def matmul_tflops(self) -> float:
        """Dense matmul rate in the benchmark dtype (n^3, n = cfg.matmul_n)."""
        if self._matmul_tflops is None:
            n = self.cfg.matmul_n
            a, b = self.randn(n, n), self.randn(n, n)
            c = self.torch.empty(n, n, dtype=self.dtype, device=self.device)
            t = self.dev.time(lambda: self.torch.matmul(a, b, out=c))
            self._matmul_tflops = 2 * n ** 3 / t / 1e12
            del a, b, c
            self.free()
        return self._matmul_tflops

    def pages(self, batch: int, tokens: int):
        """A cache with `batch` requests of `tokens` tokens on scattered pages: (k, v, block_table)."""
        torch, ps = self.torch, self.s.page
        per = -(-tokens // ps)
        num_pages = batch * per + 1
        k = self.randn(num_pages, ps, self.s.hkv, self.s.d)
        v = self.randn(num_pages, ps, self.s.hkv, self.s.d)
        perm = torch.randperm(num_pages, generator=self.gen, device=self.device)
        bt = perm[:batch * per].view(batch, per).to(torch.int32)
        return k, v, bt

    def gather(self, cache, bt, tokens: int):
        """[B, Hkv, tokens, D] contiguous copy of each request's first `tokens` keys (chunked)."""
        torch = self.torch
        batch, per = bt.shape
        out = torch.empty(batch, self.s.hkv, tokens, self.s.d, dtype=cache.dtype, device=cache.device)
        chunk = max(1, (1 << 31) // (per * self.s.page * self.s.hkv * self.s.d * cache.element_size()))
        for b0 in range(0, batch, chunk):
            idx = bt[b0:b0 + chunk].long()
            rows = cache[idx].reshape(idx.shape[0], per * self.s.page, self.s.hkv, self.s.d)[:, :tokens]
            out[b0:b0 + chunk].copy_(rows.transpose(1, 2))
        return out

    def reference(self, q, k, v, positions):
        """float32 attention of q [m, Hq, D] at `positions` [m] over k, v [Hkv, L, D] (causal)."""
        torch, s = self.torch, self.s
        m, g = q.shape[0], s.group
        qf = q.float().view(m, s.hkv, g, s.d).permute(1, 0, 2, 3).reshape(s.hkv, m * g, s.d)
        logits = torch.matmul(qf, k.float().transpose(1, 2)) * s.scale          # [Hkv, m*g, L]
        pos = torch.as_tensor(positions, device=q.device).repeat_interleave(g)  # row r -> query r // g
        keys = torch.arange(k.shape[1], device=q.device)
        logits.masked_fill_(keys[None, None, :] > pos[None, :, None], float("-inf"))
        o = torch.matmul(torch.softmax(logits, dim=-1), v.float())            # [Hkv, m*g, D]
        return o.view(s.hkv, m, g, s.d).permute(1, 0, 2, 3).reshape(m, s.hq, s.d)

    def check(self, what: str, got, ref) -> float:
        err = _err(got, ref)
        if not err <= TOL:
            raise AssertionError(f"{what} on {self.dev.kind}: max error {err:.3g} (relative to max |ref|) "
                                 f"exceeds {TOL}")
        return err

    def sdpa_context(self):
        """SDPA restricted to its fused kernels (math would materialize the scores and expanded KV)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        if hasattr(SDPBackend, "CUDNN_ATTENTION") and self.cuda:
            backends.append(SDPBackend.CUDNN_ATTENTION)
        if not self.cuda:
            backends.append(SDPBackend.MATH)
        return sdpa_kernel(backends)

    def flex(self):
        """flex_attention compiled with static shapes (one compilation per shape)."""
        if self._flex_fn is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention

            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit"):
                if hasattr(cfg, name):
                    try:
                        setattr(cfg, name, max(int(getattr(cfg, name)), 512))
                    except Exception:  # noqa: BLE001 - an alias that cannot be set
                        pass
            self._flex_fn = torch.compile(flex_attention, dynamic=False)
        return self._flex_fn

    def flashinfer(self):
        if self._flashinfer is None:
            self._flashinfer = False
            if self.cuda and self.cfg.flashinfer:
                try:
                    import flashinfer

                    self._flashinfer = flashinfer
                except Exception as e:  # noqa: BLE001 - any import failure means "not available"
                    self.note(f"flashinfer not importable ({type(e).__name__}); no FlashInfer peer")
        return self._flashinfer or None

    def fi_indices(self, bt, tokens: int):
        torch, batch, per = self.torch, bt.shape[0], bt.shape[1]
        indptr = torch.arange(batch + 1, device=self.device, dtype=torch.int32) * per
        last = torch.full((batch,), (tokens - 1) % self.s.page + 1, dtype=torch.int32, device=self.device)
        return indptr, bt.reshape(-1).contiguous(), last

    def fi_plan(self, wrapper, *args, **kwargs):
        """plan() across FlashInfer versions (q/kv_data_type vs data_type; begin_forward before plan)."""
        plan = getattr(wrapper, "plan", None) or wrapper.begin_forward
        try:
            plan(*args, q_data_type=self.dtype, kv_data_type=self.dtype, **kwargs)
        except TypeError:
            plan(*args, data_type=self.dtype, **kwargs)
        return getattr(wrapper, "run", None) or wrapper.forward

    def run_peers(self, candidates: dict[str, Callable[[], tuple[Callable[[], Any], Callable[[Any], Any]]]],
                  verify: Callable[[str, Any], None]) -> dict[str, float]:
        """Builds, checks and times each peer; returns name -> seconds for those that work.

        A candidate returns (fn, to_out): fn() runs the peer, to_out(result) gives its output in
        kvcore's layout for `verify` (which raises AssertionError when it is wrong)."""
        times = {}
        for name, build in candidates.items():
            try:
                with self.sdpa_context() if name.startswith("sdpa") else contextlib.nullcontext():
                    fn, to_out = build()
                    verify(name, to_out(fn()))
                    self.sync()
                    times[name] = self.dev.time(fn)
            except AssertionError as e:
                self.note(f"peer {name} left out: {e}")
            except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is skipped
                msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                self.note(f"peer {name} left out: {type(e).__name__}: {msg}")
                if self.cuda:
                    self.torch.cuda.synchronize()
                    self.free()
        return times

    @staticmethod
    def best(times: dict[str, float]) -> tuple[str, float | None]:
        if not times:
            return "", None
        name = min(times, key=times.get)
        return name, times[name]

    # -- decode -------------------------------------------------------------------------------------

    def decode(self, batch: int, ctx: int) -> Row | None:
        torch, F, s = self.torch, self.F, self.s
        case = f"B={batch} L={_k(ctx)} {s.desc()} ps{s.page} {'bf16' if self.cfg.dtype == 'bfloat16' else 'fp16'}"
        kv_bytes = batch * ctx * s.hkv * s.d * 2 * 2
        if not self.fits(2 * kv_bytes + (kv_bytes // ctx) * s.page + (3 << 30), f"decode {case}"):
            return None
        k, v, bt = self.pages(batch, ctx)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=self.device)
        q = self.randn(batch, s.hq, s.d)
        out = torch.empty_like(q)
        kvcore.paged_decode(q, k, v, bt, seq_lens, out=out)
        kg, vg = self.gather(k, bt, ctx), self.gather(v, bt, ctx)
        picks = sorted({0, batch - 1, *range(0, batch, max(1, batch // self.cfg.verify_requests))})
        picks = picks[: self.cfg.verify_requests + 1]
        refs = {b: self.reference(q[b:b + 1], kg[b], vg[b], [ctx - 1])[0] for b in picks}
        errs = {"kvcore": max(self.check(f"paged_decode {case} request {b}", out[b], r) for b, r in refs.items())}

        sdpa_out: dict[str, Any] = {}

        def verify(name: str, got) -> None:
            errs[name] = max(self.check(f"peer {name} {case} request {b}", got[b], r) for b, r in refs.items())
            if name.startswith("sdpa") and not sdpa_out:
                sdpa_out[name] = got.clone()

        g = s.group
        cands: dict[str, Any] = {
            # GQA as packed query rows: the G query heads of a KV head are G rows of one sequence.
            "sdpa/gathered": lambda: (lambda: F.scaled_dot_product_attention(q.view(batch, s.hkv, g, s.d), kg, vg),
                                      lambda o: o.reshape(batch, s.hq, s.d)),
            "sdpa-gqa/gathered": lambda: (
                lambda: F.scaled_dot_product_attention(q.view(batch, s.hq, 1, s.d), kg, vg, enable_gqa=True),
                lambda o: o.reshape(batch, s.hq, s.d)),
        }
        if self.cfg.flex:
            def flex_peer():
                flex, q4 = self.flex(), q.view(batch, s.hq, 1, s.d)
                return (lambda: flex(q4, kg, vg, enable_gqa=True)), (lambda o: o.reshape(batch, s.hq, s.d))

            cands["flex/gathered"] = flex_peer
        fi = self.flashinfer()
        if fi is not None:
            def fi_peer(tensor_cores: bool):
                def build():
                    ws = torch.empty(256 << 20, dtype=torch.uint8, device=self.device)
                    w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)
                    indptr, indices, last = self.fi_indices(bt, ctx)
                    run = self.fi_plan(w, indptr, indices, last, s.hq, s.hkv, s.d, s.page,
                                       pos_encoding_mode="NONE")
                    return (lambda: run(q, (k, v))), (lambda o: o)
                return build

            cands["flashinfer/paged"] = fi_peer(False)
            cands["flashinfer-tc/paged"] = fi_peer(True)
        times = self.run_peers(cands, verify)
        for name, got in sdpa_out.items():  # kvcore against the whole batch of the first correct SDPA peer
            errs["kvcore_vs_sdpa"] = self.check(f"paged_decode {case} vs {name}", out, got)
        if not sdpa_out:
            self.note(f"decode {case}: no SDPA peer ran; kvcore checked against the float32 reference only")
        del sdpa_out

        t = self.dev.time(lambda: kvcore.paged_decode(q, k, v, bt, seq_lens, out=out))
        nbytes = kv_bytes + 2 * q.numel() * q.element_size()
        peer, peer_t = self.best(times)
        gbps = nbytes / t / 1e9
        pct = 100 * gbps / self.copy_gbps()
        extra: dict[str, Any] = {
            "batch": batch, "context": ctx, "pct_copy": round(pct, 2), "copy_gbps": round(self.copy_gbps(), 1),
            "peers_us": {n: round(x * 1e6, 2) for n, x in times.items()},
            "max_rel_err": {n: float(f"{e:.3g}") for n, e in errs.items()}, "peer_note": GATHER_NOTE,
        }
        goal_pct = None
        if batch * ctx >= 64 * 4096:
            goal_pct = DECODE_GOAL_PCT
        elif (batch, ctx) == (16, 1024):
            goal_pct = SMALL_DECODE_GOAL_PCT
        if self.cfg.goals:
            parts, met = [], True
            if goal_pct is not None:
                extra["goal_pct"] = goal_pct
                parts.append(f">= {goal_pct:g}% of copy bandwidth (got {pct:.1f}%)")
                met = met and pct >= goal_pct
            if peer_t is not None:
                parts.append(f"not slower than {peer} (x{peer_t / t:.2f})")
                met = met and t <= peer_t
            if parts:
                extra.update(goal=" and ".join(parts), goal_met=bool(met))
        del k, v, kg, vg, q, out
        self.free()
        return Row("attn-decode", case, self.dev.kind, t * 1e6, gbps, peer, peer_t and peer_t * 1e6,
                   peer_t and nbytes / peer_t / 1e9, extra)

    # -- prefill / extend ---------------------------------------------------------------------------

    def prefill(self, batch: int, new: int, cached: int) -> Row | None:
        torch, F, s = self.torch, self.F, self.s
        total = cached + new
        dt = "bf16" if self.cfg.dtype == "bfloat16" else "fp16"
        if cached:
            bench, case = "attn-extend", f"B={batch} x {_k(new)} on {_k(cached)} {s.desc()} {dt}"
        else:
            bench, case = "attn-prefill", f"B={batch} x {_k(new)} causal {s.desc()} {dt}"
        kv_bytes = batch * total * s.hkv * s.d * 2 * 2
        q_bytes = batch * new * s.hq * s.d * 2
        if not self.fits(3 * kv_bytes + 4 * q_bytes + 2 * (batch * new * s.hq * s.d * 4 * 4), f"{bench} {case}"):
            return None
        k, v, bt = self.pages(batch, total)
        seq_lens = torch.full((batch,), total, dtype=torch.int32, device=self.device)
        cu = torch.arange(batch + 1, dtype=torch.int32, device=self.device) * new
        q = self.randn(batch * new, s.hq, s.d)
        out = torch.empty_like(q)
        kvcore.paged_prefill(q, k, v, bt, seq_lens, cu, causal=True, out=out)
        kg, vg = self.gather(k, bt, total), self.gather(v, bt, total)
        picks = sorted({0, batch - 1})[: self.cfg.verify_requests]
        n_rows = min(new, self.cfg.verify_rows)
        rows = torch.unique(torch.cat([torch.tensor([0, new - 1]),
                                       torch.randperm(new, generator=torch.Generator().manual_seed(1))[:n_rows]]))
        rows = rows.to(self.device)
        refs = {b: self.reference(q[b * new + rows], kg[b], vg[b], cached + rows) for b in picks}
        errs = {"kvcore": max(self.check(f"paged_prefill {case} request {b}", out[b * new + rows], r)
                              for b, r in refs.items())}

        sdpa_out: dict[str, Any] = {}

        def verify(name: str, got) -> None:
            errs[name] = max(self.check(f"peer {name} {case} request {b}", got[b * new + rows], r)
                             for b, r in refs.items())
            if name.startswith("sdpa") and not sdpa_out:
                sdpa_out[name] = got.clone()

        qg = q.view(batch, new, s.hq, s.d).transpose(1, 2).contiguous()  # [B, Hq, new, D]

        def to_out(o):
            return o.transpose(1, 2).reshape(batch * new, s.hq, s.d)

        def causal_kwargs():
            if not cached:
                return {"is_causal": True}
            from torch.nn.attention.bias import causal_lower_right

            return {"attn_mask": causal_lower_right(new, total)}

        def sdpa_gqa():
            kw = causal_kwargs()
            return (lambda: F.scaled_dot_product_attention(qg, kg, vg, enable_gqa=True, **kw)), to_out

        def sdpa_expanded():
            kw = causal_kwargs()
            ke, ve = kg.repeat_interleave(s.group, dim=1), vg.repeat_interleave(s.group, dim=1)
            return (lambda: F.scaled_dot_product_attention(qg, ke, ve, **kw)), to_out

        cands: dict[str, Any] = {"sdpa-gqa/gathered": sdpa_gqa, "sdpa/expanded KV": sdpa_expanded}
        if self.cfg.flex:
            def flex_peer():
                from torch.nn.attention.flex_attention import create_block_mask

                def mask_mod(b, h, q_idx, kv_idx):
                    return q_idx + cached >= kv_idx

                bm = create_block_mask(mask_mod, None, None, new, total, device=self.device)
                flex = self.flex()
                return (lambda: flex(qg, kg, vg, block_mask=bm, enable_gqa=True)), to_out

            cands["flex/gathered"] = flex_peer
        fi = self.flashinfer()
        if fi is not None:
            def fi_peer():
                ws = torch.empty(256 << 20, dtype=torch.uint8, device=self.device)
                w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
                indptr, indices, last = self.fi_indices(bt, total)
                run = self.fi_plan(w, cu, indptr, indices, last, s.hq, s.hkv, s.d, s.page, causal=True)
                if getattr(w, "run", None) is None:  # pre-plan API: causal is a forward() argument
                    return (lambda: run(q, (k, v), causal=True)), (lambda o: o)
                return (lambda: run(q, (k, v))), (lambda o: o)

            cands["flashinfer/paged"] = fi_peer
        times = self.run_peers(cands, verify)
        for name, got in sdpa_out.items():
            errs["kvcore_vs_sdpa"] = self.check(f"paged_prefill {case} vs {name}", out, got)
        del sdpa_out

        t = self.dev.time(lambda: kvcore.paged_prefill(q, k, v, bt, seq_lens, cu, causal=True, out=out))
        flops = 4 * s.hq * s.d * batch * (new * cached + new * (new + 1) // 2)
        nbytes = kv_bytes + 2 * q_bytes
        peer, peer_t = self.best(times)
        tflops = flops / t / 1e12
        mm = self.matmul_tflops()
        pct = 100 * tflops / mm
        extra: dict[str, Any] = {
            "batch": batch, "new_tokens": new, "cached_tokens": cached, "flops": flops,
            "tflops": round(tflops, 3), "matmul_tflops": round(mm, 2), "pct_matmul": round(pct, 2),
            "peer_tflops": {n: round(flops / x / 1e12, 3) for n, x in times.items()},
            "peers_us": {n: round(x * 1e6, 2) for n, x in times.items()},
            "max_rel_err": {n: float(f"{e:.3g}") for n, e in errs.items()}, "peer_note": GATHER_NOTE,
        }
        peer_txt = f"; best peer {peer} {flops / peer_t / 1e12:.3g}" if peer_t else ""
        self.note(f"{bench} {case}: kvcore {tflops:.3g} TFLOP/s = {pct:.1f}% of dense "
                  f"{self.cfg.dtype} matmul ({mm:.3g} TFLOP/s){peer_txt}")
        if self.cfg.goals:
            parts = [f">= {PREFILL_GOAL_PCT:g}% of dense {self.cfg.dtype} matmul {mm:.3g} TFLOP/s "
                     f"(got {tflops:.3g} TFLOP/s = {pct:.1f}%)"]
            met = pct >= PREFILL_GOAL_PCT
            if peer_t is not None:
                parts.append(f"not slower than {peer} (x{peer_t / t:.2f})")
                met = met and t <= peer_t
            extra.update(goal_pct=PREFILL_GOAL_PCT, goal=" and ".join(parts), goal_met=bool(met))
        del k, v, kg, vg, q, qg, out
        self.free()
        return Row(bench, case, self.dev.kind, t * 1e6, nbytes / t / 1e9, peer, peer_t and peer_t * 1e6,
                   peer_t and nbytes / peer_t / 1e9, extra)

    # -- shared prefix ------------------------------------------------------------------------------

    def shared(self, batch: int, prefix: int, suffix: int) -> Row | None:
        torch, s = self.torch, self.s
        ps = s.page
        case = f"B={batch} pfx={_k(prefix)} sfx={_k(suffix)} {s.desc()}"
        pp, sp = -(-prefix // ps), -(-suffix // ps)
        if prefix % ps:
            raise ValueError("the shared prefix must fill whole pages")
        num_pages = pp + batch * sp + 1
        if not self.fits(2 * num_pages * ps * s.hkv * s.d * 2 + (256 << 20), f"shared {case}"):
            return None
        k = self.randn(num_pages, ps, s.hkv, s.d)
        v = self.randn(num_pages, ps, s.hkv, s.d)
        perm = torch.randperm(num_pages, generator=self.gen, device=self.device).to(torch.int32)
        prefix_bt = perm[:pp].view(1, pp).contiguous()
        suffix_bt = perm[pp:pp + batch * sp].view(batch, sp).contiguous()
        full_bt = torch.cat([prefix_bt.expand(batch, pp), suffix_bt], dim=1).contiguous()
        prefix_lens = torch.tensor([prefix], dtype=torch.int32, device=self.device)
        group_indptr = torch.tensor([0, batch], dtype=torch.int32, device=self.device)
        suffix_lens = torch.full((batch,), suffix, dtype=torch.int32, device=self.device)
        full_lens = suffix_lens + prefix
        q = self.randn(batch, s.hq, s.d)
        out_shared, out_plain = torch.empty_like(q), torch.empty_like(q)

        def run_shared():
            return kvcore.shared_prefix_decode(q, k, v, prefix_bt, prefix_lens, group_indptr, suffix_bt,
                                               suffix_lens, out=out_shared)

        def run_plain():
            return kvcore.paged_decode(q, k, v, full_bt, full_lens, out=out_plain)

        run_shared()
        run_plain()
        total = prefix + suffix
        errs = {"shared_vs_paged": self.check(f"shared_prefix_decode {case} vs paged_decode", out_shared, out_plain)}
        for b in sorted({0, batch - 1}):
            kb = self.gather(k, full_bt[b:b + 1], total)[0]
            vb = self.gather(v, full_bt[b:b + 1], total)[0]
            ref = self.reference(q[b:b + 1], kb, vb, [total - 1])[0]
            errs[f"shared_req{b}"] = self.check(f"shared_prefix_decode {case} request {b}", out_shared[b], ref)
            errs[f"paged_req{b}"] = self.check(f"paged_decode {case} request {b}", out_plain[b], ref)

        t = self.dev.time(run_shared)
        t_plain = self.dev.time(run_plain)
        row_bytes = s.hkv * s.d * 2 * 2
        qo = 2 * q.numel() * q.element_size()
        shared_bytes = (prefix + batch * suffix) * row_bytes + qo
        plain_bytes = batch * total * row_bytes + qo
        x = t_plain / t
        extra: dict[str, Any] = {
            "batch": batch, "prefix": prefix, "suffix": suffix, "speedup": round(x, 2),
            "paged_decode_us": round(t_plain * 1e6, 2),
            "bytes_note": "GB/s counts distinct KV bytes (the prefix once); the peer's counts every request's",
            "max_rel_err": {n: float(f"{e:.3g}") for n, e in errs.items()},
        }
        if self.cfg.goals:
            extra.update(goal=f">= {SHARED_GOAL_X:g}x faster than unshared paged_decode (got x{x:.2f})",
                         goal_x=SHARED_GOAL_X, goal_met=bool(x >= SHARED_GOAL_X))
        del k, v, q, out_shared, out_plain
        self.free()
        return Row("attn-shared", case, self.dev.kind, t * 1e6, shared_bytes / t / 1e9,
                   "kvcore paged (unshared)", t_plain * 1e6, plain_bytes / t_plain / 1e9, extra)

    def run(self, quick: bool) -> list[Row]:
        cfg = self.cfg
        rows: list[Row | None] = []
        for b, c in (cfg.decode_quick if quick else cfg.decode):
            rows.append(self.decode(b, c))
        for b, n, c in (cfg.prefill_quick if quick else cfg.prefill):
            rows.append(self.prefill(b, n, c))
        rows.append(self.shared(*(cfg.shared_quick if quick else cfg.shared)))
        for n in self.notes:
            print(f"attention [{self.dev.kind}]: {n}")
        if any(r is not None and r.bench == "attn-decode" and r.peer_time_us for r in rows):
            print(f"attention [{self.dev.kind}]: {GATHER_NOTE}")
        return [r for r in rows if r is not None]


# ---------------------------------------------------------------------------------------------------
# numpy path (CPU): float16 arrays, float64 numpy reference, numpy / torch peers


def _ref_np(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions, s: _Shape) -> np.ndarray:
    """float64 attention of q [m, Hq, D] at `positions` over k, v [Hkv, L, D] (causal)."""
    m, g = q.shape[0], s.group
    qf = q.astype(np.float64).reshape(m, s.hkv, g, s.d).transpose(1, 0, 2, 3).reshape(s.hkv, m * g, s.d)
    logits = qf @ k.astype(np.float64).transpose(0, 2, 1) * s.scale
    pos = np.repeat(np.asarray(positions), g)
    logits[:, np.arange(k.shape[1])[None, :] > pos[:, None]] = -np.inf
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    o = p @ v.astype(np.float64)
    return o.reshape(s.hkv, m, g, s.d).transpose(1, 0, 2, 3).reshape(m, s.hq, s.d)


def _ref_np_decode(q: np.ndarray, k: np.ndarray, v: np.ndarray, s: _Shape) -> np.ndarray:
    """float64 decode attention of q [B, Hq, D] over all keys of k, v [B, Hkv, L, D]."""
    b = q.shape[0]
    qf = q.astype(np.float64).reshape(b, s.hkv, s.group, s.d)
    logits = qf @ k.astype(np.float64).transpose(0, 1, 3, 2) * s.scale  # [B, Hkv, G, L]
    return _softmax_av(logits, v.astype(np.float64)).reshape(b, s.hq, s.d)


def _gather_np(cache: np.ndarray, bt: np.ndarray, tokens: int) -> np.ndarray:
    b, per = bt.shape
    rows = cache[bt].reshape(b, per * cache.shape[1], cache.shape[2], cache.shape[3])[:, :tokens]
    return np.ascontiguousarray(rows.transpose(0, 2, 1, 3))  # [B, Hkv, L, D]


def _softmax_av(logits: np.ndarray, v: np.ndarray) -> np.ndarray:
    logits -= logits.max(-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(-1, keepdims=True)
    return logits @ v


class _CpuBench:
    def __init__(self, dev: Device):
        self.dev = dev
        self.s = _Shape(8, 2, 128, 16)
        self.rng = np.random.default_rng(0)
        self.torch = dev.torch
        self.notes: list[str] = []
        self._matmul: float | None = None
        self._copy: float | None = None

    def randn(self, *shape) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32).astype(np.float16)

    def pages(self, batch: int, tokens: int):
        ps, per = self.s.page, -(-tokens // self.s.page)
        num_pages = batch * per + 1
        k = self.randn(num_pages, ps, self.s.hkv, self.s.d)
        v = self.randn(num_pages, ps, self.s.hkv, self.s.d)
        bt = self.rng.permutation(num_pages)[:batch * per].reshape(batch, per).astype(np.int32)
        return k, v, bt

    def check(self, what: str, got, ref) -> float:
        err = _err(got, ref)
        if not err <= TOL:
            raise AssertionError(f"{what} on cpu: max error {err:.3g} (relative to max |ref|) exceeds {TOL}")
        return err

    def matmul_gflops(self) -> float:
        if self._matmul is None:
            n = 1024
            a = self.rng.standard_normal((n, n), dtype=np.float32)
            b = self.rng.standard_normal((n, n), dtype=np.float32)
            c = np.empty_like(a)
            t = self.dev.time(lambda: np.matmul(a, b, out=c))
            self._matmul = 2 * n ** 3 / t / 1e9
        return self._matmul

    def peers(self, cands: dict[str, Callable[[], Any]], verify: Callable[[str, Any], None]) -> dict[str, float]:
        times = {}
        for name, fn in cands.items():
            try:
                verify(name, fn())
                times[name] = self.dev.time(fn)
            except AssertionError as e:
                self.notes.append(f"peer {name} left out: {e}")
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"peer {name} left out: {type(e).__name__}: {str(e)[:160]}")
        return times

    def kv_arrays(self, batch: int, ctx: int, dtype: str):
        """(q, k, v, block_table, their float32 numpy values): numpy float16 or float32, or torch bfloat16."""
        k, v, bt = self.pages(batch, ctx)
        q = self.randn(batch, self.s.hq, self.s.d)
        if dtype == "float16":
            return q, k, v, bt, (q, k, v)
        if dtype == "float32":
            q, k, v = (x.astype(np.float32) for x in (q, k, v))
            return q, k, v, bt, (q, k, v)
        torch = self.torch
        q, k, v = (torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16) for x in (q, k, v))
        return q, k, v, bt, tuple(x.float().numpy() for x in (q, k, v))

    def decode(self, batch: int, ctx: int, dtype: str = "float16") -> Row | None:
        s, g = self.s, self.s.group
        tag = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
        case = f"B={batch} L={_k(ctx)} {s.desc()} ps{s.page} {tag}"
        if dtype == "bfloat16" and self.torch is None:
            self.notes.append(f"attn-decode {case}: skipped (bfloat16 arrays need torch)")
            return None
        q, k, v, bt, (qf, kf, vf) = self.kv_arrays(batch, ctx, dtype)
        seq_lens = np.full(batch, ctx, np.int32)
        out = kvcore.paged_decode(q, k, v, bt, seq_lens)
        kg, vg = _gather_np(kf, bt, ctx), _gather_np(vf, bt, ctx)
        ref = _ref_np_decode(qf, kg, vg, s)
        got = out.float().numpy() if dtype == "bfloat16" else out
        errs = {"kvcore": self.check(f"paged_decode {case}", got, ref)}

        def verify(name, got):
            errs[name] = self.check(f"peer {name} {case}", np.asarray(got, np.float64).reshape(batch, s.hq, s.d), ref)

        q32, k32, v32 = (x.astype(np.float32) for x in (qf, kg, vg))
        q4, k32t = q32.reshape(batch, s.hkv, g, s.d), np.ascontiguousarray(k32.transpose(0, 1, 3, 2))
        cands: dict[str, Callable[[], Any]] = {
            "numpy fp32/gathered": lambda: _softmax_av(q4 @ k32t * np.float32(s.scale), v32)}
        pregathered: dict[str, Callable[[], Any]] = {}
        if self.torch is not None:
            torch, F = self.torch, self.torch.nn.functional
            tq = q.reshape(batch, s.hkv, g, s.d) if dtype == "bfloat16" else torch.from_numpy(q).reshape(
                batch, s.hkv, g, s.d)
            tkc = k if dtype == "bfloat16" else torch.from_numpy(k)
            tvc = v if dtype == "bfloat16" else torch.from_numpy(v)
            btl = torch.from_numpy(bt).long()
            per = bt.shape[1]

            def gather(cache):  # [B, Hkv, L, D] contiguous, as SDPA wants it
                return cache[btl].reshape(batch, per * s.page, s.hkv, s.d)[:, :ctx].transpose(1, 2).contiguous()

            cands["torch sdpa+gather"] = lambda: F.scaled_dot_product_attention(tq, gather(tkc), gather(tvc)).float()
            tk, tv = gather(tkc), gather(tvc)
            pregathered["torch sdpa (gather not timed)"] = lambda: F.scaled_dot_product_attention(tq, tk, tv).float()
        times = self.peers(cands, verify)
        side = self.peers(pregathered, verify)
        t = self.dev.time(lambda: kvcore.paged_decode(q, k, v, bt, seq_lens, out=out))
        elem = 4 if dtype == "float32" else 2
        nbytes = (batch * ctx * s.hkv * s.d * 2 + 2 * batch * s.hq * s.d) * elem
        peer = min(times, key=times.get) if times else ""
        peer_t = times.get(peer)
        gbps = nbytes / t / 1e9
        extra: dict[str, Any] = {
            "batch": batch, "context": ctx, "dtype": dtype,
            "peers_us": {n: round(x * 1e6, 1) for n, x in {**times, **side}.items()},
            "max_rel_err": {n: float(f"{e:.3g}") for n, e in errs.items()},
            "peer_note": "torch sdpa+gather: the paged KV gathered into contiguous [B, Hkv, L, D] inside the timed "
                         "call (GQA as packed query rows); numpy fp32 on KV gathered beforehand"}
        copy = self.copy_gbps()
        extra["pct_copy"] = round(100 * gbps / copy, 1)
        sdpa_t = times.get("torch sdpa+gather")
        if sdpa_t:
            extra["x_torch_sdpa_gather"] = round(sdpa_t / t, 2)
        if batch * ctx >= DECODE_CPU_GOAL_TOKENS:
            x = f"{sdpa_t / t:.2f}x" if sdpa_t else "no torch"
            extra.update(goal=f">= {DECODE_CPU_GOAL_PCT:g}% of copy bandwidth (got {extra['pct_copy']}%) and >= "
                              f"{DECODE_CPU_GOAL_X:g}x torch sdpa+gather (got {x})",
                         goal_met=bool(extra["pct_copy"] >= DECODE_CPU_GOAL_PCT and sdpa_t
                                       and sdpa_t / t >= DECODE_CPU_GOAL_X))
        return Row("attn-decode", case, "cpu", t * 1e6, gbps, peer, peer_t and peer_t * 1e6,
                   peer_t and nbytes / peer_t / 1e9, extra)

    def copy_gbps(self) -> float:
        if self._copy is None:
            self._copy = copy_bandwidth(self.dev)
        return self._copy

    def tiny(self) -> Row | None:
        """Per-call overhead: B=1, 16 keys, numpy arrays, against a torch SDPA call of the same size."""
        s, g = self.s, self.s.group
        case = f"B=1 L=16 {s.desc()} fp16 numpy"
        k, v, bt = self.pages(1, 16)
        seq_lens = np.full(1, 16, np.int32)
        q = self.randn(1, s.hq, s.d)
        out = np.empty_like(q)
        kvcore.paged_decode(q, k, v, bt, seq_lens, out=out)
        ref = _ref_np_decode(q, _gather_np(k, bt, 16), _gather_np(v, bt, 16), s)
        self.check(f"paged_decode {case}", out, ref)
        t = self.dev.time(lambda: kvcore.paged_decode(q, k, v, bt, seq_lens, out=out), min_time=0.3, max_reps=20000)
        extra: dict[str, Any] = {"batch": 1, "context": 16}
        peer, peer_t = "", None
        if self.torch is not None:
            torch, F = self.torch, self.torch.nn.functional
            tq = torch.from_numpy(q).reshape(1, s.hkv, g, s.d)
            tk, tv = (torch.from_numpy(_gather_np(x, bt, 16)) for x in (k, v))
            self.check(f"torch sdpa {case}", F.scaled_dot_product_attention(tq, tk, tv).numpy().reshape(1, s.hq, s.d)
                       .astype(np.float64), ref)
            peer = "torch sdpa (1 call)"
            peer_t = self.dev.time(lambda: F.scaled_dot_product_attention(tq, tk, tv), min_time=0.3, max_reps=20000)
            extra.update(goal=f"within {TINY_GOAL_X:g}x of a torch sdpa call (got {t / peer_t:.2f}x its time)",
                         goal_met=bool(t <= TINY_GOAL_X * peer_t))
        return Row("attn-tiny", case, "cpu", t * 1e6, 0.0, peer, peer_t and peer_t * 1e6, None, extra)

    def prefill(self, new: int, cached: int) -> Row:
        s, g = self.s, self.s.group
        total = cached + new
        if cached:
            bench, case = "attn-extend", f"B=1 x {_k(new)} on {_k(cached)} {s.desc()} fp16"
        else:
            bench, case = "attn-prefill", f"B=1 x {_k(new)} causal {s.desc()} fp16"
        k, v, bt = self.pages(1, total)
        seq_lens = np.array([total], np.int32)
        cu = np.array([0, new], np.int32)
        q = self.randn(new, s.hq, s.d)
        out = np.empty_like(q)
        kvcore.paged_prefill(q, k, v, bt, seq_lens, cu, causal=True, out=out)
        kg, vg = _gather_np(k, bt, total)[0], _gather_np(v, bt, total)[0]  # [Hkv, L, D]
        positions = cached + np.arange(new)
        ref = _ref_np(q, kg, vg, positions, s)
        errs = {"kvcore": self.check(f"paged_prefill {case}", out, ref)}

        def verify(name, got):
            errs[name] = self.check(f"peer {name} {case}", got, ref)

        # numpy: [Hkv, G*new, D] rows against [Hkv, L, D], causal mask precomputed
        q32 = q.astype(np.float32).reshape(new, s.hkv, g, s.d).transpose(1, 2, 0, 3).reshape(s.hkv, g * new, s.d)
        k32t = np.ascontiguousarray(kg.astype(np.float32).transpose(0, 2, 1))
        v32 = vg.astype(np.float32)
        mask = np.where(np.arange(total)[None, :] > np.tile(positions, g)[:, None], -np.inf, 0).astype(np.float32)

        def numpy_peer():
            o = _softmax_av(q32 @ k32t * np.float32(s.scale) + mask, v32)  # [Hkv, G*new, D]
            return o.reshape(s.hkv, g, new, s.d).transpose(2, 0, 1, 3).reshape(new, s.hq, s.d)

        cands: dict[str, Callable[[], Any]] = {"numpy fp32/gathered": numpy_peer}
        torch = self.torch
        if torch is not None:
            F = torch.nn.functional
            tq = torch.from_numpy(q).view(1, new, s.hq, s.d).transpose(1, 2).contiguous()
            tk = torch.from_numpy(kg).repeat_interleave(g, dim=0)[None]
            tv = torch.from_numpy(vg).repeat_interleave(g, dim=0)[None]
            if cached:  # query i sits at cached + i (a bool mask: torch.nn.attention.bias imports dynamo)
                kw = {"attn_mask": torch.from_numpy(np.arange(total)[None, :] <= positions[:, None])}
            else:
                kw = {"is_causal": True}
            cands["torch sdpa/gathered"] = lambda: F.scaled_dot_product_attention(tq, tk, tv, **kw)[0].transpose(
                0, 1).numpy()
        times = self.peers(cands, verify)
        t = self.dev.time(lambda: kvcore.paged_prefill(q, k, v, bt, seq_lens, cu, causal=True, out=out))
        flops = 4 * s.hq * s.d * (new * cached + new * (new + 1) // 2)
        nbytes = total * s.hkv * s.d * 2 * 2 + 2 * q.nbytes
        peer = min(times, key=times.get) if times else ""
        peer_t = times.get(peer)
        mm = self.matmul_gflops()
        gf = flops / t / 1e9
        self.notes.append(f"{bench} {case}: kvcore {gf:.2f} GFLOP/s = {100 * gf / mm:.1f}% of a float32 numpy "
                          f"matmul ({mm:.1f} GFLOP/s)"
                          + (f"; best peer {peer} {flops / peer_t / 1e9:.2f} GFLOP/s" if peer_t else ""))
        extra: dict[str, Any] = {
            "new_tokens": new, "cached_tokens": cached, "flops": flops, "tflops": round(gf / 1e3, 5),
            "matmul_tflops": round(mm / 1e3, 5), "matmul": "float32 numpy 1024^3",
            "pct_matmul": round(100 * gf / mm, 2),
            "peer_tflops": {n: round(flops / x / 1e12, 5) for n, x in times.items()},
            "peers_us": {n: round(x * 1e6, 1) for n, x in times.items()},
            "max_rel_err": {n: float(f"{e:.3g}") for n, e in errs.items()},
            "peer_note": "peers on contiguous KV gathered beforehand (GQA heads repeated for torch)"}
        sdpa_t = times.get("torch sdpa/gathered")
        if not cached and new >= PREFILL_CPU_GOAL_TOKENS:
            x = f"{sdpa_t / t:.2f}x" if sdpa_t else "no torch"
            extra.update(goal=f">= {PREFILL_CPU_GOAL_PCT:g}% of the float32 numpy matmul rate (got "
                              f"{100 * gf / mm:.1f}%) and >= 1x torch sdpa on contiguous KV (got {x})",
                         goal_met=bool(100 * gf / mm >= PREFILL_CPU_GOAL_PCT and sdpa_t and sdpa_t >= t))
        return Row(bench, case, "cpu", t * 1e6, nbytes / t / 1e9, peer, peer_t and peer_t * 1e6,
                   peer_t and nbytes / peer_t / 1e9, extra)

    def shared(self, batch: int, prefix: int, suffix: int) -> Row:
        s, ps = self.s, self.s.page
        case = f"B={batch} pfx={_k(prefix)} sfx={_k(suffix)} {s.desc()}"
        pp, sp = prefix // ps, -(-suffix // ps)
        num_pages = pp + batch * sp + 1
        k = self.randn(num_pages, ps, s.hkv, s.d)
        v = self.randn(num_pages, ps, s.hkv, s.d)
        perm = self.rng.permutation(num_pages).astype(np.int32)
        prefix_bt = perm[:pp].reshape(1, pp).copy()
        suffix_bt = perm[pp:pp + batch * sp].reshape(batch, sp).copy()
        full_bt = np.ascontiguousarray(np.concatenate([np.repeat(prefix_bt, batch, 0), suffix_bt], 1))
        prefix_lens, group_indptr = np.array([prefix], np.int32), np.array([0, batch], np.int32)
        suffix_lens = np.full(batch, suffix, np.int32)
        full_lens = suffix_lens + np.int32(prefix)
        q = self.randn(batch, s.hq, s.d)
        out_shared, out_plain = np.empty_like(q), np.empty_like(q)

        def run_shared():
            kvcore.shared_prefix_decode(q, k, v, prefix_bt, prefix_lens, group_indptr, suffix_bt, suffix_lens,
                                        out=out_shared)

        def run_plain():
            kvcore.paged_decode(q, k, v, full_bt, full_lens, out=out_plain)

        run_shared()
        run_plain()
        total = prefix + suffix
        kg, vg = _gather_np(k, full_bt, total), _gather_np(v, full_bt, total)
        ref = _ref_np_decode(q, kg, vg, s)
        errs = {"shared": self.check(f"shared_prefix_decode {case}", out_shared, ref),
                "paged": self.check(f"paged_decode {case}", out_plain, ref),
                "shared_vs_paged": _err(out_shared, out_plain.astype(np.float64))}
        t, t_plain = self.dev.time(run_shared), self.dev.time(run_plain)
        row_bytes = s.hkv * s.d * 2 * 2
        shared_bytes = (prefix + batch * suffix) * row_bytes + 2 * q.nbytes
        plain_bytes = batch * total * row_bytes + 2 * q.nbytes
        extra = {"batch": batch, "prefix": prefix, "suffix": suffix, "speedup": round(t_plain / t, 2),
                 "paged_decode_us": round(t_plain * 1e6, 1),
                 "bytes_note": "GB/s counts distinct KV bytes (the prefix once); the peer's counts every request's",
                 "max_rel_err": {n: float(f"{e:.3g}") for n, e in errs.items()}}
        return Row("attn-shared", case, "cpu", t * 1e6, shared_bytes / t / 1e9, "kvcore paged (unshared)",
                   t_plain * 1e6, plain_bytes / t_plain / 1e9, extra)

    def run(self, quick: bool) -> list[Row]:
        decodes = [(4, 1024, "float16"), (8, 2048, "float16"), (8, 2048, "bfloat16"), (8, 2048, "float32")]
        if not quick:
            decodes += [(16, 1024, "float16"), (4, 4096, "float16"), (16, 2048, "float16"), (16, 2048, "bfloat16")]
        rows = [self.decode(b, c, dt) for b, c, dt in decodes]
        rows.append(self.tiny())
        rows += [self.prefill(256, 0), self.prefill(512, 0), self.prefill(64, 192)]
        if not quick:
            rows.append(self.prefill(256, 1792))
        rows.append(self.shared(16, 1024, 16))
        rows = [r for r in rows if r is not None]
        for n in self.notes:
            print(f"attention [cpu]: {n}")
        return rows


def bench_attention(dev: Device, quick: bool = False) -> list[Row]:
    if dev.is_cuda:
        torch = dev.torch
        with torch.no_grad():
            return _TorchBench(dev, f"cuda:{torch.cuda.current_device()}", _TorchConfig()).run(quick)
    return _CpuBench(dev).run(quick)
