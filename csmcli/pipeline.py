"""Text in, audio chunks out: the generation path of `say` and `stream` (bench drives the Engine directly).

`Pipeline.load` turns a model source + preset into a ready engine and codec on the chosen device;
`Pipeline.speak` yields `AudioChunk`s (codes + PCM) as they are made, sentence by sentence for long text, with
the earlier sentences carried as context so the voice stays the same.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from csmcli.checkpoint import Checkpoint, load
from csmcli.codec import MimiCodec
from csmcli.engine import ChunkDecoder, Engine, chunk_sizes, warm_up
from csmcli.errors import CsmError
from csmcli.generate import FRAME_SECONDS, SAMPLE_RATE
from csmcli.presets import CPU_PRESET, Preset
from csmcli.prompt import Prompt, Segment, build_prompt, frame_budget
from csmcli.sampling import SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
Warn = Callable[[str], None]


@dataclass
class AudioChunk:
    """`codes [n, 32]` and their audio `pcm [n * 1920]` float32 at `sample_rate`; timings in seconds."""

    index: int
    sentence: int
    codes: Tensor
    pcm: np.ndarray | None
    sample_rate: int
    generate_seconds: float
    decode_seconds: float
    stop: str | None  # on a sentence's last chunk: "eos" | "max_frames" | "cancelled"


def frames_within(seconds: float) -> int:
    """The most whole 80 ms frames that fit in `seconds` (at least one): --max-seconds 0.3 makes 3 frames, 0.24 s,
    never more audio than asked for (rounding to the nearest made 4, 0.32 s). The epsilon keeps 0.8 / 0.08 =
    10.000000000000002 and 0.24 / 0.08 = 2.9999999999999996 whole."""
    return max(1, math.floor(seconds / FRAME_SECONDS + 1e-9))


def check_weights_choice(model: str | None, random_flag: str | None) -> None:
    """Refuse `--model` together with the flag that asked for random weights (`--random-weights`, `--tiny`;
    None when neither was given): one would silently win over the other."""
    if model is not None and random_flag is not None:
        raise CsmError(f"--model and {random_flag} exclude each other: give one")


def pick_device(requested: str | None, preset: Preset | None = None) -> torch.device:
    """`--torch-device` when given (None: not given); else the CPU for the cpu preset (chosen because the GPU is
    too small or busy, or asked for), else CUDA when present."""
    if requested is not None:  # "" too: an empty value (an unset shell variable) is a mistake, not "default"
        try:
            device = torch.device(requested)
        except RuntimeError:
            shown = requested or "''"
            raise CsmError(f"--torch-device {shown}: not a device (use cpu, cuda or cuda:N)") from None
        if device.type not in ("cpu", "cuda"):
            raise CsmError(f"--torch-device {requested}: csmcli runs on cpu or cuda")
        if device.type == "cpu" and device.index not in (None, 0):  # torch accepts cpu:1 and runs on the one CPU
            raise CsmError(f"--torch-device {requested}: there is one CPU device (use cpu)")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise CsmError(f"--torch-device {requested}: CUDA is not available here (use --torch-device cpu)")
            if (device.index or 0) >= torch.cuda.device_count():
                raise CsmError(f"--torch-device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    if preset is not None and preset.name == CPU_PRESET:
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_preset(preset_name: str | None, torch_device: str | None, overrides: dict) -> tuple[Preset, str]:
    """The preset a run uses (`--preset` or the GPU's memory, then flags) and why; the GPU is the one
    `--torch-device cuda:N` names."""
    from csmcli import ui
    from csmcli.gpu import detect_gpus
    from csmcli.presets import presets_for, resolve_preset

    device = pick_device(torch_device) if torch_device is not None else None  # a bad value fails before any probe
    presets = presets_for(preset_name, ui.warn)
    gpus = detect_gpus() if device is None or device.type == "cuda" else []
    index = device.index or 0 if device is not None else 0
    return resolve_preset(preset_name, gpus[index] if index < len(gpus) else None, presets=presets, **overrides)


def random_mimi(config=None):
    """transformers' `MimiModel` with seeded random weights (default config unless given)."""
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    mimi = MimiModel(config or MimiConfig())
    with torch.no_grad():  # transformers starts the codebooks at zero: every code would decode to the same audio
        for name, t in mimi.named_buffers():
            if name.endswith("embed_sum"):
                t.normal_()
    return mimi


def random_codec(device: torch.device, config=None) -> MimiCodec:
    """Mimi with random weights: lets random-weight runs make real-size audio."""
    mimi = random_mimi(config)
    return MimiCodec(mimi.config, mimi.state_dict(), "random weights").to(device)


def load_codec(ck: Checkpoint, codec_path: str | None, device: torch.device, random_config=None) -> MimiCodec | None:
    """`--codec DIR` first, then the checkpoint's own `codec_model.*`, then random Mimi for random weights."""
    if codec_path:
        return MimiCodec.from_pretrained(codec_path).to(device)
    if ck.codec_weights:
        return MimiCodec(ck.codec_config or {}, ck.codec_weights, f"{ck.source} (codec_model.*)").to(device)
    if ck.random_weights:
        return random_codec(device, random_config)
    return None


def load_model_and_codec(source: str | None, preset: Preset, *, device: str | None = None,
                         random_weights: bool = False, codec_path: str | None = None,
                         tokenizer_path: str | None = None, config=None, codec_config=None,
                         warn: Warn | None = None) -> tuple[Checkpoint, MimiCodec | None, torch.device]:
    """Checkpoint and codec on the device the preset (or `--torch-device`) selects, in the preset's dtype (the
    transformer layers' weights in fp8 with the preset's `fp8`); off CUDA always float32, with a warning."""
    dev = pick_device(device, preset)
    if dev.type == "cuda" and dev.index is not None:  # Triton launches on the current GPU, and graph capture
        torch.cuda.set_device(dev)  # records the current GPU's stream only: --torch-device cuda:N makes N current
    dtype = DTYPES[preset.dtype] if dev.type == "cuda" else torch.float32
    if dtype != DTYPES[preset.dtype] and warn is not None:
        warn(f"dtype {preset.dtype} runs as float32 on the {dev.type}")
    gpu_only = [name for name, on in (("CUDA graphs", preset.cuda_graphs), ("fused kernels", preset.fused_kernels))
                if on]
    if gpu_only and dev.type != "cuda" and warn is not None:  # asked for by a flag or a GPU preset
        warn(f"{' and '.join(gpu_only)} need a GPU: off on the {dev.type}")
    kwargs = {"config": config} if config is not None else {}
    ck = load(source, device=dev, dtype=dtype, tokenizer_path=tokenizer_path, random_weights=random_weights,
              **kwargs)
    if preset.fp8:
        ck.model.to_fp8()
    return ck, load_codec(ck, codec_path, dev, codec_config), dev


def split_sentences(text: str, max_chars: int = 400) -> list[str]:
    """Sentences, merged while short, so each generation is a natural unit and long text never hits the limit."""
    pieces = [p.strip() for p in re.split(r"(?<=[.!?;:])\s+|\n{2,}", text.strip()) if p.strip()]
    merged: list[str] = []
    for piece in pieces:
        if merged and len(merged[-1]) + len(piece) < 80:
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    out = []
    for sentence in merged:  # a very long "sentence" (no punctuation) is cut at word boundaries
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        out.append(sentence)
    return out


class Pipeline:
    def __init__(self, checkpoint: Checkpoint, codec: MimiCodec | None, preset: Preset, device: torch.device):
        self.checkpoint, self.codec, self.preset, self.device = checkpoint, codec, preset, device
        self.model = checkpoint.model
        self.engine = Engine(self.model, max_batch=1, cuda_graphs=preset.cuda_graphs, compile=preset.compile,
                             fused_kernels=preset.fused_kernels)
        # One decoder for the pipeline's life: its CUDA graphs hold the streaming state's addresses.
        self.decoder = ChunkDecoder(codec.decoder, 1, self.model.cfg.num_codebooks, preset.cuda_graphs,
                                    self.engine.fused_kernels) \
            if codec is not None else None

    @classmethod
    def load(cls, source: str | None, preset: Preset, *, device: str | None = None, random_weights: bool = False,
             codec_path: str | None = None, tokenizer_path: str | None = None, config=None,
             codec_config=None, warn: Warn | None = None) -> Pipeline:
        """`config` / `codec_config` choose the sizes of random weights (default: the real CSM-1B and Mimi)."""
        ck, codec, dev = load_model_and_codec(source, preset, device=device, random_weights=random_weights,
                                              codec_path=codec_path, tokenizer_path=tokenizer_path, config=config,
                                              codec_config=codec_config, warn=warn)
        return cls(ck, codec, preset, dev)

    @property
    def tokenizer(self):
        if self.checkpoint.tokenizer is None:
            raise CsmError("this checkpoint has no tokenizer: pass --tokenizer DIR (a Llama-3 tokenizer.json)")
        return self.checkpoint.tokenizer

    def encode(self, audio: Tensor) -> Tensor:
        """24 kHz mono `[T]` -> codes `[32, F]` for a context turn."""
        if self.codec is None:
            raise CsmError("context audio needs the Mimi codec: pass --codec DIR (an HF-format Mimi checkpoint)")
        return self.codec.encode(audio.to(self.device, torch.float32)[None, None])[0].cpu()

    def prompt(self, context: list[Segment], speaker: int, text: str) -> Prompt:
        return build_prompt(self.tokenizer, context, speaker, text, self.encode)

    def encode_context(self, context: list[Segment]) -> list[Segment]:
        """Context turns with their audio encoded to codes once, not again for every sentence's prompt."""
        return [Segment(s.speaker, s.text, codes=self.encode(s.audio)) if s.codes is None and s.audio is not None
                else s for s in context]

    def prepare(self, context: list[Segment], speaker: int, text: str) -> None:
        """Before the first sentence is written: raise now what any sentence's prompt would raise later (no
        tokenizer, codec or room for even one frame after the given context), and capture the first sentence's
        prefill graph (`Engine.prepare`), so that its first audio waits for no capture."""
        rows = []
        for sentence in split_sentences(text):
            prompt = self.prompt(context, speaker, sentence)
            frame_budget(prompt.rows, 1, self.model.cfg.backbone.max_seq_len)
            rows.append(prompt.rows)
        self.engine.prepare(rows[:1])  # later sentences carry earlier ones as context: their lengths are not known

    def close(self) -> None:
        """Free the Mimi decoder's streaming state (and its graphs): the codec can then be used on its own again."""
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None

    def warmup(self) -> None:
        """Capture / compile now (frame step, one admission, Mimi decode of every ramp chunk size), so the first
        request's latency includes none of it (`prepare` adds the first prompt's prefill graph)."""
        warm_up(self.engine, self.decoder, chunk_sizes(self.preset.first_chunk_frames, self.preset.chunk_frames))

    def speak(
        self, text: str, speaker: int, params: SamplingParams, *, context: list[Segment] | None = None,
        max_seconds: float = 90.0, warn: Warn | None = None, max_context_turns: int = 3,
    ) -> Iterator[AudioChunk]:
        """Long text is spoken sentence by sentence; earlier sentences (text + their codes) become context, newest
        first, as many as fit, so one voice carries through. Audio stays continuous across sentences because the
        Mimi streaming state is kept."""
        warn = warn or (lambda _msg: None)
        user_context, carried = list(context or []), []
        sentences = split_sentences(text)
        max_seq = self.model.cfg.backbone.max_seq_len
        wanted = frames_within(max_seconds)
        index = 0
        if self.decoder is not None:
            self.decoder.reset()  # a new utterance; sentences within it share the Mimi state (no clicks)
        for number, sentence in enumerate(sentences):
            prompt, carried = self._fitting_prompt(user_context, carried[-max_context_turns:], speaker, sentence,
                                                   wanted)
            frames = frame_budget(prompt.rows, wanted, max_seq)
            if frames < wanted:
                warn(f"sentence {number + 1}: only {frames * FRAME_SECONDS:.1f} s fit after a {prompt.rows}-row "
                     f"prompt (limit {max_seq} positions); audio may be cut short")
            made = []
            sentence_params = SamplingParams(params.temperature, params.topk, params.seed + number)
            for chunk in self.engine.stream(prompt, sentence_params, frames, self.preset.first_chunk_frames,
                                            self.preset.chunk_frames):
                made.append(chunk.codes)
                pcm, decode_seconds = self._decode(chunk.codes) if self.decoder is not None else (None, 0.0)
                yield AudioChunk(index, number, chunk.codes, pcm, SAMPLE_RATE, chunk.generate_seconds,
                                 decode_seconds, chunk.stop)
                index += 1
                if chunk.stop == "max_frames" and frames == wanted:
                    warn(f"sentence {number + 1} hit the {max_seconds:g} s limit without ending (no EOS): "
                         "raise --max-seconds if it was cut short")
            codes = torch.cat(made) if made else torch.zeros(0, self.model.cfg.num_codebooks, dtype=torch.long)
            carried = [*carried, Segment(speaker, sentence, codes=codes.T)]

    def _fitting_prompt(self, user: list[Segment], carried: list[Segment], speaker: int, text: str, frames: int):
        """Drop the oldest carried sentences until the prompt leaves room for `frames`. The user's own context
        turns are never dropped: if those do not fit, the frame budget shrinks with a warning instead."""
        while True:
            prompt = self.prompt(user + carried, speaker, text)
            if not carried or prompt.rows + frames <= self.model.cfg.backbone.max_seq_len:
                return prompt, carried
            carried = carried[1:]

    def _decode(self, codes: Tensor) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        pcm = self.decoder.decode(codes.T[None].to(self.device))  # [1, 1, n * 1920]
        pcm = pcm[0, 0].float().cpu().numpy()
        return pcm, time.perf_counter() - start
