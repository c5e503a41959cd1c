"""Temperature / top-k / greedy sampling that never syncs with the host and is reproducible per request.

Randomness comes from a counter-based hash of (seed, frame, codebook, token) instead of a shared
`torch.Generator`: a request's codes then depend only on its own seed, not on which other requests share the
batch, whether the frame step runs eagerly or inside a CUDA graph, or on which device it runs. The draw is the
Gumbel-max form of the reference's `argmax(probs / Exponential(1))`; neither needs a `multinomial` host sync.
"""

from __future__ import annotations

from collections.abc import Callable
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


def token_keys(vocab_size: int, device=None) -> Tensor:
    """Per-token hash inputs `[V]`, made once outside the frame step: computed inside a compiled step, Triton
    would fold `arange * constant` into an int32 index expression, which this 32-bit constant overflows."""
    return torch.arange(vocab_size, device=device, dtype=torch.int64) * _GOLDEN & _MASK32


def uniform_noise(seed: Tensor, frame: Tensor, codebooks: int, tokens: Tensor) -> Tensor:
    """Uniform (0, 1) noise `[B, codebooks, V]`, a pure function of (seed [B], frame [B], codebook, token index);
    `tokens` is `token_keys(V)`.

    Made for a whole frame at once: one short chain of kernels per frame instead of one per codebook."""
    codebook = torch.arange(codebooks, device=seed.device, dtype=torch.int64)  # [C]
    key = _hash32((frame[:, None] * 64 + codebook) & _MASK32)  # [B, C]
    key = _hash32(((seed[:, None] >> 32) & _MASK32) ^ key)
    key = _hash32((seed[:, None] & _MASK32) ^ key)
    bits = _hash32(_hash32(key[..., None] ^ tokens))  # [B, C, V]
    # 23 bits + 0.5 are exact in float32, so the value is strictly inside (0, 1): log(-log(u)) is always finite.
    return ((bits >> 9).to(torch.float32) + 0.5) / 2.0**23


@dataclass(frozen=True)
class FrameSampling:
    """Every slot's sampling settings and noise for one frame, prepared once so each codebook's draw is short.
    Greedy slots get temperature 1 and zero noise: their draw is then exactly the argmax."""

    temperature: Tensor  # [B, 1] float32, > 0
    kth: Tensor  # [B, 1] index of the k-th largest logit (top-k threshold)
    gumbel: Tensor  # [B, codebooks, V] float32, 0 for greedy slots


def gumbel_noise(seed: Tensor, frame: Tensor, codebooks: int, tokens: Tensor, temperature: Tensor) -> Tensor:
    """Gumbel noise `-log(-log u)` `[B, codebooks, V]` from `uniform_noise`, 0 in the rows of greedy slots
    (`temperature [B]` <= 0). `kernels.gumbel_noise` computes the same in one kernel."""
    gumbel = -torch.log(-torch.log(uniform_noise(seed, frame, codebooks, tokens)))
    return gumbel.masked_fill((temperature <= 0)[:, None, None], 0.0)


def frame_sampling(temperature: Tensor, topk: Tensor, seed: Tensor, frame: Tensor, codebooks: int,
                   tokens: Tensor, noise: Callable[..., Tensor] = gumbel_noise) -> FrameSampling:
    """Settings `temperature, topk, seed, frame [B]` -> the frame's `FrameSampling` (Gumbel noise `-log(-log u)`)
    over a vocabulary of `len(tokens)` (`tokens = token_keys(V)`); `noise`: `gumbel_noise` or its kernel."""
    greedy = (temperature <= 0)[:, None]  # [B, 1]
    return FrameSampling(torch.where(greedy, 1.0, temperature[:, None].clamp(min=1e-5)),
                         (topk.clamp(1, len(tokens)) - 1)[:, None],
                         noise(seed, frame, codebooks, tokens, temperature))


def sample(logits: Tensor, frame: FrameSampling, codebook: int) -> Tensor:
    """One token per row of `logits [B, V]` (float32) with each row's temperature / top-k / noise; greedy where
    temperature <= 0. Branch-free so one CUDA graph serves every mix of settings.

    `argmax(logits / T + gumbel)` over the top k is the reference's `argmax(softmax(logits / T) / Exponential(1))`
    without the softmax's monotone steps: the same distribution, fewer kernels per codebook. A greedy row divides
    by 1 and adds 0, so it is `argmax(logits)` exactly (the top-k mask keeps the maximum)."""
    scaled = logits / frame.temperature
    kth = scaled.sort(dim=-1, descending=True).values.gather(1, frame.kth)  # [B, 1]
    return (scaled.masked_fill(scaled < kth, float("-inf")) + frame.gumbel[:, codebook]).argmax(dim=-1)
