"""Why is `bench`'s ms a frame above the frame graph's replayed back to back (B=64: 5.77 against 5.51 in
l2_persist_probe.py; B=1 none)? Times each frame of a chunk on the GPU (CUDA events between replays) as `bench`
runs them (an engine's chunks, its host sync per chunk), with and without a Mimi decode between chunks, and the
same graph replayed back to back. Prints ms a frame by position in the chunk. Changes nothing in csmcli.

Usage: chunk_gap_probe.py [ROWS]   (default 64)
"""

import statistics
import sys
import time
from collections import deque

import torch
from profile_frame import timed  # scripts/ is on the path when a script runs

from csmcli.checkpoint import random_model
from csmcli.engine import ChunkDecoder, Engine, Request
from csmcli.model import CSM_1B
from csmcli.pipeline import random_codec
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams

CHUNK, CHUNKS = 8, 7


def main() -> None:
    rows = int(sys.argv[1]) if sys.argv[1:] else 64
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    engine = Engine(model, max_batch=rows)
    engine.warmup()
    mimi = ChunkDecoder(random_codec(torch.device("cuda")).decoder, rows, model.cfg.num_codebooks)
    mimi.warmup([CHUNK])

    def chunks(with_mimi: bool, sync: bool) -> None:
        waiting = deque(Request(synthetic_prompt(200, seed=i), SamplingParams(0.9, 50, seed=i), 10**4)
                        for i in range(rows))
        engine.admit(waiting)
        torch.cuda.synchronize()
        by_position: list[list[float]] = [[] for _ in range(CHUNK)]
        walls, all_events = [], []
        for _ in range(CHUNKS):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(CHUNK + 1)]
            all_events.append(events)
            start = time.perf_counter()
            events[0].record()
            outputs = []
            for i in range(CHUNK):
                outputs.append(engine.step().clone())
                events[i + 1].record()
            if sync:
                codes = torch.stack(outputs).cpu()
                walls.append((time.perf_counter() - start) * 1000 / CHUNK)
                if with_mimi:
                    mimi.decode(codes.permute(1, 2, 0).cuda())
                    torch.cuda.synchronize()
        torch.cuda.synchronize()
        for events in all_events:
            for i in range(CHUNK):
                by_position[i].append(events[i].elapsed_time(events[i + 1]))
        for slot in engine.slots:
            if slot is not None:
                engine.release(slot.request)
        gpu = [round(statistics.median(p[1:]), 3) for p in by_position]  # the first chunk: warm-up
        wall = f"{statistics.median(walls[1:]):.3f}" if walls else "-"
        print(f"rows {rows} {'mimi' if with_mimi else 'no mimi':8s} {'sync' if sync else 'no sync':8s} wall/frame "
              f"{wall} ms; GPU ms by frame in chunk {gpu}, mean {statistics.mean(gpu):.3f}", flush=True)

    for _ in range(2):
        chunks(with_mimi=True, sync=True)
        chunks(with_mimi=False, sync=True)
        chunks(with_mimi=False, sync=False)
    ms = timed(engine._graphs[rows].graph.replay)
    print(f"rows {rows} frame graph replayed 50 times back to back: {ms:.3f} ms/frame")


if __name__ == "__main__":
    main()
