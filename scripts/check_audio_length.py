"""Check that audio written by `say` / `stream` holds exactly frames x 1920 samples of its saved codes.

Usage: check_audio_length.py AUDIO CODES.npy [AUDIO CODES.npy ...]   (AUDIO: a .wav, or .raw s16le mono)
"""

import sys

import numpy as np
import soundfile

SAMPLES_PER_FRAME = 1920


def main(args: list[str]) -> int:
    failed = 0
    for audio, codes in zip(args[::2], args[1::2], strict=True):
        frames = np.load(codes).shape[0]
        if audio.endswith(".raw"):
            pcm = np.fromfile(audio, dtype="<i2").astype(np.float32) / 32768
        else:
            pcm, rate = soundfile.read(audio, dtype="float32")
            assert rate == 24_000, rate
        peak = float(np.abs(pcm).max()) if len(pcm) else 0.0
        ok = len(pcm) == frames * SAMPLES_PER_FRAME and frames > 0 and bool(np.isfinite(pcm).all()) and peak > 0
        failed += not ok
        print(f"{audio}: {frames} frames, {len(pcm)} samples (want {frames * SAMPLES_PER_FRAME}), "
              f"peak {peak:.3f}: {'OK' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
