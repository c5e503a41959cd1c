"""Run `csmcli` in a subprocess as a user would, and read back what a run left: WAV, codes, stdout, stderr.

A run on the tiny checkpoint costs seconds (mostly importing torch), so `Runs` starts a test module's runs at
once in the background, two at a time, and makes each run once per session however many tests read it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 24000
FRAME = 1920  # samples per 80 ms frame
TEXT = "Hello there, how are you doing today?"
SHORT = ("--max-seconds", "0.8")  # random weights never emit EOS: every sentence makes exactly this much
FRAMES = 10
# One OpenMP thread: on shared cores the default spin-waits made a tiny run several times slower.
# CSMCLI_DEBUG off, so errors are the one line a user sees.
ENV = {"OMP_NUM_THREADS": "1", "CSMCLI_DEBUG": "", "COLUMNS": "200"}


def model_args(model: Path | str) -> tuple[str, ...]:
    return ("--torch-device", "cpu", "--model", str(model))


def seeded_say(model: Path) -> tuple[str, ...]:
    """The run most tests compare against: seed 5, default temperature, to out.wav, codes saved."""
    return ("say", TEXT, *SHORT, "--seed", "5", "-o", "out.wav", "--save-codes", "codes.npy", *model_args(model))


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str
    dir: Path  # the run's working directory, where its files are

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()

    def codes(self, name: str = "codes.npy") -> np.ndarray:
        return np.load(self.dir / name)  # [frames, 32]

    def wav(self, name: str = "out.wav") -> np.ndarray:
        return read_wav(self.dir / name)

    def stdout_wav(self) -> np.ndarray:
        return read_wav(io.BytesIO(self.stdout))


def read_wav(file) -> np.ndarray:
    data, rate = sf.read(file, dtype="int16")
    assert rate == RATE and data.ndim == 1
    return data


def env(**extra: str | None) -> dict[str, str]:
    """os.environ + ENV + extra; an extra of None removes that variable."""
    out = {**os.environ, **ENV}
    for k, v in extra.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "csmcli", *args]


def csmcli(*args: str, cwd: Path, timeout: float = 300, **extra_env: str | None) -> Result:
    p = subprocess.run(command(*args), cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout,
                       env=env(**extra_env))
    return Result(p.returncode, p.stdout, p.stderr.decode(errors="replace"), cwd)


class Runs:
    """Named CLI runs, each in its own directory under root (`dir(name)`, for input files written first).

    `start(name, *args)` queues `csmcli <args>` (once: a second start with the same arguments is a no-op);
    `runs(name)` waits for it. `cancel_pending()` drops queued runs nobody waited for (a `-k` selection).
    """

    def __init__(self, root: Path, workers: int = 2) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="csmcli-run")
        self._runs: dict[str, tuple[tuple[str, ...], Future[Result]]] = {}

    def dir(self, name: str) -> Path:
        d = self.root / name.replace(" ", "-")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start(self, name: str, *args: str) -> None:
        if name in self._runs:
            ran, _ = self._runs[name]
            assert ran == args, f"run {name!r} was started with other arguments: {ran}"
            return
        self._runs[name] = (args, self._pool.submit(csmcli, *args, cwd=self.dir(name)))

    def __call__(self, name: str) -> Result:
        return self._runs[name][1].result()

    def cancel_pending(self) -> None:
        for name, (_, future) in list(self._runs.items()):
            if future.cancel():
                del self._runs[name]


_session: Runs | None = None


def session_runs(tmp_path_factory) -> Runs:
    """One Runs for the test session, so test modules share runs (test_stream compares with test_say's)."""
    global _session
    if _session is None:
        _session = Runs(tmp_path_factory.mktemp("cli-runs"))
    return _session
