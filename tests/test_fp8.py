"""fp8 weights (`--fp8`): the quantization itself and the model it makes, against the unquantized model (CPU, torch
ops; the fused kernels' fp8 path is checked against these torch ops in test_kernels.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csmcli.checkpoint import random_model
from csmcli.generate import FrameStepper
from csmcli.model import FP8_MAX, CsmConfig, Linear, TransformerConfig
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams


def quantized(weight: torch.Tensor) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0])
    layer.weight.data = weight.clone()
    layer.to_fp8()
    return layer


def test_each_row_is_scaled_to_e4m3s_range_and_rounded_to_nearest():
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes (one scale per row, not per tensor), an all-zero row, a tiny row
    weight = torch.randn(6, 256, generator=g) * torch.tensor([[1.0], [1e-3], [50.0], [0.0], [1e-30], [3.0]])
    layer = quantized(weight)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
    assert layer.scale.dtype == torch.float32 and layer.scale.shape == (6,)
    stored = layer.weight.float()
    nonzero = weight.abs().amax(dim=1) > 0
    assert torch.equal(stored.abs().amax(dim=1)[nonzero], torch.full((5,), FP8_MAX))  # each row's largest: 448
    assert (stored[3] == 0).all() and layer.scale[3] == 1  # a zero row stays zero, without dividing by zero
    dequantized = stored * layer.scale[:, None]
    # e4m3: 3 mantissa bits, so round to nearest is within 2^-4 relative for normal values, and within half the
    # subnormal step (2^-10 of the scale) near zero
    bound = weight.abs() * 2**-4 + layer.scale[:, None] * 2**-10
    assert ((dequantized - weight).abs() <= bound * (1 + 1e-6)).all()
    # and it is the nearest of all e4m3 values to the scaled weight
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    table = table[table.isfinite()]  # [254]: the NaN codes left out
    scaled = weight / layer.scale[:, None]
    nearest = (scaled[..., None] - table).abs().amin(dim=-1)
    assert torch.equal((scaled - stored).abs(), nearest)
    assert (nearest > 0).any()  # some weights did round


def test_forward_is_the_product_with_the_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 40, generator=g) / 6
    layer = quantized(weight)
    x = torch.randn(5, 3, 40, generator=g)
    want = x @ (layer.weight.float() * layer.scale[:, None]).T
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(layer(x), x @ weight.T, rtol=1e-6, atol=1e-6)  # it did quantize
    bf16 = layer(x.bfloat16())
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), want, rtol=2e-2, atol=2e-2)


def test_float16_activations_do_not_overflow():
    """float16 tops out at 65504: a product with the unscaled e4m3 values (up to 448) over many inputs would not fit,
    the scaled result does."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 2048, generator=g) / 100
    layer = quantized(weight)
    x = (torch.randn(3, 2048, generator=g) * 20).half()  # |x @ stored.T| reaches ~1e5 before the ~1e-4 scale
    assert (x.float() @ layer.weight.float().T).abs().max() > torch.finfo(torch.float16).max
    want = x.float() @ (layer.weight.float() * layer.scale[:, None]).T
    half = layer(x)
    assert half.dtype == torch.float16 and half.isfinite().all()
    torch.testing.assert_close(half.float(), want, rtol=1e-3, atol=1e-5)  # float16's own rounding of the result


def test_quantizing_twice_changes_nothing():
    layer = quantized(torch.randn(8, 32, generator=torch.Generator().manual_seed(3)))
    weight, scale = layer.weight.clone(), layer.scale.clone()
    layer.to_fp8()
    assert torch.equal(layer.weight.float(), weight.float()) and torch.equal(layer.scale, scale)
    # cast after quantizing: the stored values and scale are converted, still multiply to the same layer, and a
    # second quantization must not take the unscaled values for the weights
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    want = layer(x)
    layer.to(torch.float64).to_fp8()
    assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer(x.double()).float(), want, rtol=1e-6, atol=1e-6)


def tiny_csm():
    block = dict(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=128)
    cfg = CsmConfig(backbone=TransformerConfig(dim=128, max_seq_len=96, **block),
                    decoder=TransformerConfig(dim=64, max_seq_len=33, **block), audio_vocab_size=67)
    return random_model(cfg, "cpu", torch.float32, seed=4)


def test_fp8_model_quantizes_the_layers_only_and_stays_close_to_the_model():
    """Embeddings, projection and heads keep their dtype; the layers' matmuls are fp8. The fp8 model's backbone
    states and codebook-0 logits after a prompt follow the unquantized model's closely (an approximation: close,
    not equal)."""
    torch.set_grad_enabled(False)
    model, fp8 = tiny_csm(), tiny_csm()
    fp8.to_fp8()
    assert fp8.fp8 and not model.fp8
    for name, param in fp8.named_parameters():
        in_layer_matmul = ".layers." in name and any(f".{m}." in name for m in ("wqkv", "wo", "w13", "w2"))
        assert param.dtype == (torch.float8_e4m3fn if in_layer_matmul else torch.float32), name
    states = []
    for m in (model, fp8):
        stepper = FrameStepper(m, 1)
        stepper.prefill(0, synthetic_prompt(40, seed=2), SamplingParams(0.0))
        states.append((stepper.hidden.clone(), m.codebook0_head(stepper.hidden)))
    (hidden, logits), (hidden8, logits8) = states
    assert not torch.equal(hidden, hidden8)
    assert F.cosine_similarity(hidden, hidden8).min() > 0.995
    assert F.cosine_similarity(logits, logits8).min() > 0.995


@pytest.mark.parametrize("weights", ["float32", "fp8"])
def test_hf_state_dict_of_an_fp8_model_is_dequantized(weights):
    from csmcli.checkpoint import hf_state_dict

    model = tiny_csm()
    if weights == "fp8":
        model.to_fp8()
    layer = model.decoder.layers[1].feed_forward.w2
    got = hf_state_dict(model)["depth_decoder.model.layers.1.mlp.down_proj.weight"]
    assert got.dtype == torch.float32
    want = layer.weight.float() * layer.scale[:, None] if weights == "fp8" else layer.weight
    assert torch.equal(got, want)
