"""CUDA only (skipped elsewhere): the graphed engine against the eager path, bf16, exact code equality."""

from __future__ import annotations

import copy
from collections import Counter, deque

import pytest
import torch

from csmcli.checkpoint import random_model
from csmcli.engine import Engine, Request
from csmcli.model import CSM_1B
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model():
    return random_model(CSM_1B, "cuda", torch.bfloat16, seed=1)


def run(model, requests, max_batch, cuda_graphs):
    """Codes per request id. Requests beyond `max_batch` wait and join when a slot frees up."""
    engine = Engine(model, max_batch=max_batch, cuda_graphs=cuda_graphs)
    out = {r.id: [] for r in requests}
    try:
        for request, chunk in engine.generate(requests, first_chunk_frames=2, chunk_frames=4):
            out[request.id].append(chunk.codes)
    finally:
        engine.close()
    return {k: torch.cat(v) for k, v in out.items()}


def requests(n, frames=24, greedy=True):
    """Prompts of 17 + 13 i rows (wrapped to stay within 1004); all greedy, or with `greedy=False` the even ones
    sampled."""
    return [Request(synthetic_prompt(17 + 13 * i % 988, seed=i),
                    SamplingParams(0.0) if greedy or i % 2 else SamplingParams(0.9, 50, seed=i), frames)
            for i in range(n)]


def test_graph_equals_eager_batch1(model):
    reqs = requests(1, frames=32)
    eager, graphed = run(model, reqs, 1, False), run(model, reqs, 1, True)
    assert torch.equal(eager[reqs[0].id], graphed[reqs[0].id])


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("n", [8, 6])  # 6: the 128-row bucket's prefill group is short (2 of 4, filled up)
def test_graph_equals_eager_batch8_mixed_lengths(model, greedy, n):
    reqs = requests(n, greedy=greedy)
    eager, graphed = run(model, reqs, 8, False), run(model, reqs, 8, True)
    for r in reqs:
        assert torch.equal(eager[r.id], graphed[r.id]), r.id


def test_slot_joining_mid_run_leaves_others_unchanged(model):
    reqs = requests(4, frames=30)
    base = run(model, reqs, 5, True)  # same batch size both times: same kernels, so equality is exact
    short = Request(synthetic_prompt(40, seed=99), SamplingParams(0.0), 6)
    joiner = Request(synthetic_prompt(55, seed=98), SamplingParams(0.0), 10)
    # With 5 slots busy (4 + short), the joiner waits until `short` finishes and then joins mid-run.
    mixed = run(model, [*reqs, short, joiner], 5, True)
    for r in reqs:
        assert torch.equal(base[r.id], mixed[r.id]), r.id
    assert mixed[joiner.id].shape == (10, 32)


def test_a_prefill_graph_captured_mid_run_changes_no_code(model):
    """Prefill graphs are captured on their length's first use: a joiner of a new length has its graph captured
    mid-run, into its own slot's cache rows only. Every request's codes equal those of an engine that captured all
    the graphs ahead (`prepare`), before any request."""
    reqs = requests(4, frames=30)
    short = Request(synthetic_prompt(40, seed=99), SamplingParams(0.0), 6)
    joiner = Request(synthetic_prompt(300, seed=98), SamplingParams(0.9, 50, seed=4), 10)  # bucket 304: new
    by_engine = []
    for ahead in (True, False):
        engine = Engine(model, max_batch=5)  # 5 busy (4 + short): the joiner waits for `short`'s slot
        engine.warmup()
        if ahead:
            engine.prepare(r.prompt.rows for r in [*reqs, short, joiner])
        assert (304 in engine._prefill_graphs) == ahead
        captured = len(engine._prefill_graphs)
        out = {r.id: [] for r in [*reqs, short, joiner]}
        for request, chunk in engine.generate([*reqs, short, joiner], first_chunk_frames=2, chunk_frames=4):
            out[request.id].append(chunk.codes)
        assert 304 in engine._prefill_graphs and (len(engine._prefill_graphs) == captured) == ahead
        engine.close()
        by_engine.append({k: torch.cat(v) for k, v in out.items()})
    for r in [*reqs, short, joiner]:
        assert torch.equal(by_engine[0][r.id], by_engine[1][r.id]), r.id


@pytest.mark.parametrize("max_batch", [8, 64, 128, 256])
def test_a_request_alone_and_in_a_full_batch_makes_the_same_codes(model, max_batch):
    """With one busy slot the engine replays its 1-row frame graph, with all slots busy its full one: block sizes
    follow the engine's batch, so the request's codes are the same either way (sampled, bf16, exact). 64 slots: the
    64-row tiles computed as weight @ x.T; 128 and 256: their own tables of 64- to 256-row tiles."""
    alone = Request(synthetic_prompt(40, seed=5), SamplingParams(0.9, 50, seed=11), 20)
    crowd = Request(alone.prompt, alone.params, 20)
    engine = Engine(model, max_batch=max_batch)
    assert engine.buckets == [1 << i for i in range(max_batch.bit_length())]
    by_id = {}
    for reqs in ([alone], [crowd, *requests(max_batch - 1, frames=20, greedy=False)]):
        for request, chunk in engine.generate(reqs, first_chunk_frames=2, chunk_frames=4):
            by_id.setdefault(request.id, []).append(chunk.codes)
    assert torch.equal(torch.cat(by_id[alone.id]), torch.cat(by_id[crowd.id]))


@pytest.mark.parametrize(("weights", "max_batch"), [("model", 1), ("model", 8), ("model", 64), ("model", 256),
                                                   ("fp8_model", 1), ("fp8_model", 8)])
def test_programmatic_dependent_launch_changes_no_code(weights, max_batch, request, monkeypatch):
    """On Hopper the fused kernels start before the previous kernel ends and wait for its results inside
    (`gdc_wait`); a missing wait would read stale activations or caches. Graphed engines of one slot (the next
    kernel launches at once; fp8: the GEMV also loads its per-row scales before the wait), 8 and 64 slots (the next
    kernel launches when the main loop is done; at 64 the 64-row split-K tiles and their sums, at 256 the 256-row
    table's tiles), three sampled
    requests: the codes with PDL equal those with every kernel launched after the previous one finished."""
    from csmcli import kernels

    model = request.getfixturevalue(weights)
    reqs = requests(3, frames=20, greedy=False)
    monkeypatch.setattr(kernels, "pdl_allowed", True)
    with_pdl = run(model, reqs, max_batch, True)
    monkeypatch.setattr(kernels, "pdl_allowed", False)
    without = run(model, reqs, max_batch, True)
    for r in reqs:
        assert torch.equal(with_pdl[r.id], without[r.id]), r.id


@pytest.fixture(scope="module")
def fp8_model():
    model = random_model(CSM_1B, "cuda", torch.bfloat16, seed=1)
    model.to_fp8()
    return model


@pytest.mark.parametrize("max_batch", [1, 8])
def test_fp8_graph_equals_eager(fp8_model, max_batch):
    """fp8 weights (`--fp8`): the fused kernels' fp8 paths (GEMV at one row, converted tensor-core tiles at 8),
    graphed against eager, sampled and greedy, exact."""
    reqs = requests(max_batch, frames=20, greedy=False)
    eager, graphed = run(fp8_model, reqs, max_batch, False), run(fp8_model, reqs, max_batch, True)
    for r in reqs:
        assert torch.equal(eager[r.id], graphed[r.id]), r.id


def test_fp8_request_alone_and_in_a_full_batch_of_64_makes_the_same_codes(fp8_model):
    """At 64 slots the fp8 weights run on their own block sizes (`kernels._FP8_CONFIGS`): still one row's result
    whatever the other rows are."""
    alone = Request(synthetic_prompt(40, seed=5), SamplingParams(0.9, 50, seed=11), 12)
    crowd = Request(alone.prompt, alone.params, 12)
    engine = Engine(fp8_model, max_batch=64)
    by_id = {}
    for reqs in ([alone], [crowd, *requests(63, frames=12, greedy=False)]):
        for request, chunk in engine.generate(reqs, first_chunk_frames=2, chunk_frames=4):
            by_id.setdefault(request.id, []).append(chunk.codes)
    assert torch.equal(torch.cat(by_id[alone.id]), torch.cat(by_id[crowd.id]))


@pytest.mark.parametrize("length", [64, 200, 1024])
def test_prompt_prefill_with_flash_attention_matches_the_written_out_attention(model, length):
    """A prefill from position 0 (an int) takes `causal_prompt_attention` (flash); the same rows at per-row
    positions (a tensor) take `grouped_attention` with its causal mask. Against the same weights in float32, the
    flash path's states and caches are as close as the written-out path's (bf16 rounding through 16 layers: ~2%
    apart from each other), and the flash path is deterministic."""
    torch.manual_seed(length)
    embeds = torch.randn(2, length, model.cfg.backbone.dim, device="cuda", dtype=torch.bfloat16)
    rows = torch.tensor([1, 0], device="cuda")
    positions = torch.arange(length, device="cuda")[None].expand(2, length)
    with torch.no_grad():
        flash_caches, written_caches = model.new_caches(2).backbone, model.new_caches(2).backbone
        flash = model.backbone(embeds, 0, flash_caches, rows)
        assert torch.equal(flash, model.backbone(embeds, 0, model.new_caches(2).backbone, rows))
        written = model.backbone(embeds, positions, written_caches, rows)
        backbone32 = copy.deepcopy(model.backbone).float()
        backbone32.set_rope(torch.device("cuda"), torch.float32)
        exact_caches = backbone32.new_caches(2, torch.float32, "cuda")
        exact = backbone32(embeds.float(), positions, exact_caches, rows)

    def error(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert not torch.equal(flash, written)  # two paths did run (each rounds in its own order)
    assert error(flash, exact) < 1.5 * error(written, exact), (error(flash, exact), error(written, exact))
    for f, w, e in zip(flash_caches, written_caches, exact_caches, strict=True):
        assert error(f.k, e.k) < 1.5 * error(w.k, e.k) + 1e-3 and error(f.v, e.v) < 1.5 * error(w.v, e.v) + 1e-3


def test_fp8_model_follows_the_bf16_model(model, fp8_model):
    """Full size: after the same prompt, the fp8 model's backbone state and codebook-0 logits point where the bf16
    model's do (an approximation, so close, not equal)."""
    states = []
    for m in (model, fp8_model):
        engine = Engine(m, max_batch=1)
        engine.admit(deque([Request(synthetic_prompt(120, seed=3), SamplingParams(0.0), 4)]))
        hidden = engine.stepper.hidden.float()
        states.append((hidden, m.codebook0_head(engine.stepper.hidden).float()))
    (hidden, logits), (hidden8, logits8) = states
    assert not torch.equal(hidden, hidden8)
    similarity = [torch.nn.functional.cosine_similarity(a, b).min().item() for a, b in ((hidden, hidden8),
                                                                                       (logits, logits8))]
    assert min(similarity) > 0.95, similarity  # 0.970 and 0.972 on an H100 (2026-11-24)


@pytest.mark.parametrize("rows", [40, 150, 400, 700])  # length buckets 48, 160 (groups of 4), 400 (2), 704 (1)
def test_a_prompt_prefills_the_same_in_any_group_and_position(model, rows):
    """Prompts of one length bucket are prefilled together (`PREFILL_GROUP`, at most 1024 rows a pass), a short
    group filled up with copies of its last entry. A prompt's slot state and cache rows come out the same (exact)
    alone, first in a group of others, and last in a group of different others: cuBLAS rounds by shape, and the
    shape is fixed."""
    from csmcli.engine import PREFILL_GROUP

    target = Request(synthetic_prompt(rows, seed=7), SamplingParams(0.9, 50, seed=3), 4)
    others = [Request(synthetic_prompt(rows - 10 + 3 * i, seed=20 + i), SamplingParams(0.9, 50, seed=i), 4)
              for i in range(6)]
    assert PREFILL_GROUP == 4
    engine, states = Engine(model, max_batch=8), []
    for companions, position in (([], 0), (others[:3], 0), (others[3:], 3)):
        engine.slots = [None] * engine.max_batch
        s = engine.stepper
        for t in [s.hidden, s.positions, s.temperature, s.seed, *(c.k for c in s.caches.backbone),
                  *(c.v for c in s.caches.backbone)]:
            t.zero_()  # a prefill that wrote nothing would leave zeros, not the last run's values
        admitted = [*companions]
        admitted.insert(position, target)
        engine.admit(deque(admitted))
        slot = position
        caches = [c.k[slot, :, :rows] for c in s.caches.backbone] + [c.v[slot, :, :rows] for c in s.caches.backbone]
        states.append([t.clone() for t in (s.hidden[slot], s.positions[slot], s.temperature[slot], s.seed[slot],
                                           *caches)])
    assert states[0][1] == rows and states[0][0].abs().sum() > 0
    for other in states[1:]:
        assert all(torch.equal(a, b) for a, b in zip(states[0], other, strict=True))


def _window_bases(graph: torch.cuda.CUDAGraph) -> list[tuple[int, int, float]]:
    """(base, bytes, hit ratio) of every kernel node's access-policy window in a graph captured with
    keep_graph=True."""
    import ctypes

    from csmcli import kernels

    rt = kernels.cudart()
    raw = ctypes.c_void_p(graph.raw_cuda_graph())
    count = ctypes.c_size_t(0)
    assert rt.cudaGraphGetNodes(raw, None, ctypes.byref(count)) == 0
    nodes = (ctypes.c_void_p * count.value)()
    assert rt.cudaGraphGetNodes(raw, nodes, ctypes.byref(count)) == 0
    windows = []
    for node in nodes:
        kind, value = ctypes.c_int(-1), kernels.LaunchAttributeValue()
        assert rt.cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)) == 0
        if kind.value == 0:  # a kernel node
            assert rt.cudaGraphKernelNodeGetAttribute(ctypes.c_void_p(node), kernels.ACCESS_POLICY_WINDOW,
                                                      ctypes.byref(value)) == 0
            windows.append((value.window.base_ptr or 0, value.window.num_bytes, value.window.hit_ratio))
    return windows


@pytest.mark.parametrize("max_batch", [1, 64])
def test_the_frame_graph_gives_its_weights_l2_hints(model, max_batch):
    """The engine sets L2 lines aside, and in the frame graph every product carries a window over its weight: the
    depth decoder's QKV and output persisting whole, its MLP weights and the backbone's and heads' weights marked
    streaming; every other kernel node (attention, draws, norms) has none (the stream's window is cleared after
    each product)."""
    from csmcli import kernels
    from csmcli.engine import state_kept

    engine = Engine(model, max_batch=max_batch)
    small, streaming = engine.stepper.l2_weights()
    if engine.l2_reserved == 0:
        pytest.skip("this GPU sets no L2 lines aside (no persisting L2, MIG, MPS)")
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with state_kept(engine.stepper.state()):
        engine.stepper.step(max_batch)  # compiled before capture
        with torch.cuda.graph(graph):
            engine.stepper.step(max_batch)
    windows = _window_bases(graph)
    marked = {(base, size): ratio for base, size, ratio in windows if size}
    index = small[0].device.index
    fits = [w for w in small + streaming if w.nbytes <= kernels._l2_max_window[index]]  # larger: no window at all
    whole = min(1.0, engine.l2_reserved / sum(w.nbytes for w in small))  # 1 where the GPU sets 20 MB aside
    want = {(w.data_ptr(), w.nbytes): whole if any(w is kept for kept in small) else 0.0 for w in fits}
    assert marked.keys() == want.keys()
    assert all(marked[key] == pytest.approx(ratio, abs=1e-6) for key, ratio in want.items())
    # Each product carries its weight's window, and so does the split-K sum after a split one (it reads no weight:
    # no effect there): per weight, one or two kernels a use. The decoder's weights are used 32 times a frame.
    decoder = [w for weights in model.decoder.l2_weights(max_batch) for w in weights]
    backbone = [w for weights in model.backbone.l2_weights(max_batch) for w in weights]
    heads = [model.codebook0_head.weight, model.projection.weight, *engine.stepper.audio_head_rows]
    assert len(decoder + backbone + heads) == len(small + streaming)
    counts = Counter((base, size) for base, size, _ in windows if size)
    for weights, uses in ((decoder, 32), (backbone, 1), (heads, 1)):
        for w in weights:
            if (w.data_ptr(), w.nbytes) in want:
                assert counts[(w.data_ptr(), w.nbytes)] in (uses, 2 * uses), (tuple(w.shape), uses)
    attention_steps = 32 * len(model.decoder.layers) + len(model.backbone.layers)
    assert sum(size == 0 for _, size, _ in windows) >= attention_steps  # attention, draws: unmarked
    assert kernels.folds_norms(max_batch) == any(w is layer.wqkv_folded for w in small
                                                 for layer in model.decoder.layers)


def test_cudart_is_the_runtime_torch_loaded():
    """`kernels.cudart` (found by soname, RTLD_NOLOAD) is the very library torch has mapped (as /proc/self/maps
    lists it): no second runtime, and hints are not silently off because none was found."""
    import ctypes
    import os

    from csmcli import kernels

    torch.zeros(1, device="cuda")
    with open("/proc/self/maps") as maps:
        paths = {line.split(maxsplit=5)[5].strip() for line in maps if "libcudart.so" in line}
    assert paths, "torch mapped no libcudart (linked statically?)"
    handles = {ctypes.CDLL(path, mode=os.RTLD_NOLOAD)._handle for path in paths}
    rt = kernels.cudart()
    assert rt is not None and rt._handle in handles
    count = ctypes.c_int(0)
    assert rt.cudaGetDeviceCount(ctypes.byref(count)) == 0 and count.value == torch.cuda.device_count()


def test_closing_the_last_engine_hands_back_its_l2_lines(model, monkeypatch):
    """Two engines hold L2 reservations: closing one leaves the other's hints and the set-aside as they are; closing
    the last drops the hints and restores the persisting-L2 limit as it was before the first (0 here). An engine
    built after that reserves again and makes the same codes as before."""
    import ctypes

    from csmcli import kernels

    rt = kernels.cudart()
    for name in ("_l2_ratio", "_l2_max_window", "_l2_holders", "_l2_limit_before"):
        monkeypatch.setattr(kernels, name, {})  # this test's reservations only
    assert rt.cudaDeviceSetLimit(kernels._LIMIT_PERSISTING_L2, ctypes.c_size_t(0)) == 0

    def limit() -> int:
        size = ctypes.c_size_t(1)
        assert rt.cudaDeviceGetLimit(ctypes.byref(size), kernels._LIMIT_PERSISTING_L2) == 0
        return size.value

    reqs = requests(1, frames=6)
    want = run(model, reqs, 1, True)  # closed: the limit is back to 0
    assert limit() == 0 and not kernels._l2_ratio and not kernels._l2_holders
    first, second = Engine(model, max_batch=1), Engine(model, max_batch=4)
    if first.l2_reserved == 0:
        pytest.skip("this GPU sets no L2 lines aside (no persisting L2, MIG, MPS)")
    assert limit() == max(first.l2_reserved, second.l2_reserved) > 0
    first.close()
    first.close()  # a second close changes nothing
    assert limit() > 0 and kernels._l2_holders == {model.codebook0_head.weight.device.index: 1}
    small, streaming = second.stepper.l2_weights()
    assert all((w.device.index, w.data_ptr()) in kernels._l2_ratio for w in small + streaming)
    second.close()
    assert limit() == 0 and not kernels._l2_ratio and not kernels._l2_holders
    again = run(model, reqs, 1, True)
    assert all(torch.equal(again[r.id], want[r.id]) for r in reqs)


class _RefusingRuntime:
    """A CUDA runtime that refuses every call (as one without persisting L2 or these calls might)."""

    def __getattr__(self, name):
        return lambda *args: 0 if name == "cudaGetLastError" else 1


def test_a_runtime_that_refuses_the_l2_hints_changes_no_code(model, monkeypatch):
    """Refused at the reservation, or at a stream attribute in the middle of a frame graph's capture: the engine
    runs on without hints (none asked for again) and every code is what an engine with hints makes."""
    from csmcli import kernels

    reqs = requests(2, frames=12, greedy=False)
    want = run(model, reqs, 2, True)
    monkeypatch.setattr(kernels, "cudart", _RefusingRuntime)
    monkeypatch.setattr(kernels, "_l2_ratio", {})
    monkeypatch.setattr(kernels, "_l2_max_window", {})
    engine = Engine(model, max_batch=2)
    assert engine.l2_reserved == 0 and not kernels._l2_ratio
    small, streaming = engine.stepper.l2_weights()
    index = small[0].device.index
    kernels._l2_ratio.update({(index, w.data_ptr()): 1.0 for w in small + streaming})  # as if reserved
    kernels._l2_max_window[index] = 1 << 30
    got = {r.id: [] for r in reqs}
    for request, chunk in engine.generate(reqs, first_chunk_frames=2, chunk_frames=4):
        got[request.id].append(chunk.codes)
    assert not kernels._l2_ratio  # the refused stream attribute stopped the hints
    for r in reqs:
        assert torch.equal(torch.cat(got[r.id]), want[r.id]), r.id


COMPILE_CHILD = r"""
import json, os, sys
from pathlib import Path
import torch, triton
sys.path.insert(0, "tests")
import tiny
from csmcli import engine, pipeline
from csmcli.sampling import SamplingParams

compiled, ahead = [], []
triton.knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiled.append(k.get("repr", "?"))
real = engine.compile_ahead
if sys.argv[1] == "ahead":
    def recorded(device, calls):
        done = real(device, calls)
        ahead.extend(compiled)
        compiled.clear()
        return done
    engine.compile_ahead = recorded
else:
    engine.compile_ahead = lambda device, calls: False
tokenizer = Path(os.environ["TRITON_CACHE_DIR"]).parent / "tokenizer"
tiny.save_tokenizer(tokenizer)
preset, _ = pipeline.choose_preset(None, None, {})
p = pipeline.Pipeline.load(None, preset, random_weights=True, tokenizer_path=str(tokenizer))
p.warmup()
in_warmup = list(compiled)
text = "Hello there, a longer first sentence, so that its prompt is padded to a bucket beyond the first one."
chunks = list(p.speak(text, 0, SamplingParams(seed=7), max_seconds=1.0))
print(json.dumps({"ahead": ahead, "in_warmup": in_warmup, "in_speak": compiled[len(in_warmup):],
                  "codes": torch.cat([c.codes for c in chunks]).tolist(),
                  "pcm": [float(c.pcm.astype("float64").sum()) for c in chunks]}))
"""


def test_compiling_ahead_leaves_the_warm_up_nothing_to_compile_and_changes_no_sample(tmp_path):
    """A machine's first run: `Pipeline.warmup` compiles every Triton kernel its warm-up launches at once on threads
    (`engine.compile_ahead`), so neither the warm-up nor speaking compiles any (a prompt of another length bucket
    than the admission's compiles ahead in `Pipeline.prepare`), and the kernels are the ones a plain warm-up
    compiles one by one: the same codes and audio. Each run in a child with an empty Triton cache."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    def child(mode):
        (tmp_path / mode).mkdir()
        env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / mode / "triton")}  # a machine's first run
        out = subprocess.run([sys.executable, "-c", COMPILE_CHILD, mode], capture_output=True, text=True,
                             timeout=600, cwd=Path(__file__).parent.parent, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1])

    ahead, plain = child("ahead"), child("plain")
    assert plain["in_warmup"]  # the counting sees compiles
    assert set(plain["in_warmup"]) | set(plain["in_speak"]) <= set(ahead["ahead"])
    assert ahead["in_warmup"] == [] and ahead["in_speak"] == []
    assert ahead["codes"] == plain["codes"] and ahead["pcm"] == plain["pcm"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_say_on_a_second_gpu_makes_what_the_first_makes(tmp_path):
    """`--torch-device cuda:1`: Triton launches on the current GPU and graph capture records the current GPU's
    stream, so csmcli makes the chosen GPU current; its codes must be the first GPU's (the same seeded random
    weights, built on each)."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    tiny.save_tokenizer(tmp_path / "tok")
    codes = []
    for device in ("cuda:0", "cuda:1"):
        out = tmp_path / f"{device[-1]}.npy"
        result = subprocess.run(
            [sys.executable, "-m", "csmcli", "say", "Hello from a GPU.", "--random-weights", "--tokenizer",
             str(tmp_path / "tok"), "--torch-device", device, "--seed", "7", "--max-seconds", "1", "-o",
             str(tmp_path / f"{device[-1]}.wav"), "--save-codes", str(out)],
            capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
        assert result.returncode == 0, result.stderr[-3000:]
        codes.append(np.load(out))
    assert codes[0].shape[0] > 0 and np.array_equal(codes[0], codes[1])
