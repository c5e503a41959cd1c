"""What `say` and `stream` do with the pipeline's chunks: route audio to a file, stdout or the speakers, show
per-chunk timings, and stop cleanly (Ctrl-C leaves a valid file and still prints the totals)."""

from __future__ import annotations

import json
import os
import secrets
import time
import unicodedata
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.live import Live
from rich.table import Table

from csmcli import audio, ui
from csmcli.errors import CsmError
from csmcli.generate import FRAME_SECONDS, SAMPLE_RATE
from csmcli.pipeline import AudioChunk, Pipeline
from csmcli.prompt import Segment
from csmcli.sampling import SamplingParams


@dataclass
class SpeakJob:
    text: str
    speaker: int = 0
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None
    max_seconds: float = 90.0
    output: str | None = "out.wav"
    raw: bool = False
    play: bool = False
    audio_device: str | None = None
    save_codes: str | None = None
    context: list[Segment] = field(default_factory=list)
    live_table: bool = False


@dataclass
class Totals:
    chunks: int = 0
    frames: int = 0
    generate_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_audio_seconds: float | None = None
    wall_seconds: float = 0.0
    underruns: int = 0

    @property
    def audio_seconds(self) -> float:
        return self.frames * FRAME_SECONDS

    def summary(self) -> str:
        if not self.frames:
            return "no audio generated"
        rtf = self.wall_seconds / self.audio_seconds
        first = f", first audio {self.first_audio_seconds * 1000:.0f} ms" if self.first_audio_seconds else ""
        underruns = f", {self.underruns} underruns" if self.underruns else ""
        return (f"{self.audio_seconds:.2f} s of audio in {self.wall_seconds:.2f} s (RTF {rtf:.3f}, "
                f"{self.generate_seconds * 1000 / self.frames:.1f} ms/frame{first}){underruns}")


def is_blank(text: str) -> bool:
    """Nothing to say: whitespace, and characters that are not seen or heard (zero-width spaces, a byte-order mark,
    control characters)."""
    return not "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf")).strip()


def read_text(text: str | None, text_file: str | None, stdin) -> str:
    if text is not None and text_file is not None:
        raise CsmError("give TEXT or -f FILE, not both")
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CsmError(f"{text_file}: cannot read text ({e})") from None
    elif text is None:
        raise CsmError("no text: give TEXT, '-' to read stdin, or -f FILE")
    elif text == "-":
        text = stdin.read()
    if is_blank(text):  # would load the model, then write an empty file and exit 0
        raise CsmError("text is empty: give the words to speak")
    try:  # bytes that are not UTF-8 reach Python as lone surrogates, which the tokenizer rejects with a TypeError
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CsmError("text is not valid UTF-8") from None
    return text


def check_outputs(output: str | None, raw: bool, play: bool, audio_device: str | None, save_codes: str | None,
                  inputs: dict[str, str | None] | None = None) -> None:
    """Refuse a bad -o, --save-codes or --device now, not after the seconds it takes to load the model; name a
    --raw or --device that has nothing to act on. `inputs`: the files read, by option (-f, --context,
    --ref-audio), which no output may overwrite."""
    out = output if output != "-" else None
    clashes = [("-o", out, "--save-codes", save_codes, "the codes would replace the audio")]
    clashes += [(flag, path, source, given, "it would be overwritten")
                for flag, path in (("-o", out), ("--save-codes", save_codes))
                for source, given in (inputs or {}).items()]
    for flag, path, other, other_path, what in clashes:
        if path and other_path and _same_file(path, other_path):
            raise CsmError(f"{flag} {path} is the file given to {other}: {what}")
    if output is not None:
        audio.check_output(output, raw)
        suffix = Path(output).suffix.lower()
        if raw and output != "-" and suffix in audio.WRITE_FORMATS:  # e.g. say --raw with the default out.wav
            ui.warn(f"--raw: {output} will hold headerless s16le PCM, not {suffix} audio")
    elif raw:  # --raw shapes only what -o writes; the speakers get samples either way
        ui.warn("--raw has no effect without -o (FILE or -)")
    if save_codes is not None:
        if Path(save_codes).name == ".npy":  # Path(".npy").suffix is "": a name that is all suffix
            raise CsmError(f"--save-codes {save_codes}: give a file name before .npy, like codes.npy")
        if Path(save_codes).suffix != ".npy":  # numpy would append .npy and write another file than the one named
            raise CsmError(f"--save-codes {save_codes}: the file name must end in .npy")
        audio.check_writable(save_codes)
    if play:
        audio.resolve_device(audio_device)
    elif audio_device is not None:
        ui.warn(f"--device {audio_device} has no effect without playback (--play)")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # links and other spellings of one file
    except OSError:  # one does not exist yet
        return Path(a).resolve() == Path(b).resolve()


CONTEXT_KEYS = ("speaker", "text", "audio")


def load_context(path: str | None, ref_audio: str | None, ref_text: str | None, speaker: int) -> list[Segment]:
    """`--context FILE` (JSON or YAML list of {speaker, text, audio?}) and/or `--ref-audio` + `--ref-text`."""
    turns: list[Segment] = []
    if path is not None:
        turns += _context_file(Path(path))
    if (ref_audio is None) != (ref_text is None):
        raise CsmError("--ref-audio and --ref-text go together: the model needs the words spoken in the reference")
    if ref_text is not None and is_blank(ref_text):
        raise CsmError("--ref-text is empty: give the words spoken in --ref-audio")
    if ref_audio is not None:
        turns.append(Segment(speaker, ref_text, audio=_audio(ref_audio)))
    return turns


def _audio(path: str | Path) -> torch.Tensor:
    return torch.from_numpy(audio.load_audio(path, on_warning=ui.warn))


def _context_file(path: Path) -> list[Segment]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CsmError(f"{path}: cannot read context file ({e})") from None
    try:
        import yaml

        data = json.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
    except Exception as e:  # json and yaml raise different types; both are a malformed file
        raise CsmError(f"{path}: not valid JSON/YAML ({e})") from None
    if not isinstance(data, list):
        raise CsmError(f"{path}: expected a list of turns like {{speaker: 0, text: ..., audio: file.wav}}")
    turns = []
    for i, turn in enumerate(data):
        if not isinstance(turn, dict) or not isinstance(turn.get("text"), str) or "speaker" not in turn:
            raise CsmError(f"{path}: turn {i + 1} needs 'speaker' (int) and 'text' (string)")
        unknown = sorted(str(key) for key in turn if key not in CONTEXT_KEYS)
        if unknown:  # a misspelt `audio` would silently drop the voice clip
            raise CsmError(f"{path}: turn {i + 1}: unknown key {', '.join(map(repr, unknown))} (a turn has "
                           f"{', '.join(CONTEXT_KEYS)})")
        spk = turn["speaker"]
        if not isinstance(spk, int) or isinstance(spk, bool) or spk < 0:  # 1.7 or true is a typo, not speaker 1
            raise CsmError(f"{path}: turn {i + 1}: speaker must be an integer >= 0, got {spk!r}")
        if is_blank(turn["text"]):
            raise CsmError(f"{path}: turn {i + 1}: text is empty (the words spoken in that turn)")
        clip = turn.get("audio")
        if clip is not None and not (isinstance(clip, str) and clip.strip()):
            raise CsmError(f"{path}: turn {i + 1}: audio must be a file path, got {clip!r}")
        turns.append(Segment(spk, turn["text"], audio=_audio(path.parent / clip) if clip else None))
    return turns


PLAYBACK_LOST = "playback stopped: the audio output went away (audio server or device gone)"
"""Said once, when `audio.Player.lost` turns true while generating or draining."""


LIVE_ROWS = 12
"""Chunks the live table shows while generating (the newest); the final table shows every chunk."""


def _chunk_table(rows: list[tuple], totals: Totals | None, playing: bool) -> Table:
    """`totals` is the running total shown while generating; the final table leaves it to the summary line."""
    shown = rows[-LIVE_ROWS:] if totals is not None else rows
    title = "csmcli stream" + (f" (the last {len(shown)} of {len(rows)} chunks)" if len(shown) < len(rows) else "")
    table = Table(title=title, caption=totals.summary() if totals else None, expand=False)
    playback = ("ahead ms", "underruns") if playing else ()
    for name in ("chunk", "frames", "gen ms", "decode ms", "chunk RTF", *playback):
        table.add_column(name, justify="right")
    for row in shown:
        table.add_row(*map(str, row))
    return table


def run(pipeline: Pipeline, job: SpeakJob) -> Totals:
    """Generate `job` and deliver the audio; returns the totals (also on Ctrl-C, then re-raised)."""
    seed = job.seed if job.seed is not None else secrets.randbelow(2**31)
    if job.seed is None and job.temperature > 0:
        ui.info(f"seed {seed} (pass --seed {seed} to repeat)")
    params = SamplingParams(job.temperature, job.topk, seed)
    # Encode context audio once and build the prompts now: a missing tokenizer or codec, or a prompt that cannot
    # fit, is refused before any output file is created or an existing one truncated (and the first prompt's
    # prefill graph is captured before the clock for first audio starts).
    context = pipeline.encode_context(job.context)
    pipeline.prepare(context, job.speaker, job.text)
    totals, rows, codes = Totals(), [], []
    start = time.perf_counter()
    try:
        with ExitStack() as stack:
            writer = stack.enter_context(audio.open_writer(job.output, SAMPLE_RATE, raw=job.raw)) \
                if job.output else None
            player = None
            if job.play:  # opened before generating: a fresh output stream takes a moment to settle
                prebuffer_ms = pipeline.preset.first_chunk_frames * FRAME_SECONDS * 1000
                player = stack.enter_context(audio.Player(SAMPLE_RATE, job.audio_device, prebuffer_ms=prebuffer_ms))
            live = None
            if job.live_table and not ui.is_quiet():
                if not ui.console.is_terminal:  # Rich ends the table it prints there without a newline: the
                    stack.callback(ui.console.line)  # totals line would be glued to its last row
                live = stack.enter_context(Live(_chunk_table(rows, totals, player is not None), console=ui.console,
                                                refresh_per_second=8, transient=False))
                # The last render leaves the totals to the summary line, also after Ctrl-C (else printed twice).
                stack.callback(lambda: live.update(_chunk_table(rows, None, player is not None)))
            lost_warned, clip_warned = False, set()
            for chunk in pipeline.speak(job.text, job.speaker, params, context=context,
                                        max_seconds=job.max_seconds, warn=ui.warn):
                with audio.interrupts_deferred():  # the file, the totals and the codes hold the chunk, or none do
                    _deliver(chunk, writer, player, totals, start)
                    codes.append(chunk.codes)
                for kind, said in _clipped(chunk.pcm).items():  # each kind once a run
                    if kind not in clip_warned:
                        clip_warned.add(kind)
                        ui.warn(f"chunk {chunk.index}: {said}")
                if player is not None and player.lost and not lost_warned:
                    lost_warned = True
                    ui.warn(PLAYBACK_LOST + (f"; still writing {job.output}" if job.output else ""))
                rows.append(_row(chunk, player))
                if live is not None:
                    live.update(_chunk_table(rows, totals, player is not None))
            if player is not None:
                if not player.drain() and not player.lost:
                    ui.warn("playback did not finish in time: the end of the audio may be cut off")
                elif player.lost and not lost_warned:
                    ui.warn(PLAYBACK_LOST)
                totals.underruns = player.underruns
    except audio.OutputClosed:
        pass  # the reader went away (`| head -c 1000`): not an error
    except (KeyboardInterrupt, CsmError):  # Ctrl-C, or a later sentence that cannot fit: keep what was made
        if failed := _finish(job, totals, codes, start):
            ui.error(failed)
        raise
    if failed := _finish(job, totals, codes, start):
        raise CsmError(failed)
    return totals


def _deliver(chunk: AudioChunk, writer, player, totals: Totals, start: float) -> None:
    if chunk.pcm is not None and len(chunk.pcm):
        if writer is not None:
            writer.write(chunk.pcm)
        if player is not None:
            player.write(chunk.pcm)
        if totals.first_audio_seconds is None:
            totals.first_audio_seconds = time.perf_counter() - start
    totals.chunks += 1
    totals.frames += len(chunk.codes)
    totals.generate_seconds += chunk.generate_seconds
    totals.decode_seconds += chunk.decode_seconds
    totals.wall_seconds = time.perf_counter() - start


CLIP_WARN_FRACTION = 1e-3
"""A chunk with more of its samples beyond full scale than this is reported (once a run): the writers clip them to
±1, which is audible; a stray peak is not worth a line."""


def _clipped(pcm: np.ndarray | None) -> dict[str, str]:
    """What to say about `pcm`'s samples the writers will change, by kind: "nan" (silenced where not numbers),
    "clip" (clipped to ±1)."""
    if pcm is None or not len(pcm):
        return {}
    said = {}
    bad = int(np.count_nonzero(np.isnan(pcm)))
    if bad:
        said["nan"] = f"{bad} samples are not numbers (NaN): written as silence (warned once a run)"
    over = int(np.count_nonzero(np.abs(np.nan_to_num(pcm, nan=0.0)) > 1.0))  # infinities among them
    if over > CLIP_WARN_FRACTION * len(pcm):
        said["clip"] = (f"{100 * over / len(pcm):.1f}% of the samples are beyond full scale: clipped to it "
                        "(warned once a run)")
    return said


def _row(chunk: AudioChunk, player) -> tuple[Any, ...]:
    n = len(chunk.codes)
    rtf = (chunk.generate_seconds + chunk.decode_seconds) / (n * FRAME_SECONDS) if n else 0.0
    playing = (f"{player.buffered_ms:.0f}", player.underruns) if player is not None else ()
    return (chunk.index, n, f"{chunk.generate_seconds * 1000:.0f}", f"{chunk.decode_seconds * 1000:.0f}",
            f"{rtf:.3f}", *playing)


def _finish(job: SpeakJob, totals: Totals, codes: list[torch.Tensor], start: float) -> str | None:
    """Totals and --save-codes, also after Ctrl-C; returns why the codes could not be written, if so. Wall time
    stays what `_deliver` measured at the last chunk: waiting for playback to drain is not generation time."""
    failed = None
    if not totals.frames:
        totals.wall_seconds = time.perf_counter() - start
    if job.save_codes and totals.frames:  # no codes: an existing file stays as it was, like the audio file
        try:
            np.save(job.save_codes, torch.cat(codes).numpy())  # [frames, 32]
        except OSError as e:
            failed = f"cannot write {job.save_codes}: {e.strerror or e}"
    summary = totals.summary()
    unwritten = [] if totals.frames else [
        name for name in (job.output if job.output != "-" else None, job.save_codes) if name]
    if unwritten:  # the audio writers create their file with the first samples
        summary += f": {' and '.join(unwritten)} not written"
    ui.info(summary)
    return failed
