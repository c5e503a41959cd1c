"""Probe (CUDA): does a chunk's Mimi decode hide behind the next chunk's frame steps when it runs on a second
stream? For 1 and 64 streams: 8 graphed frame steps alone, Mimi's decode of an 8-frame chunk alone, and both
launched together (Mimi on a side stream), wall milliseconds, medians of 10.

Usage: overlap_probe.py [BATCH ...]   (default 1 64)
"""

import statistics
import sys
import time
from collections import deque

import torch

from csmcli.checkpoint import random_model
from csmcli.engine import ChunkDecoder, Engine, Request
from csmcli.model import CSM_1B
from csmcli.pipeline import random_codec
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams


def wall_ms(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def probe(model, codec, batch: int, frames: int = 8) -> None:
    engine = Engine(model, batch)
    waiting = deque(Request(synthetic_prompt(200, i), SamplingParams(0.9, 50, seed=i), 10_000) for i in range(batch))
    engine.admit(waiting)
    decoder = ChunkDecoder(codec.decoder, batch, 32)
    decoder.warmup([frames])
    codes = torch.randint(0, 2048, (batch, 32, frames), device="cuda")  # [B, 32, n]
    side = torch.cuda.Stream()
    torch.cuda.synchronize()

    def steps():
        for _ in range(frames):
            engine.step()

    def mimi():
        decoder.decode(codes)

    def both():
        with torch.cuda.stream(side):
            decoder.decode(codes)
        steps()

    with torch.no_grad():
        a, m, b = wall_ms(steps), wall_ms(mimi), wall_ms(both)
        s = wall_ms(lambda: (steps(), mimi()))
    print(f"B={batch:3d}: {frames} frames {a:7.2f} ms | mimi {m:6.2f} ms | one after the other {s:7.2f} ms | "
          f"overlapped {b:7.2f} ms (hidden {a + m - b:6.2f} of {m:.2f})", flush=True)
    decoder.close()


def main() -> None:
    batches = [int(b) for b in sys.argv[1:]] or [1, 64]
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    codec = random_codec(torch.device("cuda"))
    for batch in batches:
        probe(model, codec, batch)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
