"""CSM-1B: Llama-style backbone (codebook 0) + depth decoder (codebooks 1..31), with static KV caches.

The model alone: configs, modules, and the two forward passes one frame needs. No I/O, no sampling policy
(a `sample` function is passed in), no CUDA objects beyond the cache buffers `setup_caches` allocates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (transformers' `rope_type: llama3`)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TransformerConfig:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)


@dataclass(frozen=True)
class CsmConfig:
    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    num_codebooks: int = 32


CSM_1B = CsmConfig(
    backbone=TransformerConfig(
        n_layers=16, dim=2048, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192, max_seq_len=2048
    ),
    decoder=TransformerConfig(
        n_layers=4, dim=1024, n_heads=8, n_kv_heads=2, head_dim=128, intermediate_size=8192, max_seq_len=33
    ),
)


def rope_inverse_frequencies(cfg: TransformerConfig) -> Tensor:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and cast back before the scale, as transformers' LlamaRMSNorm does (bf16 parity).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache(nn.Module):
    """Preallocated per-layer cache, written by index so shapes never change (CUDA-graph safe)."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)  # [B, Hkv, S, D]
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, rows: Tensor | None, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v `[b, Hkv, T, D]` at `input_pos [b, T]`; return the cache rows attention reads."""
        if rows is None:
            batch = torch.arange(self.k.shape[0], device=k.device)[:, None]  # [B, 1]
            self.k[batch, :, input_pos] = k.transpose(1, 2)
            self.v[batch, :, input_pos] = v.transpose(1, 2)
            return self.k, self.v
        self.k[rows[:, None], :, input_pos] = k.transpose(1, 2)
        self.v[rows[:, None], :, input_pos] = v.transpose(1, 2)
        return self.k[rows], self.v[rows]


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of q `[b, H, T, D]` over the cache k, v `[b, Hkv, S, D]` where `mask [b, 1, T, S]` allows.

    Written out rather than SDPA: on the H100 SDPA picked cuDNN attention for batched decode, whose results
    changed from run to run (eager vs eager differed at batch 8), so graphed and eager codes could never be
    compared. Folding each KV head's query group into the rows gives plain batched GEMMs: deterministic, and
    no copy of K/V per query head."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, hkv, (h // hkv) * t, d)  # [b, Hkv, G*T, D]: rows ordered (group, position)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * d**-0.5  # [b, Hkv, G*T, S]
    scores = scores.view(b, hkv, h // hkv, t, -1).masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(b, hkv, (h // hkv) * t, -1)
    return torch.matmul(probs, v).view(b, h, t, d)  # [b, H, T, D]


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k, v fused into one matmul: one kernel instead of three per layer and step.
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor, rows: Tensor | None):
        b, t, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [b, H, T, D]
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [b, Hkv, T, D]
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [b, 1, T, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        assert self.cache is not None, "call setup_caches() first"
        k, v = self.cache.update(rows, input_pos, k, v)
        return self.wo(grouped_attention(q, k, v, mask).transpose(1, 2).reshape(b, t, q_size))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor, rows: Tensor | None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, rows)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Llama layers + final norm; embeddings and heads live in `Csm` because backbone and decoder share them."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def setup_cache(self, batch: int, dtype: torch.dtype, device) -> None:
        for layer in self.layers:
            layer.attention.cache = KVCache(batch, self.cfg.n_kv_heads, self.cfg.max_seq_len, self.cfg.head_dim,
                                            dtype, device)

    def forward(self, x: Tensor, input_pos: Tensor, rows: Tensor | None = None) -> Tensor:
        """x `[b, T, dim]` at positions `input_pos [b, T]`, into cache rows `rows [b]` (None: all rows, b == B)."""
        freqs = input_pos[..., None].float() * self.inv_freq  # [b, T, D/2], float32 as transformers computes it
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        positions = torch.arange(self.cfg.max_seq_len, device=x.device)
        mask = (positions <= input_pos[..., None]).unsqueeze(1)  # [b, 1, T, S]: causal over the written cache
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, rows)
        return self.norm(x)


SampleFn = Callable[[Tensor, int], Tensor]
"""`sample(logits [B, V] float32, codebook) -> tokens [B]`: the engine binds per-request sampling state."""


class Csm(nn.Module):
    def __init__(self, cfg: CsmConfig):
        super().__init__()
        self.cfg = cfg
        bb, dd = cfg.backbone, cfg.decoder
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, bb.dim)
        # Codebook k token t is row t + k * audio_vocab_size; the depth decoder reads the same table.
        self.audio_embeddings = nn.Embedding(cfg.num_codebooks * cfg.audio_vocab_size, bb.dim)
        self.backbone = Transformer(bb)
        self.decoder = Transformer(dd)
        self.projection = nn.Linear(bb.dim, dd.dim, bias=False)
        self.codebook0_head = nn.Linear(bb.dim, cfg.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(torch.empty(cfg.num_codebooks - 1, dd.dim, cfg.audio_vocab_size))
        self.register_buffer("codebook_offsets", torch.empty(cfg.num_codebooks, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent buffers, e.g. after loading weights into a model built on `meta`."""
        device = self.codebook0_head.weight.device
        if device.type == "meta":
            return
        self.codebook_offsets = torch.arange(self.cfg.num_codebooks, device=device) * self.cfg.audio_vocab_size
        for t in (self.backbone, self.decoder):
            t.inv_freq = rope_inverse_frequencies(t.cfg).to(device)

    def setup_caches(self, batch: int, dtype: torch.dtype | None = None, device=None) -> None:
        param = self.codebook0_head.weight
        dtype, device = dtype or param.dtype, device or param.device
        self.backbone.setup_cache(batch, dtype, device)
        self.decoder.setup_cache(batch, dtype, device)

    def embed_rows(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Prompt rows `tokens [b, T, 33]` (32 audio codebooks + text) summed over `mask [b, T, 33]`."""
        audio = self.audio_embeddings(tokens[..., :-1] + self.codebook_offsets)  # [b, T, 32, dim]
        text = self.text_embeddings(tokens[..., -1:])  # [b, T, 1, dim]
        embeds = torch.cat([audio, text], dim=-2) * mask.unsqueeze(-1).to(audio.dtype)
        return embeds.sum(dim=-2)  # [b, T, dim]

    def embed_frame(self, codes: Tensor) -> Tensor:
        """A generated frame `codes [B, 32]` as a backbone input row `[B, 1, dim]` (audio columns only)."""
        return self.audio_embeddings(codes + self.codebook_offsets).sum(dim=1, keepdim=True)

    def decode_frame(self, hidden: Tensor, sample: SampleFn) -> Tensor:
        """Backbone hidden state `[B, dim]` -> the frame's 32 codes `[B, 32]` (codebook 0 + depth decoder)."""
        b = hidden.shape[0]
        c0 = sample(self.codebook0_head(hidden).float(), 0)  # [B]
        decoder_in = torch.stack([hidden, self.audio_embeddings(c0)], dim=1)  # [B, 2, dim]: codebook 0 offset is 0
        pos = torch.arange(2, device=hidden.device).expand(b, 2)  # fresh decoder cache each frame: positions 0, 1
        codes = [c0]
        for i in range(1, self.cfg.num_codebooks):
            h = self.decoder(self.projection(decoder_in), pos)[:, -1]  # [B, decoder dim]
            ci = sample(torch.mm(h, self.audio_head[i - 1]).float(), i)
            codes.append(ci)
            decoder_in = self.audio_embeddings(ci + i * self.cfg.audio_vocab_size)[:, None]  # [B, 1, dim]
            pos = pos[:, -1:] + 1
        return torch.stack(codes, dim=1)  # [B, 32]
