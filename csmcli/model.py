"""CSM-1B: Llama-style backbone (codebook 0) + depth decoder (codebooks 1..31), with static KV caches.

The model alone: configs, modules, and the two forward passes one frame needs. No I/O, no sampling policy
(a `sample` function is passed in), and no state: the KV caches are made by `new_caches` and passed in by whoever
owns them (the frame stepper), so several engines can share one model's weights.
"""

from __future__ import annotations

import functools
import importlib.util
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
        # One fused kernel on CUDA (it computes in float32 internally) instead of eight. transformers' LlamaRMSNorm
        # rounds to the activation dtype before scaling by the weight; this rounds once, after: identical in
        # float32 (the parity tests), at most one bf16 ulp apart in bf16.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def add_norm(x: Tensor, delta: Tensor | None, norm: RMSNorm, fused: bool = False) -> tuple[Tensor, Tensor]:
    """`x + delta` (None: x) and its RMS norm. `fused`: one pass through `kernels.add_rms_norm` (CUDA, Triton)
    instead of two: the same sum; the norm as `F.rms_norm` computes it, up to float32 summation order (at most an
    ulp apart in bf16 / fp16, a few in float32)."""
    if fused:
        from csmcli import kernels

        return kernels.add_rms_norm(x, delta, norm.weight, norm.eps)
    x = x if delta is None else x + delta
    return x, norm(x)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


class Linear(nn.Linear):
    """A bias-free linear layer whose weight may be stored in fp8 (`to_fp8`): e4m3 values and one float32 scale per
    output row, `y = (x @ weight.T) * scale`. A one-token step is bound by the bytes of its weights, and this
    halves them; but each weight keeps only 3 mantissa bits, so the model is an approximation of the bf16 one,
    used only when asked for (`--fp8`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("scale", None)  # [out_features] float32 with fp8 weights

    @torch.no_grad()
    def to_fp8(self) -> None:
        """Quantize the weight in place: each row scaled so its largest magnitude is e4m3's largest value, then
        rounded to nearest (torch's conversion). Quantizing twice is a no-op. Quantize after the last
        `.to(dtype)`: a dtype cast converts the fp8 values and the float32 scale like any other tensor."""
        if self.scale is not None:  # quantized already (perhaps cast since: its values and scale still multiply)
            return
        w = self.weight.float()  # [N, K]
        scale = w.abs().amax(dim=1) / FP8_MAX  # [N]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
        self.weight = nn.Parameter((w / scale[:, None]).to(torch.float8_e4m3fn), requires_grad=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        if self.scale is None:
            return super().forward(x)
        if x.dtype == torch.float16:
            # float16's range (65504) cannot hold products with the unscaled e4m3 values (up to 448): float32
            # throughout, as the fused kernels do.
            return (F.linear(x.float(), _widen(self.weight, torch.float32)) * self.scale).to(x.dtype)
        # The stored values are exact in x's dtype; the scale is applied in float32 (in bf16 after the product's
        # own rounding: at most one bf16 ulp from the fused kernels, which round once).
        return (F.linear(x, _widen(self.weight, x.dtype)) * self.scale).to(x.dtype)


@functools.cache
def compute_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability, asked once (it is read on every layer's forward)."""
    return torch.cuda.get_device_capability(device)


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_converts_fp8(device: torch.device) -> bool:
    """Triton is installed and converts fp8 (e4m3) on this CUDA device: Ada / Hopper and newer."""
    return compute_capability(device) >= (8, 9) and has_triton()


def _widen(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8 `weight` as `dtype` (exact): a Triton kernel on GPUs whose Triton converts e4m3 (Ada, Hopper and newer),
    torch's conversion elsewhere (without Triton, and under torch.compile, which makes its own kernel)."""
    if (weight.is_cuda and weight.dtype == torch.float8_e4m3fn and not torch.compiler.is_compiling()
            and triton_converts_fp8(weight.device)):
        from csmcli import kernels  # here, so CPU-only installs never need Triton

        return kernels.widen(weight, dtype)
    return weight.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """Preallocated per-layer cache, written by index so shapes never change (CUDA-graph safe)."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device):
        shape = (batch, n_kv_heads, max_seq_len, head_dim)  # [B, Hkv, S, D]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def head(self, n: int) -> KVCache:
        """A view of the first `n` rows (writes go to this cache)."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:n], self.v[:n]
        return view

    def write(self, rows: Tensor | None, start: int, k: Tensor, v: Tensor, fused: bool = False) -> None:
        """Write k/v `[b, Hkv, T, D]` at positions `start..+T` of cache rows `rows [b]` (None: all rows). `fused`:
        rows' writes in one kernel (`kernels.write_kv`)."""
        end = start + k.shape[2]
        if fused and rows is not None:
            from csmcli import kernels

            kernels.write_kv(k, v, self.k, self.v, rows, start)
        elif rows is None:
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
        else:
            self.k[rows, :, start:end] = k
            self.v[rows, :, start:end] = v

    def update(self, rows: Tensor | None, input_pos: Tensor | int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v `[b, Hkv, T, D]` at `input_pos [b, T]` (or, all rows alike, at `input_pos..+T`); return the
        cache rows attention reads (for an int position only the written prefix)."""
        if isinstance(input_pos, int):
            end = input_pos + k.shape[2]
            self.write(rows, input_pos, k, v)
            if rows is None:
                return self.k[:, :, :end], self.v[:, :, :end]
            return self.k[rows, :, :end], self.v[rows, :, :end]
        if rows is None:
            batch = torch.arange(self.k.shape[0], device=k.device)[:, None]  # [B, 1]
            self.k[batch, :, input_pos] = k.transpose(1, 2)
            self.v[batch, :, input_pos] = v.transpose(1, 2)
            return self.k, self.v
        self.k[rows[:, None], :, input_pos] = k.transpose(1, 2)
        self.v[rows[:, None], :, input_pos] = v.transpose(1, 2)
        return self.k[rows], self.v[rows]


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, blocked: Tensor | None) -> Tensor:
    """Attention of q `[b, H, T, D]` over the cache k, v `[b, Hkv, S, D]`, except where `blocked` (broadcast to
    `[b, Hkv, H / Hkv, T, S]`; None: nowhere) is True.

    Written out rather than SDPA: on the H100 SDPA picked cuDNN attention for batched decode, whose results
    changed from run to run (eager vs eager differed at batch 8), so graphed and eager codes could never be
    compared. Folding each KV head's query group into the rows gives plain batched GEMMs: deterministic, and
    no copy of K/V per query head."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, hkv, (h // hkv) * t, d)  # [b, Hkv, G*T, D]: rows ordered (group, position)
    scores = torch.matmul(q, k.transpose(-1, -2)) * d**-0.5  # [b, Hkv, G*T, S], scaled in q's dtype as transformers
    if blocked is not None:
        scores = scores.view(b, hkv, h // hkv, t, -1).masked_fill(blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype).view(b, hkv, (h // hkv) * t, -1)
    return torch.matmul(probs, v).view(b, h, t, d)  # [b, H, T, D]


def flash_prompt(q: Tensor, input_pos: Tensor | int) -> bool:
    """Whether rows `q [b, H, T, D]` at `input_pos` take `causal_prompt_attention`: several rows from position 0
    (a prompt's prefill; with torch ops also the depth decoder's 2-row first step), in bf16 / fp16 on a GPU that
    SDPA's flash kernel runs on (Ampere or newer, head size up to 256), and not under torch.compile. (A prefill's
    last layer, which wants one row per prompt, attends for that row written out in float32: `Attention.forward`.)"""
    t, d = q.shape[-2:]
    return (isinstance(input_pos, int) and input_pos == 0 and t > 1 and q.is_cuda and q.dtype != torch.float32
            and d % 8 == 0 and d <= 256 and not torch.compiler.is_compiling()
            and compute_capability(q.device) >= (8, 0))


def causal_prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of rows at positions 0..T-1 over themselves, q `[b, H, T, D]`, k, v `[b, Hkv, T, D]`
    (where `flash_prompt` says so). The flash kernel alone, never cuDNN (see `grouped_attention`):
    its forward is deterministic, and it is one kernel where the written-out form takes six per layer."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k, v fused into one matmul: one kernel instead of three per layer and step.
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, blocked: Tensor | None, input_pos: Tensor | int,
                rows: Tensor | None, cache: KVCache, fused: bool = False, last: Tensor | None = None) -> Tensor:
        """`last [b]`: every row's keys and values go into the cache, but only row `last[i]` of each `x[i]` is
        wanted, `[b, 1, dim]` (the last layer of a prefill)."""
        b, t, _ = x.shape
        h, hkv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(b, t, h + 2 * hkv, self.head_dim)
        qk, v = qkv.split([h + hkv, hkv], dim=2)  # [b, T, H + Hkv, D], [b, T, Hkv, D]
        if fused:  # one kernel, the same roundings
            from csmcli import kernels

            qk = kernels.rope(qk, cos, sin)
        else:
            qk = qk * cos + _rotate_half(qk) * sin  # q and k heads rotated together: half the kernels
        q, k = qk.split([h, hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, H or Hkv, T, D]
        if flash_prompt(q, input_pos):
            cache.write(rows, 0, k, v, fused)  # a prompt from position 0 attends to its own keys only: no read back
            if last is None:
                out = causal_prompt_attention(q, k, v)  # [b, H, T, D]
                return self.wo(out.transpose(1, 2).reshape(b, t, h * self.head_dim))
        else:
            k, v = cache.update(rows, input_pos, k, v)  # [b, Hkv, S, D]
        if last is not None:  # one query row per prompt, over a mask; in float32, as cheap as that is at one row
            q = q.gather(2, last[:, None, None, None].expand(-1, h, 1, self.head_dim))  # [b, H, 1, D]
            position = input_pos + last if isinstance(input_pos, int) else input_pos.gather(1, last[:, None])[:, 0]
            keys = torch.arange(k.shape[2], device=x.device)  # [S]
            blocked = (keys > position[:, None])[:, None, None, None]  # [b, 1, 1, 1, S]
            out = grouped_attention(q.float(), k.float(), v.float(), blocked).to(q.dtype)  # [b, H, 1, D]
            return self.wo(out.transpose(1, 2).reshape(b, 1, h * self.head_dim))
        out = grouped_attention(q, k, v, blocked)  # [b, H, T, D]
        return self.wo(out.transpose(1, 2).reshape(b, t, h * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.w13 = Linear(cfg.dim, 2 * cfg.intermediate_size)  # gate and up, fused
        self.w2 = Linear(cfg.intermediate_size, cfg.dim)

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        if fused:  # one kernel, the same roundings
            from csmcli import kernels

            return self.w2(kernels.silu_mul(self.w13(x)))
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        # `fold_norms`: the QKV and gate/up weights with their norms' weights in their columns (batched kernels)
        self.register_buffer("wqkv_folded", None, persistent=False)
        self.register_buffer("w13_folded", None, persistent=False)
        self._folded_from: tuple = ()  # what the copies were made from (`fold_norms`)

    @torch.no_grad()
    def fold_norms(self) -> None:
        """Copies of the QKV and gate/up weights with the norms' weights folded in (`kernels.fold_norm`), for the
        batched steps of large engines (`kernels.folds_norms`); bf16 / float32 weights only (fp8 rows have their
        own scales). Taken again only if those weights changed since (loaded, cast, moved): a new copy, so the
        graphs of engines built before keep the tensors they captured."""
        from csmcli import kernels

        a, f = self.attention, self.feed_forward
        assert a.wqkv.scale is None and f.w13.scale is None, "fp8 weights are not folded"
        sources = (a.wqkv.weight, self.attention_norm.weight, f.w13.weight, self.ffn_norm.weight)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        if self.wqkv_folded is None or key != self._folded_from:
            self.wqkv_folded = kernels.fold_norm(a.wqkv.weight, self.attention_norm.weight)
            self.w13_folded = kernels.fold_norm(f.w13.weight, self.ffn_norm.weight)
            self._folded_from = key

    def forward(self, x: Tensor, delta: Tensor | None, cos: Tensor, sin: Tensor, blocked: Tensor | None,
                input_pos: Tensor | int, rows: Tensor | None, cache: KVCache, fused: bool = False,
                last: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The layer on `x + delta` (`delta`: the layer before's output, not yet added; None: nothing). Returns
        the new residual stream and this layer's output, not yet added, so each sum travels with the norm after
        it (`add_norm`). `last`: only those rows are wanted (`Attention.forward`), both come back `[b, 1, dim]`."""
        x, normed = add_norm(x, delta, self.attention_norm, fused)
        out = self.attention(normed, cos, sin, blocked, input_pos, rows, cache, fused, last)
        if last is not None:
            x = x.gather(1, last[:, None, None].expand(-1, 1, x.shape[-1]))  # [b, 1, dim]
        x, normed = add_norm(x, out, self.ffn_norm, fused)
        return x, self.feed_forward(normed, fused)

    def qkv_weight(self, batch: int) -> Tensor:
        """The QKV weight `step` reads in an engine of `batch` slots: the folded copy where taken and used
        (`kernels.folds_norms`), else the layer's own."""
        from csmcli import kernels

        if self.wqkv_folded is not None and kernels.folds_norms(batch):
            return self.wqkv_folded
        return self.attention.wqkv.weight

    def w13_weight(self, batch: int) -> Tensor:
        """The gate/up weight `step` reads in an engine of `batch` slots (as `qkv_weight`)."""
        return self.w13_folded if self.qkv_weight(batch) is self.wqkv_folded else self.feed_forward.w13.weight

    def step(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor, position: Tensor | int, cache: KVCache,
             batch: int | None = None, squares: Tensor | None = None,
             l2_hint: bool = False) -> tuple[Tensor, Tensor | None]:
        """`forward` for one token per row, `x [B, dim]` at `position` (`[B]` or one int), in five fused kernels
        (csmcli.kernels; imported here so CPU-only installs never need Triton). `batch`: see `kernels.linear`.
        `squares`: x's rows' sums of squares in parts, if the kernel that wrote x made them. `l2_hint`: the
        products carry their weights' L2 cache hints (`kernels.linear`, `kernels.L2_PERSISTING`). Returns the
        output and, in engines that share them (`kernels.shares_squares`), its rows' sums of squares (else None)."""
        from csmcli import kernels

        a, f = self.attention, self.feed_forward
        rows = batch or x.shape[0]
        qkv_weight = self.qkv_weight(rows)
        folded = qkv_weight is self.wqkv_folded
        share = kernels.shares_squares(rows)

        def plus_residual(inputs: Tensor, linear: Linear, residual: Tensor) -> tuple[Tensor, Tensor | None]:
            if share:
                return kernels.linear_with_squares(inputs, linear.weight, scale=linear.scale, residual=residual,
                                                   batch=batch, l2_hint=l2_hint)
            return kernels.linear(inputs, linear.weight, scale=linear.scale, residual=residual, batch=batch,
                                  l2_hint=l2_hint), None

        if folded:
            qkv = kernels.linear(x, qkv_weight, norm_folded=True, eps=self.attention_norm.eps, squares=squares,
                                 batch=batch, l2_hint=l2_hint)
        else:
            qkv = kernels.linear(x, qkv_weight, scale=a.wqkv.scale, norm=self.attention_norm.weight,
                                 eps=self.attention_norm.eps, squares=squares, batch=batch, l2_hint=l2_hint)
        out = kernels.decode_attention(qkv, rope_cos, rope_sin, cache.k, cache.v, position, a.n_heads, a.n_kv_heads,
                                       batch)
        x, squares = plus_residual(out, a.wo, x)
        w13 = self.w13_weight(rows)
        if folded:
            hidden = kernels.linear(x, w13, norm_folded=True, eps=self.ffn_norm.eps, squares=squares, gated=True,
                                    batch=batch, l2_hint=l2_hint)
        else:
            hidden = kernels.linear(x, w13, scale=f.w13.scale, norm=self.ffn_norm.weight, eps=self.ffn_norm.eps,
                                    squares=squares, gated=True, batch=batch, l2_hint=l2_hint)
        return plus_residual(hidden, f.w2, x)


class Transformer(nn.Module):
    """Llama layers + final norm; embeddings and heads live in `Csm` because backbone and decoder share them."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)  # [D / 2]
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)  # [max_seq_len, D], see set_rope
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.set_rope(self.inv_freq.device, torch.float32)

    def set_rope(self, device, dtype: torch.dtype) -> None:
        """Tabulate cos / sin for every position once: a step then gathers rows instead of recomputing them.
        Float32 angles, as transformers computes them, stored rounded to the activations' `dtype` (where
        transformers rounds them too), so a step needs no cast. On `meta` (a model before its weights) the tables'
        shapes only: arithmetic on meta tensors runs torch's Python references, whose first use imports
        torch._dynamo (~1.3 s of every start-up)."""
        c = self.cfg
        if torch.device(device).type == "meta":
            self.inv_freq = torch.empty(c.head_dim // 2, device=device)
            self.rope_cos = torch.empty(c.max_seq_len, c.head_dim, dtype=dtype, device=device)
            self.rope_sin = torch.empty(c.max_seq_len, c.head_dim, dtype=dtype, device=device)
            return
        self.inv_freq = rope_inverse_frequencies(c).to(device)
        freqs = torch.arange(self.cfg.max_seq_len, device=device).float()[:, None] * self.inv_freq  # [S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def fold_norms(self) -> None:
        """`Block.fold_norms` for every layer."""
        for layer in self.layers:
            layer.fold_norms()

    def new_caches(self, batch: int, dtype: torch.dtype, device) -> list[KVCache]:
        """One zeroed cache per layer for `batch` rows (the caller owns them)."""
        c = self.cfg
        return [KVCache(batch, c.n_kv_heads, c.max_seq_len, c.head_dim, dtype, device) for _ in self.layers]

    def forward(self, x: Tensor, input_pos: Tensor | int, caches: list[KVCache], rows: Tensor | None = None,
                fused: bool = False, last: Tensor | None = None) -> Tensor:
        """x `[b, T, dim]` at positions `input_pos [b, T]`, into rows `rows [b]` of `caches` (None: all rows, b == B).
        `fused`: RoPE and silu * up through csmcli.kernels (CUDA, Triton), bit for bit the torch ops, each residual
        sum with the norm after it in one pass (`add_norm`: the norm within an ulp of torch's in bf16), and a flash
        prefill's cache write in one kernel (`KVCache.write`). `last [b]`: only row `last[i]` of each
        `x[i]` is wanted (a prefill wants its last prompt row): every layer writes all rows' keys and values, but
        the last layer's attention, MLP and the final norm run for those rows only; returns `[b, 1, dim]`.

        An int `input_pos` means every row is at positions input_pos..input_pos+T-1 (a prompt prefill, the depth
        decoder): the cache is written and read through slices up to the last position only, the causal mask is a
        `[T, end]` triangle (unused where `flash_prompt` picks SDPA's causal flash kernel), and a one-token step
        needs no mask at all."""
        t = x.shape[1]
        if isinstance(input_pos, int):
            end = input_pos + t
            cos = self.rope_cos[input_pos:end, None].to(x.dtype)  # [T, 1, D]: broadcast over rows and heads
            sin = self.rope_sin[input_pos:end, None].to(x.dtype)
            # Row r (position input_pos + r) sees columns up to input_pos + r: block the triangle above that.
            blocked = None if t == 1 else torch.ones(t, end, dtype=torch.bool, device=x.device).triu(input_pos + 1)
        else:
            cos = self.rope_cos[input_pos][:, :, None].to(x.dtype)  # [b, T, 1, D]
            sin = self.rope_sin[input_pos][:, :, None].to(x.dtype)
            positions = torch.arange(self.cfg.max_seq_len, device=x.device)
            blocked = (positions > input_pos[..., None])[:, None, None]  # [b, 1, 1, T, S]: causal over the cache
        delta = None
        for i, (layer, cache) in enumerate(zip(self.layers, caches, strict=True)):
            x, delta = layer(x, delta, cos, sin, blocked, input_pos, rows, cache, fused,
                             last if i == len(self.layers) - 1 else None)
        return add_norm(x, delta, self.norm, fused)[1]

    def step(self, x: Tensor, position: Tensor | int, caches: list[KVCache], batch: int | None = None,
             l2_hint: bool = False) -> tuple[Tensor, Tensor | None]:
        """One token per row through the fused kernels: `x [B, dim]` at `position` (`[B]`, or one int for all
        rows) into all rows of `caches`. Returns the last layer's output *before* the final norm `[B, dim]`, so
        the caller can fold that norm into the next matmul, with its rows' sums of squares for that norm's RMS
        (None where not shared: `Block.step`). `batch`: see `kernels.linear`; `l2_hint`: see `Block.step`
        (the weights are `l2_weights`)."""
        squares = None
        for layer, cache in zip(self.layers, caches, strict=True):
            x, squares = layer.step(x, self.rope_cos, self.rope_sin, position, cache, batch, squares, l2_hint)
        return x, squares

    def l2_weights(self, batch: int) -> tuple[list[Tensor], list[Tensor]]:
        """The weights `step` reads in an engine of `batch` slots, for `kernels.reserve_l2`: every layer's QKV and
        output weights, and its gate/up and down weights (`FrameStepper.l2_weights` says which persist)."""
        small = [w for layer in self.layers for w in (layer.qkv_weight(batch), layer.attention.wo.weight)]
        mlp = [w for layer in self.layers for w in (layer.w13_weight(batch), layer.feed_forward.w2.weight)]
        return small, mlp


@dataclass(frozen=True)
class Caches:
    """Everything a frame step writes besides its outputs: per-layer KV caches of both transformers."""

    backbone: list[KVCache]
    decoder: list[KVCache]

    def head(self, n: int) -> Caches:
        """Views of the first `n` rows of every cache."""
        return Caches([c.head(n) for c in self.backbone], [c.head(n) for c in self.decoder])


SampleFn = Callable[[Tensor, int], Tensor]
"""`sample(logits [B, V], codebook) -> tokens [B]`: the frame stepper binds per-request sampling state."""

SampleEmbedFn = Callable[[Tensor, int], tuple[Tensor, Tensor | None]]
"""`sample(logits [B, V], codebook) -> (tokens [B], next input [B, decoder dim])`: `SampleFn` that also returns
the tokens' rows of `Csm.projected_code_embeddings` (None after the last codebook)."""


class Csm(nn.Module):
    def __init__(self, cfg: CsmConfig):
        super().__init__()
        self.cfg = cfg
        bb, dd = cfg.backbone, cfg.decoder
        # Uninitialised (`_weight`) like every other weight here: loaders fill them. Embedding's own normal_ init on
        # `meta`, where models are built, imports torch._dynamo (~1.3 s of every start-up).
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, bb.dim,
                                            _weight=torch.empty(cfg.text_vocab_size, bb.dim))
        # Codebook k token t is row t + k * audio_vocab_size; the depth decoder reads the same table.
        rows = cfg.num_codebooks * cfg.audio_vocab_size
        self.audio_embeddings = nn.Embedding(rows, bb.dim, _weight=torch.empty(rows, bb.dim))
        self.backbone = Transformer(bb)
        self.decoder = Transformer(dd)
        self.projection = nn.Linear(bb.dim, dd.dim, bias=False)
        self.codebook0_head = nn.Linear(bb.dim, cfg.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(torch.empty(cfg.num_codebooks - 1, dd.dim, cfg.audio_vocab_size))
        self.register_buffer("codebook_offsets", torch.empty(cfg.num_codebooks, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent buffers, e.g. after loading weights into a model built on `meta`."""
        device, dtype = self.codebook0_head.weight.device, self.codebook0_head.weight.dtype
        if device.type == "meta":
            return
        self.codebook_offsets = torch.arange(self.cfg.num_codebooks, device=device) * self.cfg.audio_vocab_size
        for t in (self.backbone, self.decoder):
            t.set_rope(device, dtype)

    def linears(self) -> list[Linear]:
        """The transformer layers' matmuls (backbone and depth decoder): ~97% of the weight bytes a frame reads."""
        return [m for t in (self.backbone, self.decoder) for m in t.modules() if isinstance(m, Linear)]

    def to_fp8(self) -> None:
        """Store the transformer layers' weights in fp8 (`Linear.to_fp8`). Embeddings, the projection and the
        codebook heads stay as they are: they are few bytes per frame, and the heads make the logits."""
        for linear in self.linears():
            linear.to_fp8()
        for layer in [*self.backbone.layers, *self.decoder.layers]:  # copies of the bf16 weights: stale now
            layer.wqkv_folded = layer.w13_folded = None

    @property
    def fp8(self) -> bool:
        return any(linear.scale is not None for linear in self.linears())

    def new_caches(self, batch: int) -> Caches:
        """Zeroed KV caches for `batch` independent rows, in the weights' dtype and device."""
        param = self.codebook0_head.weight
        return Caches(self.backbone.new_caches(batch, param.dtype, param.device),
                      self.decoder.new_caches(batch, param.dtype, param.device))

    def embed_rows(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Prompt rows `tokens [b, T, 33]` (32 audio codebooks + text) summed over `mask [b, T, 33]`."""
        audio = self.audio_embeddings(tokens[..., :-1] + self.codebook_offsets)  # [b, T, 32, dim]
        text = self.text_embeddings(tokens[..., -1:])  # [b, T, 1, dim]
        embeds = torch.cat([audio, text], dim=-2) * mask.unsqueeze(-1).to(audio.dtype)
        return embeds.sum(dim=-2)  # [b, T, dim]

    def embed_frame(self, codes: Tensor) -> Tensor:
        """A generated frame `codes [B, 32]` as a backbone input row `[B, 1, dim]` (audio columns only)."""
        return self.audio_embeddings(codes + self.codebook_offsets).sum(dim=1, keepdim=True)

    def decode_frame(self, hidden: Tensor, sample: SampleFn, caches: list[KVCache]) -> Tensor:
        """Backbone hidden state `[B, dim]` -> the frame's 32 codes `[B, 32]` (codebook 0 + depth decoder, whose
        `caches` are rewritten from position 0 every frame)."""
        c0 = sample(self.codebook0_head(hidden), 0)  # [B]
        decoder_in = torch.stack([hidden, self.audio_embeddings(c0)], dim=1)  # [B, 2, dim]: codebook 0 offset is 0
        codes = [c0]
        for i in range(1, self.cfg.num_codebooks):
            # A fresh decoder cache each frame: codebook i's input sits at position i (0 and 1 on the first step).
            pos = 0 if i == 1 else i
            h = self.decoder(self.projection(decoder_in), pos, caches)[:, -1]  # [B, decoder dim]
            ci = sample(torch.mm(h, self.audio_head[i - 1]), i)
            codes.append(ci)
            decoder_in = self.audio_embeddings(ci + i * self.cfg.audio_vocab_size)[:, None]  # [B, 1, dim]
        return torch.stack(codes, dim=1)  # [B, 32]

    def projected_code_embeddings(self) -> Tensor:
        """Every depth-decoder input a code can become, `projection(audio_embeddings)` for codebooks 0..C-2
        `[(C-1) * V, decoder dim]` (130 MB at full size): a decoder step then starts from a table row instead of
        a matmul."""
        rows = (self.cfg.num_codebooks - 1) * self.cfg.audio_vocab_size
        return self.projection(self.audio_embeddings.weight[:rows])

    def decode_frame_fused(self, hidden: Tensor, sample: SampleEmbedFn, caches: list[KVCache],
                           audio_head_rows: Tensor, batch: int | None = None, heads_folded: bool = False) -> Tensor:
        """`decode_frame` through the fused kernels (csmcli.kernels): the same computation, one token per
        decoder step (positions 0 and 1 as two steps; causal attention makes that the 2-token prefill), each
        step's input a row of `projected_code_embeddings` that the draw before it copies out, and the decoder's
        final norm folded into each codebook head. `audio_head_rows [C-1, V, dim]` is `audio_head` transposed and
        contiguous: the GEMV reads it row-major; `heads_folded`: with the final norm's weight already in its columns
        (`kernels.fold_norm`, batched tiles only). `batch`: see `kernels.linear`."""
        from csmcli import kernels

        dec = self.decoder
        # Every product carries its weight's L2 cache hint (`kernels.reserve_l2`): the decoder's weights are read
        # 32 times a frame, the heads' and the projection's once.
        c0_logits = kernels.linear(hidden, self.codebook0_head.weight, batch=batch, l2_hint=True)  # [B, V]
        c0, x = sample(c0_logits, 0)  # [B], [B, dim]
        # Position 0 only fills the cache: its output is not needed.
        dec.step(kernels.linear(hidden, self.projection.weight, batch=batch, l2_hint=True), 0, caches, batch,
                 l2_hint=True)
        codes = [c0]
        for i in range(1, self.cfg.num_codebooks):
            x, squares = dec.step(x, i, caches, batch, l2_hint=True)
            logits = kernels.linear(x, audio_head_rows[i - 1], norm=None if heads_folded else dec.norm.weight,
                                    norm_folded=heads_folded, eps=dec.norm.eps, squares=squares,
                                    batch=batch, l2_hint=True)  # [B, V]
            code, x = sample(logits, i)
            codes.append(code)
        return torch.stack(codes, dim=1)  # [B, 32]
