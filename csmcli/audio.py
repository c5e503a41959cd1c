"""Audio I/O: reading reference audio, incremental file writers, stdout streaming and playback.

Everything here takes or returns numpy float32 mono arrays (`[T]`, range [-1, 1]); the engine's chunk type stays
outside. sounddevice is imported inside functions so this module imports on machines without PortAudio.
"""

from __future__ import annotations

import errno
import os
import signal
import stat as stat_mode
import struct
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import soundfile as sf
import soxr

from csmcli.errors import CsmError

SAMPLE_RATE = 24000
# extension -> (libsndfile major format, subtype)
WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
# libsndfile's sf_command codes (sndfile.h); soundfile exposes sf_command but not these names.
_SFC_SET_UPDATE_HEADER_AUTO = 0x1061
_NO_PLAYBACK = "audio playback unavailable: {} — write a file instead (say -o FILE, stream --no-play -o FILE)"


class OutputClosed(Exception):
    """The reader of our stdout went away (`csmcli say - | head -c 1000`): stop quietly, exit 0.

    Raised from a BrokenPipeError after the dead pipe's file descriptor has been pointed at /dev/null: the
    interpreter flushes sys.stdout once more at exit and would otherwise print "Exception ignored ...
    BrokenPipeError" (the recipe from the Python docs, signal module, "Note on SIGPIPE").
    """


# ---------------------------------------------------------------------------------------------------------- reading


def load_audio(
    path: str | Path,
    target_rate: int = SAMPLE_RATE,
    max_seconds_warn: float = 30.0,
    on_warning: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Read reference/context audio (wav/flac/ogg/mp3, any rate, any channels) as float32 mono `[T]` at target_rate.

    Clips longer than max_seconds_warn, and float files beyond full scale, are reported through on_warning (default:
    `warnings.warn`), not refused; samples that are not numbers are refused.
    """

    def warn(msg: str) -> None:
        if on_warning is None:
            warnings.warn(msg, stacklevel=3)
        else:
            on_warning(msg)

    p = Path(path)
    if not p.exists():
        raise CsmError(f"audio file not found: {p}")
    if not p.is_file():
        raise CsmError(f"not an audio file: {p}")
    try:
        data, rate = sf.read(p, dtype="float32", always_2d=True)  # [T, C]
    except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise CsmError(f"cannot read audio file {p}: {e}") from e
    if data.shape[0] == 0:
        raise CsmError(f"audio file has no samples: {p}")
    if not np.isfinite(data).all():
        raise CsmError(f"audio file has samples that are not numbers (NaN or infinite): {p}")
    peak = float(np.abs(data).max())
    if peak > 1.0:  # only float files can: the model hears it as it is, far louder than any recording
        warn(f"{p} peaks at {peak:.3g}, beyond full scale (1.0): the reference may be distorted")
    seconds = data.shape[0] / rate
    if seconds > max_seconds_warn:
        warn(f"{p} is {seconds:.1f} s long; audio over {max_seconds_warn:g} s fills the context and slows generation")
    mono = data.mean(axis=1)  # [T]
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------- writing


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 (x * 32767, rounded, clipped): the one conversion every writer uses, so that file,
    streamed WAV and raw output hold identical samples."""
    x = np.nan_to_num(_mono(pcm), nan=0.0)  # NaN cast to int16 is undefined: a click of random value
    return np.rint(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def _mono(pcm: np.ndarray) -> np.ndarray:
    x = np.asarray(pcm, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono pcm of shape [T], got {x.shape}")
    return x


class AudioWriter:
    """Incremental mono writer: `write(pcm)` per chunk, `close()` (or `with`); `frames_written` counts samples."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.frames_written = 0

    def write(self, pcm: np.ndarray) -> None:
        data = to_int16(pcm)
        self._write(data)
        self.frames_written += len(data)

    def _write(self, data: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> AudioWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # runs on KeyboardInterrupt too: the CLI's Ctrl-C (exit 130) still finalizes the file


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back until the block is done (their handlers swapped for ones that only note them;
    main thread only, where Python runs handlers): between creating a FLAC and writing its first samples an
    interrupt would leave a file without a header, which close() cannot repair; `speak` delivers each chunk (file,
    speakers, totals, codes) inside one, so that an interrupt never separates them. Nests."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    held = {sig: signal.signal(sig, lambda signum, frame: pending.append((signum, frame)))
            for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for signum, frame in pending[:1]:  # now, as it would have run
            handler = held[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


class FileWriter(AudioWriter):
    """.wav (PCM_16) / .flac / .ogg (vorbis) through libsndfile.

    The file is created by the first write: a run stopped before any audio (Ctrl-C, SIGTERM, an error) leaves no
    file, and an existing one as it was (a FLAC without samples cannot even be made valid: libsndfile writes its
    header with the first samples). A WAV is valid after every write, even if the process is killed before
    close(): soundfile's flush() does not touch the header (sizes stay 0 until close), so libsndfile is told to
    rewrite it after each write.
    """

    def __init__(self, path: Path, sample_rate: int, major: str, subtype: str) -> None:
        super().__init__(sample_rate)
        self.path = check_writable(path)
        self._format = (major, subtype)
        self._f: sf.SoundFile | None = None
        self._failed = False

    def _open(self) -> sf.SoundFile:
        major, subtype = self._format
        try:
            f = sf.SoundFile(self.path, "w", self.sample_rate, 1, subtype, format=major)
        except (RuntimeError, OSError) as e:
            raise CsmError(f"cannot write {self.path}: {e}") from e
        if major == "WAV":  # soundfile wraps no such call; its private handles are guarded by the SIGKILL test
            sf._snd.sf_command(f._file, _SFC_SET_UPDATE_HEADER_AUTO, sf._ffi.NULL, 1)
        return f

    def _write(self, data: np.ndarray) -> None:
        try:
            if self._f is None:  # Ctrl-C / SIGTERM wait until the file holds its first samples: close() finishes it
                with interrupts_deferred():
                    self._f = self._open()
                    self._f.write(data)
                return
            self._f.write(data)
        except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
            self._failed = True
            raise CsmError(f"cannot write {self.path}: {_write_failure(self.path, e)}") from e

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()  # idempotent
            except (RuntimeError, OSError) as e:
                if not self._failed:  # after a failed write its error is the one to report
                    raise CsmError(f"cannot write {self.path}: {_write_failure(self.path, e)}") from e


def _write_failure(path: Path, error: Exception) -> str:
    """Why a write failed, in words: libsndfile says only "System error." for a full disk."""
    try:
        stat = os.statvfs(path.parent)
        if stat.f_bavail * stat.f_frsize < 1 << 20:
            return os.strerror(errno.ENOSPC)  # the words the OS uses elsewhere: "No space left on device"
    except OSError:
        pass
    return getattr(error, "strerror", None) or str(error)


class StreamWriter(AudioWriter):
    """Streaming WAV (or raw s16le with raw=True) to a binary stream such as stdout, flushed per chunk.

    A streamed WAV cannot be seeked back to, so its RIFF and data sizes are 0xFFFFFFFF ("unknown, read to EOF"),
    the convention of ffmpeg, sox and libsndfile for piped WAV; readers take the length from the stream's end.
    """

    def __init__(self, out: IO[bytes], sample_rate: int, *, raw: bool = False, owns: bool = False,
                 name: str = "stdout") -> None:
        super().__init__(sample_rate)
        self._out, self._owns, self._closed, self.name = out, owns, False, name
        if not raw:
            unknown = 0xFFFFFFFF
            fmt = (16, 1, 1, sample_rate, sample_rate * 2, 2, 16)  # fmt size, PCM, mono, rate, bytes/s, align, bits
            self._put(struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", unknown, b"WAVE", b"fmt ", *fmt, b"data", unknown))

    def _write(self, data: np.ndarray) -> None:
        self._put(data.astype("<i2", copy=False).tobytes())

    def _put(self, b: bytes) -> None:
        try:
            self._out.write(b)
            self._out.flush()  # a listener on the pipe hears each chunk as soon as it exists
        except BrokenPipeError as e:
            self._closed = True
            _point_at_devnull(self._out)
            raise OutputClosed("output pipe closed by the reader") from e
        except OSError as e:  # a full disk (or /dev/full): nothing more can be delivered
            self._closed = True
            raise CsmError(f"cannot write {self.name}: {e.strerror or e}") from e

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._owns:
                self._out.close()
            else:
                self._out.flush()
        except BrokenPipeError:  # nothing left to deliver; the CLI's exit is the same either way
            _point_at_devnull(self._out)


class _CreatedOnWrite:
    """A binary file opened for writing by its first write: headerless output (`--raw -o FILE`) follows
    `FileWriter`'s rule, a run stopped before any audio leaves no file and an existing one as it was."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[bytes] | None = None

    def write(self, b: bytes) -> int:
        if self._f is None:
            try:
                self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close()
            except OSError as e:
                raise CsmError(f"cannot write {self.path}: {e.strerror or e}") from e
        return self._f.write(b)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _point_at_devnull(stream: IO[bytes]) -> None:
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # BytesIO & co: no interpreter-exit flush to silence
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def check_writable(path: str | Path) -> Path:
    """Refuse an output file that could not be created, without leaving anything created or truncated: the one check
    behind audio -o, --save-codes and bench -o, so a bad path is refused before the model loads (or the
    measurements run) and in the same words everywhere."""
    p = Path(path)
    if p.is_dir():
        raise CsmError(f"cannot write {p}: it is a directory")
    if not p.parent.is_dir():  # libsndfile would only say "System error."
        raise CsmError(f"cannot write {p}: directory {p.parent} does not exist")
    if p.exists() and not p.is_file():  # a FIFO or device: opening it to check could block
        return p
    existed = p.exists()
    try:  # appending creates nothing that stays and truncates nothing; a read-only place refuses it now
        with open(p, "ab"):
            pass
    except OSError as e:
        raise CsmError(f"cannot write {p}: {e.strerror or e}") from None
    if not existed:
        p.unlink(missing_ok=True)
    return p


def check_output(path: str | Path, raw: bool = False, stdout: IO[Any] | None = None) -> None:
    """What `open_writer` would refuse, checked without creating or truncating anything (so the CLI can refuse a
    bad -o before loading the model)."""
    if str(path) == "-":
        if _binary(stdout).isatty():
            raise CsmError("refusing to write binary audio to a terminal; redirect or use -o FILE")
        return
    p = check_writable(path)  # first: `-o .` is a directory, not a file without a suffix
    if _is_stream(p):
        if not raw and p.suffix.lower() in WRITE_FORMATS and p.suffix.lower() != ".wav":
            raise CsmError(f"{p} is not a regular file: only WAV (or --raw) can be streamed into it")
        if _is_terminal(p):  # `-o /dev/tty`, `-o /dev/stdout` on a terminal: what `-o -` refuses there
            raise CsmError(f"refusing to write binary audio to a terminal ({p}); redirect or use -o FILE")
        return
    if not raw and p.name.lower() in WRITE_FORMATS:  # `-o .wav`: Path(".wav").suffix is "", all name
        raise CsmError(f"{p}: give a file name before {p.name}, like out{p.name}")
    if not raw and p.suffix.lower() not in WRITE_FORMATS:
        raise CsmError(f"{p}: unsupported output format '{p.suffix or p.name}': use {', '.join(WRITE_FORMATS)} or '-' "
                       "for stdout")


def _binary(stdout: IO[Any] | None) -> IO[bytes]:
    out = stdout if stdout is not None else sys.stdout
    if out is None:  # started with stdout closed (`>&-`)
        raise CsmError("stdout is closed: write to a file with -o FILE")
    return getattr(out, "buffer", out)  # text stdout -> its binary buffer


def _is_terminal(p: Path) -> bool:
    """A character device that is a terminal (opened without waiting or taking it as controlling terminal; FIFOs
    are not opened: that would wait for a reader)."""
    try:
        if not stat_mode.S_ISCHR(p.stat().st_mode):
            return False
        fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.isatty(fd)
    finally:
        os.close(fd)


def _is_stream(p: Path) -> bool:
    """An existing path that is no regular file: a FIFO or a device such as /dev/null, written like stdout."""
    return p.exists() and not p.is_file() and not p.is_dir()


def open_writer(path: str | Path, sample_rate: int, *, raw: bool = False, stdout: IO[Any] | None = None) -> AudioWriter:
    """Writer chosen by path: "-" streams to stdout (WAV, or s16le with raw=True), else by extension
    (.wav PCM_16, .flac, .ogg vorbis), or headerless s16le with raw=True whatever the extension."""
    check_output(path, raw, stdout)
    if str(path) == "-":
        return StreamWriter(_binary(stdout), sample_rate, raw=raw)
    p = Path(path)
    if raw or _is_stream(p):  # a FIFO or device: a streamed WAV, as on stdout
        return StreamWriter(_CreatedOnWrite(p), sample_rate, raw=raw, owns=True, name=str(p))  # type: ignore[arg-type]
    return FileWriter(p, sample_rate, *WRITE_FORMATS[p.suffix.lower()])


# --------------------------------------------------------------------------------------------------------- playback


def load_sounddevice() -> tuple[Any, str | None]:
    """The sounddevice module, or None and the reason it cannot load (shared with `csmcli info`)."""
    try:
        import sounddevice
    except OSError:  # sounddevice raises OSError('PortAudio library not found') at import
        return None, "PortAudio not found (apt-get install libportaudio2)"
    except ImportError:
        return None, "the sounddevice package is not installed"
    return sounddevice, None


def _sounddevice() -> Any:
    sounddevice, reason = load_sounddevice()
    if sounddevice is None:
        raise CsmError(_NO_PLAYBACK.format(reason))
    return sounddevice


def list_devices() -> list[dict[str, Any]]:
    """Output devices as dicts: index, name, channels (max output), default (PortAudio's default output)."""
    sd = _sounddevice()
    default = sd.default.device[1]
    return [
        {"index": i, "name": d["name"], "channels": d["max_output_channels"], "default": i == default}
        for i, d in enumerate(sd.query_devices())
        if d["max_output_channels"] > 0
    ]


def resolve_device(name_or_index: str | int | None = None) -> int:
    """PortAudio index of an output device given by index, exact name or unique name fragment (None: default)."""
    devices = list_devices()
    if not devices:
        raise CsmError(_NO_PLAYBACK.format("no audio output device found"))
    if name_or_index is None or name_or_index == "":
        return next((d["index"] for d in devices if d["default"]), devices[0]["index"])
    key = str(name_or_index).strip()
    available = "; ".join(f"{d['index']}: {d['name']}" for d in devices)
    if key.isdigit():
        if any(d["index"] == int(key) for d in devices):
            return int(key)
        raise CsmError(f"unknown audio output device {key}; available: {available}")
    matches = [d for d in devices if d["name"].lower() == key.lower()]
    matches = matches or [d for d in devices if key.lower() in d["name"].lower()]
    if len(matches) == 1:
        return matches[0]["index"]
    if matches:
        raise CsmError(f"audio output device '{key}' is ambiguous: {'; '.join(d['name'] for d in matches)}")
    raise CsmError(f"unknown audio output device '{key}'; available: {available}")


class Player:
    """Gapless playback of streamed chunks: one OutputStream whose callback drains a queue that write() fills.

    sd.play() per chunk opens a new stream each time and leaves audible gaps between chunks; here the stream
    runs for the whole utterance and plays queued chunks back to back.

    Prebuffer: output stays silent until prebuffer_ms (at least the first chunk) is queued, then plays
    continuously. When the callback finds too little audio while playing (the generator fell behind), the gap is
    padded with zeros, counted in `underruns`, and the prebuffer refills before resuming, so one slow stretch is
    one gap rather than a stutter. drain() marks the end: a short tail then is the end, not an underrun.

    Use: `with Player(24000) as p: ...; p.write(pcm); ...; p.drain()`; leaving the block without drain() (Ctrl-C)
    cuts playback at once. Start it before generating: the stream opens while the first chunk is computed.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, device: str | int | None = None, prebuffer_ms: float = 0.0):
        self.sample_rate = sample_rate
        self.device = device
        self.underruns = 0
        self.frames_played = 0  # real (non-padding) samples handed to the device
        self._prebuffer = max(1, round(sample_rate * prebuffer_ms / 1000))
        self._chunks: deque[np.ndarray] = deque()  # float32 [n] each
        self._head = 0  # samples of _chunks[0] already played
        self._queued = 0
        self._cond = threading.Condition()
        self._playing = False  # False while (re)filling the prebuffer
        self._ending = False  # inside drain()
        self._stream: Any = None

    @property
    def buffered_ms(self) -> float:
        """Audio queued ahead of playback."""
        return self._queued * 1000.0 / self.sample_rate

    def start(self) -> Player:
        """Open and start the output stream (idempotent): it plays silence until the prebuffer is filled."""
        if self._stream is not None:  # a second stream would drain the same queue at twice the rate
            return self
        sd = _sounddevice()
        device = resolve_device(self.device)
        stream = None
        try:
            stream = sd.OutputStream(
                samplerate=self.sample_rate, channels=1, dtype="float32", device=device, callback=self._callback
            )
            stream.start()
        except sd.PortAudioError as e:
            if stream is not None:
                stream.close()
            why = f"cannot open output device {device} at {self.sample_rate} Hz: {e}"
            raise CsmError(_NO_PLAYBACK.format(why)) from e
        self._stream = stream
        return self

    @property
    def lost(self) -> bool:
        """The output stream stopped by itself (the audio server or the device went away, e.g. PulseAudio was
        killed): what is queued will not play, and `write` drops what it is given."""
        stream = self._stream
        return stream is not None and not stream.active

    def write(self, pcm: np.ndarray) -> None:
        """Queue a chunk; never blocks on the device."""
        x = np.clip(np.nan_to_num(_mono(pcm), nan=0.0), -1.0, 1.0)  # a copy: the caller may reuse its buffer
        if len(x) and not self.lost:
            with self._cond:
                self._chunks.append(x)
                self._queued += len(x)

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        self._fill(outdata[:, 0])

    def _fill(self, out: np.ndarray) -> None:
        """Body of the PortAudio callback: fill `out` ([frames] float32) from the queue, zeros where there is none."""
        n, got = len(out), 0
        with self._cond:
            if not self._playing and (self._queued >= self._prebuffer or (self._ending and self._queued)):
                self._playing = True
            if self._playing:
                while got < n and self._chunks:
                    chunk = self._chunks[0]
                    take = min(n - got, len(chunk) - self._head)
                    out[got : got + take] = chunk[self._head : self._head + take]
                    got, self._head = got + take, self._head + take
                    if self._head == len(chunk):
                        self._chunks.popleft()
                        self._head = 0
                self._queued -= got
                self.frames_played += got
                if got < n and not self._ending:
                    self.underruns += 1
                    self._playing = False
                if not self._queued:
                    self._cond.notify_all()
        out[got:] = 0

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until all queued audio has played; False if timeout (default: queued duration + 5 s) ran out or
        the stream was `lost` (checked every 0.1 s: a dead stream's callback never empties the queue)."""
        with self._cond:
            timeout = self._queued / self.sample_rate + 5.0 if timeout is None else timeout
            deadline = time.monotonic() + timeout
            self._ending = True
            try:
                while self._queued and not self.lost and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(min(left, 0.1))
            finally:
                self._ending = False
            done = not self._queued
            if done:
                self._playing = False  # idle until the next utterance: silence now is not an underrun
        if done and self._stream is not None:
            time.sleep(self._stream.latency)  # the device still holds that much audio we handed over
        return done

    def close(self) -> None:
        """Stop the stream: the device plays out what it holds, or is cut at once if audio is still queued
        (Ctrl-C)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                if self._queued:
                    stream.abort()
                else:
                    stream.stop()
            finally:
                stream.close()
        with self._cond:
            self._chunks.clear()
            self._queued = self._head = 0

    def __enter__(self) -> Player:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
