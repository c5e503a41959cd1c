"""`csmcli stream` end to end on a tiny random checkpoint: the same audio as `say`, and real playback through
PortAudio onto a PulseAudio null sink (skipped where PortAudio or pulseaudio is missing)."""

from __future__ import annotations

import os
import re
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from clirun import FRAME, FRAMES, SHORT, TEXT, csmcli, model_args, seeded_say, session_runs
from test_audio_player import pulse_sink  # noqa: F401 - the fixture, used by name below

from csmcli import speak
from csmcli.audio import to_int16
from csmcli.pipeline import AudioChunk

TOTALS = re.compile(
    r"^0\.80 s of audio in [\d.]+ s \(RTF [\d.]+, [\d.]+ ms/frame, first audio \d+ ms\)(, (\d+) underruns)?$"
)


@pytest.fixture(scope="module")
def runs(hf_checkpoint, tmp_path_factory):
    runs = session_runs(tmp_path_factory)
    runs.start("seeded", *seeded_say(hf_checkpoint))  # shared with test_say when both run
    runs.start("stream-no-play", "stream", TEXT, *SHORT, "--seed", "5", "--no-play", "-o", "out.wav",
               "--save-codes", "codes.npy", *model_args(hf_checkpoint))
    runs.start("stream-many-chunks", "stream", TEXT, "--max-seconds", "1.2", "--seed", "5", "--no-play", "-o",
               "out.wav", "--first-chunk-frames", "1", "--chunk-frames", "1", *model_args(hf_checkpoint))
    yield runs
    runs.cancel_pending()


def test_no_play_writes_the_same_audio_as_say(runs):
    result = runs("stream-no-play")
    assert result.code == 0, result.stderr
    assert result.stdout == b""
    np.testing.assert_array_equal(result.codes(), runs("seeded").codes())
    np.testing.assert_array_equal(result.wav(), runs("seeded").wav())
    assert len(result.wav()) == FRAMES * FRAME


def test_table_then_totals_on_their_own_line(runs):
    lines = runs("stream-no-play").lines
    assert any(re.match(r"^│\s+0 │\s+2 │", line) for line in lines), lines  # the first chunk's row: 2 frames
    assert TOTALS.match(lines[-1]), lines  # not glued to the table's last line


def test_the_final_table_shows_every_chunk(runs):
    """The live view keeps the newest chunks; the table left at the end (here the only one: stderr is a file)
    has them all, the first (latency) chunk included. Without playback there is no buffer or underrun column."""
    result = runs("stream-many-chunks")
    assert result.code == 0, result.stderr
    chunks = [int(m.group(1)) for line in result.lines if (m := re.match(r"^│\s+(\d+) │\s+1 │", line))]
    assert chunks == list(range(15)), result.lines  # 1.2 s, one frame a chunk: more than the live view's 12
    assert "underruns" not in result.stderr and "ahead ms" not in result.stderr


def test_list_devices_lists_devices_or_says_why_not(tmp_path):
    result = csmcli("stream", "--list-devices", cwd=tmp_path, PULSE_SERVER=None)
    if result.code == 0:
        lines = result.stdout.decode().splitlines()
        assert lines and all(re.match(r"^ *\d+  \S", line) for line in lines), lines
    else:
        assert result.code == 2 and len(result.lines) == 1, result.stderr
        assert result.lines[0].startswith("error: audio playback unavailable: "), result.lines


def test_list_devices_shows_the_null_sink(pulse_sink, tmp_path):  # noqa: F811 - the imported fixture
    result = csmcli("stream", "--list-devices", cwd=tmp_path)  # PULSE_SERVER set by the fixture
    assert result.code == 0, result.stderr
    assert any(line.split()[1:] == [pulse_sink] for line in result.stdout.decode().splitlines()), result.stdout


def test_unknown_device_is_one_error_line(pulse_sink, hf_checkpoint, tmp_path):  # noqa: F811
    result = csmcli("stream", TEXT, *SHORT, "--device", "no-such-device", *model_args(hf_checkpoint), cwd=tmp_path)
    assert result.code == 2, result.stderr
    assert result.lines == [result.lines[0]] and result.lines[0].startswith(
        "error: unknown audio output device 'no-such-device'; available: "
    ), result.lines


def test_plays_on_the_null_sink(pulse_sink, runs, hf_checkpoint, tmp_path):  # noqa: F811
    result = csmcli("stream", TEXT, *SHORT, "--seed", "5", "--device", pulse_sink, "-o", "out.wav",
                    *model_args(hf_checkpoint), cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    np.testing.assert_array_equal(result.wav(), runs("seeded").wav())  # playing changes nothing in the file
    totals = TOTALS.match(result.lines[-1])
    assert totals, result.lines
    # one gap between chunks is one underrun, not one per silent callback; a busy CPU may make one or two
    assert int(totals.group(2) or 0) <= 2
    assert any("ahead ms" in line for line in result.lines)  # the table's playback column


class _Pipeline:
    """Three one-frame chunks, without a model: what `speak.run` needs of a `Pipeline`."""

    preset = SimpleNamespace(first_chunk_frames=1)

    def encode_context(self, context):
        return []

    def prepare(self, context, speaker, text):
        pass

    def speak(self, text, speaker, params, *, context, max_seconds, warn):
        for i in range(3):
            yield AudioChunk(i, 0, torch.zeros(1, 32, dtype=torch.long), np.full(FRAME, 0.1 * (i + 1), np.float32),
                             24000, 0.01, 0.01, "eos" if i == 2 else None)


class _LosingPlayer:
    """A player whose audio server goes away after the first chunk."""

    def __init__(self, *args, **kwargs):
        self.writes, self.underruns = 0, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def lost(self):
        return self.writes >= 1

    def write(self, pcm):
        self.writes += 1

    buffered_ms = 0.0

    def drain(self):
        return False


@pytest.mark.parametrize("lose", [True, False])
def test_playback_lost_is_one_warning_and_the_file_still_complete(lose, tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(speak.ui, "warn", warnings.append)
    monkeypatch.setattr(speak.ui, "info", lambda message: None)
    if lose:
        monkeypatch.setattr(speak.audio, "Player", _LosingPlayer)
    else:  # the stream lives but does not finish in time: the other warning
        monkeypatch.setattr(speak.audio, "Player", type("SlowPlayer", (_LosingPlayer,), {"lost": False}))
    out = tmp_path / "out.wav"
    speak.run(_Pipeline(), speak.SpeakJob("Hello.", output=str(out), play=True))
    if lose:
        assert warnings == [f"playback stopped: the audio output went away (audio server or device gone); "
                            f"still writing {out}"]
    else:
        assert warnings == ["playback did not finish in time: the end of the audio may be cut off"]
    assert len(sf.read(out)[0]) == 3 * FRAME  # every chunk reached the file


class _SilentPipeline(_Pipeline):
    """A sentence that ends before its first frame (EOS at once)."""

    def speak(self, text, speaker, params, *, context, max_seconds, warn):
        yield AudioChunk(0, 0, torch.zeros(0, 32, dtype=torch.long), np.zeros(0, np.float32), 24000, 0.01, 0.0,
                         "eos")


def test_without_frames_existing_audio_and_codes_files_stay_as_they_were(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(speak.ui, "info", said.append)
    out, codes = tmp_path / "out.wav", tmp_path / "codes.npy"
    out.write_bytes(b"earlier audio")
    np.save(codes, np.ones((10, 32), dtype=np.int64))
    speak.run(_SilentPipeline(), speak.SpeakJob("Hello.", output=str(out), save_codes=str(codes)))
    assert out.read_bytes() == b"earlier audio"
    assert np.load(codes).shape == (10, 32)  # was overwritten by an empty array
    assert said[-1].endswith(f": {out} and {codes} not written"), said


class _InterruptedWriter:
    """An audio writer during whose first write Ctrl-C arrives (as in the race CI once caught: the file held the
    chunk, the summary said no audio, and the codes lacked it)."""

    def __init__(self):
        self.samples = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def write(self, pcm):
        if not self.samples:
            os.kill(os.getpid(), signal.SIGINT)
        self.samples += len(pcm)


def test_an_interrupt_never_separates_a_chunk_s_audio_from_its_totals_and_codes(tmp_path, monkeypatch):
    said, writer, codes = [], _InterruptedWriter(), tmp_path / "codes.npy"
    monkeypatch.setattr(speak.ui, "info", said.append)
    monkeypatch.setattr(speak.audio, "open_writer", lambda *args, **kwargs: writer)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            speak.run(_Pipeline(), speak.SpeakJob("Hello.", output=str(tmp_path / "out.wav"), save_codes=str(codes)))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert writer.samples == FRAME  # the interrupt came during the first chunk: only it was written
    assert said[-1].startswith("0.08 s of audio in "), said  # said "no audio generated: ... not written"
    assert np.load(codes).shape == (1, 32)


class _LoudPipeline(_Pipeline):
    """Chunks 1 and 2 go beyond full scale (2% and 50% of their samples), chunk 0 by a single sample."""

    def speak(self, text, speaker, params, *, context, max_seconds, warn):
        for i, loud in enumerate((1, FRAME // 50, FRAME // 2)):
            pcm = np.full(FRAME, 0.5, np.float32)
            pcm[:loud] = 1.5
            yield AudioChunk(i, 0, torch.zeros(1, 32, dtype=torch.long), pcm, 24000, 0.01, 0.01,
                             "eos" if i == 2 else None)


def test_audible_clipping_is_warned_once_and_a_stray_peak_not_at_all(tmp_path, monkeypatch):
    """The writers clip samples beyond full scale to it: a chunk where that is audible (more than 0.1% of its
    samples) is named once a run; one sample over is not worth a line. The file holds the clipped samples."""
    warned = []
    monkeypatch.setattr(speak.ui, "warn", warned.append)
    monkeypatch.setattr(speak.ui, "info", lambda msg: None)
    out = tmp_path / "out.wav"
    speak.run(_LoudPipeline(), speak.SpeakJob("Hello.", output=str(out)))
    assert warned == ["chunk 1: 2.0% of the samples are beyond full scale: clipped to it (warned once a run)"]
    samples = sf.read(out, dtype="int16")[0]
    assert len(samples) == 3 * FRAME and samples.max() == 32767


def test_samples_that_are_not_numbers_are_named_beside_clipping():
    """NaN and clipping are two warnings, each once a run: one said does not silence the other."""
    pcm = np.zeros(FRAME, np.float32)
    pcm[3] = np.nan
    pcm[4:99] = 2.0
    pcm[99] = -np.inf  # clipped to full scale by the writers, like any sample beyond it
    assert speak._clipped(pcm) == {
        "nan": "1 samples are not numbers (NaN): written as silence (warned once a run)",
        "clip": "5.0% of the samples are beyond full scale: clipped to it (warned once a run)"}
    assert to_int16(pcm)[3] == 0 and to_int16(pcm)[99] == -32767
    assert speak._clipped(np.zeros(FRAME, np.float32)) == {}
