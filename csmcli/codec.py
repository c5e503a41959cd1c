"""Mimi codec for CSM: our own stateful streaming decoder, plus encoding of context audio.

Decoding N frames chunk by chunk inside `streaming()` gives exactly what transformers' one-shot
`MimiModel.decode` gives for all N at once: every causal conv keeps its left context, every transposed conv keeps
its overlap-add tail, and the decoder transformer keeps a sliding-window KV cache with positions that continue.
Decoding chunks independently instead is what produces the clicks users report on csm-streaming.

Every state buffer is preallocated by `streaming(batch_size)` and updated in place, and a chunk of fixed size
does fixed-shape work with no host sync, so an engine can capture one `decode_chunk` in a CUDA graph.

Dtypes: the decoder runs in float32. `MimiCodec.to(device, transformer_dtype=torch.bfloat16)` runs only the
decoder transformer (and its KV cache) in bf16; the quantizer, the upsampling and the SEANet convs stay float32
because they produce the waveform directly and bf16's 8-bit mantissa is audible there.

Weights load from a flat Mimi state dict (the layout of `kyutai/mimi` files and of `codec_model.*` in CSM's HF
checkpoint). transformers 5.23's in-memory `MimiModel` nests the halves (`decoder.decoder_seanet.layers`, ...);
`flatten_mimi_state_dict` maps that back, and folds weight norm (`weight_g`/`weight_v` or parametrizations).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csmcli.errors import CsmError

CSM_NUM_CODEBOOKS = 32
BY_STEPS_ROWS = 64
"""Streams x steps from which the stride-8 transposed conv runs as a matmul (below: cuDNN). One stream's 8-frame
chunk (16 steps) took 0.20 ms as a matmul against cuDNN's 0.09 on an H200 (an earlier session)."""
BY_STEPS_STREAMS = 128
"""Streams from which it runs through cuDNN again, whatever the steps: cuDNN's speed depends on the streams (its
algorithm choice), the matmul's on the rows. 8-frame chunks on an H200 (twenty-sixth session, docs/BENCHMARKS.md):
matmul / cuDNN 0.20 / 0.27 ms at 16 streams, 0.45 / 0.99 at 64, 0.89 / 0.34 at 128, 1.76 / 0.61 at 256."""
RING_STEPS = 32
"""Transformer steps (two per frame) decoded together at most: longer chunks go through the transformer in pieces.
Each layer's key ring holds the window and one piece; 16 frames covers every preset's chunk."""
_USAGE_EPS = 1e-5  # MimiEuclideanCodebook: embed = embed_sum / cluster_usage.clamp(min=eps)

# (flat prefix, transformers 5.23 nested prefix). Files are flat; 5.23's MimiModel.state_dict() is nested.
_LAYOUT = (
    ("encoder.layers.", "encoder.encoder_seanet.layers."),
    ("encoder_transformer.", "encoder.encoder_transformer."),
    ("downsample.", "encoder.downsample."),
    ("upsample.", "decoder.upsample."),
    ("decoder_transformer.", "decoder.decoder_transformer."),
    ("decoder.layers.", "decoder.decoder_seanet.layers."),
)
_TO_FLAT = tuple((nested, flat) for flat, nested in _LAYOUT)
_DECODER_PREFIXES = ("upsample.", "decoder_transformer.", "decoder.")  # decoder half, flat or nested
# (g, v) suffixes of weight norm: old `nn.utils.weight_norm`, then `nn.utils.parametrizations.weight_norm`
_WEIGHT_NORM = (
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CodecConfig:
    """The Mimi settings csmcli reads, with transformers' `MimiConfig` defaults and derived values (tests hold the
    two equal over configs as transformers 4.x and 5.x save them, and variants). Read without transformers:
    importing its config classes pulled in its generation code and torch._dynamo with transformers 5.17 (~3 s on
    2 CPU cores, 6-8 s of a start-up on the GPU image), and a decode needs none of it."""

    sampling_rate: int = 24_000
    audio_channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "constant"
    compress: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    use_conv_shortcut: bool = False
    vector_quantization_hidden_dimension: int = 256
    num_semantic_quantizers: int = 1
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    sliding_window: int = 250
    attention_bias: bool = False
    rope_type: str = "default"
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    frame_rate: float = 12.5
    """Codes a second: a config's own (transformers saves `_frame_rate`, older ones `frame_rate`), else derived."""
    source: Mapping[str, Any] = field(kw_only=True, compare=False, repr=False)
    """The dict it was read from: transformers' `MimiModel` is built from it to encode context audio. Required, so
    that every config comes through `from_dict` (keywords alone would skip its derived values and checks)."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "Mimi config") -> CodecConfig:
        """config.json's dict (or a `codec_config`, or transformers' `MimiConfig`) -> settings, as transformers'
        `MimiConfig.from_dict` reads them; keys csmcli does not use are ignored. A value of the wrong type, or one
        the decoder cannot be built with (a size below 1, ...), is one `CsmError` line."""
        if hasattr(raw, "to_dict"):  # transformers' MimiConfig itself (tests, random weights)
            raw = raw.to_dict()
        if not isinstance(raw, Mapping):
            raise CsmError(f"{where}: {raw!r} is not a mapping of Mimi's settings")
        if raw.get("model_type", "mimi") != "mimi":
            raise CsmError(f"{where}: model_type is {raw.get('model_type')!r}, expected a Mimi codec ('mimi')")
        plain = [f for f in fields(cls) if f.name not in _DERIVED]
        values = {f.name: _checked(raw[f.name], f.default, f"{where}: {f.name}") for f in plain if f.name in raw}
        # None stands for "derive it" where transformers lets it (4.x saved such Nones)
        values["upsampling_ratios"] = _checked(raw.get("upsampling_ratios") or cls.upsampling_ratios, (),
                                               f"{where}: upsampling_ratios")
        hidden = values.get("hidden_size", cls.hidden_size)
        heads = values.get("num_attention_heads", cls.num_attention_heads)
        if heads < 1:
            raise CsmError(f"{where}: num_attention_heads is {heads}, expected at least 1")
        values["head_dim"] = _checked(raw.get("head_dim") or hidden // heads, 0, f"{where}: head_dim")
        codebook_dim = raw.get("codebook_dim", cls.codebook_dim)
        values["codebook_dim"] = _checked(hidden if codebook_dim is None else codebook_dim, 0, f"{where}: codebook_dim")
        # RoPE as transformers standardises it: `rope_scaling` (older files) over `rope_parameters`, a top-level
        # `rope_theta` and the type "default" filling in what neither says
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        if not isinstance(rope, Mapping):
            raise CsmError(f"{where}: rope_parameters is {rope!r}, expected a mapping")
        values["rope_theta"] = _checked(rope.get("rope_theta", raw.get("rope_theta", cls.rope_theta)), 0.0,
                                        f"{where}: rope_theta")
        values["rope_type"] = _checked(rope.get("rope_type", rope.get("type", "default")), "", f"{where}: rope_type")
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
        values["partial_rotary_factor"] = _checked(1.0 if partial is None else partial, 0.0,
                                                   f"{where}: partial_rotary_factor")
        if any(ratio < 1 for ratio in values["upsampling_ratios"]):
            raise CsmError(f"{where}: upsampling_ratios is {list(values['upsampling_ratios'])}, expected sizes of 1 "
                           "or more")
        for name in _POSITIVE:
            if values.get(name, 1) < 1:
                raise CsmError(f"{where}: {name} is {values[name]}, expected at least 1")
        frame_rate = raw["_frame_rate"] if "_frame_rate" in raw else raw.get("frame_rate")
        sampling_rate = values.get("sampling_rate", cls.sampling_rate)
        frame_rate = sampling_rate / _frame_size(values["upsampling_ratios"]) if frame_rate is None else frame_rate
        values["frame_rate"] = _checked(frame_rate, 0.0, f"{where}: frame_rate")
        config = cls(**values, source=dict(raw))
        if not config.frame_rate > 0 or config.latent_stride < 1:
            raise CsmError(f"{where}: frame_rate {config.frame_rate} does not fit its transformer's steps "
                           f"({config.encodec_frame_rate} a second)")
        if config.latent_stride > 1 and config.hidden_size % config.upsample_groups:
            raise CsmError(f"{where}: upsample_groups ({config.upsample_groups}) must divide hidden_size "
                           f"({config.hidden_size})")
        if config.num_semantic_quantizers >= config.num_quantizers:
            raise CsmError(f"{where}: num_semantic_quantizers ({config.num_semantic_quantizers}) must be below "
                           f"num_quantizers ({config.num_quantizers})")
        if config.codebook_size & (config.codebook_size - 1):
            raise CsmError(f"{where}: codebook_size must be a power of 2, not {config.codebook_size}")
        return config

    @property
    def frame_size(self) -> int:
        return _frame_size(self.upsampling_ratios)

    @property
    def encodec_frame_rate(self) -> int:
        """The transformer's steps a second."""
        return math.ceil(self.sampling_rate / math.prod(self.upsampling_ratios))

    @property
    def latent_stride(self) -> int:
        """The transformer's steps a frame of codes (2: codes at 12.5 Hz are upsampled to 25 Hz)."""
        return int(self.encodec_frame_rate / self.frame_rate)


_DERIVED = ("upsampling_ratios", "head_dim", "codebook_dim", "rope_type", "rope_theta", "partial_rotary_factor",
            "frame_rate", "source")  # where transformers derives a value or lets None stand for one
_POSITIVE = ("sampling_rate", "audio_channels", "hidden_size", "num_filters", "kernel_size", "last_kernel_size",
             "residual_kernel_size", "dilation_growth_rate", "compress", "codebook_size", "codebook_dim",
             "num_quantizers", "vector_quantization_hidden_dimension", "upsample_groups", "intermediate_size",
             "num_key_value_heads", "head_dim")


def _frame_size(upsampling_ratios: tuple[int, ...]) -> int:
    """Samples a frame of codes: the SEANet's strides and the 2x downsampling (transformers' `frame_size`)."""
    return math.prod(upsampling_ratios) * 2


def _checked(value: Any, like: Any, what: str) -> Any:
    """`value` if it has the type of the default `like` (an int may stand for a float; a list of ints for a
    tuple)."""
    if isinstance(like, tuple):
        ok = isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value, expected = (tuple(value) if ok else value), "a list of integers"
    elif isinstance(like, float):
        ok, expected = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    elif isinstance(like, int) and not isinstance(like, bool):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, expected = isinstance(value, type(like)), type(like).__name__
    if not ok:
        raise CsmError(f"{what} is {value!r}, expected {expected}")
    return value


# ---------------------------------------------------------------------------------------------------- streaming


def _time_major(like: Tensor, batch: int, channels: int, steps: int) -> Tensor:
    """An empty [B, C, T] tensor stored as [B, T, C] (the transformer's and the dequantizer's layout), on `like`'s
    device. The SEANet keeps every activation and state so and runs its convs as 2-d convs over a height of 1 in
    channels-last (NHWC): the layout cuDNN's fastest conv kernels read and write; fed channels-first they transpose
    around each conv, and `conv1d` does not pick NHWC on its own. On an H200 an 8-frame chunk's SEANet convs took
    3.1 instead of 4.2 ms at 64 streams, 8.4 instead of 12.7 at 256; on 2 CPU cores one stream's 2-frame chunk
    decodes in ~35 instead of ~60 ms, four streams' 8-frame chunk in ~142 instead of ~205 (docs/BENCHMARKS.md,
    twenty-sixth session)."""
    return like.new_empty(batch, steps, channels).transpose(1, 2)


def _nhwc_weight(weight: Tensor) -> Tensor:
    """A conv's `weight` [O, I, k] as [O, I, 1, k] in channels-last: a view of the weight itself when it is stored
    that way (`StreamingMimiDecoder._lay_out_conv_weights`), else a copy. A view, not a cached
    copy, so weights loaded in place reach the convs (and captured CUDA graphs) at once."""
    w = weight.unsqueeze(2)
    return w if w.is_contiguous(memory_format=torch.channels_last) else w.contiguous(memory_format=torch.channels_last)


class _StreamingModule(nn.Module):
    """A layer whose per-utterance state exists only inside `StreamingMimiDecoder.streaming()`."""

    def __init__(self) -> None:
        super().__init__()
        self._state: Any = None

    def init_state(self, batch_size: int) -> Any:
        raise NotImplementedError

    @property
    def state(self) -> Any:
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__} needs `with decoder.streaming(batch_size):`")
        return self._state


@dataclass
class _ConvState:
    history: Tensor  # [B, C_in, effective_kernel - 1]: last inputs, the left context of the next chunk


@dataclass
class _ConvTransposeState:
    tail: Tensor  # [B, C_out, kernel - stride]: overlap-add tail (bias-free) that the next chunk completes


@dataclass
class _KVState:
    k: Tensor  # [B, H_kv, slots, D]: a ring of rotated keys, position p in slot p % slots
    v: Tensor  # [B, H_kv, slots, D]


@dataclass
class _PositionState:
    offset: Tensor  # [] int64: transformer position of the chunk's first step; continues across chunks


@dataclass
class _Activation:
    """A SEANet activation [B, C, T] (time-major) not yet written out: a conv's output `x` plus `bias`, plus `skip`
    plus `skip_bias` (a resnet block's input, added after it). With the fused kernels the convs leave their bias
    out and one pass (`kernels.seanet_sum`) adds the biases and the skip and applies the ELU before the next conv,
    writing straight into its padded input: cuDNN adds a bias in a pass of its own, and at 64 streams those adds,
    the residual adds and the ELUs took ~2.2 ms of an 8-frame chunk's 6.7 on an H200 (docs/BENCHMARKS.md,
    twenty-seventh session). In the torch path the convs add their own bias (the CPU's convs fuse it)."""

    x: Tensor
    bias: Tensor | None = None
    skip: Tensor | None = None
    skip_bias: Tensor | None = None

    def write(self, elu: bool, fused: bool, out: Tensor | None = None) -> Tensor:
        """The value, ELU'd if asked, into `out` (time-major [B, C, T], e.g. a slice of a padded input) or a new
        tensor."""
        if self.bias is None and self.skip is None and not elu:
            return self.x if out is None else out.copy_(self.x)
        if fused:
            from csmcli import kernels  # here, so CPU-only installs never need Triton

            return kernels.seanet_sum(self.x, self.bias, self.skip, self.skip_bias, elu, out)
        y = self.x if self.bias is None else self.x + self.bias[:, None]
        if self.skip is not None:
            y = (self.skip if self.skip_bias is None else self.skip + self.skip_bias[:, None]) + y
        if not elu:
            return y if out is None else out.copy_(y)
        # the same kernel as nn.ELU, so the same values; into `out` without a copy
        return F.elu(y) if out is None else torch.ops.aten.elu.out(y, 1.0, 1, 1, out=out)


class _CausalConv1d(_StreamingModule):
    """Stride-1 causal conv. One-shot Mimi left-pads with zeros; streaming starts from a zero history instead.

    With `elu_input` the conv applies the ELU that precedes it in Mimi itself, writing it straight into the padded
    input (history, then the chunk): one pass over the chunk instead of an ELU pass and a copy (a concatenation)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1, elu_input: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, dilation=dilation)
        self.context = (kernel - 1) * dilation
        self.elu_input = elu_input

    def init_state(self, batch_size: int) -> _ConvState:
        return _ConvState(_time_major(self.conv.weight, batch_size, self.conv.in_channels, self.context).zero_())

    def forward(self, h: _Activation, elu: bool, fused: bool) -> _Activation:  # [B, C_in, T] -> [B, C_out, T]
        """`elu`: an ELU before this conv (as well as `elu_input`); `fused`: see `_Activation`."""
        elu = elu or self.elu_input
        if self.context == 0:  # nothing carried across chunks
            return self._conv(h.write(elu, fused), fused)
        history, (b, c, t) = self.state.history, h.x.shape
        padded = _time_major(h.x, b, c, self.context + t)  # [B, C_in, context + T]
        padded[..., : self.context] = history
        h.write(elu, fused, out=padded[..., self.context :])
        history.copy_(padded[..., t:])
        return self._conv(padded, fused)

    def _conv(self, x: Tensor, fused: bool) -> _Activation:  # [B, C_in, T'] -> [B, C_out, T' - context]
        conv = self.conv
        w = _nhwc_weight(conv.weight)  # [C_out, C_in, 1, k]
        y = F.conv2d(x.unsqueeze(2), w, None if fused else conv.bias, dilation=(1, conv.dilation[0])).squeeze(2)
        return _Activation(y, conv.bias) if fused else _Activation(y)


class _CausalConvTranspose1d(_StreamingModule):
    """Transposed conv whose one-shot output is trimmed by kernel - stride on the right (Mimi, trim_right_ratio 1).

    Those trimmed samples are exactly the ones the next input would still add to, so each chunk emits T * stride
    samples and carries its last kernel - stride (without bias, which the emitting chunk adds once) forward.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        if kernel > 2 * stride:  # otherwise a tail would span more than one following chunk
            raise ValueError(f"transposed conv needs kernel <= 2 * stride, got {kernel}, {stride}")
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel, stride, groups=groups, bias=bias)
        self.overlap = kernel - stride
        # The SEANet's stride-8 layer, over many streams' steps, as one float32 matmul (each input step's outputs)
        # overlap-added: cuDNN ran it with a generic kernel, 1.0 ms of a 64-stream, 8-frame chunk on an H200 (the
        # decoder's slowest layer) against 0.45. For one stream (16 steps) cuDNN was faster: 0.09 against 0.20 ms.
        self.by_steps = kernel == 2 * stride and groups == 1 and stride >= 8

    def init_state(self, batch_size: int) -> _ConvTransposeState:
        tail = _time_major(self.conv.weight, batch_size, self.conv.out_channels, self.overlap).zero_()
        return _ConvTransposeState(tail)

    def forward(self, x: Tensor, add_bias: bool = True) -> Tensor:  # [B, C_in, T] -> [B, C_out, T * stride]
        """`add_bias=False`: the caller adds the bias (`_Activation`)."""
        conv, tail = self.conv, self.state.tail
        streams, steps = x.shape[0], x.shape[-1]
        if self.by_steps and streams * steps >= BY_STEPS_ROWS and streams < BY_STEPS_STREAMS:
            y = self._overlap_add(self._steps(x))
        elif conv.groups == 1:  # [B, C_out, T*s + overlap], time-major
            w = _nhwc_weight(conv.weight)  # [C_in, C_out, 1, 2s]
            y = F.conv_transpose2d(x.unsqueeze(2), w, None, (1, conv.stride[0])).squeeze(2)
        else:
            y = F.conv_transpose1d(x, conv.weight, None, conv.stride, groups=conv.groups)  # [B, C_out, T*s + overlap]
        y[..., : self.overlap] += tail
        n = y.shape[-1] - self.overlap
        tail.copy_(y[..., n:])
        y = y[..., :n]
        return y if conv.bias is None or not add_bias else y + conv.bias[:, None]

    def _steps(self, x: Tensor) -> Tensor:  # [B, C_in, T] -> [B, T, 2s, C_out]: each input step's outputs
        w = self.conv.weight.transpose(1, 2)  # [C_in, 2s, C_out]: contiguous as `_lay_out_conv_weights` stores it
        b, c_in, t = x.shape
        w_steps = w.reshape(c_in, -1)  # [C_in, 2s C_out], a view
        steps = x.transpose(1, 2).reshape(b * t, c_in) @ w_steps  # [B T, 2s C_out]: one GEMM, not B small ones
        return steps.view(b, t, w.shape[1], -1)

    def _overlap_add(self, steps: Tensor) -> Tensor:  # [B, T, 2s, C] -> [B, C, (T + 1) s], time-major
        b, t, two_s, c = steps.shape
        s = two_s // 2
        y = _time_major(steps, b, c, (t + 1) * s)
        y_steps = y.transpose(1, 2)  # [B, (T + 1) s, C]
        y_steps[:, : t * s].view(b, t, s, c).copy_(steps[:, :, :s])
        y_steps[:, t * s :].zero_()
        y_steps[:, s:].view(b, t, s, c).add_(steps[:, :, s:])  # each step's second half overlaps the next one's
        return y


# ---------------------------------------------------------------------------------------------------- SEANet


class _ResnetBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel: int, dilation: int, conv_shortcut: bool) -> None:
        super().__init__()
        # indices 1 and 3 hold the convs: checkpoint keys are `block.1.conv.*`, `block.3.conv.*`. The ELU before
        # each conv runs inside it (`elu_input`); indices 0 and 2 stay, empty, for the keys.
        self.block = nn.Sequential(
            nn.Identity(), _CausalConv1d(dim, hidden, kernel, dilation, elu_input=True), nn.Identity(),
            _CausalConv1d(hidden, dim, 1, elu_input=True),
        )
        self.shortcut = _CausalConv1d(dim, dim, 1) if conv_shortcut else nn.Identity()

    def forward(self, h: _Activation, elu: bool, fused: bool) -> _Activation:
        """shortcut(h) + block(h), left unwritten: the next conv's input pass adds it up."""
        if elu or h.skip is not None:  # h is read twice: write it once
            h = _Activation(h.write(elu, fused))
        y = self.block[3](self.block[1](h, False, fused), False, fused)
        skip = h if isinstance(self.shortcut, nn.Identity) else self.shortcut(h, False, fused)
        return _Activation(y.x, y.bias, skip.x, skip.bias)


class _SeanetDecoder(nn.Module):
    """Latents at 25 Hz -> waveform: conv, then per ratio ELU + transposed conv + resnet blocks, then ELU + conv."""

    def __init__(self, c: CodecConfig) -> None:
        super().__init__()
        channels = 2 ** len(c.upsampling_ratios) * c.num_filters
        layers: list[nn.Module] = [_CausalConv1d(c.hidden_size, channels, c.kernel_size)]
        for ratio in c.upsampling_ratios:
            layers += [nn.ELU(), _CausalConvTranspose1d(channels, channels // 2, 2 * ratio, ratio)]
            channels //= 2
            layers += [
                _ResnetBlock(
                    channels,
                    channels // c.compress,
                    c.residual_kernel_size,
                    c.dilation_growth_rate**j,
                    c.use_conv_shortcut,
                )
                for j in range(c.num_residual_layers)
            ]
        layers += [nn.Identity(), _CausalConv1d(c.num_filters, c.audio_channels, c.last_kernel_size, elu_input=True)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:  # [B, hidden, 2n] -> [B, 1, n * frame_size]
        """`fused`: biases, residuals and ELUs through `kernels.seanet_sum` (see `_Activation`)."""
        h, elu = _Activation(x), False
        for layer in self.layers:
            if isinstance(layer, nn.ELU):  # applied by the next conv as it reads its input
                elu = True
            elif isinstance(layer, _CausalConvTranspose1d):
                y = layer(h.write(elu, fused), add_bias=not fused)
                h, elu = _Activation(y, layer.conv.bias if fused else None), False
            elif not isinstance(layer, nn.Identity):
                h, elu = layer(h, elu, fused), False
        return h.write(elu, fused)


# ---------------------------------------------------------------------------------------------------- transformer


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on halves (HF layout: Kyutai's interleaved q/k were permuted when converted)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class _Attention(_StreamingModule):
    def __init__(self, c: CodecConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=bias)
        self.slots = c.sliding_window - 1 + RING_STEPS  # the window before a piece's first step, and the piece

    def init_state(self, batch_size: int) -> _KVState:
        w = self.k_proj.weight
        shape = (batch_size, self.n_kv_heads, self.slots, self.head_dim)
        return _KVState(w.new_zeros(shape), w.new_zeros(shape))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Tensor, fused: bool) -> Tensor:
        """x [B, T, C] at ring slots `slots [T]`; `mask [T, slots]` (0 or -inf, added to the scores) says which
        slots each step sees. Returns the heads side by side [B, T, H D], before `o_proj` (the layer's). `fused`
        (float32, as many key/value heads as heads): `kernels.mimi_attention`, one kernel, instead of `_attention`."""
        q, k, v = (_linear(p, x, fused) for p in (self.q_proj, self.k_proj, self.v_proj))  # [B, T, H D] each
        attend = _attention
        if fused and x.dtype == torch.float32 and self.n_heads == self.n_kv_heads:
            from csmcli import kernels  # here, so CPU-only installs never need Triton

            attend = kernels.mimi_attention
        cache = self.state
        return attend(q, k, v, cos, sin, cache.k, cache.v, slots, mask, self.head_dim**-0.5)


def _attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_ring: Tensor, v_ring: Tensor,
               ring: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Mimi's attention for a piece of T steps as torch ops: projections q `[B, T, H D]`, k, v `[B, T, H_kv D]`,
    rotated by `cos, sin [T, D]`, k and v written into slots `ring [T]` of the key / value rings
    `[B, H_kv, slots, D]`, then softmax(scale q k^T + mask) v over the ring (`mask [T, slots]`). Returns
    `[B, T, H D]`. (`kernels.mimi_attention` is the same in one kernel.)"""
    b, t, _ = q.shape
    n_kv_heads, head_dim = k_ring.shape[1], k_ring.shape[3]
    q = q.view(b, t, -1, head_dim).transpose(1, 2)  # [B, H, T, D]
    k = k.view(b, t, -1, head_dim).transpose(1, 2)  # [B, H_kv, T, D]
    v = v.view(b, t, -1, head_dim).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    # Written into the ring in place: a shifted cache would copy the whole window twice a chunk (at 64 streams
    # ~0.5 GB per layer and chunk in float32). The keys' order does not matter to attention, only the mask.
    k_ring.index_copy_(2, ring, k)
    v_ring.index_copy_(2, ring, v)
    k, v = k_ring, v_ring  # [B, H_kv, slots, D]
    if q.shape[1] != n_kv_heads:
        k = k.repeat_interleave(q.shape[1] // n_kv_heads, dim=1)
        v = v.repeat_interleave(q.shape[1] // n_kv_heads, dim=1)
    # Two batched matmuls and a softmax, not SDPA: for a chunk's few steps over the window, PyTorch's only
    # float32 SDPA kernel (memory-efficient, 64-query tiles) took 0.40 ms a layer at 256 streams on an H200,
    # these 0.27 (0.135 -> 0.088 at 64 streams), equal to ~1e-6.
    scores = torch.baddbmm(mask, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), alpha=scale)
    probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)  # [B H, T, slots]; scale 1/sqrt(D) as Mimi
    y = (probs @ v.flatten(0, 1)).view(b, -1, t, head_dim)  # [B, H, T, D]
    return y.transpose(1, 2).reshape(b, t, -1)


def _linear(layer: nn.Linear, x: Tensor, fused: bool, act: nn.Module | None = None, scale: Tensor | None = None,
            residual: Tensor | None = None) -> Tensor:
    """`residual + scale * act(layer(x))` (each part optional). Fused (float32, exact GELU or no `act`, enough rows:
    `kernels.MATMUL_F32_MIN_ROWS`): one Triton product (`kernels.matmul_f32`, on the tensor cores as three TF32
    products each) with the rest as its epilogue; cuBLAS runs float32 GEMMs on the CUDA cores."""
    if fused and x.dtype == torch.float32 and layer.weight.is_contiguous() and (act is None or _is_exact_gelu(act)):
        from csmcli import kernels  # here, so CPU-only installs never need Triton

        if x.numel() // x.shape[-1] >= kernels.MATMUL_F32_MIN_ROWS:
            return kernels.matmul_f32(x, layer.weight, layer.bias, scale, residual, gelu=act is not None)
    y = layer(x)
    y = y if act is None else act(y)
    y = y if scale is None else scale * y
    return y if residual is None else residual + y


def _is_exact_gelu(act: nn.Module) -> bool:
    return isinstance(act, nn.GELU) and act.approximate == "none"  # "gelu": erf, not the tanh approximation


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}
"""The Mimi config's `hidden_act` names csmcli runs (kyutai/mimi's is "gelu"), as torch modules computing what
transformers' `ACT2FN` gives for each, bit for bit: importing `transformers.activations` costs ~0.5 s and ~600
modules with transformers 5.24, and with the GPU image's 5.17 its chain reached transformers' generation code and
torch._dynamo (twenty-ninth session)."""


class _LayerScale(nn.Module):
    """`scale * x`, applied in `_linear`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class _MLP(nn.Module):
    """`fc2(act(fc1(x)))`, applied in `_TransformerLayer.forward`."""

    def __init__(self, c: CodecConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = ACTIVATIONS[c.hidden_act]()  # a name csmcli does not run is refused by `_check_supported`


class _TransformerLayer(nn.Module):
    def __init__(self, c: CodecConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.self_attn = _Attention(c)
        self.self_attn_layer_scale = _LayerScale(c.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = _MLP(c)
        self.mlp_layer_scale = _LayerScale(c.hidden_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Tensor, fused: bool) -> Tensor:
        heads = self.self_attn(self.input_layernorm(x), cos, sin, mask, slots, fused)  # [B, T, H D]
        x = _linear(self.self_attn.o_proj, heads, fused, scale=self.self_attn_layer_scale.scale, residual=x)
        mlp = self.mlp
        hidden = _linear(mlp.fc1, self.post_attention_layernorm(x), fused, act=mlp.act)  # [B, T, intermediate]
        return _linear(mlp.fc2, hidden, fused, scale=self.mlp_layer_scale.scale, residual=x)


def _rope_inv_freq(c: CodecConfig) -> Tensor:
    # computed on the CPU in float32 like transformers does, then only moved: keeps cos/sin bit-identical. On the CPU
    # also when built on `meta`: arithmetic on meta tensors imports torch._dynamo (~1.3 s of a start-up).
    steps = torch.arange(0, c.head_dim, 2, dtype=torch.float, device="cpu")
    return 1.0 / (c.rope_theta ** (steps / c.head_dim))


class _Transformer(_StreamingModule):
    """Causal sliding-window transformer, no final norm. Its dtype is that of its layers (see module docstring)."""

    def __init__(self, c: CodecConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_TransformerLayer(c) for _ in range(c.num_hidden_layers))
        self.window = c.sliding_window
        # float32 on purpose: set_transformer_dtype casts `layers` only
        self.register_buffer("inv_freq", _rope_inv_freq(c), persistent=False)

    def init_state(self, batch_size: int) -> _PositionState:
        return _PositionState(torch.zeros((), dtype=torch.long, device=self.inv_freq.device))

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:  # [B, T, C] -> [B, T, C]
        """Pieces of at most RING_STEPS steps (each layer's key ring holds the window and one piece). `fused`: the
        float32 products through `kernels.matmul_f32` (see `_linear`) and the attention through
        `kernels.mimi_attention` (see `_Attention`)."""
        dtype = self.layers[0].input_layernorm.weight.dtype
        pieces = [self._piece(x[:, i : i + RING_STEPS].to(dtype), fused) for i in range(0, x.shape[1], RING_STEPS)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _piece(self, x: Tensor, fused: bool) -> Tensor:  # [B, T <= RING_STEPS, C]
        t, dev, offset = x.shape[1], x.device, self.state.offset
        slots = self.layers[0].self_attn.slots
        pos = offset + torch.arange(t, device=dev)  # [T]
        # the position each ring slot holds once this piece is written (negative: never written)
        last = offset + t - 1
        key_pos = last - (last - torch.arange(slots, device=dev)) % slots  # [slots]
        dist = pos[:, None] - key_pos[None, :]
        seen = (dist >= 0) & (dist < self.window) & (key_pos >= 0)  # [T, slots]: causal, within the window
        mask = torch.zeros(seen.shape, dtype=x.dtype, device=dev).masked_fill_(~seen, float("-inf"))
        freqs = pos[:, None].float() * self.inv_freq  # [T, D / 2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [T, D]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        ring = pos % slots  # [T]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, ring, fused)
        offset += t
        return x


# ---------------------------------------------------------------------------------------------------- quantizer


class _Dequantizer(nn.Module):
    """Split RVQ decode: sum of codebook vectors, semantic and acoustic groups each through their own projection."""

    def __init__(self, c: CodecConfig) -> None:
        super().__init__()
        self.n_semantic, self.codebook_size = c.num_semantic_quantizers, c.codebook_size
        # embed_sum / cluster_usage, folded at load time
        self.register_buffer("codebooks", torch.zeros(c.num_quantizers, c.codebook_size, c.codebook_dim))
        projected = c.vector_quantization_hidden_dimension != c.hidden_size
        dim = c.vector_quantization_hidden_dimension
        self.semantic_proj = nn.Linear(dim, c.hidden_size, bias=False) if projected else nn.Identity()
        self.acoustic_proj = nn.Linear(dim, c.hidden_size, bias=False) if projected else nn.Identity()

    def forward(self, codes: Tensor) -> Tensor:  # [B, K, n] int64 -> [B, hidden, n]
        k = codes.shape[1]
        # CSM's audio vocabulary has 2051 ids, Mimi's codebooks 2048: an out-of-range id (which a trained model
        # rarely and random weights often emit) would read the next codebook's rows, or past the table.
        codes = codes.clamp(0, self.codebook_size - 1)
        rows = codes + torch.arange(k, device=codes.device)[:, None] * self.codebook_size  # row in the stacked table
        vectors = F.embedding(rows, self.codebooks[:k].flatten(0, 1))  # [B, K, n, D]
        x = self.semantic_proj(_sum_in_order(vectors[:, : self.n_semantic]))  # [B, n, hidden]
        if k > self.n_semantic:
            x = x + self.acoustic_proj(_sum_in_order(vectors[:, self.n_semantic :]))
        return x.transpose(1, 2)


def _sum_in_order(vectors: Tensor) -> Tensor:  # [B, K, n, D] -> [B, n, D]
    # codebook by codebook like the reference RVQ, not `.sum(1)`: same rounding, so bit-exact on the CPU
    total = vectors[:, 0]
    for i in range(1, vectors.shape[1]):
        total = total + vectors[:, i]
    return total


# ---------------------------------------------------------------------------------------------------- decoder


class StreamingMimiDecoder(nn.Module):
    """Mimi codes -> 24 kHz waveform, one-shot or chunk by chunk with state carried across chunks.

    Submodule names follow the flat checkpoint layout, so state dict keys are the checkpoint's (except the
    quantizer, whose codebooks are folded at load time).
    """

    def __init__(self, config: CodecConfig | Mapping[str, Any]) -> None:
        super().__init__()
        config = _codec_config(config, "Mimi config")
        _check_supported(config)
        self.config = config
        self.quantizer = _Dequantizer(config)
        self.upsample = None
        stride = config.latent_stride
        if stride != 1:  # 12.5 Hz codes -> 25 Hz transformer steps
            self.upsample = _CausalConvTranspose1d(
                config.hidden_size, config.hidden_size, 2 * stride, stride, groups=config.upsample_groups, bias=False
            )
        self.decoder_transformer = _Transformer(config)
        self.decoder = _SeanetDecoder(config)
        self.frame_size = math.prod(config.upsampling_ratios) * stride
        self._lay_out_conv_weights()
        self.register_load_state_dict_post_hook(StreamingMimiDecoder._lay_out_conv_weights)

    @classmethod
    def from_state_dict(
        cls, config: CodecConfig | Mapping[str, Any], state_dict: Mapping[str, Tensor], source: str = "state dict"
    ) -> StreamingMimiDecoder:
        """Build from Mimi weights in the flat or the nested layout; `source` names them in errors."""
        state_dict = flatten_mimi_state_dict(state_dict)
        with torch.device("meta"):  # no init work: every weight comes from the checkpoint
            decoder = cls(config)
        weights = {
            key: _take(state_dict, key, ref.shape, source)
            for key, ref in decoder.state_dict().items()
            if not key.startswith("quantizer.")
        }
        weights.update(_dequantizer_weights(decoder.config, state_dict, source))
        decoder.load_state_dict(weights, assign=True)  # inv_freq (non-persistent) was made on the CPU
        return decoder.requires_grad_(False).eval()

    def _lay_out_conv_weights(self, *_: Any) -> None:
        """Store the SEANet's conv weights [O, I, k] as [O, k, I] (the transposed convs' [I, O, k] likewise), so
        that `_nhwc_weight` is a view of them. Runs when the decoder is built and after every `load_state_dict`
        (which may assign plain tensors); `.to()` keeps the layout. So `state_dict()` gives these weights
        non-contiguous: `.contiguous()` them before safetensors' `save_file`."""
        convs = (m.conv for m in self.decoder.modules() if isinstance(m, (_CausalConv1d, _CausalConvTranspose1d)))
        for w in (conv.weight for conv in convs):
            if not w.unsqueeze(2).is_contiguous(memory_format=torch.channels_last):
                w.data = w.detach().transpose(1, 2).contiguous().transpose(1, 2)

    def set_transformer_dtype(self, dtype: torch.dtype) -> StreamingMimiDecoder:
        """Run the transformer (and its KV cache) in `dtype`; convs stay float32. Call outside `streaming()`.

        Lossy: casting back to float32 does not restore the weights; reload them instead.
        """
        self.decoder_transformer.layers.to(dtype)
        return self

    def _streaming_modules(self) -> Iterator[_StreamingModule]:
        return (m for m in self.modules() if isinstance(m, _StreamingModule))

    @property
    def is_streaming(self) -> bool:
        return self.decoder_transformer._state is not None

    @contextmanager
    def streaming(self, batch_size: int) -> Iterator[StreamingMimiDecoder]:
        """Allocate every layer's state for `batch_size` utterances; dropped on exit."""
        if self.is_streaming:
            raise RuntimeError("already streaming: use decode_chunk(), and reset() for a new utterance")
        try:
            for m in self._streaming_modules():
                m._state = m.init_state(batch_size)
            yield self
        finally:
            for m in self._streaming_modules():
                m._state = None

    def state_tensors(self) -> list[Tensor]:
        """Every streaming state tensor, the ones a chunk reads and updates in place."""
        return [getattr(m.state, f.name) for m in self._streaming_modules() for f in fields(m.state)]

    def reset(self) -> None:
        """Start a new utterance: zero every state in place (addresses stay, so captured CUDA graphs stay valid)."""
        for t in self.state_tensors():
            t.zero_()

    @torch.no_grad()
    def decode_chunk(self, codes: Tensor, fused: bool = False) -> Tensor:
        """[B, K, n] int64 codes (K <= num_quantizers, each in [0, codebook_size)) -> [B, 1, n * frame_size].

        `fused`: Triton kernels for the transformer's float32 products (`_linear`) and attention (`_Attention`),
        and the SEANet's biases, residuals and ELUs (`_Activation`): CUDA only (or Triton's interpreter);
        `engine.ChunkDecoder` decides."""
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], self.config.audio_channels, 0, device=codes.device)
        x = self.quantizer(codes)  # [B, hidden, n]
        if self.upsample is not None:
            x = self.upsample(x)  # [B, hidden, 2n]
        x = self.decoder_transformer(x.transpose(1, 2), fused).float().transpose(1, 2)  # [B, hidden, 2n]
        return self.decoder(x, fused)  # [B, 1, n * frame_size]

    forward = decode_chunk

    def decode(self, codes: Tensor) -> Tensor:
        """One-shot: [B, K, F] -> [B, 1, F * frame_size], equal to transformers' `MimiModel.decode`."""
        with self.streaming(codes.shape[0]):
            return self.decode_chunk(codes)


def _check_supported(c: CodecConfig) -> None:
    """Settings the streaming decoder is exact for; kyutai/mimi and CSM use all of them."""
    problems = [
        f"{name}={value!r}"
        for name, value, ok in (
            ("use_causal_conv", c.use_causal_conv, c.use_causal_conv),
            ("trim_right_ratio", c.trim_right_ratio, c.trim_right_ratio == 1.0),
            ("pad_mode", c.pad_mode, c.pad_mode == "constant"),
            ("rope_type", c.rope_type, c.rope_type == "default"),
            ("partial_rotary_factor", c.partial_rotary_factor, c.partial_rotary_factor == 1.0),
            ("sliding_window", c.sliding_window, c.sliding_window >= 1),
            ("hidden_act", c.hidden_act, c.hidden_act in ACTIVATIONS),
        )
        if not ok
    ]
    if problems:
        raise CsmError(f"unsupported Mimi config for streaming decode: {', '.join(problems)}")


# ---------------------------------------------------------------------------------------------------- loading


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def _fold_weight_norm(g: Tensor, v: Tensor) -> Tensor:
    # weight = g * v / |v|, the norm over every dim where g has size 1 (all but weight norm's `dim`)
    dims = [i for i, n in enumerate(g.shape) if n == 1] if g.dim() else list(range(v.dim()))
    v = v.float()
    return v * (g.float() / torch.linalg.vector_norm(v, dim=dims, keepdim=True))


def flatten_mimi_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any Mimi state dict -> the flat checkpoint layout with plain conv weights (idempotent)."""
    renamed = {_rename(key, _TO_FLAT): tensor for key, tensor in state_dict.items()}
    out: dict[str, Tensor] = {}
    for key, tensor in renamed.items():
        for g_suffix, v_suffix in _WEIGHT_NORM:
            if key.endswith(v_suffix):
                break
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                if base + v_suffix not in renamed:
                    raise CsmError(f"weight norm of {base!r}: found {key!r} but not {base + v_suffix!r}")
                out[base + ".weight"] = _fold_weight_norm(tensor, renamed[base + v_suffix])
                break
        else:
            out[key] = tensor
    return out


def _take(state_dict: Mapping[str, Tensor], key: str, shape: tuple[int, ...], source: str) -> Tensor:
    tensor = state_dict.get(key)
    if tensor is None:
        raise CsmError(f"{source}: missing Mimi weight {key!r}")
    if tuple(tensor.shape) != tuple(shape):
        raise CsmError(f"{source}: Mimi weight {key!r} has shape {list(tensor.shape)}, expected {list(shape)}")
    return tensor.to(torch.float32)


def _dequantizer_weights(c: CodecConfig, state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Checkpoint quantizer keys -> `_Dequantizer` buffers: codebooks folded, 1x1 output convs as linears."""
    out: dict[str, Tensor] = {}
    codebooks = []
    n_acoustic = c.num_quantizers - c.num_semantic_quantizers
    for group, count in (("semantic", c.num_semantic_quantizers), ("acoustic", n_acoustic)):
        rvq = f"quantizer.{group}_residual_vector_quantizer."
        for i in range(count):
            prefix = f"{rvq}layers.{i}.codebook."
            embed_sum = _take(state_dict, prefix + "embed_sum", (c.codebook_size, c.codebook_dim), source)
            usage = _take(state_dict, prefix + "cluster_usage", (c.codebook_size,), source)
            codebooks.append(embed_sum / usage.clamp(min=_USAGE_EPS)[:, None])  # [codebook_size, codebook_dim]
        if c.vector_quantization_hidden_dimension != c.hidden_size:
            shape = (c.hidden_size, c.vector_quantization_hidden_dimension, 1)
            out[f"quantizer.{group}_proj.weight"] = _take(state_dict, rvq + "output_proj.weight", shape, source)[..., 0]
    out["quantizer.codebooks"] = torch.stack(codebooks)  # [Q, codebook_size, codebook_dim]
    return out


def _codec_config(raw: Mapping[str, Any] | CodecConfig, where: str) -> CodecConfig:
    return raw if isinstance(raw, CodecConfig) else CodecConfig.from_dict(raw, where)


def load_mimi_state_dict(path: str | Path) -> tuple[CodecConfig, dict[str, Tensor]]:
    """HF-format Mimi checkpoint (a dir, or its .safetensors file, with config.json beside it) -> config, flat dict."""
    from csmcli.checkpoint import read_json, read_safetensors

    path = Path(path)
    if not path.exists():
        raise CsmError(f"{path}: no such Mimi checkpoint directory or file")
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CsmError(f"{folder}: no config.json, not an HF-format Mimi checkpoint")
    config = CodecConfig.from_dict(read_json(config_file), str(config_file))
    return config, flatten_mimi_state_dict(read_safetensors(path))


def extract_codec_state_dict(
    state_dict: Mapping[str, Tensor], codec_config: Mapping[str, Any] | CodecConfig, source: str = "CSM checkpoint"
) -> tuple[CodecConfig, dict[str, Tensor]]:
    """CSM HF-format state dict + its `codec_config` -> the Mimi config and its flat state dict."""
    prefix = "codec_model."
    codec = {key[len(prefix) :]: t for key, t in state_dict.items() if key.startswith(prefix)}
    if not codec:
        raise CsmError(f"{source}: no {prefix}* weights (the Mimi codec of the HF format)")
    return _codec_config(codec_config, f"{source} codec_config"), flatten_mimi_state_dict(codec)


# ---------------------------------------------------------------------------------------------------- codec


class MimiCodec:
    """Mimi as CSM uses it: our streaming decoder, and transformers' `MimiModel` (built on first use) to encode."""

    def __init__(
        self,
        config: CodecConfig | Mapping[str, Any],
        state_dict: Mapping[str, Tensor],
        source: str = "state dict",
        num_codebooks: int = CSM_NUM_CODEBOOKS,
    ) -> None:
        config = _codec_config(config, f"{source} config")
        if not config.num_semantic_quantizers < num_codebooks <= config.num_quantizers:
            raise CsmError(f"{source}: Mimi has {config.num_quantizers} quantizers, CSM needs {num_codebooks}")
        self.config, self.num_codebooks, self.source = config, num_codebooks, source
        state_dict = flatten_mimi_state_dict(state_dict)
        self.decoder = StreamingMimiDecoder.from_state_dict(config, state_dict, source)
        # kept for the encoder (its SEANet, transformer, downsample and the quantizer), built only if needed
        self._encoder_weights = {k: t for k, t in state_dict.items() if not k.startswith(_DECODER_PREFIXES)}
        self._encoder: nn.Module | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, num_codebooks: int = CSM_NUM_CODEBOOKS) -> MimiCodec:
        from csmcli.checkpoint import safetensors_files

        config, state_dict = load_mimi_state_dict(path)
        files = safetensors_files(Path(path))
        return cls(config, state_dict, str(files[0]) if len(files) == 1 else f"{path} (sharded)", num_codebooks)

    @classmethod
    def from_csm_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        codec_config: Mapping[str, Any] | CodecConfig,
        source: str = "CSM checkpoint",
        num_codebooks: int = CSM_NUM_CODEBOOKS,
    ) -> MimiCodec:
        config, codec = extract_codec_state_dict(state_dict, codec_config, source)
        return cls(config, codec, f"{source} (codec_model.*)", num_codebooks)

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def frame_size(self) -> int:
        return self.decoder.frame_size

    @property
    def device(self) -> torch.device:
        return self.decoder.quantizer.codebooks.device

    def to(self, device: torch.device | str, transformer_dtype: torch.dtype | None = None) -> MimiCodec:
        self.decoder.to(device)  # moves only: weights stay float32 unless transformer_dtype says otherwise
        if transformer_dtype is not None:
            self.decoder.set_transformer_dtype(transformer_dtype)
        if self._encoder is not None:
            self._encoder.to(device)
        return self

    def decode(self, codes: Tensor) -> Tensor:
        """One-shot: [B, K, F] -> [B, 1, F * frame_size]. Stream with `decoder.streaming()` + `decode_chunk`."""
        return self.decoder.decode(codes)

    @torch.no_grad()
    def encode(self, pcm: Tensor) -> Tensor:
        """[B, 1, T] float at 24 kHz (one-shot, not streaming) -> [B, num_codebooks, F] int64 codes."""
        if self._encoder is None:
            self._encoder = self._build_encoder()
        out = self._encoder.encode(pcm.to(self.device, torch.float32), num_quantizers=self.num_codebooks)
        return out.audio_codes

    def _build_encoder(self) -> nn.Module:
        from transformers import MimiConfig, MimiModel

        try:  # what csmcli reads was checked; transformers checks the rest (types it is stricter about)
            config = MimiConfig.from_dict(dict(self.config.source))
        except Exception as e:  # huggingface_hub's strict-dataclass errors are neither TypeError nor ValueError
            reason = " ".join(str(e).split())
            raise CsmError(f"{self.source}: transformers' MimiConfig refuses this config for the encoder: {reason}") \
                from e
        with contextlib.suppress(AttributeError, ValueError):
            config.decoder_config = None  # recent transformers can drop the decoder half, which we do not need
        model = MimiModel(config)
        target = {k: t for k, t in model.state_dict().items() if not k.startswith(_DECODER_PREFIXES)}
        weights = {
            key: _take(self._encoder_weights, _rename(key, _TO_FLAT), ref.shape, self.source)
            for key, ref in target.items()
            if not key.endswith(".initialized")  # an unused codebook flag, absent from some checkpoints
        }
        model.load_state_dict(weights, strict=False)
        return model.requires_grad_(False).eval().to(self.device)
