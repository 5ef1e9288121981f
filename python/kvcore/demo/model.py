"""A small Llama-style decoder (RMSNorm, RoPE, GQA, SiLU MLP, head dim 128) with random but
fixed-seed weights, and the plain-torch reference path: contiguous KV, scaled_dot_product_attention.

The model is split so an engine can own attention and the KV cache: `qkv(layer, x, positions)`
returns rotated q, k, v as bfloat16 [tokens, heads, 128]; `finish_layer(layer, x, attn)` applies
the output projection and the MLP. Both paths feed attention identical bfloat16 q/k/v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 512
    layers: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 128
    ffn: int = 1024
    rope_theta: float = 10000.0
    seed: int = 0

    @property
    def hidden(self) -> int:
        return self.q_heads * self.head_dim


class TinyLlama:
    def __init__(self, cfg: ModelConfig = ModelConfig(), device: str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        g = torch.Generator().manual_seed(cfg.seed)

        def w(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(self.device)

        h, d = cfg.hidden, cfg.head_dim
        self.embed = w(cfg.vocab, h, scale=1.0)
        self.layers = []
        for _ in range(cfg.layers):
            self.layers.append({
                "norm1": 1.0 + w(h, scale=0.05), "norm2": 1.0 + w(h, scale=0.05),
                "wq": w(h, cfg.q_heads * d, scale=h ** -0.5), "wk": w(h, cfg.kv_heads * d, scale=h ** -0.5),
                "wv": w(h, cfg.kv_heads * d, scale=h ** -0.5), "wo": w(cfg.q_heads * d, h, scale=(h) ** -0.5),
                "w1": w(h, cfg.ffn, scale=h ** -0.5), "w3": w(h, cfg.ffn, scale=h ** -0.5),
                "w2": w(cfg.ffn, h, scale=cfg.ffn ** -0.5),
            })
        self.final_norm = 1.0 + w(h, scale=0.05)
        self.unembed = w(h, cfg.vocab, scale=3.0 * h ** -0.5)  # peaked logits: clear greedy choices
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        self._inv_freq = inv.to(self.device)

    @staticmethod
    def _rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def _rope(self, x, positions):
        ang = positions.to(torch.float64)[:, None] * self._inv_freq[None, :]
        cos, sin = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens]

    def qkv(self, layer: int, x: torch.Tensor, positions: torch.Tensor):
        p, c = self.layers[layer], self.cfg
        h = self._rms(x, p["norm1"])
        q = (h @ p["wq"]).view(-1, c.q_heads, c.head_dim)
        k = (h @ p["wk"]).view(-1, c.kv_heads, c.head_dim)
        v = (h @ p["wv"]).view(-1, c.kv_heads, c.head_dim)
        q, k = self._rope(q, positions), self._rope(k, positions)
        return q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)

    def finish_layer(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        p = self.layers[layer]
        x = x + attn.float().reshape(x.shape[0], -1) @ p["wo"]
        h = self._rms(x, p["norm2"])
        return x + (torch.nn.functional.silu(h @ p["w1"]) * (h @ p["w3"])) @ p["w2"]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._rms(x, self.final_norm) @ self.unembed


def reference_generate(model: TinyLlama, prompt: list[int], new_tokens: int):
    """Greedy generation with contiguous per-layer KV and SDPA (the plain torch path).
    Returns (tokens, logits [new_tokens, vocab] float32)."""
    c = model.cfg
    tokens = list(prompt)
    ks = [torch.empty(0, c.kv_heads, c.head_dim, dtype=torch.bfloat16, device=model.device) for _ in range(c.layers)]
    vs = [k.clone() for k in ks]
    out_logits = []
    step_tokens = torch.tensor(tokens, device=model.device)
    start = 0
    for _ in range(new_tokens):
        positions = torch.arange(start, start + len(step_tokens), device=model.device)
        x = model.embed_tokens(step_tokens)
        for layer in range(c.layers):
            q, k, v = model.qkv(layer, x, positions)
            ks[layer] = torch.cat([ks[layer], k])
            vs[layer] = torch.cat([vs[layer], v])
            qt = q.float().transpose(0, 1)[None]                       # [1, Hq, T, D]
            kt = ks[layer].float().transpose(0, 1)[None]               # [1, Hkv, L, D]
            vt = vs[layer].float().transpose(0, 1)[None]
            total, t = kt.shape[2], qt.shape[2]
            mask = torch.arange(total, device=model.device)[None, :] <= (total - t + torch.arange(t, device=model.device))[:, None]
            attn = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
            x = model.finish_layer(layer, x, attn[0].transpose(0, 1).to(torch.bfloat16))
        logits = model.logits(x[-1:])[0]
        out_logits.append(logits)
        nxt = int(logits.argmax())
        tokens.append(nxt)
        start += len(step_tokens)
        step_tokens = torch.tensor([nxt], device=model.device)
    return tokens[len(prompt):], torch.stack(out_logits)
