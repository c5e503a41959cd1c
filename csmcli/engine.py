"""The engine: many requests share one frame step (continuous batching), replayed from a CUDA graph on GPU.

Requests join a free slot between chunks (their prompt prefill runs outside the graph, variable length) and leave
on EOS, on their frame limit, or when cancelled, without disturbing the other slots: every slot's state lives in
its own rows of the stepper's static tensors. The host reads codes once per chunk.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from csmcli.generate import FrameChunk, FrameStepper, is_eos
from csmcli.model import Csm
from csmcli.prompt import Prompt
from csmcli.sampling import SamplingParams

NO_GRAPHS_ENV = "CSMCLI_NO_CUDA_GRAPHS"
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: Prompt
    params: SamplingParams
    max_frames: int
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False


@dataclass(eq=False)
class _Active:
    request: Request
    made: int = 0
    chunks: int = 0


class FrameGraph:
    """One CUDA graph for the whole frame step, captured after warm-up, replayed with no host work."""

    def __init__(self, step, warmup: int = 3):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture requires
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step()

    def __call__(self) -> Tensor:
        self.graph.replay()
        return self.output


def graphs_enabled(requested: bool, device: torch.device) -> bool:
    """CUDA graphs run when asked for, on CUDA, and not switched off by CSMCLI_NO_CUDA_GRAPHS=1."""
    return requested and device.type == "cuda" and os.environ.get(NO_GRAPHS_ENV) != "1"


class Engine:
    def __init__(self, model: Csm, max_batch: int = 1, cuda_graphs: bool = True, compile: bool = False):
        self.stepper = FrameStepper(model, max_batch)
        self.device = self.stepper.device
        self.max_batch = max_batch
        step = self.stepper.step
        if compile:
            step = torch.compile(step, fullgraph=True, dynamic=False)
        self.cuda_graphs = graphs_enabled(cuda_graphs, self.device)
        if self.device.type == "cuda":
            # cuBLAS may pick another GEMM algorithm under graph capture than eagerly; with split-K reductions in
            # bf16 those round differently and greedy codes drift apart. fp32 reductions keep graph == eager.
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        self._eager_step = step
        self.compiled = compile
        self._graph: FrameGraph | None = None
        self._warm = False
        self.slots: list[_Active | None] = [None] * max_batch

    def step(self) -> Tensor:
        """One frame for all slots -> static `codes [B, 32]` (overwritten by the next step)."""
        if not self.cuda_graphs:
            return self._eager_step()
        self.warmup()
        return self._graph()

    def warmup(self) -> None:
        """Compile / capture now, so no request's latency includes it. The warm-up runs real steps, so the slots'
        state is saved and restored around it: warming up never changes what any request makes."""
        if self._warm:
            return
        saved = [t.clone() for t in self.stepper.state()]
        if self.cuda_graphs:
            self._graph = FrameGraph(self._eager_step)
        elif self.compiled:
            self._eager_step()
        for t, s in zip(self.stepper.state(), saved, strict=True):
            t.copy_(s)
        self._warm = True

    def admit(self, waiting: deque[Request]) -> list[Request]:
        """Prefill waiting requests into free slots (outside the graph: prompts vary in length)."""
        admitted = []
        for slot, active in enumerate(self.slots):
            if active is None and waiting:
                request = waiting.popleft()
                self.stepper.prefill(slot, request.prompt, request.params)
                self.slots[slot] = _Active(request)
                admitted.append(request)
        return admitted

    def release(self, request: Request) -> None:
        self.slots = [None if a is not None and a.request is request else a for a in self.slots]

    def run_chunk(self, frames: int) -> Tensor:
        """`frames` steps for every slot, then the one host sync: codes `[frames, B, 32]` on the CPU."""
        return torch.stack([self.step().clone() for _ in range(frames)]).cpu()

    def generate(
        self, requests: Iterable[Request], first_chunk_frames: int = 2, chunk_frames: int = 8
    ) -> Iterator[tuple[Request, FrameChunk]]:
        """Run requests to completion, up to `max_batch` at a time, yielding each request's chunks as made.

        A request's first chunk is `first_chunk_frames` long (low first-audio latency), later ones `chunk_frames`.
        """
        waiting = deque(requests)
        while True:
            self.admit(waiting)
            active = [(slot, a) for slot, a in enumerate(self.slots) if a is not None]
            if not active:
                return
            n = min(first_chunk_frames if a.chunks == 0 else chunk_frames for _, a in active)
            n = max(1, min(n, min(a.request.max_frames - a.made for _, a in active)))
            start = time.perf_counter()
            frames = self.run_chunk(n)  # [n, B, 32]
            seconds = time.perf_counter() - start
            for slot, a in active:
                chunk = self._chunk(a, frames[:, slot], seconds)
                if chunk.stop or a.request.cancelled:
                    self.slots[slot] = None
                yield a.request, chunk

    @staticmethod
    def _chunk(a: _Active, codes: Tensor, seconds: float) -> FrameChunk:
        eos = is_eos(codes).nonzero()
        stop = None
        if len(eos):
            codes, stop = codes[: int(eos[0])], "eos"
        a.made += len(codes)
        if stop is None and a.made >= a.request.max_frames:
            stop = "max_frames"
        if stop is None and a.request.cancelled:
            stop = "cancelled"
        chunk = FrameChunk(a.chunks, codes, seconds, stop)
        a.chunks += 1
        return chunk

    def stream(
        self, prompt: Prompt, params: SamplingParams, max_frames: int, first_chunk_frames: int = 2,
        chunk_frames: int = 8,
    ) -> Iterator[FrameChunk]:
        """One request's chunks (the say / stream path)."""
        request = Request(prompt, params, max_frames)
        try:
            for _, chunk in self.generate([request], first_chunk_frames, chunk_frames):
                yield chunk
        finally:  # the consumer stopped early (Ctrl-C, closed pipe): free the slot for the next request
            self.release(request)
