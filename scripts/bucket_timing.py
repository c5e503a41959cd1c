"""ms/frame of a 64-slot engine with 1, 8 and 64 busy slots (CUDA): the frame graph per batch bucket at work."""

import time
from collections import deque

import torch

from csmcli.checkpoint import random_model
from csmcli.engine import Engine, Request
from csmcli.model import CSM_1B
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams


def main():
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    engine = Engine(model, max_batch=64)
    engine.warmup()
    print(f"buckets {engine.buckets}, fused kernels {engine.fused_kernels}")
    for busy in (1, 8, 64):
        requests = deque(Request(synthetic_prompt(200, seed=i), SamplingParams(0.9, 50, seed=i), 10_000)
                         for i in range(busy))
        engine.admit(requests)
        engine.run_chunk(8)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            engine.run_chunk(8)
        ms = (time.perf_counter() - start) * 1000 / 40
        print(f"max_batch 64, {busy:2d} busy (bucket {engine.active_rows()}): {ms:.2f} ms/frame", flush=True)
        engine.slots = [None] * engine.max_batch


if __name__ == "__main__":
    main()
