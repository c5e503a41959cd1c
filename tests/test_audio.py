"""csmcli.audio: reading, file writers, interruption safety, stdout streaming (playback: test_audio_player.py)."""

from __future__ import annotations

import io
import os
import pty
import signal
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from csmcli.audio import OutputClosed, check_output, load_audio, open_writer, to_int16
from csmcli.errors import CsmError

ROOT = Path(__file__).resolve().parents[1]
RATE = 24000
CHUNK = 1920  # one 80 ms frame


def sine(seconds: float, rate: int = RATE, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def chunks(x: np.ndarray, sizes=(CHUNK, 700, 3000, 1)):
    """Uneven chunks, as a streaming decoder may produce."""
    i, k = 0, 0
    while i < len(x):
        yield x[i : i + sizes[k % len(sizes)]]
        i, k = i + sizes[k % len(sizes)], k + 1


def run_py(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, timeout=60, **kw)


# ------------------------------------------------------------------------------------------------------- load_audio


def test_load_stereo_48k_is_mixed_down_and_resampled(tmp_path):
    left, right = sine(1.0, 48000, 300), sine(1.0, 48000, 500, 0.2)
    sf.write(tmp_path / "ref.wav", np.stack([left, right], axis=1), 48000, subtype="FLOAT")
    got = load_audio(tmp_path / "ref.wav")
    want = soxr.resample((left + right) / 2, 48000, RATE, quality="HQ")
    assert got.dtype == np.float32 and got.shape == (RATE,)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_load_at_target_rate_is_untouched(tmp_path):
    x = sine(0.5)
    sf.write(tmp_path / "ref.wav", x, RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "ref.wav"), x)


@pytest.mark.parametrize("ext", ["flac", "ogg", "mp3"])
def test_load_compressed_formats(tmp_path, ext):
    x = sine(1.0, 16000)
    sf.write(tmp_path / f"ref.{ext}", x, 16000)
    got = load_audio(tmp_path / f"ref.{ext}")
    want = soxr.resample(x, 16000, RATE, quality="HQ")
    n = min(len(got), len(want))
    assert abs(len(got) - RATE) < 0.01 * RATE  # mp3 may carry encoder padding
    assert np.corrcoef(got[:n], want[:n])[0, 1] > 0.95


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("missing.wav", None, "not found"),
        ("noise.wav", os.urandom(4000), "cannot read"),
        ("text.flac", b"hello, not audio\n", "cannot read"),
        ("zero-bytes.wav", b"", "cannot read"),
    ],
)
def test_load_bad_files_raise_csm_error_with_path(tmp_path, name, content, words):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CsmError, match=words) as err:
        load_audio(path)
    assert str(path) in str(err.value)


def test_load_directory_and_zero_length_audio(tmp_path):
    with pytest.raises(CsmError, match="not an audio file"):
        load_audio(tmp_path)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), RATE)
    with pytest.raises(CsmError, match="no samples") as err:
        load_audio(tmp_path / "empty.wav")
    assert "empty.wav" in str(err.value)


def test_load_warns_above_max_seconds(tmp_path):
    sf.write(tmp_path / "long.wav", np.zeros(8000 * 31, np.float32), 8000)
    seen: list[str] = []
    load_audio(tmp_path / "long.wav", on_warning=seen.append)
    assert len(seen) == 1 and "31.0 s" in seen[0]
    with pytest.warns(UserWarning, match="long.wav"):
        load_audio(tmp_path / "long.wav")
    seen.clear()
    load_audio(tmp_path / "long.wav", max_seconds_warn=40, on_warning=seen.append)
    assert seen == []


# ---------------------------------------------------------------------------------------------------------- writers


def test_to_int16_clips_rounds_and_zeroes_nan():
    x = np.array([0.0, 1.0, -1.0, 2.5, -7.0, 0.5, np.nan, np.inf], np.float32)
    assert to_int16(x).tolist() == [0, 32767, -32767, 32767, -32767, 16384, 0, 32767]
    with pytest.raises(ValueError, match="mono"):
        to_int16(np.zeros((10, 2), np.float32))


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_lossless_writer_round_trips_int16(tmp_path, ext):
    x = sine(1.0) * 2.5  # clips: the file holds exactly what to_int16 makes
    with open_writer(tmp_path / f"out.{ext}", RATE) as w:
        for c in chunks(x):
            w.write(c)
    assert w.frames_written == len(x)
    data, rate = sf.read(tmp_path / f"out.{ext}", dtype="int16")
    assert rate == RATE
    np.testing.assert_array_equal(data, to_int16(x))


def test_ogg_writer(tmp_path):
    x = sine(1.0)
    with open_writer(tmp_path / "out.OGG", RATE) as w:
        for c in chunks(x):
            w.write(c)
    data, rate = sf.read(tmp_path / "out.OGG", dtype="float32")
    assert rate == RATE and len(data) == len(x)
    assert np.corrcoef(data, x)[0, 1] > 0.99


def test_writer_rejects_unknown_extension_and_missing_dir(tmp_path):
    with pytest.raises(CsmError, match=r"\.wav, \.flac, \.ogg"):
        open_writer(tmp_path / "out.mp4", RATE)
    with pytest.raises(CsmError, match="does not exist"):
        open_writer(tmp_path / "nope" / "out.wav", RATE)


@pytest.mark.parametrize(("name", "raw"), [("out.wav", False), ("out.pcm", True)])
def test_an_output_that_is_a_directory_is_refused_before_writing(tmp_path, name, raw):
    (tmp_path / name).mkdir()
    with pytest.raises(CsmError, match=f"^cannot write {tmp_path / name}: it is a directory$"):
        check_output(tmp_path / name, raw)


def test_raw_file_writer(tmp_path):
    x = sine(0.3)
    with open_writer(tmp_path / "out.pcm", RATE, raw=True) as w:
        for c in chunks(x):
            w.write(c)
    assert (tmp_path / "out.pcm").read_bytes() == to_int16(x).astype("<i2").tobytes()


# The child writes one chunk per line it reads on stdin and prints frames_written after each, so the parent
# signals it at a known point (blocked in readline, between chunks) without sleeps or races.
INTERRUPTED_WRITER = """
import sys
import numpy as np
from csmcli.audio import open_writer
x = (0.5 * np.sin(np.arange(24000 * 5) * 0.05)).astype(np.float32)
try:
    with open_writer(sys.argv[1], 24000) as w:
        for i in range(0, len(x), 1920):
            w.write(x[i:i + 1920])
            print(w.frames_written, flush=True)
            sys.stdin.readline()
except KeyboardInterrupt:
    sys.exit(130)
"""


def wav_header_sizes(path: Path) -> tuple[int, int]:
    b = path.read_bytes()
    assert b[:4] == b"RIFF" and b[36:40] == b"data", "expected the canonical 44-byte PCM header"
    return struct.unpack("<I", b[4:8])[0], struct.unpack("<I", b[40:44])[0]


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
def test_a_file_is_created_by_its_first_samples(tmp_path, ext):
    """Stopped before any audio, a run leaves no file and an existing one as it was: a FLAC without samples cannot
    be made valid (libsndfile writes its header with the first samples)."""
    path = tmp_path / f"out.{ext}"
    with open_writer(path, RATE):
        pass
    assert not path.exists()
    path.write_bytes(b"keep me")
    with open_writer(path, RATE):
        pass
    assert path.read_bytes() == b"keep me"
    with open_writer(path, RATE) as w:
        w.write(np.zeros(1920, dtype=np.float32))
    assert sf.info(path).frames == 1920


def test_a_raw_file_is_created_by_its_first_samples(tmp_path):
    """`--raw -o FILE` follows the same rule (it used to truncate an existing file when opened)."""
    path = tmp_path / "out.raw"
    with open_writer(path, RATE, raw=True):
        pass
    assert not path.exists()
    path.write_bytes(b"keep me")
    with open_writer(path, RATE, raw=True):
        pass
    assert path.read_bytes() == b"keep me"
    with open_writer(path, RATE, raw=True) as w:
        w.write(np.full(1920, 0.5, dtype=np.float32))
    assert path.read_bytes() == to_int16(np.full(1920, 0.5, dtype=np.float32)).astype("<i2").tobytes()


def test_an_interrupt_waits_until_a_new_file_holds_its_first_samples(tmp_path):
    """A FLAC created but not yet written has no header, and close() cannot repair it: a SIGTERM (or Ctrl-C) that
    arrives in between is held back until the first samples are in, then stops the run with a valid file."""

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    path = tmp_path / "out.flac"
    writer = open_writer(path, RATE)
    real_open = writer._open

    def open_then_terminated():
        f = real_open()
        os.kill(os.getpid(), signal.SIGTERM)  # lands here, after the file exists and before any samples
        return f

    writer._open = open_then_terminated
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped), writer:
            writer.write(np.full(1920, 0.25, dtype=np.float32))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sf.info(path).frames == 1920


@pytest.mark.parametrize(
    ("ext", "sig", "rc"), [("wav", signal.SIGINT, 130), ("wav", signal.SIGKILL, -9), ("flac", signal.SIGINT, 130)]
)
def test_file_stays_valid_when_interrupted(tmp_path, ext, sig, rc):
    """SIGINT: close() runs on KeyboardInterrupt. SIGKILL: nothing runs, the WAV header must already be right."""
    path = tmp_path / f"out.{ext}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_WRITER, str(path)],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        for _ in range(6):
            written = int(p.stdout.readline())
            p.stdin.write("\n")
            p.stdin.flush()
        written = int(p.stdout.readline())  # 7th chunk is in the file; the child now waits on stdin
        p.send_signal(sig)
        assert p.wait(timeout=30) == rc
    finally:
        p.kill()
    assert written == 7 * 1920
    data, _ = sf.read(path, dtype="int16")
    x = (0.5 * np.sin(np.arange(written) * 0.05)).astype(np.float32)
    np.testing.assert_array_equal(data, to_int16(x))
    if ext == "wav":  # libsndfile forgives a stale header; other readers (wave, browsers) do not
        assert wav_header_sizes(path) == (36 + 2 * written, 2 * written)
        with wave.open(str(path)) as w:
            assert w.getnframes() == written


# ----------------------------------------------------------------------------------------------- stdout streaming

STDOUT_WRITER = """
import sys
import numpy as np
from csmcli.audio import open_writer
x = (0.7 * np.sin(np.arange(24000) * 0.03)).astype(np.float32) * 1.6
with open_writer("-", 24000, raw=sys.argv[1] == "raw") as w:
    for i in range(0, len(x), 1000):
        w.write(x[i:i + 1000])
"""


@pytest.mark.parametrize("mode", ["wav", "raw"])
def test_stdout_stream_matches_file_writer(tmp_path, mode):
    out = run_py(STDOUT_WRITER, mode, capture_output=True, check=True).stdout
    x = (0.7 * np.sin(np.arange(24000) * 0.03)).astype(np.float32) * 1.6
    with open_writer(tmp_path / "ref.wav", RATE) as w:
        w.write(x)
    ref, _ = sf.read(tmp_path / "ref.wav", dtype="int16")
    if mode == "raw":
        assert out == to_int16(x).astype("<i2").tobytes()
        return
    assert out[:4] == b"RIFF" and struct.unpack("<I", out[40:44])[0] == 0xFFFFFFFF  # streamed: size unknown
    data, rate = sf.read(io.BytesIO(out), dtype="int16")
    assert rate == RATE
    np.testing.assert_array_equal(data, ref)


def test_stdout_refuses_terminal():
    master, slave = pty.openpty()
    try:
        with open(slave, "wb", closefd=False) as tty, pytest.raises(CsmError, match="terminal"):
            open_writer("-", RATE, stdout=tty)
    finally:
        os.close(master)
        os.close(slave)


def test_a_terminal_device_given_to_o_is_refused_like_stdout_on_one():
    """`-o /dev/tty` (or `/dev/stdout` on a terminal) is a device, streamed like `-o -`: a terminal is refused as
    `-o -` on one is; a device that is no terminal (/dev/null) is not."""
    master, slave = pty.openpty()
    try:
        with pytest.raises(CsmError, match="refusing to write binary audio to a terminal"):
            check_output(os.ttyname(slave))
        check_output("/dev/null")
    finally:
        os.close(master)
        os.close(slave)


def test_stdout_accepts_text_stream_with_buffer():
    buf = io.TextIOWrapper(io.BytesIO())
    with open_writer("-", RATE, raw=True, stdout=buf) as w:
        w.write(np.array([0.5, -0.5], np.float32))
    assert buf.buffer.getvalue() == struct.pack("<hh", 16384, -16384)


# What the CLI does: OutputClosed -> exit 0, quietly.
HEAD_WRITER = """
import sys
import numpy as np
from csmcli.audio import OutputClosed, open_writer
try:
    with open_writer("-", 24000) as w:
        for _ in range(400):  # 1.5 MB: far past the pipe buffer, so writes hit the closed pipe
            w.write(np.zeros(1920, np.float32))
except OutputClosed:
    print("late output")  # whatever still goes to stdout, up to the interpreter's flush at exit, must vanish
    sys.exit(0)
sys.exit(3)
"""


def test_closed_pipe_exits_quietly():
    cmd = f'"{sys.executable}" -c "$CHILD" | head -c 1000 | wc -c; exit "${{PIPESTATUS[0]}}"'
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHILD": HEAD_WRITER}
    r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "1000"
    assert r.stderr == "", r.stderr  # no traceback, no "Exception ignored ... BrokenPipeError" at exit
    assert r.returncode == 0


def test_output_closed_in_process():
    class Dead(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise BrokenPipeError

    w = open_writer("-", RATE, raw=True, stdout=Dead())
    with pytest.raises(OutputClosed):
        w.write(np.zeros(10, np.float32))
    w.close()  # no second error


def test_file_writer_closes_on_keyboard_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt), open_writer(tmp_path / "out.wav", RATE) as w:
        w.write(sine(0.1))
        raise KeyboardInterrupt
    assert w._f.closed


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_a_write_that_fails_on_a_full_disk_says_so_in_one_line(tmp_path, monkeypatch, ext):
    """libsndfile reports a full disk as "System error.": the writer names the file and the reason (free space
    read from the file system), and its close() after that failure raises nothing more; what the first write put
    in the file stays readable."""
    import csmcli.audio as audio_module

    path = tmp_path / f"out.{ext}"
    writer = open_writer(path, 24000)
    writer.write(np.zeros(1920, dtype=np.float32))

    def refuse(data):
        raise sf.LibsndfileError(2, "")  # the code libsndfile returns for a failed system call

    monkeypatch.setattr(writer._f, "write", refuse)
    full = os.statvfs_result((4096, 4096, 100, 0, 0, 10, 0, 0, 0, 255))  # no free blocks
    monkeypatch.setattr(audio_module.os, "statvfs", lambda path: full)
    with pytest.raises(CsmError, match=rf"^cannot write {path}: No space left on device$"):
        writer.write(np.zeros(1920, dtype=np.float32))
    writer.close()
    assert len(sf.read(path)[0]) == 1920


def test_a_write_that_fails_for_another_reason_keeps_the_library_s_words(tmp_path, monkeypatch):
    path = tmp_path / "out.wav"
    writer = open_writer(path, 24000)
    writer.write(np.zeros(1920, dtype=np.float32))

    def refuse(data):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer._f, "write", refuse)
    with pytest.raises(CsmError, match=r"^cannot write .*out.wav: Input/output error$"):
        writer.write(np.zeros(1920, dtype=np.float32))
    writer.close()
