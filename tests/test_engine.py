"""Continuous batching on CPU: every request's codes in a shared batch equal the codes it gets alone."""

from __future__ import annotations

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
