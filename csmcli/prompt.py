"""Prompt layout: segments -> rows of 33 columns (32 audio codebooks + 1 text) and a mask of the same shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from csmcli.errors import CsmError

BEGIN_OF_TEXT = 128000
END_OF_TEXT = 128001
NUM_CODEBOOKS = 32
COLUMNS = NUM_CODEBOOKS + 1


@dataclass
class Segment:
    """One conversation turn. `audio` is 24 kHz mono float `[T]`; `codes [32, F]` skips encoding."""

    speaker: int
    text: str
    audio: Tensor | None = None
    codes: Tensor | None = None


@dataclass
class Prompt:
    tokens: Tensor  # [T, 33] int64
    mask: Tensor  # [T, 33] bool

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


def text_rows(tokenizer: Any, speaker: int, text: str) -> tuple[Tensor, Tensor]:
    if not text.strip():
        raise CsmError("text is empty: give the words to speak")
    # split_special_tokens: text that spells a control token ("<|end_of_text|>") is spoken as text, not made one
    words = tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False, split_special_tokens=True)
    ids = [BEGIN_OF_TEXT, *words, END_OF_TEXT]
    tokens = torch.zeros(len(ids), COLUMNS, dtype=torch.long)  # [T, 33]
    tokens[:, -1] = torch.tensor(ids)
    mask = torch.zeros(len(ids), COLUMNS, dtype=torch.bool)
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Codes `[32, F]` -> F rows plus the all-zero EOS frame the model saw after every audio segment."""
    if codes.ndim != 2 or codes.shape[0] != NUM_CODEBOOKS:
        raise CsmError(f"audio codes must have shape [32, frames], got {list(codes.shape)}")
    frames = codes.shape[1]
    tokens = torch.zeros(frames + 1, COLUMNS, dtype=torch.long)  # [F + 1, 33]
    tokens[:frames, :-1] = codes.T.cpu()
    mask = torch.zeros(frames + 1, COLUMNS, dtype=torch.bool)
    mask[:, :-1] = True
    return tokens, mask


Encoder = Callable[[Tensor], Tensor]
"""24 kHz mono audio `[T]` -> codes `[32, F]` (the Mimi encoder)."""


def build_prompt(tokenizer: Any, context: list[Segment], speaker: int, text: str, encode: Encoder | None) -> Prompt:
    """Context turns (text, then audio if any) followed by the target text."""
    parts = []
    for segment in context:
        parts.append(text_rows(tokenizer, segment.speaker, segment.text))
        codes = segment.codes
        if codes is None and segment.audio is not None:
            if encode is None:
                raise CsmError("context audio needs the Mimi codec, which this checkpoint did not provide")
            codes = encode(segment.audio)
        if codes is not None:
            parts.append(audio_rows(codes))
    parts.append(text_rows(tokenizer, speaker, text))
    return Prompt(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def frame_budget(prompt_rows: int, max_frames: int, max_seq_len: int) -> int:
    """How many frames fit after the prompt; an over-long prompt is an error, never a silent truncation."""
    room = max_seq_len - prompt_rows
    if room < 1:
        raise CsmError(
            f"prompt is {prompt_rows} rows but the model holds {max_seq_len} positions: shorten the text or context"
        )
    return min(max_frames, room)


def synthetic_prompt(rows: int, seed: int = 0, text_vocab_size: int = 128_000) -> Prompt:
    """A text-only prompt of exactly `rows` rows of random token ids: benchmarks and random weights need no
    tokenizer."""
    if rows < 2:
        raise CsmError(f"a prompt needs at least 2 rows (begin and end of text), got {rows}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(text_vocab_size, BEGIN_OF_TEXT), (rows,), generator=generator)
    ids[0], ids[-1] = BEGIN_OF_TEXT, END_OF_TEXT
    tokens = torch.zeros(rows, COLUMNS, dtype=torch.long)
    tokens[:, -1] = ids
    mask = torch.zeros(rows, COLUMNS, dtype=torch.bool)
    mask[:, -1] = True
    return Prompt(tokens, mask)
