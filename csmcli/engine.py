"""The engine: many requests share one frame step (continuous batching), replayed from a CUDA graph on GPU.

Requests join a free slot between chunks (their prompt prefill runs outside the frame graph: on CUDA padded to a
length bucket, several prompts in one pass, with a graph per bucket) and leave on EOS, on their frame limit, or when
cancelled, without disturbing the other slots: every slot's state lives in its own rows of the stepper's static
tensors. The host reads codes once per chunk. `ChunkDecoder` is the same idea for streaming Mimi decode: one graph
per chunk size.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from csmcli.generate import FrameChunk, FrameStepper, is_eos
from csmcli.model import Csm, compute_capability, has_triton, triton_converts_fp8
from csmcli.prompt import Prompt
from csmcli.sampling import SamplingParams

if TYPE_CHECKING:
    from csmcli.codec import StreamingMimiDecoder

NO_GRAPHS_ENV = "CSMCLI_NO_CUDA_GRAPHS"
NO_FUSED_ENV = "CSMCLI_NO_FUSED_KERNELS"
_ids = itertools.count()
log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    prompt: Prompt
    params: SamplingParams
    max_frames: int
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False

    def __post_init__(self) -> None:
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")


@dataclass(eq=False)
class _Active:
    request: Request
    made: int = 0
    chunks: int = 0
    last_frames: int | None = None  # size of its previous chunk (the ramp doubles it)


class CapturedCall:
    """`fn(*inputs)` captured once in a CUDA graph for fixed input shapes. A call copies new inputs into the
    captured ones and replays, with no host work; the output tensor is the captured one (valid until the next
    replay of any graph sharing its `pool`)."""

    def __init__(self, fn, *inputs: Tensor, warmup: int = 3, pool=None):
        self.inputs = [x.clone() for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture requires
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for captured, given in zip(self.inputs, inputs, strict=True):
            assert captured.shape == given.shape, (captured.shape, given.shape)  # copy_ would broadcast
            captured.copy_(given)
        self.graph.replay()
        return self.output


def _interpreting() -> bool:
    """Triton's interpreter (the CPU tests): its kernels run as Python, and cannot be made compile-only."""
    from csmcli import kernels

    return kernels.INTERPRET


def _with_one(sizes: Iterable[int]) -> list[int]:
    """Chunk sizes with 1 added: with a graph for 1, any size splits into graphed sizes."""
    return sorted(set(sizes) | {1})


def compile_ahead(device: torch.device, calls: list[Callable[[], object]]) -> bool:
    """Compile every Triton kernel that `calls` launch, all at once on a thread per CPU (at most 32), before a
    warm-up launches them one at a time: with an empty Triton cache (a machine's first run) that is most of a
    warm-up (`kernels.compiling_only`; H200, 16 threads: a cold `say` 41-43 -> 25 s, docs/BENCHMARKS.md). Nothing
    runs on the GPU: the calls are traced into a CUDA graph on `device` that is thrown away, so no torch op sees
    the outputs the skipped kernels never wrote and no tensor changes (what libraries set up on first use, and
    Triton's caches, are kept, as meant). The calls must keep no host-side state of their own. With a warm cache
    the compiles are cache reads. Best effort: False where nothing was done (no calls, a Triton without the
    means), or where the trace failed — the warm-up then compiles as it launches, as before."""
    if not calls:
        return False
    from csmcli import kernels

    threads = min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        with torch.cuda.device(device), kernels.compiling_only(threads) as compiling:
            if compiling:
                graph = torch.cuda.CUDAGraph()
                # "relaxed": a library's first use (cuBLAS, cuDNN handles) may allocate during the trace
                with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="relaxed"):
                    for call in calls:
                        call()
                del graph
    except Exception as e:  # an optimisation only: the warm-up compiles what is missing, and raises what fails
        log.debug("compiling ahead failed (%s: %s); the warm-up compiles as it launches", type(e).__name__, e)
        return False
    return compiling


def warm_up(engine: Engine, chunks: ChunkDecoder | None, sizes: Iterable[int]) -> None:
    """An engine's frame steps and first admission, and Mimi's chunk `sizes`, compiled (all at once:
    `compile_ahead`) and captured, so that no request's latency includes either."""
    sizes = list(sizes)
    compile_ahead(engine.device, [*engine.warmup_calls(), *(chunks.warmup_calls(sizes) if chunks is not None else [])])
    engine.warmup()
    if chunks is not None:
        chunks.warmup(sizes)


@contextmanager
def state_kept(tensors: list[Tensor]) -> Iterator[None]:
    """Warm-up and capture run real steps: put the state they advance back afterwards, in place (graphs hold the
    addresses), so warming up never changes what any request makes."""
    saved = [t.clone() for t in tensors]
    try:
        yield
    finally:
        for t, s in zip(tensors, saved, strict=True):
            t.copy_(s)


PREFILL_GROUP = 4
"""Prompts prefilled together on CUDA (engines of 4 slots or more; fewer slots: that many), but never more rows in
one pass than the largest bucket (512-row prompts two at a time, 1024-row ones alone), so the prefill graphs need no
more memory than one 1024-row prompt. Four 256-row prompts: 4.9 ms through the backbone in one pass on an H100,
against 2.1 ms each alone. A bucket's group is always the same size, a short one filled up with copies of its last
entry, so a prompt's rounding is the same whoever it is admitted with (a lone prompt pays for the copies)."""


PREFILL_BUCKETS = (*range(16, 513, 16), *range(576, 1025, 64))
"""Prompt lengths with a captured prefill graph on CUDA in engines of `PREFILL_GROUP` slots or more (`prefill_buckets`);
longer prompts run eagerly at their own length. Padded rows cost as much as real ones: steps of 16 rows (64 beyond
512) pad a prompt of 224 rows or more by at most 7% (12% just past 512). 32-row steps padded 64 prompts of 200 rows
to 224 (twenty-eighth session: with the 208-row bucket their prefill graphs took 3.23 instead of 3.60 ms a group
of four, with the prefill's other changes)."""

PREFILL_BUCKETS_FEW_SLOTS = (*range(32, 513, 32), *range(640, 1025, 128))
"""The buckets of smaller engines (`say`, `stream`: one slot). Each bucket's graph is captured on its first use
(~0.05-0.1 s, twenty-ninth session; a 1-slot engine capturing all of them took 1.1-1.3 s with these 20 against
1.9-2.1 s with the 40 above, twenty-eighth session): `say -f` with sentences of many lengths meets fewer new buckets,
while padding a lone 200-row prompt to 224 instead of 208 rows costs it ~0.2 ms."""


def prefill_buckets(max_batch: int) -> tuple[int, ...]:
    """The prompt length buckets of an engine of `max_batch` slots."""
    return PREFILL_BUCKETS if max_batch >= PREFILL_GROUP else PREFILL_BUCKETS_FEW_SLOTS


def prefill_length(rows: int, max_seq_len: int, buckets: tuple[int, ...]) -> int | None:
    """The padded length a `rows`-row prompt is prefilled at on CUDA: the smallest of `buckets` that holds it
    (None: none does, no padding)."""
    return next((n for n in buckets if rows <= n <= max_seq_len), None)


def next_chunk_frames(previous: int | None, first: int, chunk: int) -> int:
    """Chunk sizes ramp up: `first`, then double the previous chunk until `chunk`, the largest (a `first` above it
    is capped too). A small first chunk gives early audio, and each chunk is made while the previous (half as long)
    one plays, so playback does not run dry."""
    return min(chunk, first if previous is None else 2 * previous)


def chunk_sizes(first: int, chunk: int) -> list[int]:
    """The distinct sizes `next_chunk_frames` produces (a run's last chunk may be shorter)."""
    n = next_chunk_frames(None, first, chunk)
    sizes = [n]
    while (n := next_chunk_frames(n, first, chunk)) != sizes[-1]:
        sizes.append(n)
    return sizes


def graphs_enabled(requested: bool, device: torch.device) -> bool:
    """CUDA graphs run when asked for, on CUDA, and not switched off by CSMCLI_NO_CUDA_GRAPHS=1."""
    return requested and device.type == "cuda" and os.environ.get(NO_GRAPHS_ENV) != "1"


FP8_ON_TORCH_OPS = ("fp8 weights without the fused kernels (those need a CUDA GPU of compute capability 8.9 or newer "
                    "with Triton, and no --compile / --no-fused-kernels / CSMCLI_NO_FUSED_KERNELS=1): torch ops "
                    "convert the weights back at every step, so this runs slower than bf16")


def fused_kernels_enabled(requested: bool, model: Csm, compile: bool = False) -> bool:
    """The Triton decode kernels run when asked for, on CUDA (Ampere or newer) with Triton installed, for head
    sizes they handle (tl.dot needs half a head >= 16), with fp8 weights on Ada or newer, not switched off by
    CSMCLI_NO_FUSED_KERNELS=1, and not with `compile`: torch.compile makes its own kernels from the torch ops, so
    compiling means the torch-ops path."""
    device = model.codebook0_head.weight.device
    if compile or not mimi_kernels_enabled(requested, device):
        return False  # also no Triton, or a GPU before Ampere (bf16 tensor-core dots): torch ops
    if model.fp8 and not triton_converts_fp8(device):
        return False
    heads = [model.cfg.backbone.head_dim, model.cfg.decoder.head_dim]
    return all(d >= 32 and d & (d - 1) == 0 for d in heads)


def mimi_kernels_enabled(requested: bool, device: torch.device) -> bool:
    """The Mimi decode's Triton kernels (`StreamingMimiDecoder.decode_chunk(fused=True)`) run when asked for, on CUDA
    (Ampere or newer: tf32x3 products on the tensor cores) with Triton, not switched off by
    CSMCLI_NO_FUSED_KERNELS=1. Callers ask when the engine's own kernels run (`Engine.fused_kernels`), whose rule
    (`fused_kernels_enabled`) adds its own conditions to this one."""
    if not requested or device.type != "cuda" or os.environ.get(NO_FUSED_ENV) == "1":
        return False
    return has_triton() and compute_capability(device) >= (8, 0)


def batch_buckets(max_batch: int, fused_kernels: bool) -> list[int]:
    """Slot counts a frame step is built for: with the fused kernels, powers of two below `max_batch` and
    `max_batch` (their rows compute the same whatever the count: block sizes follow `max_batch`); with torch ops
    `max_batch` only (GEMM algorithms change with the row count, and with them a slot's rounding)."""
    if not fused_kernels:
        return [max_batch]
    return sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch} | {max_batch})


class Engine:
    def __init__(self, model: Csm, max_batch: int = 1, cuda_graphs: bool = True, compile: bool = False,
                 fused_kernels: bool = True):
        self.fused_kernels = fused_kernels_enabled(fused_kernels, model, compile)
        self.stepper = FrameStepper(model, max_batch, self.fused_kernels)
        self.device = self.stepper.device
        if self.fused_kernels:  # L2 cache hints for the frame step's weights
            from csmcli import kernels

            self.l2_reserved = kernels.reserve_l2(*self.stepper.l2_weights())
        else:
            self.l2_reserved = 0
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
        self.buckets = batch_buckets(max_batch, self.fused_kernels)
        self._graphs: dict[int, CapturedCall] = {}  # frame step by bucket
        self._prefill_graphs: dict[int, CapturedCall] = {}  # by prompt length bucket, captured on first use
        # one pool: a prefill's output is copied out before the next runs
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # On CUDA prompts are padded to a length bucket and prefilled in fixed-size groups (graphable shapes).
        self.pad_prompts = self.device.type == "cuda"
        self.prefill_group = min(PREFILL_GROUP, max_batch) if self.pad_prompts else 1  # at most; see group_size
        self.prefill_buckets = prefill_buckets(max_batch)
        self._warm = False
        self._admission_warm = False
        self.slots: list[_Active | None] = [None] * max_batch

    def close(self) -> None:
        """Drop the captured graphs and hand back the L2 lines this engine set aside (`kernels.release_l2`): what
        runs after it on the GPU gets the whole cache again. The engine is not used after."""
        self._graphs.clear()
        self._prefill_graphs.clear()
        if self.l2_reserved:
            from csmcli import kernels

            kernels.release_l2(self.device.index)
            self.l2_reserved = 0

    def active_rows(self) -> int:
        """The smallest bucket that holds every busy slot (slots are filled lowest first)."""
        highest = max((slot for slot, a in enumerate(self.slots) if a is not None), default=0)
        return next(n for n in self.buckets if n > highest)

    def step(self) -> Tensor:
        """One frame for the busy slots' bucket -> static `codes [B, 32]` (rows of busy slots valid; overwritten
        by the next step)."""
        n = self.active_rows()
        if not self.cuda_graphs:
            return self._eager_step(n)
        self.warmup()
        return self._graphs[n]()

    def warmup(self) -> None:
        """Compile / capture the frame step now, so no request's latency includes it. The warm-up runs real steps,
        so the slots' state is saved and restored around it: warming up never changes what any request makes. One
        admission is made before any request is admitted (it writes slot 0's cache rows). Prefill graphs are
        captured when their length is first used (`prefill_graph`, ~0.1 s each), or ahead by `prepare`."""
        if self.pad_prompts and not self._admission_warm and all(a is None for a in self.slots):
            self._warm_admission()
        if self._warm:
            return
        with state_kept(self.stepper.state()):
            if self.cuda_graphs:
                pool = torch.cuda.graph_pool_handle()  # buckets never run at once: one memory pool
                for n in self.buckets:
                    self._graphs[n] = CapturedCall(lambda n=n: self._eager_step(n), pool=pool)
            elif self.compiled or self.fused_kernels:  # compile now, not in the first request
                for n in self.buckets:
                    self._eager_step(n)
        self._warm = True

    def prepare(self, prompt_rows: Iterable[int]) -> None:
        """Capture now the prefill graphs that prompts of these many rows will use, so that their first admission
        includes no capture (a caller that knows its first prompt keeps it out of the first audio; one that serves
        many streams keeps it from stalling the busy ones). The captures write the cache rows of free slots; with
        none free, nothing is done (admission captures as it goes)."""
        free = [slot for slot, active in enumerate(self.slots) if active is None]
        if not (self.pad_prompts and free):
            return
        prompt_rows = list(prompt_rows)
        compile_ahead(self.device, self._prefill_calls(prompt_rows))  # a longer prompt's kernels, all at once
        for rows in prompt_rows:
            self.prefill_graph(prefill_length(rows, self.stepper.max_seq_len, self.prefill_buckets), free)

    def _capture_prefills(self) -> None:
        """Every length bucket's prefill graph, with no request admitted (the start-up of earlier versions)."""
        assert all(active is None for active in self.slots)
        self.prepare(n for n in self.prefill_buckets if n <= self.stepper.max_seq_len)

    @torch.no_grad()
    def prefill_graph(self, length: int | None, slots: list[int]) -> CapturedCall | None:
        """The captured prefill of `length`-row groups (None: eager — no graphs, or no bucket holds the prompt),
        captured now if it is the length's first use. The capture runs the prefill on dummy prompts into the cache
        rows of `slots` (repeated to fill the group): pass the slots of the group about to be prefilled, or free
        ones, whose rows are rewritten by the prompts that take them, and no other slot's rows are touched. A capture
        synchronises the GPU and runs the prefill three times first: ~0.05-0.1 s during which busy slots make no
        frames (`prepare` captures ahead)."""
        if not self.cuda_graphs or length is None:
            return None
        assert slots, "a capture needs slots whose cache rows it may write"
        graph = self._prefill_graphs.get(length)
        if graph is None:
            inputs = self._dummy_prefill(length, slots)
            graph = CapturedCall(self.stepper.prefill_rows, *inputs, pool=self._prefill_pool)
            self._prefill_graphs[length] = graph
        return graph

    def _dummy_prefill(self, length: int, slots: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """`prefill_rows`' inputs for a group of empty `length`-row prompts into `slots` (repeated to fill it)."""
        group, columns = self.group_size(length), self.stepper.model.cfg.num_codebooks + 1
        tokens = torch.zeros(group, length, columns, dtype=torch.long, device=self.device)  # [G, L, 33]
        mask = torch.ones(group, length, columns, dtype=torch.bool, device=self.device)
        rows = (slots * group)[:group]
        slots_and_last = torch.tensor([rows, [length - 1] * group], device=self.device)  # [2, G]
        return tokens, mask, slots_and_last

    def warmup_calls(self) -> list[Callable[[], object]]:
        """What `warmup` launches (each bucket's frame step, the first admission's prefill), as calls for
        `compile_ahead`; none where Triton compiles nothing (torch ops, torch.compile, the CPU) or where nothing is
        captured (`--no-cuda-graphs`: the way out of capture trouble stays free of it)."""
        if not self._compiles_ahead():
            return []
        return [*(functools.partial(self._eager_step, n) for n in self.buckets),
                *self._prefill_calls([1])]  # `_warm_admission`'s one-row prompt

    def _compiles_ahead(self) -> bool:
        return self.fused_kernels and self.cuda_graphs and not self.compiled and not _interpreting()

    def _prefill_calls(self, prompt_rows: Iterable[int]) -> list[Callable[[], object]]:
        """The prefills of these many rows (those not captured yet) as calls for `compile_ahead`."""
        if not self._compiles_ahead():
            return []
        lengths = {prefill_length(rows, self.stepper.max_seq_len, self.prefill_buckets) for rows in prompt_rows}
        return [functools.partial(self.stepper.prefill_rows, *self._dummy_prefill(length, [0]))
                for length in sorted(lengths - {None}) if length not in self._prefill_graphs]

    @torch.no_grad()
    def _warm_admission(self) -> None:
        """One admission of an empty prompt into slot 0, now: the first use of a CUDA kernel loads its module
        (tens of ms), which would otherwise land in the first request's time to first audio. Slot 0's state is
        put back; its cache rows are rewritten by the prompt that takes the slot."""
        columns = self.stepper.model.cfg.num_codebooks + 1
        prompt = Prompt(torch.zeros(1, columns, dtype=torch.long), torch.zeros(1, columns, dtype=torch.bool))
        length = prefill_length(prompt.rows, self.stepper.max_seq_len, self.prefill_buckets)
        stepper = self.stepper
        with state_kept([*stepper.state(), stepper.temperature, stepper.topk, stepper.seed]):
            stepper.prefill_group([(0, prompt, SamplingParams())] * self.group_size(length), length,
                                  self.prefill_graph(length, [0]))
        self._admission_warm = True

    def group_size(self, length: int | None) -> int:
        """How many prompts padded to `length` rows are prefilled in one pass (None: unpadded, one at a time)."""
        if length is None:
            return 1
        return max(1, min(self.prefill_group, self.prefill_buckets[-1] // length))

    def check(self, request: Request) -> None:
        """Raise ValueError for a request whose frames would not all fit in the cache after its prompt (past the
        last position the step clamps, and frames would come out wrong, not short)."""
        room = self.stepper.max_seq_len - request.prompt.rows + 1  # frame k is decoded at position rows - 1 + k
        if request.max_frames > room:
            raise ValueError(f"request {request.id}: {request.max_frames} frames after a {request.prompt.rows}-row "
                             f"prompt need {request.prompt.rows + request.max_frames - 1} positions; the model has "
                             f"{self.stepper.max_seq_len}")

    def admit(self, waiting: deque[Request]) -> list[Request]:
        """Prefill waiting requests into free slots (outside the frame graph: prompts vary in length). On CUDA
        prompts are padded to their length bucket and prefilled `group_size` at a time, graphed or not, so graphed
        and eager runs compute the same; prompts too long for a bucket run alone at their own length. A slot is
        taken once its prompt is in; if a prefill fails, the requests not yet in go back to the front of `waiting`."""
        self.warmup()
        by_length: dict[int | None, list[tuple[int, Request]]] = {}
        free = [slot for slot, active in enumerate(self.slots) if active is None]
        for request in list(waiting)[: len(free)]:  # before any slot is taken
            self.check(request)
        taken = [(slot, waiting.popleft()) for slot in free[: len(waiting)]]
        for slot, request in taken:
            length = (prefill_length(request.prompt.rows, self.stepper.max_seq_len, self.prefill_buckets)
                      if self.pad_prompts else None)
            by_length.setdefault(length, []).append((slot, request))
        admitted: list[Request] = []
        try:
            for length, entries in by_length.items():
                size = self.group_size(length)
                for start in range(0, len(entries), size):
                    group = entries[start : start + size]
                    padded = group + [group[-1]] * (size - len(group))  # a fixed group size: copies of the last
                    graph = self.prefill_graph(length, [slot for slot, _ in group])
                    self.stepper.prefill_group([(slot, r.prompt, r.params) for slot, r in padded], length, graph)
                    for slot, request in group:
                        self.slots[slot] = _Active(request)
                        admitted.append(request)
        finally:
            waiting.extendleft(reversed([r for _, r in taken if r not in admitted]))
        return [r for _, r in taken if r in admitted]  # in slot order

    def release(self, request: Request) -> None:
        """Free `request`'s slot, if it has one."""
        for slot, active in enumerate(self.slots):
            if active is not None and active.request is request:
                self._free(slot)

    def _free(self, slot: int) -> None:
        # An idle slot below a busy one is still stepped (its rows are ignored) and its position would climb to
        # the cache's end, making every attention kernel scan as far as the longest request; from 0 it scans
        # little until the next prompt resets it.
        self.slots[slot] = None
        self.stepper.positions[slot] = 0

    def run_chunk(self, frames: int) -> Tensor:
        """`frames` steps for every slot, then the one host sync: codes `[frames, B, 32]` on the CPU."""
        return torch.stack([self.step().clone() for _ in range(frames)]).cpu()

    def generate(
        self, requests: Iterable[Request], first_chunk_frames: int = 2, chunk_frames: int = 8
    ) -> Iterator[tuple[Request, FrameChunk]]:
        """Run requests to completion, up to `max_batch` at a time, yielding each request's chunks as made.

        A request's first chunk is `first_chunk_frames` long (low first-audio latency); later ones double up to
        `chunk_frames` (`next_chunk_frames`). Slots at different points of their ramp share the smallest size.
        Every request ends with a chunk whose `stop` is set (one cancelled before it got a slot: an empty chunk).
        One `generate` (or `stream`) at a time per engine: every step runs every busy slot. When the loop ends
        early (the consumer stops, a step or prefill raises), this call's requests give their slots up. Raises
        ValueError, before any work, for a request that does not fit (`check`).
        """
        if any(a is not None for a in self.slots):
            raise RuntimeError("this engine is already generating: one generate() or stream() at a time")
        mine = list(requests)
        for request in mine:
            self.check(request)
        waiting = deque(mine)
        try:
            while True:
                for request in [r for r in waiting if r.cancelled]:  # cancelled before it got a slot
                    waiting.remove(request)
                    empty = torch.zeros(0, self.stepper.codes.shape[1], dtype=torch.long)  # [0, 32]
                    yield request, FrameChunk(0, empty, 0.0, "cancelled")
                self.admit(waiting)
                active = [(slot, a) for slot, a in enumerate(self.slots) if a is not None]
                if not active:
                    return
                ramp = min(next_chunk_frames(a.last_frames, first_chunk_frames, chunk_frames) for _, a in active)
                n = min(ramp, min(a.request.max_frames - a.made for _, a in active))
                start = time.perf_counter()
                frames = self.run_chunk(n)  # [n, B, 32]
                seconds = time.perf_counter() - start
                for slot, a in active:
                    a.last_frames = ramp  # a chunk cut short by someone's frame limit does not restart the ramp
                    chunk = self._chunk(a, frames[:, slot], seconds)
                    if chunk.stop:  # `cancelled` is read once, in `_chunk`: a request never ends without a stop
                        self._free(slot)
                    yield a.request, chunk
        finally:
            for request in mine:
                self.release(request)

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


class ChunkDecoder:
    """Streaming Mimi decode of `batch` streams, chunk by chunk. On CUDA each chunk size given to `warmup` (and 1)
    replays its own CUDA graph; another size (a short last chunk) is decoded as a run of graphed sizes.

    The decoder's streaming state stays allocated for this object's life (graphs hold its addresses), so the
    decoder cannot be used for anything else meanwhile; `reset()` starts new utterances, `close()` frees it.
    `fused_kernels`: the decode's Triton kernels where they can run (`mimi_kernels_enabled`)."""

    def __init__(self, decoder: StreamingMimiDecoder, batch: int = 1, codebooks: int = 32, cuda_graphs: bool = True,
                 fused_kernels: bool = True):
        self.decoder, self.batch, self.codebooks = decoder, batch, codebooks
        param = next(decoder.parameters())
        self.device = param.device
        self.cuda_graphs = graphs_enabled(cuda_graphs, self.device)
        self.fused_kernels = mimi_kernels_enabled(fused_kernels, self.device)
        self._decode_chunk = functools.partial(decoder.decode_chunk, fused=self.fused_kernels)
        self._streaming = ExitStack()
        self._streaming.enter_context(decoder.streaming(batch))
        self._graphs: dict[tuple[int, ...], CapturedCall] = {}  # by codes shape
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    def warmup(self, sizes: Iterable[int]) -> None:
        """Capture a graph for (or on CUDA without graphs, run once: first calls are slow) each chunk size. The
        streaming state is restored afterwards, so warming up never changes the audio."""
        if self.device.type != "cuda":
            return
        with state_kept(self.decoder.state_tensors()):
            for n in _with_one(sizes):
                codes = self._dummy_codes(n)
                shape = tuple(codes.shape)
                if self.cuda_graphs and shape not in self._graphs:
                    self._graphs[shape] = CapturedCall(self._decode_chunk, codes, warmup=2, pool=self._pool)
                elif not self.cuda_graphs:
                    self._decode_chunk(codes)

    def warmup_calls(self, sizes: Iterable[int]) -> list[Callable[[], object]]:
        """What `warmup` launches, as calls for `compile_ahead`; none where Triton compiles nothing."""
        if not (self.cuda_graphs and self.fused_kernels) or _interpreting():
            return []
        return [functools.partial(self._decode_chunk, self._dummy_codes(n)) for n in _with_one(sizes)]

    def _dummy_codes(self, n: int) -> Tensor:
        return torch.zeros(self.batch, self.codebooks, n, dtype=torch.long, device=self.device)  # [B, K, n]

    def decode(self, codes: Tensor) -> Tensor:
        """codes `[B, K, n]` on the decoder's device -> pcm `[B, 1, n * 1920]` (valid until the next decode).

        A size without a graph is cut into graphed sizes, largest first (11 = 8 + 2 + 1): the streaming decoder
        gives the same audio however the frames are chunked, and a first eager run of a new size costs ~50 ms."""
        graph = self._graphs.get(tuple(codes.shape))
        if graph is not None:
            return graph(codes)
        lead, n = tuple(codes.shape[:-1]), codes.shape[-1]
        sizes = sorted((shape[-1] for shape in self._graphs if shape[:-1] == lead), reverse=True)
        if not sizes or n == 0:
            return self._decode_chunk(codes)
        pieces, start = [], 0
        while start < n:
            size = next(s for s in sizes if s <= n - start)
            pieces.append(self._graphs[(*lead, size)](codes[..., start : start + size]).clone())  # [B, 1, size*1920]
            start += size
        return torch.cat(pieces, dim=-1)

    def reset(self) -> None:
        self.decoder.reset()

    def close(self) -> None:
        self._streaming.close()
        self._graphs.clear()
