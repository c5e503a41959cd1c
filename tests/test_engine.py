"""Continuous batching on CPU: every request's codes in a shared batch equal the codes it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csmcli import checkpoint
from csmcli.engine import Engine, Request
from csmcli.prompt import build_prompt
from csmcli.sampling import SamplingParams

TEXTS = ["Hello there.", "The quick brown fox jumps over the lazy dog, twice.", "How are you doing today?", "Fine."]


@pytest.fixture(scope="module")
def ck(hf_checkpoint):
    return checkpoint.load(str(hf_checkpoint))


def alone(ck, request: Request) -> torch.Tensor:
    chunks = list(Engine(ck.model).stream(request.prompt, request.params, request.max_frames, 3, 3))
    return torch.cat([c.codes for c in chunks])


def test_batched_requests_with_joins_equal_each_alone(ck):
    params = [SamplingParams(0.0), SamplingParams(0.9, 20, seed=7), SamplingParams(0.0), SamplingParams(1.2, 5, 3)]
    lengths = [9, 4, 7, 6]
    requests = [Request(build_prompt(ck.tokenizer, [], i % 2, t, None), p, n)
                for i, (t, p, n) in enumerate(zip(TEXTS, params, lengths, strict=True))]
    assert len({r.prompt.rows for r in requests}) > 1  # mixed prompt lengths
    engine = Engine(ck.model, max_batch=2)  # 4 requests through 2 slots: two join mid-run
    got: dict[int, list] = {r.id: [] for r in requests}
    order = []
    for request, chunk in engine.generate(requests, first_chunk_frames=2, chunk_frames=3):
        got[request.id].append(chunk.codes)
        order.append(request.id)
    assert order.index(requests[2].id) > order.index(requests[0].id)  # the third waited for a free slot
    for r in requests:
        codes = torch.cat(got[r.id])
        assert codes.shape == (r.max_frames, 32)
        assert torch.equal(codes, alone(ck, r)), f"request {r.id} changed by batching"


def test_cancel_frees_the_slot(ck):
    engine = Engine(ck.model, max_batch=1)
    first = Request(build_prompt(ck.tokenizer, [], 0, TEXTS[0], None), SamplingParams(0.0), 50)
    second = Request(build_prompt(ck.tokenizer, [], 0, TEXTS[1], None), SamplingParams(0.0), 4)
    stops = {}
    for request, chunk in engine.generate([first, second], 2, 2):
        first.cancelled = True
        stops[request.id] = chunk.stop
    assert stops == {first.id: "cancelled", second.id: "max_frames"}


def test_chunk_sizes_ramp_up_to_the_chunk_size(ck):
    from csmcli.engine import chunk_sizes, next_chunk_frames

    assert chunk_sizes(1, 12) == [1, 2, 4, 8, 12]
    assert chunk_sizes(4, 4) == [4]
    assert chunk_sizes(6, 4) == [4] and next_chunk_frames(None, 6, 4) == 4  # the largest caps the first too
    assert next_chunk_frames(None, 3, 8) == 3 and next_chunk_frames(3, 3, 8) == 6 and next_chunk_frames(6, 3, 8) == 8
    request = Request(build_prompt(ck.tokenizer, [], 0, TEXTS[0], None), SamplingParams(0.0), 20)
    sizes = [len(chunk.codes) for chunk in Engine(ck.model).stream(request.prompt, request.params, 20, 1, 6)]
    assert sizes == [1, 2, 4, 6, 6, 1]  # the last chunk is what is left of max_frames


def test_prefill_padded_to_a_length_bucket_changes_nothing(ck):
    """CUDA pads prompts to length buckets (graphable shapes); the empty rows must not leak into real ones."""
    from csmcli.generate import FrameStepper

    prompt = build_prompt(ck.tokenizer, [], 0, TEXTS[1], None)
    runs = []
    for length in (None, prompt.rows + 37):
        stepper = FrameStepper(ck.model, 2)
        stepper.prefill(1, prompt, SamplingParams(0.0), length)
        hidden = stepper.hidden[1].clone()
        runs.append((hidden, torch.stack([stepper.step()[1].clone() for _ in range(6)])))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_prompts_prefilled_in_groups_make_what_they_make_alone(ck):
    """CUDA prefills prompts of one length bucket in fixed-size groups (a short group filled up with copies of its
    last entry). Here on the CPU with groups of 3: 5 requests of mixed lengths through 4 slots (a full group, a
    short one in another bucket, a later join in a third) make exactly the codes each makes alone in a group of
    copies of itself."""
    params = [SamplingParams(0.9, 20, seed=i) for i in range(5)]
    texts = [*TEXTS, " ".join(["A much longer prompt, for the second length bucket."] * 2)]
    requests = [Request(build_prompt(ck.tokenizer, [], i % 2, t, None), p, 6)
                for i, (t, p) in enumerate(zip(texts, params, strict=True))]

    def grouped_engine() -> Engine:
        engine = Engine(ck.model, max_batch=4)
        engine.pad_prompts, engine.prefill_group = True, 3
        return engine

    from csmcli.engine import prefill_length

    buckets = grouped_engine().prefill_buckets  # an engine of 4 slots: every 16 rows
    assert [prefill_length(r.prompt.rows, 2048, buckets) for r in requests] == [16, 32, 16, 16, 96]
    assert grouped_engine().group_size(64) == 3 and grouped_engine().group_size(512) == 2  # <= 1024 rows a pass
    got = {r.id: [] for r in requests}
    for request, chunk in grouped_engine().generate(requests, first_chunk_frames=2, chunk_frames=3):
        got[request.id].append(chunk.codes)
    for r in requests:
        alone = torch.cat([c.codes for c in grouped_engine().stream(r.prompt, r.params, r.max_frames, 2, 3)])
        assert torch.equal(torch.cat(got[r.id]), alone), r.id


def test_the_warm_up_admission_changes_no_request(ck, monkeypatch):
    """On CUDA the warm-up admits an empty prompt into slot 0 (so the first request pays no kernel loading) and
    puts the slot's state back. Here on the CPU with padded prompts: sampled requests, slot 0 among them, make the
    same codes with that admission as without, and the stepper's state comes back as it was."""
    requests = [Request(build_prompt(ck.tokenizer, [], i, t, None), SamplingParams(0.9, 20, seed=i), 6)
                for i, t in enumerate(TEXTS[:3])]

    def padded_engine() -> Engine:
        engine = Engine(ck.model, max_batch=3)
        engine.pad_prompts = True
        return engine

    engine = padded_engine()
    s = engine.stepper
    s.temperature.fill_(0.5), s.topk.fill_(7), s.seed.fill_(3), s.positions.fill_(2), s.hidden.normal_()
    before = [t.clone() for t in (*s.state(), s.temperature, s.topk, s.seed)]
    engine.warmup()
    assert engine._admission_warm
    assert all(torch.equal(a, b) for a, b in zip(before, (*s.state(), s.temperature, s.topk, s.seed), strict=True))
    with_warm_up = {r.id: [] for r in requests}
    for request, chunk in padded_engine().generate(requests, first_chunk_frames=2, chunk_frames=2):
        with_warm_up[request.id].append(chunk.codes)
    monkeypatch.setattr(Engine, "_warm_admission", lambda self: setattr(self, "_admission_warm", True))
    without = {r.id: [] for r in requests}
    for request, chunk in padded_engine().generate(requests, first_chunk_frames=2, chunk_frames=2):
        without[request.id].append(chunk.codes)
    for r in requests:
        assert torch.equal(torch.cat(with_warm_up[r.id]), torch.cat(without[r.id])), r.id


def test_a_failed_prefill_takes_no_slot_and_loses_no_request(ck, monkeypatch):
    from collections import deque

    from csmcli.generate import FrameStepper

    engine = Engine(ck.model, max_batch=3)
    requests = deque(Request(build_prompt(ck.tokenizer, [], 0, t, None), SamplingParams(0.0), 4) for t in TEXTS)
    order = list(requests)
    calls = []

    def prefill_group(self, entries, length=None, run=None):
        calls.append(entries)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return real(self, entries, length, run)

    real = FrameStepper.prefill_group
    monkeypatch.setattr(FrameStepper, "prefill_group", prefill_group)
    with pytest.raises(RuntimeError):
        engine.admit(requests)
    assert [a.request for a in engine.slots if a is not None] == order[:1]  # the first got in
    assert list(requests) == order[1:]  # the rest wait, in order
    monkeypatch.setattr(FrameStepper, "prefill_group", real)
    assert engine.admit(requests) == order[1:3] and list(requests) == order[3:]


def request(ck, text: str, frames: int) -> Request:
    return Request(build_prompt(ck.tokenizer, [], 0, text, None), SamplingParams(0.0), frames)


def test_a_generate_left_early_gives_its_slots_back(ck):
    """A consumer that stops reading (or a step that raises) must not leave its requests running: the next call
    would step them and hand their chunks to its own caller."""
    engine = Engine(ck.model, max_batch=2)
    running = engine.generate([request(ck, TEXTS[0], 20), request(ck, TEXTS[1], 20)], 2, 2)
    next(running)
    running.close()  # what leaving a for loop over it early does
    assert all(a is None for a in engine.slots)
    wanted = request(ck, TEXTS[2], 5)
    chunks = list(engine.stream(wanted.prompt, wanted.params, wanted.max_frames, 2, 2))
    assert torch.equal(torch.cat([c.codes for c in chunks]), alone(ck, wanted)) and chunks[-1].stop == "max_frames"

    def failing_step():
        raise RuntimeError("CUDA out of memory")

    engine.step = failing_step
    with pytest.raises(RuntimeError, match="out of memory"):
        list(engine.generate([request(ck, TEXTS[0], 6)], 2, 2))
    assert all(a is None for a in engine.slots)


def test_one_generate_at_a_time(ck):
    engine = Engine(ck.model, max_batch=2)
    running = engine.generate([request(ck, TEXTS[0], 8)], 2, 2)
    next(running)
    with pytest.raises(RuntimeError, match="already generating"):
        next(engine.generate([request(ck, TEXTS[1], 4)], 2, 2))
    assert sum(len(chunk.codes) for _, chunk in running) == 6  # the first goes on undisturbed


def test_requests_that_do_not_fit_are_refused_before_any_work(ck):
    with pytest.raises(ValueError, match="at least 1"):
        request(ck, TEXTS[0], 0)
    engine = Engine(ck.model, max_batch=2)
    max_seq_len = engine.stepper.max_seq_len
    fits = request(ck, TEXTS[0], 1)
    fits.max_frames = max_seq_len - fits.prompt.rows + 1  # the last frame is decoded at the last position
    too_long = request(ck, TEXTS[1], max_seq_len - build_prompt(ck.tokenizer, [], 0, TEXTS[1], None).rows + 2)
    with pytest.raises(ValueError, match=f"positions; the model has {max_seq_len}"):
        next(engine.generate([fits, too_long], 2, 2))
    assert all(a is None for a in engine.slots)
    from collections import deque

    waiting = deque([fits, too_long])
    with pytest.raises(ValueError):  # admitting directly (as bench does) checks too, before taking a slot
        engine.admit(waiting)
    assert list(waiting) == [fits, too_long] and all(a is None for a in engine.slots)
    waiting.pop()
    assert engine.admit(waiting) == [fits]  # the longest that fits is taken


def test_a_request_cancelled_while_waiting_ends_without_a_prefill(ck):
    engine = Engine(ck.model, max_batch=1)
    first, waiting = request(ck, TEXTS[0], 4), request(ck, TEXTS[1], 4)
    got = []
    for req, chunk in engine.generate([first, waiting], 2, 2):
        waiting.cancelled = True
        got.append((req.id, len(chunk.codes), chunk.stop))
    assert got == [(first.id, 2, None), (waiting.id, 0, "cancelled"), (first.id, 2, "max_frames")]


def test_a_cancel_between_two_reads_still_ends_with_a_stop(ck):
    """`cancelled` is set from another thread: a request must end with a stop chunk however the reads fall."""

    class CancelledAfterFirstRead(Request):
        reads = 0

        @property
        def cancelled(self) -> bool:
            self.reads += 1
            return self.reads > 1

        @cancelled.setter
        def cancelled(self, value: bool) -> None:
            pass

    engine = Engine(ck.model)
    r = CancelledAfterFirstRead(build_prompt(ck.tokenizer, [], 0, TEXTS[0], None), SamplingParams(0.0), 20)
    stops = [chunk.stop for _, chunk in engine.generate([r], 2, 2)]
    assert stops[-1] == "cancelled" and stops.count("cancelled") == 1 and all(a is None for a in engine.slots)


def test_a_freed_slot_stops_climbing_through_the_cache(ck):
    """A finished slot below a busy one is still stepped; its position restarts at 0 rather than climbing to the
    cache's end (each attention kernel runs as long as its longest row)."""
    engine = Engine(ck.model, max_batch=2)
    short, long = request(ck, TEXTS[0], 2), request(ck, TEXTS[1], 10)
    chunks = {short.id: [], long.id: []}
    for req, chunk in engine.generate([short, long], 2, 2):
        chunks[req.id].append(chunk)
    assert len(chunks[short.id]) == 1 and len(chunks[long.id][0].codes) == 2  # short ended with the first chunk
    after_short = sum(len(c.codes) for c in chunks[long.id][1:])  # frames slot 0 was stepped while free
    assert after_short > 0 and int(engine.stepper.positions[0]) == after_short  # not rows + 2 + after_short


def test_two_engines_share_a_model_without_sharing_state(ck):
    """Each engine owns its KV caches: a second engine on the same weights cannot disturb a running one."""
    first = Request(build_prompt(ck.tokenizer, [], 0, TEXTS[1], None), SamplingParams(0.0), 8)
    other = Request(build_prompt(ck.tokenizer, [], 1, TEXTS[2], None), SamplingParams(0.0), 5)
    running = Engine(ck.model).stream(first.prompt, first.params, first.max_frames, 2, 2)
    codes = [next(running).codes]
    list(Engine(ck.model).stream(other.prompt, other.params, other.max_frames, 2, 2))  # runs to completion between
    codes += [chunk.codes for chunk in running]
    assert torch.equal(torch.cat(codes), alone(ck, first))


def test_prefill_length_buckets():
    """Engines of 4 slots or more (which prefill prompts in groups) pad to every 16 rows, smaller ones (one prompt
    at a time, and each bucket a graph captured at start-up) to every 32."""
    from csmcli.engine import PREFILL_BUCKETS, PREFILL_BUCKETS_FEW_SLOTS, prefill_buckets, prefill_length

    assert prefill_buckets(4) == prefill_buckets(64) == PREFILL_BUCKETS
    assert prefill_buckets(1) == prefill_buckets(3) == PREFILL_BUCKETS_FEW_SLOTS
    fine, coarse = PREFILL_BUCKETS, PREFILL_BUCKETS_FEW_SLOTS
    assert [prefill_length(n, 2048, fine) for n in (1, 64, 65, 200, 513, 1024)] == [16, 64, 80, 208, 576, 1024]
    assert [prefill_length(n, 2048, coarse) for n in (1, 64, 65, 200, 513, 1024)] == [32, 64, 96, 224, 640, 1024]
    for buckets in (fine, coarse):
        assert prefill_length(1025, 2048, buckets) is None  # beyond the largest graph: eager at its own length
        assert prefill_length(100, 100, buckets) is None  # a bucket may not exceed the cache
    assert len(fine) == 40 and len(coarse) == 20


def test_pipeline_speaks_twice_and_close_frees_the_codec(hf_checkpoint):
    """The pipeline keeps one Mimi streaming state for its life (graphs hold its addresses), reset per utterance:
    a second utterance sounds exactly like the first, and close() hands the decoder back."""
    from csmcli.pipeline import Pipeline
    from csmcli.presets import CPU_PRESET, get_preset

    pipeline = Pipeline.load(str(hf_checkpoint), get_preset(CPU_PRESET), device="cpu")
    pipeline.warmup()
    runs = [np.concatenate([c.pcm for c in pipeline.speak("Hello there.", 0, SamplingParams(0.0), max_seconds=0.4)])
            for _ in range(2)]
    assert len(runs[0]) == 5 * 1920 and np.array_equal(runs[0], runs[1])
    codes = torch.zeros(1, 32, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="already streaming"):
        pipeline.codec.decode(codes)
    pipeline.close()
    assert pipeline.codec.decode(codes).shape == (1, 1, 2 * 1920)


def test_every_sentence_is_checked_to_fit_before_any_is_spoken(hf_checkpoint):
    """A context that leaves room after a short first sentence but none after a long second one is refused up front
    (before an output file is written), not when the second sentence is reached."""
    from csmcli.errors import CsmError
    from csmcli.pipeline import Pipeline, split_sentences
    from csmcli.presets import CPU_PRESET, get_preset
    from csmcli.prompt import Segment

    pipeline = Pipeline.load(str(hf_checkpoint), get_preset(CPU_PRESET), device="cpu")
    short = "Hello there, this first sentence is short enough to fit in what the context leaves."
    long = "And this second sentence goes on " + "and on " * 30 + "until it cannot fit anywhere."
    assert split_sentences(f"{short} {long}") == [short, long]

    def context(frames: int) -> list[Segment]:
        return [Segment(1, "An earlier turn.", codes=torch.zeros(32, frames, dtype=torch.long))]

    max_seq = pipeline.model.cfg.backbone.max_seq_len
    rows = {s: pipeline.prompt(context(10), 0, s).rows for s in (short, long)}
    assert rows[long] > rows[short]
    full = context(10 + max_seq - 1 - rows[short])  # the short sentence leaves room for exactly one frame
    pipeline.prepare(full, 0, short)
    with pytest.raises(CsmError, match=r"prompt is \d+ rows but the model holds"):
        pipeline.prepare(full, 0, f"{short} {long}")


def test_fused_kernels_only_on_cuda_with_triton_without_compile_or_the_env_var(monkeypatch):
    from types import SimpleNamespace

    from csmcli import engine
    from csmcli import model as model_module
    from csmcli.model import CSM_1B, CsmConfig, TransformerConfig

    def model(device: str, cfg: CsmConfig = CSM_1B, fp8: bool = False):
        weight = SimpleNamespace(device=torch.device(device))
        return SimpleNamespace(cfg=cfg, codebook0_head=SimpleNamespace(weight=weight), fp8=fp8)

    def gpu(capability: tuple[int, int], triton: bool = True) -> None:  # the facts the engine's rule reads
        for module in (engine, model_module):
            monkeypatch.setattr(module, "compute_capability", lambda device: capability)
            monkeypatch.setattr(module, "has_triton", lambda: triton)

    gpu((9, 0))  # Hopper, Triton installed
    monkeypatch.delenv(engine.NO_FUSED_ENV, raising=False)
    assert engine.fused_kernels_enabled(True, model("cuda"))
    assert not engine.fused_kernels_enabled(False, model("cuda"))
    assert not engine.fused_kernels_enabled(True, model("cuda"), compile=True)  # compile: the torch-ops path
    assert not engine.fused_kernels_enabled(True, model("cpu"))
    small_heads = CsmConfig(backbone=CSM_1B.backbone, decoder=TransformerConfig(
        n_layers=1, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96, max_seq_len=33))
    assert not engine.fused_kernels_enabled(True, model("cuda", small_heads))  # tl.dot needs half a head >= 16
    monkeypatch.setenv(engine.NO_FUSED_ENV, "1")
    assert not engine.fused_kernels_enabled(True, model("cuda"))
    monkeypatch.delenv(engine.NO_FUSED_ENV)
    gpu((8, 0))  # Ampere
    assert engine.fused_kernels_enabled(True, model("cuda"))
    assert not engine.fused_kernels_enabled(True, model("cuda", fp8=True))  # Triton's fp8 wants Ada or newer
    gpu((8, 9))  # Ada
    assert engine.fused_kernels_enabled(True, model("cuda", fp8=True))
    gpu((7, 5))  # Turing: no bf16 dots
    assert not engine.fused_kernels_enabled(True, model("cuda"))
    gpu((9, 0), triton=False)  # no Triton
    assert not engine.fused_kernels_enabled(True, model("cuda"))


def test_mimi_kernels_only_on_cuda_ampere_or_newer_with_triton_unless_switched_off(monkeypatch):
    from csmcli import engine

    def gpu(capability: tuple[int, int], triton: bool = True) -> None:
        monkeypatch.setattr(engine, "compute_capability", lambda device: capability)
        monkeypatch.setattr(engine, "has_triton", lambda: triton)

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(engine.NO_FUSED_ENV, raising=False)
    gpu((8, 0))
    assert engine.mimi_kernels_enabled(True, cuda)
    assert not engine.mimi_kernels_enabled(False, cuda)
    assert not engine.mimi_kernels_enabled(True, cpu)
    monkeypatch.setenv(engine.NO_FUSED_ENV, "1")
    assert not engine.mimi_kernels_enabled(True, cuda)
    monkeypatch.delenv(engine.NO_FUSED_ENV)
    gpu((7, 5))  # Turing: TF32 tensor cores start with Ampere
    assert not engine.mimi_kernels_enabled(True, cuda)
    gpu((9, 0), triton=False)
    assert not engine.mimi_kernels_enabled(True, cuda)


def test_chunk_decoder_on_the_cpu_decodes_with_the_torch_ops(monkeypatch):
    from tiny import tiny_mimi_config

    from csmcli import codec
    from csmcli.engine import ChunkDecoder
    from csmcli.pipeline import random_codec

    seen = []
    real = codec.StreamingMimiDecoder.decode_chunk
    monkeypatch.setattr(codec.StreamingMimiDecoder, "decode_chunk",
                        lambda self, codes, fused=False: seen.append(fused) or real(self, codes, fused))
    chunks = ChunkDecoder(random_codec(torch.device("cpu"), tiny_mimi_config()).decoder, 1, 32, fused_kernels=True)
    try:
        assert chunks.fused_kernels is False
        chunks.decode(torch.zeros(1, 32, 1, dtype=torch.long))
    finally:
        chunks.close()
    assert seen == [False]


def test_flash_attention_only_where_sdpa_has_its_kernel(monkeypatch):
    """Prompt rows from position 0 in bf16 / fp16 on an Ampere-or-newer GPU take SDPA's flash kernel; a T4 or V100
    (no flash kernel: pinning it would raise), float32, a one-row step, per-row positions or a head over 256 take the
    written-out attention."""
    from csmcli import model

    class Rows:  # stands in for q on a GPU: flash_prompt reads only these
        def __init__(self, t=200, d=64, dtype=torch.bfloat16):
            self.shape, self.dtype, self.is_cuda, self.device = (1, 32, t, d), dtype, True, torch.device("cuda", 0)

    monkeypatch.setattr(model, "compute_capability", lambda device: (9, 0))
    assert model.flash_prompt(Rows(), 0) and model.flash_prompt(Rows(dtype=torch.float16), 0)
    assert not model.flash_prompt(Rows(dtype=torch.float32), 0)
    assert not model.flash_prompt(Rows(t=1), 0) and not model.flash_prompt(Rows(), 5)
    assert not model.flash_prompt(Rows(), torch.arange(200)[None]) and not model.flash_prompt(Rows(d=320), 0)
    monkeypatch.setattr(model, "compute_capability", lambda device: (7, 5))  # T4
    assert not model.flash_prompt(Rows(), 0)
    assert not model.flash_prompt(torch.zeros(1, 32, 200, 64, dtype=torch.bfloat16), 0)  # on the CPU
