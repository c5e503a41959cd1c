"""Temperature / top-k / greedy sampling that never syncs with the host and is reproducible per request.

Randomness comes from a counter-based hash of (seed, frame, codebook, token) instead of a shared
`torch.Generator`: a request's codes then depend only on its own seed, not on which other requests share the
batch, whether the frame step runs eagerly or inside a CUDA graph, or on which device it runs. The draw itself is
the reference's `argmax(probs / Exponential(1))`, which needs no `multinomial` host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.9
    topk: int = 50
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def _hash32(x: Tensor) -> Tensor:
    """Integer avalanche hash on int64 holding values < 2**32 (products stay below 2**63: no overflow)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seed: Tensor, frame: Tensor, codebook: int, vocab_size: int) -> Tensor:
    """Uniform (0, 1) noise `[B, V]`, a pure function of (seed [B], frame [B], codebook, token index)."""
    key = _hash32((frame * 64 + codebook) & _MASK32)
    key = _hash32(((seed >> 32) & _MASK32) ^ key)
    key = _hash32((seed & _MASK32) ^ key)  # [B]
    tokens = torch.arange(vocab_size, device=seed.device, dtype=torch.int64) * _GOLDEN & _MASK32  # [V]
    bits = _hash32(_hash32(key[:, None] ^ tokens))  # [B, V]
    # 23 bits + 0.5 are exact in float32, so the value is strictly inside (0, 1): -log(u) is never 0 or inf.
    return ((bits >> 9).to(torch.float32) + 0.5) / 2.0**23


def sample(logits: Tensor, temperature: Tensor, topk: Tensor, seed: Tensor, frame: Tensor, codebook: int) -> Tensor:
    """One token per row of `logits [B, V]` (float32) with per-row temperature / top-k / seed; greedy where
    temperature <= 0. Branch-free so one CUDA graph serves every mix of settings."""
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp(min=1e-5)[:, None]
    ranked = scaled.sort(dim=-1, descending=True).values
    kth = ranked.gather(1, (topk.clamp(1, logits.shape[-1]) - 1)[:, None])  # [B, 1]
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    exponential = -torch.log(uniform_noise(seed, frame, codebook, logits.shape[-1]))
    drawn = (probs / exponential).argmax(dim=-1)
    return torch.where(temperature <= 0, greedy, drawn)
