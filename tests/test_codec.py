"""Our streaming Mimi decoder against transformers' one-shot `MimiModel.decode`, on tiny random Mimis.

The tiny configs keep the real upsampling ratios (frame = 1920 samples) and a sliding window of 4 transformer
steps (2 frames), so 15 frames exceed it several times. Weights that init to constants (layer scales, norms,
biases, codebooks, weight-norm gains) are randomised so that each of them changes the output.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close
from transformers import MimiConfig, MimiModel

import csmcli.codec as codec_module
from csmcli.codec import RING_STEPS, MimiCodec, StreamingMimiDecoder, flatten_mimi_state_dict
from csmcli.errors import CsmError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_FRAMES = 15  # > 3 sliding windows; 2 and 5 do not all divide it, so a short last chunk is tested too
TINY = dict(
    hidden_size=32, num_filters=4, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=2, codebook_size=16, codebook_dim=8, vector_quantization_hidden_dimension=8,
    upsample_groups=32, sliding_window=4, attention_bias=True,
)  # fmt: skip
VARIANTS = {
    "gqa-weightnorm": {},
    "resnet2-shortcut-noproj": dict(
        num_residual_layers=2, use_conv_shortcut=True, codebook_dim=32, vector_quantization_hidden_dimension=32,
        upsample_groups=16, num_key_value_heads=4,
    ),
    "resnet2-identity": dict(num_residual_layers=2),  # one block's output (still a sum) is the next one's input
}  # fmt: skip


def random_mimi(config: MimiConfig, weight_norm: bool = False, seed: int = 0) -> MimiModel:
    torch.manual_seed(seed)
    model = MimiModel(config).eval()
    if weight_norm:  # the SEANet decoder convs, so the file holds parametrizations.weight.original0/1
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and name.startswith("decoder") and "layers" in name:
                nn.utils.parametrizations.weight_norm(module)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("embed_sum"):
                t.normal_()
            elif name.endswith(("cluster_usage", ".scale", "layernorm.weight", "original0")):
                t.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                t.normal_(0.0, 0.1)
            elif "transformer" in name and t.dim() == 2:  # the 0.02 init leaves attention nearly uniform
                t.normal_(0.0, t.shape[1] ** -0.5)
    return model


def random_codes(config: MimiConfig, batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.codebook_size, (batch, config.num_quantizers, frames), generator=gen)  # [B, 32, F]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # chunk seams change float rounding only (~1e-6 of the peak); a lost state is >= 1e-3 of it
    assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def decode_in_chunks(decoder: StreamingMimiDecoder, codes: torch.Tensor, chunk: int, fused: bool = False
                     ) -> torch.Tensor:
    frames = codes.shape[-1]
    return torch.cat([decoder.decode_chunk(codes[..., i : i + chunk], fused) for i in range(0, frames, chunk)], -1)




@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    """(HF model, its saved dir, our codec loaded from the files, codes, reference audio)."""
    config = MimiConfig(**{**TINY, **VARIANTS[request.param]})
    model = random_mimi(config, weight_norm=request.param == "gqa-weightnorm")
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    codec = MimiCodec.from_pretrained(directory)
    codes = random_codes(config, 1, N_FRAMES)
    with torch.no_grad():
        reference = model.decode(codes).audio_values  # [1, 1, N * 1920]
    return model, directory, codec, codes, reference


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_chunked_decode_equals_transformers(tiny, chunk):
    _, _, codec, codes, reference = tiny
    assert reference.shape == (1, 1, N_FRAMES * 1920) and codec.frame_size == 1920
    with codec.decoder.streaming(1):
        close(decode_in_chunks(codec.decoder, codes, chunk), reference)


def test_one_shot_decode_equals_transformers(tiny):
    _, _, codec, codes, reference = tiny
    close(codec.decode(codes), reference)


def test_chunks_longer_than_the_key_ring_go_through_in_pieces(tiny):
    # more transformer steps than RING_STEPS at once: one-shot, and chunks of RING_STEPS / 2 + 1 frames
    model, _, codec, _, _ = tiny
    frames = RING_STEPS + 3
    codes = random_codes(model.config, 1, frames, seed=3)
    with torch.no_grad():
        reference = model.decode(codes).audio_values
    close(codec.decode(codes), reference)
    with codec.decoder.streaming(1):
        close(decode_in_chunks(codec.decoder, codes, RING_STEPS // 2 + 1), reference)


def force_stride8_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The SEANet's stride-8 transposed conv as a matmul (`path` "matmul") or through the conv ("conv"), whatever
    the streams and steps (`codec.BY_STEPS_ROWS`, `codec.BY_STEPS_STREAMS`)."""
    monkeypatch.setattr(codec_module, "BY_STEPS_ROWS", 0 if path == "matmul" else 10**9)
    monkeypatch.setattr(codec_module, "BY_STEPS_STREAMS", 10**9)


@pytest.mark.parametrize("path", ["matmul", "conv"])
def test_stride8_layer_as_a_matmul_or_through_cudnn_decodes_the_same(tiny, path, monkeypatch):
    force_stride8_path(monkeypatch, path)
    _, _, codec, codes, reference = tiny
    with codec.decoder.streaming(1):
        close(decode_in_chunks(codec.decoder, codes, 2), reference)


@pytest.mark.parametrize(("streams", "frames", "matmul"), [(1, 2, False), (4, 8, True), (64, 1, True), (128, 1, False)])
def test_stride8_layer_takes_the_matmul_from_64_rows_below_128_streams(tiny, streams, frames, matmul, monkeypatch):
    """Streams x steps (2 a frame) from BY_STEPS_ROWS, below BY_STEPS_STREAMS streams: where the matmul was faster
    on an H200."""
    calls, layer = [], codec_module._CausalConvTranspose1d
    steps = layer._steps
    monkeypatch.setattr(layer, "_steps", lambda self, x: calls.append(x.shape) or steps(self, x))
    model, _, codec, _, _ = tiny
    codec.decode(random_codes(model.config, streams, frames))
    assert bool(calls) == matmul


@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("path", ["matmul", "conv"])
def test_two_streams_keep_time_major_states_and_decode_the_same(tiny, path, kernels, monkeypatch):
    """The SEANet's states are [B, C, T] stored as [B, T, C] (`codec._time_major`), and two different streams'
    chunks, through either path of the stride-8 transposed conv, as torch ops or through the fused kernels
    (`kernels.seanet_sum`, `kernels.matmul_f32`; Triton's interpreter here), equal transformers' one-shot decode of
    both."""
    force_stride8_path(monkeypatch, path)
    model, _, codec, _, _ = tiny
    if kernels == "fused":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # conftest: without a GPU
            pytest.skip("CPU tensors need Triton's interpreter; test_codec_cuda runs the fused passes on the GPU")
        from csmcli import kernels as kernels_module

        monkeypatch.setattr(kernels_module, "MATMUL_F32_MIN_ROWS", 1)  # the transformer's few rows too
    codes = random_codes(model.config, 2, N_FRAMES, seed=4)  # [2, K, N]
    with torch.no_grad():
        reference = model.decode(codes).audio_values  # [2, 1, N * frame]
    with codec.decoder.streaming(2):
        convs = [s for s in codec.decoder.state_tensors() if s.dim() == 3]  # [B, C, T] histories and tails
        assert convs and all(s.transpose(1, 2).is_contiguous() for s in convs)
        close(decode_in_chunks(codec.decoder, codes, 3, fused=kernels == "fused"), reference)


@pytest.mark.parametrize("path", ["matmul", "conv"])
def test_convs_read_their_weights_in_place(tiny, path, monkeypatch):
    """Built, loaded (also by assignment) and moved, the SEANet's conv weights are stored so that the 2-d convs
    and the stride-8 matmul read them as they are (no copy), so weights loaded in place later decode like a
    decoder built from them."""
    force_stride8_path(monkeypatch, path)
    model, _, codec, codes, _ = tiny
    decoder = copy.deepcopy(codec.decoder)
    convs = (codec_module._CausalConv1d, codec_module._CausalConvTranspose1d)

    def read_in_place() -> bool:
        weights = [m.conv.weight for m in decoder.decoder.modules() if isinstance(m, convs)]
        return bool(weights) and all(codec_module._nhwc_weight(w).data_ptr() == w.data_ptr() for w in weights)

    assert read_in_place()  # as `from_state_dict` made them
    decoder.load_state_dict({k: v.contiguous() for k, v in decoder.state_dict().items()}, assign=True)
    assert read_in_place()  # plain tensors assigned, then laid out again
    decoder.to(torch.float64).to(torch.float32)
    assert read_in_place()
    decoder.decode(codes)  # first use before the new weights
    other = StreamingMimiDecoder.from_state_dict(model.config, random_mimi(model.config, seed=5).state_dict())
    decoder.load_state_dict(other.state_dict())  # copied into the existing tensors
    close(decoder.decode(codes), other.decode(codes))


def test_plain_conv_weights_are_copied_to_channels_last():
    weight = torch.randn(6, 5, 3)  # [O, I, k], contiguous
    nhwc = codec_module._nhwc_weight(weight)  # [O, I, 1, k]
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and nhwc.data_ptr() != weight.data_ptr()
    assert torch.equal(nhwc, weight.unsqueeze(2))


def test_stateless_chunks_do_not_match(tiny):
    # decoding each frame with a fresh state is the clicking bug; the comparison above must be able to see it
    _, _, codec, codes, reference = tiny
    stateless = torch.cat([codec.decode(codes[..., i : i + 1]) for i in range(N_FRAMES)], -1)
    with pytest.raises(AssertionError):
        close(stateless, reference)


def test_reset_and_reentry_repeat_the_utterance(tiny):
    _, _, codec, codes, _ = tiny
    with codec.decoder.streaming(1):
        first = decode_in_chunks(codec.decoder, codes, 2)
        codec.decoder.reset()
        second = decode_in_chunks(codec.decoder, codes, 2)
    with codec.decoder.streaming(1):
        third = decode_in_chunks(codec.decoder, codes, 2)
    assert torch.equal(first, second) and torch.equal(first, third)
    with pytest.raises(RuntimeError):
        codec.decoder.decode_chunk(codes)  # outside streaming(): no state to use


def test_batch_equals_each_alone(tiny):
    model, _, codec, codes, reference = tiny
    other = random_codes(model.config, 1, N_FRAMES, seed=7)
    with codec.decoder.streaming(2):
        both = decode_in_chunks(codec.decoder, torch.cat([codes, other]), 3)  # [2, 1, N * 1920]
    close(both[:1], reference)
    close(both[1:], codec.decode(other))
    assert not torch.allclose(both[0], both[1])


def test_nested_and_legacy_weight_norm_layouts_load(tiny):
    model, directory, _, codes, reference = tiny
    nested = model.state_dict()  # transformers 5.23 nests the halves in memory; files are flat
    if any(k.startswith("decoder.decoder_seanet.") for k in nested):
        assert not any(k.startswith("decoder.decoder_seanet.") for k in flatten_mimi_state_dict(nested))
    close(StreamingMimiDecoder.from_state_dict(model.config, nested).decode(codes), reference)
    flat = load_file(directory / "model.safetensors")
    legacy = {  # pre-parametrization `nn.utils.weight_norm` names
        k.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v"
        ): t
        for k, t in flat.items()
    }
    close(StreamingMimiDecoder.from_state_dict(model.config, legacy).decode(codes), reference)


def test_csm_state_dict_loads(tiny):
    model, directory, _, codes, reference = tiny
    csm = {"codec_model." + k: t for k, t in load_file(directory / "model.safetensors").items()}
    csm["backbone_model.norm.weight"] = torch.ones(4)
    codec = MimiCodec.from_csm_state_dict(csm, model.config.to_dict(), source="csm.safetensors")
    close(codec.decode(codes), reference)


@pytest.mark.parametrize(
    "key",
    [
        "decoder_transformer.layers.1.mlp.fc1.weight",
        "quantizer.acoustic_residual_vector_quantizer.layers.30.codebook.embed_sum",
    ],
)
def test_missing_or_misshaped_weight_names_file_and_key(tiny, key, tmp_path):
    model, directory, _, _, _ = tiny
    weights = load_file(directory / "model.safetensors")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    save_file({k: t for k, t in weights.items() if k != key}, tmp_path / "model.safetensors")
    with pytest.raises(CsmError, match=rf"{tmp_path}/model\.safetensors: missing Mimi weight '{key}'"):
        MimiCodec.from_pretrained(tmp_path)
    misshaped = {**weights, key: weights[key][:-1]}
    with pytest.raises(CsmError, match=rf"csm\.safetensors.*{key}.*shape"):
        MimiCodec(model.config, misshaped, source="csm.safetensors")


def test_corrupt_mimi_files_are_one_clear_error(tiny, tmp_path):
    _, directory, _, _, _ = tiny
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CsmError, match=r"model\.safetensors: not a readable safetensors file"):
        MimiCodec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CsmError, match=r"config\.json: not valid JSON"):
        MimiCodec.from_pretrained(tmp_path)


def test_encode_equals_transformers(tiny):
    model, _, codec, _, _ = tiny
    pcm = torch.randn(2, 1, 4 * 1920 + 100, generator=torch.Generator().manual_seed(3))  # [B, 1, T] at 24 kHz
    with torch.no_grad():
        expected = model.encode(pcm).audio_codes  # [B, 32, F]
    codes = codec.encode(pcm)
    assert codes.shape == (2, 32, 5) and codes.dtype == torch.long
    assert torch.equal(codes, expected)


def test_default_config_streams_like_transformers():
    """The real kyutai/mimi sizes (random weights): 6 frames in chunks of 1 and 3, and one-shot."""
    config = MimiConfig()
    with contextlib.suppress(AttributeError, ValueError):
        config.encoder_config = None  # transformers >= 5.2x: skip building the encoder half (seconds on 2 cores)
    model = random_mimi(config)
    decoder = StreamingMimiDecoder.from_state_dict(config, model.state_dict(), source="default")
    codes = random_codes(config, 1, 6)
    with torch.no_grad():
        reference = model.decode(codes).audio_values
    assert reference.shape[-1] == 6 * 1920 == 6 * math.prod(config.upsampling_ratios) * 2
    close(decoder.decode(codes), reference)
    for chunk in (1, 3):
        with decoder.streaming(1):
            close(decode_in_chunks(decoder, codes, chunk), reference)


def test_csm_extra_ids_decode_as_the_last_mimi_id():
    """CSM's audio vocabulary has 2051 ids, Mimi's codebooks 2048: ids 2048..2050 must decode like 2047 (the clamp),
    not read the next codebook's rows (a middle codebook) or past the table (the last one)."""
    config = MimiConfig(**{**TINY, "codebook_size": 2048})
    decoder = MimiCodec(config, random_mimi(config).state_dict(), source="random").decoder
    codes = random_codes(config, 1, 6)  # [1, 32, 6] in [0, 2048)
    extra = codes.clone()
    extra[0, -1, :3] = torch.tensor([2048, 2049, 2050])  # the last codebook: past the stacked table
    extra[0, 5, 3:] = torch.tensor([2048, 2049, 2050])  # a middle one: would read codebook 6's first rows
    clamped = extra.clamp(max=2047)
    assert not torch.equal(clamped, codes)
    out = decoder.decode(extra)
    assert out.shape == (1, 1, 6 * 1920) and torch.isfinite(out).all()
    assert torch.equal(out, decoder.decode(clamped))
    assert not torch.allclose(out, decoder.decode(codes))  # the changed positions do reach the audio


def test_the_test_checkpoint_and_random_codecs_tell_codes_apart(hf_checkpoint):
    """transformers starts Mimi's codebooks at zero, so every code decoded to the same audio: the CLI tests that
    compare audio files could not see a wrong code. The tiny checkpoint (loaded as a user's download is) and
    `random_codec` (--random-weights, bench) now have random codebooks."""
    from tiny import tiny_mimi_config  # tests/tiny.py ("tiny" is a fixture here)

    from csmcli.checkpoint import load
    from csmcli.pipeline import load_codec, random_codec

    cpu = torch.device("cpu")
    ck = load(str(hf_checkpoint), device=cpu)
    torch.manual_seed(3)
    a, b = torch.randint(0, 2048, (2, 1, 32, 6))  # [B, 32, n] each
    for codec in (load_codec(ck, None, cpu), random_codec(cpu, tiny_mimi_config())):
        with torch.inference_mode():
            assert not torch.equal(codec.decode(a), codec.decode(b))


@pytest.mark.parametrize("name", sorted(codec_module.ACTIVATIONS))
def test_activations_compute_what_transformers_names_them(name):
    """csmcli maps Mimi's `hidden_act` to torch modules without importing transformers.activations (seconds of
    start-up): each must compute transformers' ACT2FN of the same name bit for bit."""
    from transformers.activations import ACT2FN

    x = torch.randn(4096) * 4
    assert torch.equal(codec_module.ACTIVATIONS[name]()(x), ACT2FN[name](x))
    # the fused products take exact GELU into their epilogue, and nothing else
    assert codec_module._is_exact_gelu(codec_module.ACTIVATIONS[name]()) == (name == "gelu")


def test_an_activation_csmcli_does_not_run_is_one_error():
    config = MimiConfig(**TINY, hidden_act="quick_gelu")
    with pytest.raises(CsmError, match="unsupported Mimi config for streaming decode: hidden_act='quick_gelu'"):
        StreamingMimiDecoder(config)


CONFIG_DICTS = {
    "defaults": {},
    "tiny": TINY,
    **{name: {**TINY, **variant} for name, variant in VARIANTS.items()},
    "saved by transformers": MimiConfig(**TINY).to_dict(),
    # as transformers 4.x saved it (CSM's codec_config): top-level RoPE theta, rope_scaling, frame_rate, Nones
    "transformers 4": dict(rope_theta=5000.0, rope_scaling=None, frame_rate=12.5, head_dim=None,
                           upsampling_ratios=None, model_type="mimi", transformers_version="4.52.0"),
    "rope_parameters without a type": dict(rope_parameters={"rope_theta": 7000.0}),
    "rope_scaling over rope_parameters": dict(rope_scaling={"type": "linear", "factor": 2.0},
                                              rope_parameters={"rope_type": "default", "rope_theta": 1.0}),
    "partial rotary": dict(partial_rotary_factor=0.5),
    "derived sizes": dict(hidden_size=96, num_attention_heads=3, head_dim=0, upsampling_ratios=[],
                          sampling_rate=16000, frame_rate=None, upsample_groups=32),
    "other ratios": dict(upsampling_ratios=[4, 5, 6], sampling_rate=32000, codebook_dim=128),
    "ints for floats": dict(norm_eps=1e-6, trim_right_ratio=0.5, frame_rate=25),
    "_frame_rate over frame_rate": dict(frame_rate=25.0, _frame_rate=None),
    "_frame_rate over frame_rate, given": dict(frame_rate=12.5, _frame_rate=25.0),
    "partial rotary None": dict(partial_rotary_factor=None),
}


@pytest.mark.parametrize("raw", list(CONFIG_DICTS.values()), ids=list(CONFIG_DICTS))
def test_codec_config_reads_what_transformers_mimi_config_reads(raw):
    """csmcli reads Mimi's config.json without transformers (its config classes cost seconds of a start-up): every
    setting, default and derived value must be what `MimiConfig.from_dict` makes of the same dict."""
    ours = codec_module.CodecConfig.from_dict(copy.deepcopy(raw))
    ref = MimiConfig.from_dict(copy.deepcopy(raw))
    rope = {"partial_rotary_factor": 1.0, **ref.rope_parameters}
    for f in dataclasses.fields(ours):
        if f.name == "source":
            continue
        expected = rope[f.name] if f.name in rope else getattr(ref, f.name)
        assert getattr(ours, f.name) == (tuple(expected) if f.name == "upsampling_ratios" else expected), f.name
    assert (ours.frame_size, ours.encodec_frame_rate, ours.latent_stride) == (
        ref.frame_size, ref.encodec_frame_rate, int(ref.encodec_frame_rate / ref.frame_rate))
    assert ours.source == raw
    # and a transformers MimiConfig given as it is reads the same
    assert codec_module.CodecConfig.from_dict(ref) == ours


@pytest.mark.parametrize("raw", [
    {"hidden_size": "512"}, {"hidden_size": 1.5}, {"hidden_size": True}, {"upsampling_ratios": "8654"},
    {"upsampling_ratios": [8, 6.0]}, {"use_causal_conv": 1}, {"hidden_act": 3}, {"sliding_window": 2.5},
    {"num_semantic_quantizers": 32},
])  # fmt: skip
def test_codec_config_refuses_what_transformers_refuses_in_one_line(raw):
    with pytest.raises(Exception):  # noqa: B017 - the reference: transformers refuses each
        MimiConfig.from_dict(copy.deepcopy(raw))
    _refused_in_one_line(raw)


@pytest.mark.parametrize("raw", [
    {"rope_parameters": {"rope_theta": "big"}}, {"model_type": "encodec"}, {"num_attention_heads": 0},
    {"codebook_size": 1000}, "kyutai/mimi", ["not", "a", "mapping"], {"rope_scaling": "default"},
    {"rope_parameters": [1, 2]}, {"upsampling_ratios": [8, 0]}, {"sampling_rate": 0}, {"frame_rate": 0},
    {"frame_rate": -12.5}, {"upsample_groups": 7}, {"sliding_window": None}, {"hidden_act": None},
    {"num_key_value_heads": 0}, {"codebook_dim": 0}, {"frame_rate": 50.0},
])  # fmt: skip
def test_codec_config_refuses_what_would_fail_later_in_one_line(raw):
    """Values that would fail later (in torch, or in transformers' encoder), and a codebook size not a power of 2,
    which transformers refuses only in later 5.x releases (5.24 does, the GPU image's 5.17 does not)."""
    _refused_in_one_line(raw)


def _refused_in_one_line(raw):
    with pytest.raises(CsmError) as error:
        codec_module.CodecConfig.from_dict(raw, "x/config.json")
    assert str(error.value).startswith("x/config.json: ") and "\n" not in str(error.value)


def test_partial_rotary_is_refused_for_streaming_decode():
    with pytest.raises(CsmError, match=r"unsupported Mimi config for streaming decode: partial_rotary_factor=0\.5"):
        StreamingMimiDecoder({**TINY, "partial_rotary_factor": 0.5})


def test_codec_config_none_codebook_dim_is_the_hidden_size():
    """transformers 4.x's rule (5.x refuses None there): such a file still loads."""
    config = {"hidden_size": 64, "upsample_groups": 64, "codebook_dim": None}
    assert codec_module.CodecConfig.from_dict(config).codebook_dim == 64


def test_encoding_with_a_config_only_transformers_refuses_is_one_line(tiny):
    """csmcli reads `trim_right_ratio: 1` (an integer for a float) and decodes with it; transformers' strict
    `MimiConfig`, which builds the encoder for context audio, refuses it: that is one `CsmError` line too."""
    model, _, _, _, _ = tiny
    codec = MimiCodec({**model.config.to_dict(), "trim_right_ratio": 1}, model.state_dict(), "x/model.safetensors")
    with pytest.raises(CsmError) as error:
        codec.encode(torch.zeros(1, 1, 1920))
    message = str(error.value)
    assert message.startswith("x/model.safetensors: transformers' MimiConfig refuses") and "\n" not in message
