"""The fused Triton decode kernels against the torch ops they replace (the reference): on the CPU through Triton's
interpreter (conftest sets TRITON_INTERPRET=1), on CUDA for real (bf16 tensor-core dots)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from csmcli import kernels
from csmcli.checkpoint import random_model
from csmcli.generate import FrameStepper
from csmcli.model import CsmConfig, Linear, Transformer, TransformerConfig, _rotate_half
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import FrameSampling, SamplingParams, frame_sampling, gumbel_noise, sample, token_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]


def tolerance(dtype):
    # bf16: a few ulps, as torch and the kernels round the same values in a different summation order
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=6e-2, atol=6e-2)


def reference_linear(x, weight, norm=None, eps=1e-5, residual=None, gated=False):
    """`weight`: a tensor, or a `Linear` with fp8 weights (its torch forward is the reference)."""
    if norm is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm, eps)
    y = weight(x) if isinstance(weight, Linear) else x @ weight.T
    if gated:
        gate, up = y.split(y.shape[-1] // 2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else y + residual


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("fusion", ["plain", "norm", "residual", "gated", "transposed"])
@pytest.mark.parametrize("blocks", ["shape's own", "small", "small, split K", "64-row tiles", "256-row tiles"])
def test_linear_matches_torch(dtype, m, fusion, blocks):
    g = torch.Generator().manual_seed(m)
    n, k = 48, 80  # not multiples of the small blocks: masked edges, several K steps
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(2 * n if fusion == "gated" else n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    split = 3 if blocks not in ("shape's own", "small") and fusion != "gated" else 1  # K = 80: 32, 32, 16
    config = None if blocks == "shape's own" else ((1 if m == 1 else 16), 16, 32, 4, split, 3)
    if blocks.endswith("-row tiles") and m > 1:  # computed as weight @ x.T
        config = (int(blocks[:3].strip("-")), 16, 32, 4, split, 3)
    norm = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    residual = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    if fusion == "plain":
        got, want = kernels.linear(x, weight, config=config), reference_linear(x, weight)
    elif fusion == "transposed":  # a [K, N] weight read through strides (the codebook heads)
        stored = weight.T.contiguous()
        got, want = kernels.linear(x, stored.T, config=config), reference_linear(x, weight)
    elif fusion == "norm":
        got = kernels.linear(x, weight, norm=norm, eps=1e-5, config=config)
        want = reference_linear(x, weight, norm=norm)
    elif fusion == "residual":
        got = kernels.linear(x, weight, residual=residual, config=config)
        want = reference_linear(x, weight, residual=residual)
    elif fusion == "gated":
        got = kernels.linear(x, weight, norm=norm, eps=1e-5, gated=True, config=config)
        want = reference_linear(x, weight, norm=norm, gated=True)
    else:
        raise AssertionError(fusion)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("gated", "config"), [(gated, config) for gated in (False, True) for config in
                                               [(16, 16, 32, 4, 1, 3), (16, 16, 32, 4, 3, 3), (64, 16, 32, 4, 1, 3),
                                                (128, 16, 32, 4, 1, 3), (256, 16, 32, 4, 3, 3)]
                                               if not (gated and config[4] > 1)])  # gated products are never split
def test_linear_with_the_norm_folded_into_the_weight_matches_torch(dtype, gated, config):
    """`norm_folded`: the norm's weight in the weight's columns, each row scaled by its 1 / RMS after the product,
    gives torch's RMSNorm then matmul: 16- to 256-row tiles, split K, 70 rows (the last row block masked), K = 80
    (a masked last K block), gated and plain."""
    g = torch.Generator().manual_seed(7)
    m, n, k = 70, 48, 80
    x = (3 * torch.randn(m, k, generator=g)).to(DEVICE, dtype)  # RMS far from 1: a missing scale would show
    weight = (torch.randn(2 * n if gated else n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    norm = (1 + 0.3 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    got = kernels.linear(x, kernels.fold_norm(weight, norm), norm_folded=True, eps=1e-5, gated=gated, config=config)
    torch.testing.assert_close(got, reference_linear(x, weight, norm=norm, gated=gated), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "producer", "tile_rows"), [(3, (16, 32, 32, 4, 1, 3), 16),
                                                          (70, (64, 64, 32, 4, 3, 3), 64), (1, (1, 64, 32, 4, 1, 3), 1),
                                                          (130, (256, 64, 32, 4, 3, 3), 128)])
@pytest.mark.parametrize("consumer", ["norm", "norm folded", "gated, norm folded"])
def test_rows_squares_from_the_producer_give_the_same_normed_product(dtype, m, producer, tile_rows, consumer):
    """`linear_with_squares` writes its output rows' sums of squares in parts (per column tile, or per split-K sum
    program: N = 512 is two 256-wide parts), and a normed product given them (`squares=`) matches the same product
    that sums x's squares itself, and torch: 1, 3, 70 and 130 rows (masked row blocks), one-row, 16-row and (split
    K) 64- and 256-row producer tiles, consumers of 1 to 128 rows."""
    g = torch.Generator().manual_seed(11)
    k, n, n2 = 96, 512, 48
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    residual = (3 * torch.randn(m, n, generator=g)).to(DEVICE, dtype)  # RMS far from 1
    hidden, squares = kernels.linear_with_squares(x, weight, residual=residual, config=producer)
    assert torch.equal(hidden, kernels.linear(x, weight, residual=residual, config=producer))
    parts = 2 if producer[4] > 1 else n // producer[1]
    assert squares.shape == (m, parts)
    torch.testing.assert_close(squares.sum(1), (hidden.float() ** 2).sum(1), rtol=1e-5, atol=1e-5)
    gated = consumer.startswith("gated")
    w2 = (torch.randn(2 * n2 if gated else n2, n, generator=g) / n**0.5).to(DEVICE, dtype)
    norm = (1 + 0.3 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    config = (tile_rows, 16, 128, 4, 1, 3)
    if consumer == "norm":
        weight2, options = w2, dict(norm=norm)
    elif m == 1:
        return  # folded norms are for batched tiles only
    else:
        weight2, options = kernels.fold_norm(w2, norm), dict(norm_folded=True)
    got = kernels.linear(hidden, weight2, eps=1e-5, squares=squares, gated=gated, config=config, **options)
    own = kernels.linear(hidden, weight2, eps=1e-5, gated=gated, config=config, **options)
    torch.testing.assert_close(got, own, **tolerance(dtype))
    torch.testing.assert_close(got, reference_linear(hidden, w2, norm=norm, gated=gated), **tolerance(dtype))
    wrong = kernels.linear(hidden, weight2, eps=1e-5, squares=squares * 4, gated=gated, config=config, **options)
    assert not torch.allclose(wrong, own, **tolerance(dtype))  # the squares given are the ones used


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 17])
def test_linear_norm_prepass_unrolled_or_looped_is_the_same_sum(dtype, m, monkeypatch):
    """The per-tile RMS pre-pass is unrolled up to `NORM_UNROLL_BLOCKS` K blocks, a loop beyond: the same sum in
    the same order, so the same result bit for bit, and both match torch (K = 300 in 16-wide blocks: 19 blocks)."""
    g = torch.Generator().manual_seed(3)
    n, k = 24, 300
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    norm = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    config = ((1 if m == 1 else 16), 16, 16, 4, 1, 3)
    results = []
    for blocks in (0, 32):  # looped, unrolled
        monkeypatch.setattr(kernels, "NORM_UNROLL_BLOCKS", blocks)
        results.append(kernels.linear(x, weight, norm=norm, eps=1e-5, config=config))
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], reference_linear(x, weight, norm=norm), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("fusion", ["residual", "gated"])
@pytest.mark.parametrize("blocks", ["shape's own", "small, split K", "64-row tiles", "cuBLAS's shape"])
def test_fp8_linear_matches_torch(dtype, m, fusion, blocks):
    """fp8 weights with a scale per row (`Linear.to_fp8`): the kernel's `(x @ w8.T) * scale` against the layer's
    torch forward, on the GEMV path, tensor-core tiles (fp8 converted for the MMA), split K and swapped tiles. A
    shape cuBLAS serves in bf16 has no fp8 cuBLAS product: the kernel's tiles run it."""
    g = torch.Generator().manual_seed(m)
    n, k = 48, 80
    gated = fusion == "gated"
    layer = Linear(k, 2 * n if gated else n)
    layer.weight.data = torch.randn(layer.weight.shape, generator=g) / k**0.5
    layer.to_fp8()
    layer = layer.to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    norm = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    residual = None if gated else torch.randn(m, n, generator=g).to(DEVICE, dtype)
    config = {"shape's own": None, "small, split K": ((1 if m == 1 else 16), 16, 32, 4, 1 if gated else 3, 3),
              "64-row tiles": ((1 if m == 1 else 64), 16, 32, 4, 1, 3), "cuBLAS's shape": kernels.CUBLAS}[blocks]
    if blocks == "cuBLAS's shape" and not gated:
        norm = None  # the plain product with a residual (the output projections cuBLAS serves in bf16)
    got = kernels.linear(x, layer.weight, scale=layer.scale, norm=norm, eps=1e-5, residual=residual, gated=gated,
                         config=config)
    want = reference_linear(x, layer, norm=norm, residual=residual, gated=gated)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
def test_fp8_linear_with_the_norm_folded_matches_torch(dtype, gated):
    """fp8 weights quantized after the norm's weight was folded into them (`scripts/fp8_probe.py`'s `fp8 folded`):
    the 64-row tile's product scaled by each row's 1 / RMS and each weight row's scale, against torch's RMSNorm of x
    (unit weight: the norm is in the weight) then the fp8 layer's forward; 70 rows, a masked last K block."""
    g = torch.Generator().manual_seed(5)
    m, n, k = 70, 48, 80
    layer = Linear(k, 2 * n if gated else n)
    norm = 1 + 0.3 * torch.randn(k, generator=g)
    layer.weight.data = kernels.fold_norm(torch.randn(layer.weight.shape, generator=g) / k**0.5, norm)
    layer.to_fp8()
    layer = layer.to(DEVICE)
    x = (3 * torch.randn(m, k, generator=g)).to(DEVICE, dtype)  # RMS far from 1: a missing 1 / RMS would show
    got = kernels.linear(x, layer.weight, scale=layer.scale, norm_folded=True, eps=1e-5, gated=gated,
                         config=(64, 16, 32, 4, 1, 3))
    want = reference_linear(x, layer, norm=torch.ones(k, dtype=dtype, device=DEVICE), gated=gated)
    torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_widen_converts_every_fp8_value_as_torch_does(dtype):
    """`kernels.widen` (the prefill's fp8 -> bf16 conversion) against torch's: every finite e4m3 code (quantized
    weights hold no NaN; Triton's interpreter reads the NaN codes as +-480), in a tensor whose size is no multiple
    of the kernel's block."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[codes.float().isfinite()].repeat(40)[:10_000]  # 254 finite codes
    weight = codes.view(40, 250).to(DEVICE)
    got = kernels.widen(weight, dtype)
    assert got.dtype == dtype and got.shape == weight.shape
    torch.testing.assert_close(got, weight.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positions", ["a prompt from 0", "per row"])
def test_rope_kernel_equals_torch_rope(dtype, positions):
    """`kernels.rope` (the prefill's RoPE, `fused`) against the torch ops it replaces, bit for bit: the q and k
    heads of a fused QKV output as the model passes them (a strided view), `cos, sin` broadcast as `[T, 1, D]`
    (a prompt) or `[b, T, 1, D]` (a position per row), more heads than one program's block. The interpreter
    converts to bf16 in its own way, so there bf16 is compared within a tolerance."""
    g = torch.Generator().manual_seed(7)
    b, t, heads, kv, d = 3, 11, 20, 4, 64
    qkv = torch.randn(b, t, heads + 2 * kv, d, generator=g).to(DEVICE, dtype)
    qk = qkv[:, :, : heads + kv]  # [b, T, H + Hkv, D], strided
    cos_table, sin_table = (torch.randn(40, d, generator=g).to(DEVICE, dtype) for _ in range(2))  # [S, D]
    if positions == "a prompt from 0":
        cos, sin = cos_table[:t, None], sin_table[:t, None]  # [T, 1, D]
    else:
        pos = torch.randint(0, 40, (b, t), generator=g).to(DEVICE)
        cos, sin = cos_table[pos][:, :, None], sin_table[pos][:, :, None]  # [b, T, 1, D]
    want = qk * cos + _rotate_half(qk) * sin
    got = kernels.rope(qk, cos, sin)
    assert got.is_contiguous() and got.shape == want.shape
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # the interpreter's bf16 conversions are its own
        torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_kernel_equals_torch(dtype):
    """`kernels.silu_mul` (the prefill's MLP gate, `fused`) against `F.silu(gate) * up` on the halves of a
    gate/up output, rows of a width no multiple of the block. On CUDA bit for bit (CUDA's expf and an IEEE
    division, as torch); the interpreter's exp is numpy's, which may differ from torch's CPU exp in the last bit,
    and its bf16 conversions are its own."""
    g = torch.Generator().manual_seed(8)
    h = (3 * torch.randn(2, 5, 2 * 1100, generator=g)).to(DEVICE, dtype)  # [b, T, 2I]
    gate, up = h.split(1100, dim=-1)
    want = F.silu(gate) * up
    got = kernels.silu_mul(h)
    assert got.shape == want.shape == (2, 5, 1100)
    if DEVICE == "cuda":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, **(dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32
                                                 else tolerance(dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32] if DEVICE == "cuda" else DTYPES)
@pytest.mark.parametrize("delta", [True, False])
def test_add_rms_norm_kernel_equals_torch(dtype, delta):
    """`kernels.add_rms_norm` (a prefill's residual sum and the norm after it, `fused`) against `x + delta` and
    `F.rms_norm`: the sum bit for bit, the norm (its float32 sum of squares in another order) on the GPU within one
    ulp in bf16 / fp16, almost always equal, and a few ulps in float32; rows of a width no power of two."""
    g = torch.Generator().manual_seed(9)
    x, change = ((3 * torch.randn(2, 7, 1000, generator=g)).to(DEVICE, dtype) for _ in range(2))  # [b, T, D]
    weight = (1 + 0.3 * torch.randn(1000, generator=g)).to(DEVICE, dtype)
    want_sum = x + change if delta else x
    want = F.rms_norm(want_sum, (1000,), weight, 1e-5)
    got_sum, got = kernels.add_rms_norm(x, change if delta else None, weight, 1e-5)
    assert got.shape == got_sum.shape == x.shape and got.is_contiguous()
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(got_sum, want_sum)
    else:  # the interpreter's bf16 conversions are its own
        torch.testing.assert_close(got_sum, want_sum, **tolerance(dtype))
    if DEVICE == "cuda":
        magnitude = want.float().abs().clamp(min=torch.finfo(dtype).tiny)
        ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(magnitude)))  # the spacing at each value
        ulps = (got.float() - want.float()).abs() / ulp
        if dtype == torch.float32:
            assert ulps.max() <= 4, ulps.max()
        else:
            assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.99, (ulps.max(), (ulps == 0).float().mean())
    else:
        torch.testing.assert_close(got, want, **(dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32
                                                 else tolerance(dtype)))


def test_write_kv_kernel_equals_indexed_writes():
    """`kernels.write_kv` (a prefill's cache write, `fused`) against torch's indexed writes: k and v as the model
    passes them (strided views of a QKV output), into cache rows in any order, one of them twice with the same
    values (a prefill group filled up with copies), from a start position, more steps than a program's block."""
    g = torch.Generator().manual_seed(10)
    b, heads, kv, t, d = 4, 6, 2, 37, 32
    qkv = torch.randn(b, t, heads + 2 * kv, d, generator=g).to(DEVICE)
    k, v = (qkv[:, :, i : i + kv].transpose(1, 2) for i in (heads, heads + kv))  # [b, Hkv, T, D], strided
    rows = torch.tensor([3, 0, 5, 5], device=DEVICE)
    k[3], v[3] = k[2], v[2]  # the copy: same slot, same values
    want_k, want_v = (torch.randn(7, kv, 50, d, generator=g).to(DEVICE) for _ in range(2))  # [B, Hkv, S, D]
    got_k, got_v = want_k.clone(), want_v.clone()
    want_k[rows, :, 5 : 5 + t], want_v[rows, :, 5 : 5 + t] = k, v
    kernels.write_kv(k, v, got_k, got_v, rows, 5)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("positions", ["a prompt from 0", "per row"])
def test_prefill_of_the_last_rows_only_equals_the_full_prefill(fused, positions):
    """`Transformer.forward(..., last=)` (a prefill that wants only each prompt's last row) writes the same keys and
    values as the full pass and returns the full pass's rows `last`: the last layer's attention over a mask instead
    of the causal triangle (or flash), its MLP on fewer rows."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # bf16: the flash path on CUDA
    t = small_transformer(dtype, max_seq_len=80, seed=4)
    b, length = 3, 23
    x = torch.randn(b, length, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    rows = torch.tensor([2, 0, 4], device=DEVICE)
    last = torch.tensor([22, 0, 9], device=DEVICE)  # the end, the first row, one in between
    input_pos = 0 if positions == "a prompt from 0" else torch.arange(length, device=DEVICE).expand(b, length)
    with torch.no_grad():
        full_caches, last_caches = t.new_caches(5, dtype, DEVICE), t.new_caches(5, dtype, DEVICE)
        full = t(x, input_pos, full_caches, rows, fused=fused)  # [b, T, dim]
        got = t(x, input_pos, last_caches, rows, fused=fused, last=last)  # [b, 1, dim]
    assert got.shape == (b, 1, 64)
    want = full[torch.arange(b), last][:, None]
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **tolerance(dtype))
    else:  # flash against the written-out attention, each rounding to bf16 in its own order (~0.3% apart)
        assert ((got - want).float().norm() / want.float().norm()).item() < 1e-2
    for f, c in zip(full_caches, last_caches, strict=True):
        assert torch.equal(f.k, c.k) and torch.equal(f.v, c.v)


def time_major(streams: int, channels: int, steps: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(streams, steps, channels, generator=g).to(DEVICE).transpose(1, 2)  # [B, C, T] as [B, T, C]


@pytest.mark.parametrize(("bias", "skip", "skip_bias", "elu"), [
    (True, False, False, False), (True, False, False, True), (False, False, False, True), (True, True, False, False),
    (True, True, True, True), (False, True, True, False),
])  # fmt: skip
@pytest.mark.parametrize("channels", [1, 12])
def test_seanet_sum_equals_the_torch_ops(bias, skip, skip_bias, elu, channels):
    """`kernels.seanet_sum` (the Mimi SEANet's bias + residual + ELU pass) against the torch ops it replaces, on
    time-major tensors as the SEANet has them: `x` a slice of a conv output longer than the chunk, the result
    written into the chunk's part of a padded buffer (streams at a stride of their own), 1 or several channels,
    more elements per stream than the kernel's block. On CUDA bit for bit (CUDA's expm1f, torch's order of
    adds); the interpreter's exp is numpy's."""
    g = torch.Generator().manual_seed(9)
    streams, steps, context = 3, 2 * kernels.SEANET_SUM_BLOCK // channels + 5, 4
    x = time_major(streams, channels, steps + 3, g)[..., :steps]  # [B, C, T] of a longer output
    b = torch.randn(channels, generator=g).to(DEVICE) if bias else None
    s = time_major(streams, channels, steps, g) if skip else None
    sb = torch.randn(channels, generator=g).to(DEVICE) if skip_bias else None
    want = x if b is None else x + b[:, None]
    if s is not None:
        want = (s if sb is None else s + sb[:, None]) + want
    want = F.elu(want) if elu else want
    padded = time_major(streams, channels, context + steps, g)
    before = padded[..., :context].clone()
    got = kernels.seanet_sum(x, b, s, sb, elu, out=padded[..., context:])
    assert got.data_ptr() == padded[..., context:].data_ptr()
    assert torch.equal(padded[..., :context], before)
    fresh = kernels.seanet_sum(x, b, s, sb, elu)
    assert fresh.transpose(1, 2).is_contiguous()
    for result in (got, fresh):
        if DEVICE == "cuda":
            assert torch.equal(result, want)
        else:
            torch.testing.assert_close(result, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("epilogue", ["plain", "bias", "gelu", "scale+residual", "all"])
@pytest.mark.parametrize(("m", "n", "k"), [(5, 48, 40), (70, 520, 96), (600, 300, 200), (2100, 1000, 72)])
def test_matmul_f32_equals_torch(epilogue, m, n, k):
    """`kernels.matmul_f32` (the Mimi transformer's float32 products; on CUDA three TF32 products each) against
    torch's float32 `residual + scale * gelu(x @ w.T + bias)`: sizes no multiple of the blocks, and each tile
    size (`kernels.matmul_f32_blocks`). tf32x3 drops only the low parts' product: float32-level agreement, where
    plain TF32 is off by ~1e-3 of the largest output."""
    if DEVICE == "cpu" and m > 100:
        pytest.skip("the interpreter's large tiles: slow; the CUDA run covers them")
    g = torch.Generator().manual_seed(10)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE) if epilogue in ("bias", "all") else None
    scale = torch.rand(n, generator=g).to(DEVICE) + 0.5 if epilogue in ("scale+residual", "all") else None
    residual = torch.randn(m, n, generator=g).to(DEVICE) if epilogue in ("scale+residual", "all") else None
    gelu = epilogue in ("gelu", "all")
    want = x @ weight.T if bias is None else x @ weight.T + bias
    want = F.gelu(want) if gelu else want
    want = want if scale is None else scale * want
    want = want if residual is None else residual + want
    got = kernels.matmul_f32(x, weight, bias, scale, residual, gelu)
    assert got.shape == want.shape and got.dtype == torch.float32
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error < 2e-6, error


def test_matmul_f32_keeps_three_stages_where_they_fit_in_shared_memory():
    """H100 / H200 (227 KB a block) and A100 (163 KB): the measured 3 stages; sm86 / sm89 (99 KB): 2 stages for the
    64x64x64 tiles (96 KB in 3), 3 for the 128x64x32 ones (72 KB)."""
    for smem in (227 * 1024, 163 * 1024):
        assert [kernels.matmul_f32_stages(b, smem) for b in ((64, 64, 64), (128, 64, 32), (16, 64, 32))] == [3, 3, 3]
    assert [kernels.matmul_f32_stages(b, 99 * 1024) for b in ((64, 64, 64), (128, 64, 32), (16, 64, 32))] == [2, 3, 3]


@pytest.mark.parametrize("head_dim", [8, 64])  # the tests' Mimi, the real one
def test_mimi_attention_kernel_equals_the_torch_attention(head_dim, monkeypatch):
    """`kernels.mimi_attention` (the Mimi transformer's attention, `fused`) against `codec._attention`'s torch ops,
    in a two-layer streaming transformer fed pieces of 3 to 32 steps, 202 in all: a window shorter than the stream,
    so the key ring (131 slots, three of the kernel's blocks) wraps and the mask hides old slots. Layer 0's key and
    value rings come out bit for bit (RoPE rounds as torch), the outputs at float32 level (online softmax, TF32x3
    products on a GPU)."""
    import copy

    from csmcli import codec

    config = codec.CodecConfig.from_dict(dict(  # 131 slots: 3 blocks of 64
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
        intermediate_size=64, sliding_window=100, upsample_groups=32))
    torch.manual_seed(11)
    transformers = [codec._Transformer(config).to(DEVICE)]
    transformers.append(copy.deepcopy(transformers[0]))
    for t in transformers:
        for m in t.modules():
            if isinstance(m, codec._StreamingModule):
                m._state = m.init_state(3)
    g = torch.Generator().manual_seed(12)
    calls = []
    attention = kernels.mimi_attention
    monkeypatch.setattr(kernels, "mimi_attention", lambda *a: calls.append(a[0].shape) or attention(*a))
    with torch.no_grad():
        for steps in (5, 16, 3, 32, 20, 32, 32, 32, 30):  # 202 steps: the ring of 131 slots wraps
            x = torch.randn(3, steps, 32, generator=g).to(DEVICE)  # [B, T, C]
            want, got = transformers[0](x), transformers[1](x, fused=True)
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
            rings = [t.layers[0].self_attn.state for t in transformers]
            assert torch.equal(rings[1].k, rings[0].k) and torch.equal(rings[1].v, rings[0].v)
            later = [t.layers[1].self_attn.state for t in transformers]
            torch.testing.assert_close(later[1].k, later[0].k, rtol=2e-5, atol=2e-5)
    assert len(calls) == 9 * 2  # every piece, both layers: the kernel did run


@pytest.mark.parametrize("shape", [(64, 1024, 8192, False), (64, 2048, 2048, False), (64, 2048, 8192, False),
                                   (64, 2051, 1024, False)])
def test_fp8_never_picks_cublas(shape, monkeypatch):
    """A model shape the block table sends to cuBLAS at 64 rows (`kernels.CUBLAS`; the first three it sent there
    until the kernel's split-K tiles measured faster, with fp8 block sizes of their own; the codebook head has none)
    gets the kernel's own tiles with fp8 weights (the block table's rule; `linear` refusing the cuBLAS shortcut for
    an explicit config is the "cuBLAS's shape" case of test_fp8_linear_matches_torch)."""
    monkeypatch.setitem(kernels._LINEAR_CONFIGS, shape, kernels.CUBLAS)
    bucket, n, k, gated = shape
    assert kernels.linear_config(bucket, n, k, gated) == kernels.CUBLAS
    for m in (17, 64, 128):
        assert kernels.linear_config(m, n, k, gated, fp8=True) != kernels.CUBLAS, (m, n, k, gated)


def test_engines_of_more_than_64_slots_use_the_wider_tables():
    """65-128 slots read the 128-row table, more the 256-row one, for every layer product and head of the frame
    step; shapes not measured wider (the projection, the backbone's head) and fp8 weights keep the 64-row tiles."""
    measured = {(1536, 1024, False), (1024, 1024, False), (8192, 1024, True), (1024, 8192, False),
                (2051, 1024, False), (3072, 2048, False), (2048, 2048, False), (8192, 2048, True),
                (2048, 8192, False)}
    for rows, bucket in ((65, 128), (128, 128), (129, 256), (256, 256), (300, 256)):
        assert kernels.rows_bucket(rows) == bucket
        for (table_rows, n, k, gated), config in kernels._LINEAR_CONFIGS.items():
            if table_rows != 64:
                continue
            got = kernels.linear_config(rows, n, k, gated)
            if (n, k, gated) in measured:
                assert got == kernels._LINEAR_CONFIGS[(bucket, n, k, gated)] and got[0] >= 64, (rows, n, k)
            else:
                assert got == config, (rows, n, k)
            fp8 = kernels.linear_config(rows, n, k, gated, fp8=True)
            assert fp8 == kernels.linear_config(64, n, k, gated, fp8=True), (rows, n, k)


@pytest.mark.parametrize("residual", [False, True])
def test_cublas_linear_runs_every_row_count_as_the_full_batch(residual):
    """Shapes served by cuBLAS (`kernels.CUBLAS`) always multiply `batch` rows: a slot's row comes out bit for bit
    the same whether 2 or all 5 slots run, and matches the torch product."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=g).to(DEVICE, DTYPES[0])
    weight = torch.randn(40, 64, generator=g).to(DEVICE, DTYPES[0]) / 8
    res = torch.randn(5, 40, generator=g).to(DEVICE, DTYPES[0]) if residual else None
    full = kernels.linear(x, weight, residual=res, batch=5, config=kernels.CUBLAS)
    fewer = kernels.linear(x[:2], weight, residual=None if res is None else res[:2], batch=5, config=kernels.CUBLAS)
    assert torch.equal(fewer, full[:2])
    torch.testing.assert_close(full, reference_linear(x, weight, residual=res), **tolerance(DTYPES[0]))


def small_transformer(dtype, max_seq_len=80, seed=0):
    cfg = TransformerConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=96,
                            max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    t = Transformer(cfg)
    for name, p in t.named_parameters():
        p.data = (1 + 0.1 * torch.randn_like(p)) if "norm" in name else torch.randn_like(p) * 0.1
    t = t.to(DEVICE, dtype)
    t.set_rope(torch.device(DEVICE), dtype)
    return t


def filled_caches(t, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    caches = t.new_caches(batch, dtype, DEVICE)
    for c in caches:
        c.k.copy_(torch.randn(c.k.shape, generator=g))
        c.v.copy_(torch.randn(c.v.shape, generator=g))
    return caches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position", ["per row", "per row, blocks of 16", 5, 20, 45, 70])
def test_transformer_step_matches_forward(dtype, position, monkeypatch):
    """One token per row through the fused step (norm+QKV, RoPE + cache write + attention, ...) against the torch
    forward: same outputs and the same cache entries, with each row at its own position (the backbone) or all at
    one int position (the depth decoder). Positions below the block take attention's one-block path (an int
    position's block 16, 32 or 64 positions wide), later ones the two-pass loop over blocks (of 64 for an int
    position, `ATTENTION_POSITIONS` per row: 16 makes rows 37 and 79 walk 3 and 5 blocks)."""
    per_row = position.startswith("per row") if isinstance(position, str) else False
    if position == "per row, blocks of 16":
        monkeypatch.setattr(kernels, "ATTENTION_POSITIONS", 16)
    torch.set_grad_enabled(False)
    t = small_transformer(dtype)
    batch = 3
    x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    positions = torch.tensor([0, 37, 79], device=DEVICE) if per_row else position
    ref_caches, fused_caches = filled_caches(t, batch, dtype), filled_caches(t, batch, dtype)
    want = t(x[:, None], positions[:, None] if per_row else positions, ref_caches)[:, 0]
    got = t.norm(t.step(x, positions, fused_caches)[0])
    torch.testing.assert_close(got, want, **tolerance(dtype))
    for ref, fused in zip(ref_caches, fused_caches, strict=True):
        torch.testing.assert_close(fused.k, ref.k, **tolerance(dtype))
        torch.testing.assert_close(fused.v, ref.v, **tolerance(dtype))


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("radix_bits", "split_tail"), [(1, True), (2, True), (4, True), (8, True), (4, False)])
def test_sample_kernel_equals_sort_based_sampling(logits_dtype, radix_bits, split_tail, monkeypatch):
    """The radix-select top-k draw picks exactly the token the sort-based reference picks, for every mix of
    greedy / temperature / top-k settings, including k = 1, k = V / 2 and k = V, heavily tied logits (ties at the
    k-th value are kept by both), all-negative logits and a k-th value of +-0.0, the largest values in the
    2048-block's 3-logit tail and ties between block and tail; whatever digit size the radix passes use, with the
    row split into block + tail or padded to 4096."""
    monkeypatch.setattr(kernels, "SAMPLE_RADIX_BITS", radix_bits)
    monkeypatch.setattr(kernels, "SAMPLE_SPLIT_TAIL", split_tail)
    vocab, codebooks = 2051, 7
    assert kernels.sample_blocks(vocab) == ((2048, 4) if split_tail else (4096, 2))
    temperature = torch.tensor([0.0, 0.9, 1.3, 0.7, 0.0, 2.0, 0.5, 1.0], device=DEVICE)
    topk = torch.tensor([50, 50, 1, vocab, 7, 3, vocab // 2, 2], device=DEVICE)
    seed = torch.arange(8, device=DEVICE) * 7919
    settings = frame_sampling(temperature, topk, seed, torch.full((8,), 3, device=DEVICE), codebooks,
                              token_keys(vocab, DEVICE))
    g = torch.Generator().manual_seed(0)
    for codebook in range(codebooks):
        logits = torch.randn(8, vocab, generator=g) * 3
        if codebook == 1:  # integers: many exact ties, at the maximum and at the k-th value
            logits = logits.round()
        elif codebook == 2:  # all negative: the k-th value is negative for every k
            logits = logits - 20
        elif codebook == 3:  # mostly +0.0 and -0.0, a few larger values: the k-th value is a signed zero
            zeros = torch.where(torch.rand(8, vocab, generator=g) < 0.5, 0.0, -0.0)
            logits = torch.where(torch.rand(8, vocab, generator=g) < 0.01, logits, zeros)
        elif codebook == 5:  # integers, the tail holding copies of each row's maximum and of other values
            logits = logits.round()
            logits[:, 2048] = logits[:, :2048].max(dim=1).values
            logits[:, 2050] = logits[:, 17]
        elif codebook == 6:  # the three largest values in the tail, the largest last
            logits[:, 2048:] = 100 + torch.arange(3.0)
        logits = logits.to(DEVICE, logits_dtype)
        want = sample(logits.float(), settings, codebook)
        # odd codebooks also copy out each token's row of a table (the next decoder input), at the codebook's offset
        table = torch.randn(codebooks * vocab, 48, generator=g).to(DEVICE, logits_dtype) if codebook % 2 else None
        got, rows = kernels.sample(logits, settings.temperature, settings.kth, settings.gumbel[:, codebook], table,
                                   codebook * vocab)
        assert torch.equal(got, want), codebook
        assert rows is None if table is None else torch.equal(rows, table[codebook * vocab + want])


@pytest.mark.parametrize("vocab", [1, 2, 3, 64, 65, 100, 129, 192, 200, 1024])
def test_sample_kernel_equals_sort_based_sampling_for_any_vocabulary_size(vocab):
    """Rows of any length: a power of two (one block), a block and a short tail (65 = 64 + 1, 100, 129, 192 = 128 +
    64), a long remainder (200: one block of 256), down to one logit; greedy, k = 1, k = V and k between, with
    integer logits (ties) in every other row."""
    kernel_blocks = kernels.sample_blocks(vocab)
    assert sum(kernel_blocks) >= vocab and kernel_blocks[0] & (kernel_blocks[0] - 1) == 0
    rows = 6
    temperature = torch.tensor([0.0, 0.9, 1.3, 0.7, 0.0, 1.0], device=DEVICE)
    topk = torch.tensor([50, 1, vocab, 2, 1, max(1, vocab // 3)], device=DEVICE)
    frame = torch.zeros(rows, dtype=torch.long, device=DEVICE)
    settings = frame_sampling(temperature, topk, torch.arange(rows, device=DEVICE) * 31, frame, 1,
                              token_keys(vocab, DEVICE))
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[::2] = logits[::2].round()
    logits = logits.to(DEVICE)
    want = sample(logits, settings, 0)
    assert torch.equal(kernels.sample(logits, settings.temperature, settings.kth, settings.gumbel[:, 0])[0], want)


def test_sample_kernel_divides_by_temperature_as_torch_does():
    """4.6875 / 0.9375 is exactly 5.0, which ties token 1 with token 0 (logit 0 + noise 5.0). The draw depends on
    the division's last bit, so the kernel must divide as torch does on the same device: on CUDA, IEEE division
    (CUDA's fast `div.full` lands one ulp high and would pick token 1 where torch picks token 0); on the CPU torch
    itself multiplies by the reciprocal."""
    logits = torch.full((1, 2051), -100.0)
    logits[0, 1] = 4.6875
    gumbel = torch.zeros(1, 2051)
    gumbel[0, 0] = 5.0
    temperature = torch.tensor([[0.9375]])
    kth = torch.tensor([[2050]])
    logits, temperature, kth, gumbel = (t.to(DEVICE) for t in (logits, temperature, kth, gumbel))
    want = sample(logits, FrameSampling(temperature, kth, gumbel[:, None]), 0)
    assert torch.equal(kernels.sample(logits, temperature, kth, gumbel)[0], want)


def test_gumbel_noise_kernel_equals_torch_noise():
    """The frame's noise from one kernel against `sampling.gumbel_noise` (the hash chain in torch ops): seeds and
    frame counters past 32 bits and negative, greedy rows zero. On CUDA bit for bit (both call CUDA's logf); the
    interpreter's log is numpy's, which may differ from torch's CPU log in the last bit, while a wrong hash bit
    would change a value by far more than the tolerance."""
    seed = torch.tensor([1, -5, 2**40 + 7, 0, 123456789], device=DEVICE)
    frame = torch.tensor([0, 3, 2**33 + 1, 9, 70000], device=DEVICE)
    temperature = torch.tensor([0.9, 0.5, 1.0, 0.0, 1.3], device=DEVICE)
    tokens = token_keys(2051, DEVICE)
    want = gumbel_noise(seed, frame, 32, tokens, temperature)
    got = kernels.gumbel_noise(seed, frame, 32, tokens, temperature)
    assert got.shape == (5, 32, 2051) and (got[3] == 0).all() and got[[0, 1, 2, 4]].std() > 1
    if DEVICE == "cuda":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_sum_matches_embed_frame(dtype):
    model = tiny_csm(dtype)
    codes = torch.randint(0, model.cfg.audio_vocab_size, (5, model.cfg.num_codebooks),
                          generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = kernels.embed_sum(model.audio_embeddings.weight, codes, model.cfg.audio_vocab_size)
    torch.testing.assert_close(got, model.embed_frame(codes)[:, 0], **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_sum_of_prompt_rows_matches_embed_rows(dtype):
    """The prefill's embedding: audio codes and a text token per row, summed where the mask keeps them."""
    model = tiny_csm(dtype)
    gen = torch.Generator().manual_seed(4)
    rows, columns = 7, model.cfg.num_codebooks + 1
    tokens = torch.randint(0, model.cfg.audio_vocab_size, (rows, columns), generator=gen)
    tokens[:, -1] = torch.randint(0, model.cfg.text_vocab_size, (rows,), generator=gen)
    mask = torch.rand(rows, columns, generator=gen) < 0.6
    mask[0] = False  # a padding row: zeros
    mask[1, :-1], mask[1, -1] = False, True  # a text row
    mask[2, :-1], mask[2, -1] = True, False  # an audio row
    tokens, mask = tokens.to(DEVICE), mask.to(DEVICE)
    got = kernels.embed_sum(model.audio_embeddings.weight, tokens, model.cfg.audio_vocab_size, mask,
                            model.text_embeddings.weight)
    want = model.embed_rows(tokens[None], mask[None])[0]
    assert (got[0] == 0).all() and torch.equal(got[1], model.text_embeddings.weight[tokens[1, -1]])
    torch.testing.assert_close(got, want, **tolerance(dtype))
    if DEVICE == "cuda":  # torch sums the 33 entries in order too
        assert torch.equal(got, want)


def tiny_csm(dtype):
    block = dict(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=96)
    cfg = CsmConfig(backbone=TransformerConfig(dim=64, max_seq_len=96, **block),
                    decoder=TransformerConfig(dim=48, max_seq_len=33, **block), audio_vocab_size=67,
                    num_codebooks=32)  # a small codebook vocabulary: the interpreter runs one program per block
    return random_model(cfg, DEVICE, dtype, seed=3)


def run_frames(model, fused, frames=2, slots=3, steppers=None):
    stepper = FrameStepper(model, slots, fused=fused)
    if steppers is not None:
        steppers.append(stepper)
    params = [SamplingParams(0.9, 50, seed=5), SamplingParams(0.0), SamplingParams(1.1, 5, seed=6)]
    for slot, (rows, p) in enumerate(zip([30, 9, 17][:slots], params[:slots], strict=True)):
        stepper.prefill(slot, synthetic_prompt(rows, seed=slot), p)
    return torch.stack([stepper.step().clone() for _ in range(frames)]), stepper.hidden.clone()


@pytest.mark.parametrize(("slots", "weights"),
                         [(3, "float32"), (3, "float32, norms folded"), (3, "float32, norms folded, squares shared"),
                          (1, "float32"), (1, "fp8")])
def test_fused_frame_step_equals_torch_frame_step(slots, weights, monkeypatch):
    """Whole frames (codebook 0, the depth decoder's 31 steps, sampling, the backbone step) through the fused
    kernels give the same codes as the torch path for greedy and sampled slots at different positions (float32:
    the two differ only by summation order, far below any sampling decision). One slot: the one-row (GEMV)
    kernels, as `say` and `stream` run them. fp8: the transformer layers' weights in fp8 in both paths (batched
    fp8 tiles: test_fp8_linear_matches_torch)."""
    if DEVICE == "cpu":  # wide one-row blocks: the interpreter runs programs one by one
        config = kernels.linear_config
        monkeypatch.setattr(kernels, "linear_config", lambda m, n, k, gated, fp8=False: (1, 64, 128, 4, 1, 3)
                            if m == 1 else config(m, n, k, gated, fp8))
    folded_calls, squares_calls, kept_in_l2 = [], [], []
    if weights.startswith("float32, norms folded"):  # as engines of 64 slots run (`kernels.folds_norms`), at 3 here
        monkeypatch.setattr(kernels, "folds_norms", lambda batch: batch > 1)
        monkeypatch.setattr(kernels, "shares_squares", lambda batch: "squares" in weights and batch > 1)
    linear, linear_with_squares = kernels.linear, kernels.linear_with_squares

    def counted(*args, **kwargs):
        folded_calls.append(kwargs.get("norm_folded", False))
        squares_calls.append(kwargs.get("squares") is not None)
        if kwargs.get("l2_hint"):
            kept_in_l2.append(args[1].data_ptr())
        return linear(*args, **kwargs)

    def counted_with_squares(*args, **kwargs):
        if kwargs.get("l2_hint"):
            kept_in_l2.append(args[1].data_ptr())
        return linear_with_squares(*args, **kwargs)

    monkeypatch.setattr(kernels, "linear", counted)
    monkeypatch.setattr(kernels, "linear_with_squares", counted_with_squares)
    model = tiny_csm(torch.float32)
    g = torch.Generator().manual_seed(4)
    for name, param in model.named_parameters():  # norm weights other than 1: a fold that is not applied shows
        if name.endswith("norm.weight"):
            param.copy_(1 + 0.3 * torch.randn(param.shape, generator=g))
    if weights == "fp8":
        model.to_fp8()
    want_codes, want_hidden = run_frames(model, fused=False, slots=slots)
    steppers = []
    got_codes, got_hidden = run_frames(model, fused=True, slots=slots, steppers=steppers)
    assert torch.equal(got_codes, want_codes)
    torch.testing.assert_close(got_hidden, want_hidden, rtol=1e-4, atol=1e-4)
    frames, layer_steps = 2, 2 * (1 + 32)  # 2 layers; a backbone step and 32 decoder steps a frame
    if weights.startswith("float32, norms folded"):  # every layer step's QKV and gate/up, and every head, folded
        assert sum(folded_calls) == frames * (layer_steps * 2 + 31), sum(folded_calls)
        # shared squares: every normed product but a step's first QKV (x from the embedding or the draw)
        shared = frames * ((1 + 32) * (2 * 2 - 1) + 31) if "squares" in weights else 0
        assert sum(squares_calls) == shared, sum(squares_calls)
    # L2 hints on every product, each on a weight the engine registers (`FrameStepper.l2_weights`): every layer
    # step's QKV, output, gate/up and down weights; codebook 0's head, the projection and the 31 heads
    small, streaming = steppers[0].l2_weights()
    assert set(kept_in_l2) == {w.data_ptr() for w in small + streaming}
    assert len(small + streaming) == 2 * 2 * 4 + 2 + 31
    assert len(kept_in_l2) == frames * (layer_steps * 4 + 2 + 31)


def test_folded_copies_follow_the_weights():
    """`fold_norms` copies once, and again (a new tensor) when the weights were changed, cast or loaded since."""
    torch.set_grad_enabled(False)
    block = small_transformer(torch.float32).layers[0]
    block.fold_norms()
    first = block.wqkv_folded
    torch.testing.assert_close(first, block.attention.wqkv.weight * block.attention_norm.weight)
    block.fold_norms()
    assert block.wqkv_folded is first  # unchanged weights: the same copy (graphs captured on it stay valid)
    block.ffn_norm.weight.mul_(2)
    block.fold_norms()
    assert block.wqkv_folded is not first
    torch.testing.assert_close(block.w13_folded, block.feed_forward.w13.weight * block.ffn_norm.weight)
    block.to(torch.bfloat16)
    block.fold_norms()
    assert block.w13_folded.dtype == torch.bfloat16
    assert torch.equal(block.w13_folded, kernels.fold_norm(block.feed_forward.w13.weight, block.ffn_norm.weight))
    assert not any("folded" in name for name in block.state_dict())  # never saved with the weights


def test_fewer_rows_compute_exactly_what_the_full_batch_computes():
    """The engine steps only the lowest `n` slots while only they are busy. With the fused kernels' block sizes
    set by the engine's batch (not by `n`), those rows must come out bit for bit as in a full-batch step, whatever
    the other slots hold: each row is computed on its own. (What the interpreter cannot show, a compiled kernel
    adding up in another order for one row: tests/test_kernel_layouts.py.)"""
    torch.set_grad_enabled(False)
    model = tiny_csm(torch.float32)
    full, fewer = FrameStepper(model, 3, fused=True), FrameStepper(model, 3, fused=True)
    for slot in range(3):  # one row alone would take the GEMV path if block sizes followed the row count
        full.prefill(slot, synthetic_prompt(9 + 7 * slot, seed=slot), SamplingParams(0.9, 20, seed=slot))
    fewer.prefill(0, synthetic_prompt(9, seed=0), SamplingParams(0.9, 20, seed=0))
    want = full.step().clone()
    got = fewer.step(1).clone()
    assert torch.equal(got[0], want[0])
    assert torch.equal(fewer.hidden[0], full.hidden[0]) and fewer.positions[0] == full.positions[0]
    assert (fewer.positions[1:] == 0).all()  # rows from n on: untouched


def test_compiling_only_puts_triton_back_after_an_error():
    """`kernels.compiling_only` patches Triton's launch for the whole process: an error inside must not leave every
    later launch compile-only, nor Triton's async mode on; `engine.compile_ahead` turns a failed trace into
    "nothing done" (the warm-up then compiles as it launches)."""
    from triton.runtime import _async_compile
    from triton.runtime.jit import JITFunction

    from csmcli.engine import compile_ahead

    run = JITFunction.run
    with pytest.raises(RuntimeError, match="inside"), kernels.compiling_only(2) as compiling:
        assert compiling and JITFunction.run is not run and _async_compile.active_mode.get() is not None
        raise RuntimeError("inside")
    assert JITFunction.run is run and _async_compile.active_mode.get() is None

    def fails():
        raise RuntimeError("a trace that fails")

    device = torch.device("cuda", 0)
    assert compile_ahead(device, [fails]) is False and JITFunction.run is run
    assert compile_ahead(device, []) is False
