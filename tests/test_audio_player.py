"""csmcli.audio playback: the Player's buffer logic driven by hand, then real PortAudio on a PulseAudio null sink."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from csmcli import audio
from csmcli.audio import Player, list_devices, resolve_device
from csmcli.errors import CsmError

ROOT = Path(__file__).resolve().parents[1]
RATE = 24000
CHUNK = 1920  # one 80 ms frame


def ramp(n: int, start: int = 0) -> np.ndarray:
    """Distinct, never-zero samples: a dropped, repeated or reordered sample shows, and zeros are padding."""
    return ((1 + np.arange(start, start + n) % 999) / 1000.0).astype(np.float32)


def pull(player: Player, frames: int) -> np.ndarray:
    """One callback's worth of output, as PortAudio would ask for it ([frames, 1] float32)."""
    out = np.full((frames, 1), 9.0, np.float32)  # garbage the callback must overwrite
    player._callback(out, frames, None, None)
    return out[:, 0]


# ----------------------------------------------------------------------------------- buffer logic without PortAudio


def test_chunks_play_back_to_back():
    p = Player(RATE)
    x = ramp(10 * CHUNK + 123)
    i = 0
    for size in [CHUNK, 5, 4000, 1, 3 * CHUNK, len(x)]:
        p.write(x[i : i + size])
        i += size
    assert p.buffered_ms == pytest.approx(len(x) * 1000 / RATE)
    got = np.concatenate([pull(p, n) for n in [512] * 40])[: len(x)]
    np.testing.assert_array_equal(got, x)
    assert p.underruns == 1 and p.frames_played == len(x)  # the last pull ran dry: nobody called drain()


def test_prebuffer_holds_silence_until_filled():
    p = Player(RATE, prebuffer_ms=200)  # 4800 samples
    p.write(ramp(CHUNK))
    np.testing.assert_array_equal(pull(p, 256), 0)
    assert p.frames_played == 0 and p.underruns == 0  # not started yet: silence is not an underrun
    p.write(ramp(3000, CHUNK))
    np.testing.assert_array_equal(pull(p, 256), ramp(256))


def test_underrun_pads_with_zeros_counts_once_and_resumes():
    p = Player(RATE)
    p.write(ramp(300))
    out = pull(p, 512)
    np.testing.assert_array_equal(out[:300], ramp(300))
    np.testing.assert_array_equal(out[300:], 0)
    assert p.underruns == 1
    for _ in range(5):  # a long gap is one underrun, not one per callback
        np.testing.assert_array_equal(pull(p, 512), 0)
    assert p.underruns == 1
    p.write(ramp(100, 300))
    np.testing.assert_array_equal(pull(p, 100), ramp(100, 300))
    assert p.frames_played == 400


def test_drain_plays_tail_below_prebuffer_without_underrun():
    p = Player(RATE, prebuffer_ms=1000)
    p.write(ramp(1000))
    played: list[np.ndarray] = []
    stop = threading.Event()

    def device():  # stands in for the PortAudio thread
        while not stop.is_set():
            played.append(pull(p, 256))
            time.sleep(0.001)

    t = threading.Thread(target=device)
    t.start()
    try:
        assert p.drain(timeout=10)
    finally:
        stop.set()
        t.join()
    out = np.concatenate(played)
    first = np.flatnonzero(out)[0]  # silence while the prebuffer was short, then the whole tail at once
    np.testing.assert_array_equal(out[first : first + 1000], ramp(1000))
    assert not out[first + 1000 :].any()
    assert p.underruns == 0 and p.frames_played == 1000 and p.buffered_ms == 0
    np.testing.assert_array_equal(pull(p, 256), 0)  # idle after drain: silence, no underrun
    assert p.underruns == 0


def test_drain_times_out_without_a_device():
    p = Player(RATE)
    p.write(ramp(100))
    assert p.drain(timeout=0.05) is False


class DeadStream:
    """What sounddevice's OutputStream reports once PortAudio's callback thread has ended by itself (the audio
    server went away): not active, not stopped by us."""

    active = False
    latency = 0.0


def test_a_lost_stream_ends_drain_at_once_and_drops_writes():
    p = Player(RATE)
    p.write(ramp(RATE * 5))
    assert not p.lost  # no stream opened: nothing lost, only unplayed
    p._stream = DeadStream()
    assert p.lost
    start = time.monotonic()
    assert p.drain(timeout=30) is False
    assert time.monotonic() - start < 1.0  # not the queued 5 s + 5 s a dead callback would never shorten
    queued = p.buffered_ms
    p.write(ramp(CHUNK))
    assert p.buffered_ms == queued  # dropped: it would never play


def test_drain_notices_a_stream_lost_while_waiting():
    p = Player(RATE)
    p._stream = type("LiveStream", (), {"active": True, "latency": 0.0})()
    p.write(ramp(RATE * 5))
    threading.Timer(0.3, lambda: setattr(p._stream, "active", False)).start()
    start = time.monotonic()
    assert p.drain(timeout=30) is False
    assert 0.25 < time.monotonic() - start < 1.5


def test_write_rejects_non_mono_and_clips():
    p = Player(RATE)
    with pytest.raises(ValueError, match="mono"):
        p.write(np.zeros((10, 2), np.float32))
    p.write(np.array([2.0, -3.0, np.nan], np.float32))
    np.testing.assert_array_equal(pull(p, 3), [1.0, -1.0, 0.0])


def test_module_imports_without_sounddevice():
    code = "import sys, csmcli.audio; assert 'sounddevice' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=60)


def test_missing_portaudio_is_a_csm_error(tmp_path, monkeypatch):
    # what sounddevice does when libportaudio2 is not installed
    (tmp_path / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    advice = r"PortAudio not found \(apt-get install libportaudio2\).*stream --no-play -o FILE"
    with pytest.raises(CsmError, match=advice):
        list_devices()
    with pytest.raises(CsmError, match="PortAudio not found"):
        Player(RATE).start()


def test_no_output_device_is_a_csm_error(monkeypatch):
    monkeypatch.setattr(audio, "list_devices", lambda: [])
    with pytest.raises(CsmError, match="no audio output device"):
        resolve_device(None)


def test_resolve_device_by_index_name_and_fragment(monkeypatch):
    devices = [
        {"index": 0, "name": "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "channels": 2, "default": False},
        {"index": 3, "name": "pulse", "channels": 32, "default": False},
        {"index": 4, "name": "default", "channels": 32, "default": True},
    ]
    monkeypatch.setattr(audio, "list_devices", lambda: devices)
    assert resolve_device(None) == 4
    assert resolve_device(3) == 3 and resolve_device("3") == 3
    assert resolve_device("PULSE") == 3
    assert resolve_device("alc3246") == 0
    with pytest.raises(CsmError, match="ambiguous"):
        resolve_device("a")  # in every name
    with pytest.raises(CsmError, match="unknown audio output device 7"):
        resolve_device(7)
    with pytest.raises(CsmError, match=r"unknown audio output device 'speakers'.*3: pulse"):
        resolve_device("speakers")


# ------------------------------------------------------------------------------- real PortAudio, PulseAudio null sink


def _sounddevice():
    try:
        import sounddevice
    except OSError as e:
        pytest.skip(f"PortAudio not installed (apt-get install libportaudio2): {e}")
    return sounddevice


def _reload_portaudio(sd) -> None:
    # PortAudio lists devices once, at initialization: re-initialize so it sees (or forgets) the sink.
    # Private but documented in sounddevice's issue tracker as the way to refresh the device list.
    sd._terminate()
    sd._initialize()


@pytest.fixture(scope="module")
def pulse_sink(tmp_path_factory):
    """A private PulseAudio daemon with one null sink, reached by PortAudio through ALSA's "pulse" device."""
    with pulse_daemon(tmp_path_factory.mktemp("pulse")):
        yield "pulse"


@contextmanager
def pulse_daemon(home: Path) -> Iterator[subprocess.Popen]:
    """Run a PulseAudio daemon with a null sink in `home`; PortAudio's "pulse" device reaches it while inside."""
    sd = _sounddevice()
    if shutil.which("pulseaudio") is None:
        pytest.skip("pulseaudio not installed (apt-get install pulseaudio libasound2-plugins)")
    sock = home / "native"
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home)}
    cmd = [
        "pulseaudio",
        "-n",
        "--daemonize=no",
        "--exit-idle-time=30",  # a test process that crashes before teardown leaks no daemon for long
        "--use-pid-file=no",
        "--disable-shm=yes",
        "--log-target=stderr",
        "--load=module-null-sink sink_name=csmcli_null",
        f"--load=module-native-protocol-unix socket={sock} auth-anonymous=1",
    ]
    log = open(home / "pulseaudio.log", "wb")  # noqa: SIM115 - closed at teardown
    daemon = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    old_server = os.environ.get("PULSE_SERVER")
    try:
        deadline = time.monotonic() + 10
        while not _accepts(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"pulseaudio did not start: {(home / 'pulseaudio.log').read_text()[-500:]}")
            time.sleep(0.05)
        os.environ["PULSE_SERVER"] = f"unix:{sock}"  # for the ALSA pulse plugin inside this process
        _reload_portaudio(sd)
        if not any(d["name"] == "pulse" for d in list_devices()):
            pytest.skip("PortAudio has no 'pulse' device: the ALSA pulse plugin is missing (libasound2-plugins)")
        yield daemon
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=5)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        if old_server is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = old_server
        _reload_portaudio(sd)


def _accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def start_running(p: Player) -> Player:
    """Start p and wait until its stream consumes in real time.

    Through ALSA's pulse plugin onto a null sink, a new stream takes its first ~6 callbacks at once, then none for
    about 2 s (PortAudio's ALSA poll timeout) before running steadily; a chunk written in that window would wait
    instead of underrunning.
    """
    requested = [0]
    fill = p._fill

    def counting_fill(out: np.ndarray) -> None:
        requested[0] += len(out)
        fill(out)

    p._fill = counting_fill
    p.start()
    deadline = time.monotonic() + 15
    while requested[0] < RATE // 2:  # half a second of silence pulled: past the start burst and the stall
        assert time.monotonic() < deadline, f"the null sink pulled only {requested[0]} samples in 15 s"
        time.sleep(0.02)
    return p


def test_plays_one_second_gapless(pulse_sink):
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)).astype(np.float32)
    with start_running(Player(RATE, device=pulse_sink, prebuffer_ms=300)) as p:
        for i in range(0, len(x), CHUNK):
            p.write(x[i : i + CHUNK])
            time.sleep(0.04)  # twice real time, as a generator that keeps ahead
        assert p.drain(timeout=20)
    assert p.underruns == 0
    assert p.frames_played == len(x)


def test_late_chunk_is_an_underrun(pulse_sink):
    with start_running(Player(RATE, device=pulse_sink)) as p:
        p.write(np.zeros(CHUNK, np.float32))
        time.sleep(0.6)  # far longer than the 80 ms chunk plus the device's latency
        assert p.underruns >= 1  # counted while the gap is happening, not at drain
        p.write(np.zeros(CHUNK, np.float32))
        assert p.drain(timeout=20)
    assert p.frames_played == 2 * CHUNK


def test_real_device_listing_and_unknown_name(pulse_sink):
    devices = list_devices()
    assert {"index", "name", "channels", "default"} <= devices[0].keys()
    assert sum(d["default"] for d in devices) <= 1
    assert resolve_device(pulse_sink) == next(d["index"] for d in devices if d["name"] == "pulse")
    with pytest.raises(CsmError, match="unknown audio output device 'no-such-speaker'"):
        Player(RATE, device="no-such-speaker").start()
    p = Player(RATE, device=pulse_sink).start()
    try:
        stream = p._stream
        assert p.start()._stream is stream  # a second stream would eat the queue twice as fast
    finally:
        p.close()


def test_audio_server_killed_mid_playback(tmp_path):
    # Without the check, drain() waited the queued audio + 5 s for a callback that never came back (11 s here).
    with pulse_daemon(tmp_path) as daemon:
        p = start_running(Player(RATE, device="pulse"))
        try:
            p.write(np.zeros(RATE * 5, np.float32))
            time.sleep(0.3)
            daemon.kill()
            daemon.wait()
            deadline = time.monotonic() + 10
            while not p.lost:
                assert time.monotonic() < deadline, "PortAudio's stream still active 10 s after the server died"
                time.sleep(0.05)
            start = time.monotonic()
            assert p.drain() is False
            assert time.monotonic() - start < 1.0
        finally:
            p.close()
