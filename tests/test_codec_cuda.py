"""The streaming Mimi decoder on CUDA: float32 parity, bf16 transformer, and one chunk captured in a CUDA graph.

Skipped without a GPU. Default Mimi sizes with random weights; 150 frames exceed the 250-step sliding window.
`python tests/test_codec_cuda.py` also prints per-chunk timings.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from test_codec import decode_in_chunks, force_stride8_path, random_codes, random_mimi
from transformers import MimiConfig

from csmcli.codec import StreamingMimiDecoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
N_FRAMES = 150


@pytest.fixture(scope="module")
def setup():
    torch.backends.cudnn.allow_tf32 = False  # TF32 convs would differ between chunk shapes by ~1e-3
    config = MimiConfig()
    model = random_mimi(config).cuda()
    decoder = StreamingMimiDecoder.from_state_dict(config, model.state_dict()).cuda()
    codes = random_codes(config, 2, N_FRAMES).cuda()  # [2, 32, N]
    with torch.no_grad():
        reference = model.decode(codes).audio_values  # [2, 1, N * 1920]
    return decoder, codes, reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("path", ["matmul", "conv"])
def test_cuda_float32_chunks_equal_transformers(setup, path, fused, monkeypatch):
    """Either stride-8 path; the SEANet's biases, residuals and ELUs as torch ops or `kernels.seanet_sum`."""
    force_stride8_path(monkeypatch, path)  # 2 streams' chunks of 1 and 4 frames would take cuDNN
    decoder, codes, reference = setup
    for chunk in (1, 4):
        with decoder.streaming(2):
            assert relative_error(decode_in_chunks(decoder, codes, chunk, fused), reference) < 1e-4


@pytest.mark.parametrize("attention", ["kernel", "torch ops"])
@pytest.mark.parametrize("streams", [2, 64])
def test_fused_kernels_equal_the_torch_ops(setup, streams, attention, monkeypatch):
    """`kernels.seanet_sum` adds in torch's order with CUDA's expm1f and the convs without their bias run the same
    kernels: with 2 streams (32 rows: the transformer's products stay on cuBLAS) and the attention as torch ops the
    audio is the same to the bit. `kernels.mimi_attention` (online softmax, tf32x3 products) and, with 64 streams
    (1024 rows), `kernels.matmul_f32`'s tf32x3 products agree with float32 to ~1e-6: the audio to float32 level
    (plain TF32 products: ~1e-3; a lost bias or residual: >= 1e-2 of the peak); 64 streams also take the stride-8
    matmul."""
    from csmcli import codec, kernels

    if attention == "torch ops":  # only the attention: the projections still take matmul_f32 where they would
        monkeypatch.setattr(kernels, "mimi_attention", codec._attention)
    decoder, codes, _ = setup
    codes = codes[:, :, :16].repeat(streams // 2, 1, 1)  # [streams, 32, 16]
    pcm = {}
    for fused in (False, True):
        with decoder.streaming(streams):
            pcm[fused] = decode_in_chunks(decoder, codes, 8, fused)
    error = relative_error(pcm[True], pcm[False])
    print(f"{streams} streams, attention as {attention}: fused against torch ops, max difference {error:.1e} of peak")
    if streams * 16 < kernels.MATMUL_F32_MIN_ROWS and attention == "torch ops":
        assert error == 0
    else:
        assert 0 < error < 1e-5


def test_chunk_decoder_runs_the_fused_kernels_when_asked(setup, monkeypatch):
    """`ChunkDecoder(fused_kernels=)` on CUDA (`engine.mimi_kernels_enabled`; CPU-side rule tests in test_engine):
    its graphs decode through the fused kernels when asked, the torch ops otherwise."""
    from csmcli import kernels
    from csmcli.engine import ChunkDecoder

    decoder, codes, _ = setup
    monkeypatch.setattr(kernels, "MATMUL_F32_MIN_ROWS", 1)  # 2 streams' rows through matmul_f32 too
    calls = []
    for name in ("seanet_sum", "matmul_f32", "mimi_attention"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    for requested in (True, False):
        calls.clear()
        chunks = ChunkDecoder(decoder, 2, 32, cuda_graphs=True, fused_kernels=requested)
        try:
            assert chunks.fused_kernels is requested
            chunks.warmup([2])
            chunks.decode(codes[..., :2])
        finally:
            chunks.close()
        assert ({"seanet_sum", "matmul_f32", "mimi_attention"} <= set(calls)) is requested
        assert (not calls) is (not requested)


@pytest.mark.parametrize("fused", [False, True])
def test_cuda_bf16_transformer_stays_close(setup, fused):
    """Fused: the bf16 transformer keeps torch's products (`kernels.matmul_f32` is float32 only)."""
    decoder, codes, reference = setup
    decoder = copy.deepcopy(decoder).set_transformer_dtype(torch.bfloat16)  # the cast is lossy: keep ours float32
    with decoder.streaming(2):
        error = relative_error(decode_in_chunks(decoder, codes, 1, fused), reference)
    print(f"bf16 transformer: max error {error:.2e} of peak")
    assert 1e-5 < error < 5e-2


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("batch", [2, 64])
def test_seanet_activations_stay_time_major(setup, batch, fused):
    """cuDNN's NHWC kernels keep the SEANet's time-major layout from layer to layer (no transposes around convs);
    64 streams run the stride-8 transposed conv as a matmul (`codec.BY_STEPS_ROWS`), 2 through cuDNN."""
    decoder, codes, _ = setup
    outputs = []

    def keep(m, args, out):  # convs and blocks give a `codec._Activation`: its tensors
        for t in (out,) if isinstance(out, torch.Tensor) else (out.x, out.skip):
            if t is not None:
                outputs.append((type(m).__name__, t))

    hooks = [m.register_forward_hook(keep)
             for m in decoder.decoder.modules() if m is not decoder.decoder and not isinstance(m, torch.nn.Sequential)]
    try:
        with decoder.streaming(batch):
            decoder.decode_chunk(codes[:1, :, :8].expand(batch, -1, -1), fused)
    finally:
        for h in hooks:
            h.remove()
    wide = [(name, out) for name, out in outputs if out.shape[1] > 1]  # [B, C, T]; C = 1 is both layouts
    assert wide
    # each stream's [T, C] contiguous (a transposed conv's output may be a slice of a longer one)
    assert [name for name, out in wide if (out.stride(1), out.stride(2)) != (1, out.shape[1])] == []


def capture(decoder: StreamingMimiDecoder, codes_in: torch.Tensor, fused: bool = False
            ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture one decode_chunk on the static `codes_in`; call inside streaming(), reset() before replaying."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: cuDNN/cuBLAS pick their algorithms (Triton compiles) outside the capture
            decoder.decode_chunk(codes_in, fused)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pcm_out = decoder.decode_chunk(codes_in, fused)
    return graph, pcm_out


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("path", ["matmul", "conv"])
def test_cuda_graph_replay_equals_eager(setup, path, fused, monkeypatch):
    """Fused: every product through `kernels.matmul_f32` (whatever the rows), the SEANet passes through
    `kernels.seanet_sum`, replayed from the graph."""
    from csmcli import kernels

    force_stride8_path(monkeypatch, path)
    monkeypatch.setattr(kernels, "MATMUL_F32_MIN_ROWS", 1)
    decoder, codes, reference = setup
    chunk = 2
    with decoder.streaming(2):
        codes_in = codes[..., :chunk].clone()  # [2, 32, chunk], the graph's static input
        graph, pcm_out = capture(decoder, codes_in, fused)
        decoder.reset()  # in place: the captured state buffers are the ones reset
        pieces = []
        for i in range(0, N_FRAMES, chunk):
            codes_in.copy_(codes[..., i : i + chunk])
            graph.replay()
            pieces.append(pcm_out.clone())
    assert relative_error(torch.cat(pieces, -1), reference) < 1e-4


def test_chunk_decoder_graphs_equal_eager_chunks(setup):
    """The pipeline's ChunkDecoder: graphs per warmed size, other sizes (3, 5) cut into graphed ones, warm-up
    mid-stream."""
    from csmcli.engine import ChunkDecoder

    decoder, codes, _ = setup
    sizes = [1, 2, 4, 3] + [8] * 16 + [5, 7]  # sums to N_FRAMES
    assert sum(sizes) == N_FRAMES
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    with decoder.streaming(2):
        eager = torch.cat([decoder.decode_chunk(codes[..., s : s + n]) for s, n in zip(starts, sizes, strict=True)], -1)
    chunks = ChunkDecoder(decoder, 2, codes.shape[1], cuda_graphs=True)
    chunks.warmup([1, 2, 4])
    pieces = []
    for i, (s, n) in enumerate(zip(starts, sizes, strict=True)):
        if i == 4:
            chunks.warmup([8])  # captured mid-utterance: the state must come back unchanged
        pieces.append(chunks.decode(codes[..., s : s + n]).clone())
    assert len(chunks._graphs) == 4
    chunks.reset()
    again = chunks.decode(codes[..., :1]).clone()
    chunks.close()
    # Same kernels, so equal up to cuDNN's algorithm choice (~1e-7); a lost or disturbed state is >= 1e-3.
    assert relative_error(torch.cat(pieces, -1), eager) < 1e-5
    assert relative_error(again, eager[..., :1920]) < 1e-5


def _time_chunks(batch: int, chunk: int, transformer_dtype: torch.dtype) -> None:
    torch.backends.cudnn.allow_tf32 = True
    config = MimiConfig()
    decoder = StreamingMimiDecoder.from_state_dict(config, random_mimi(config).state_dict()).cuda()
    decoder.set_transformer_dtype(transformer_dtype)
    codes = random_codes(config, batch, 100).cuda()
    with decoder.streaming(batch):
        codes_in = codes[..., :chunk].clone()
        graph, _ = capture(decoder, codes_in)
        for name, step in (("eager", lambda: decoder.decode_chunk(codes_in)), ("graph", graph.replay)):
            decoder.reset()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(50):
                step()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / 50 * 1e3
            print(f"B={batch} chunk={chunk} frames transformer={transformer_dtype}: {name} {ms:.2f} ms/chunk")


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    for batch, chunk in ((1, 1), (1, 4), (8, 1)):
        for dtype in (torch.float32, torch.bfloat16):
            _time_chunks(batch, chunk, dtype)
