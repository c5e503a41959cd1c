"""Block sizes for csmcli.kernels.linear on this GPU (CUDA): every CSM matmul shape at batch rows 1 / 16 / 64,
each candidate config timed inside a CUDA graph over enough weight copies to defeat L2 (as in a real frame,
where ~9 GB of weights stream through per frame). Prints the best config per shape next to the current choice
and cuBLAS (torch.nn.functional.linear), in microseconds and weight GB/s.

Modes (first argument): all (default), gemv (one row), batched (64 rows), fp8 (one row, fp8 weights), fp8batched
(64 rows, fp8 weights: cuBLAS is then timed on bf16 weights, for reference), sample (the draw only), prefill and
fp8prefill (256 rows, the backbone's shapes: a prompt's prefill), wide (128 and 256 rows: the frame step's layer
products and decoder heads with the fusions an engine of that many slots uses: folded norms and handed-on squares,
residuals with squares out; tiles of 64-256 rows)."""

import itertools
import sys

import torch
import torch.nn.functional as F

from csmcli import kernels

SHAPES = {  # name: (N, K, gated)
    "dec qkv": (1536, 1024, False), "dec o": (1024, 1024, False), "dec w13": (8192, 1024, True),
    "dec w2": (1024, 8192, False), "dec proj": (1024, 2048, False), "dec head": (2051, 1024, False),
    "bb qkv": (3072, 2048, False), "bb o": (2048, 2048, False), "bb w13": (8192, 2048, True),
    "bb w2": (2048, 8192, False), "bb head": (2051, 2048, False),
}


def candidates(m: int, k: int, gated: bool, stages: bool = False, fp8: bool = False, wide: bool = False):
    if wide:  # 128 / 256 rows: tiles of 64-256 rows (weight @ x.T); K blocks of 128 on 3 stages or 64 on 4
        splits = (1,) if gated else (1, 2, 4) if k <= 2048 else (2, 4, 8)
        found = []
        for bm, n, (bk, st), w, s in itertools.product((64, 128, 256), (32, 64, 128), ((128, 3), (64, 4), (128, 4)),
                                                        (4, 8), splits):
            weight_rows = 2 * n if gated else n
            if (w == 4 and bm > 64) or (st == 4 and bk == 128 and not gated):
                continue
            if st * (bm + weight_rows) * bk * 2 > 200_000 or weight_rows * bm > 128 * 32 * w:  # smem, registers
                continue
            found.append((bm, n, bk, w, s, st))
        return found
    if m >= 256:  # a prompt's prefill: large tiles
        return list(itertools.product((64, 128), (64, 128), (64, 128), (4, 8), (1,), (3, 4)))
    if m == 1:  # split K measured no faster at one row (2026-11-23); 2 warps and short blocks won for fp8 gate/up
        grid = itertools.product((2, 4, 8), (256, 512, 1024, 2048, 4096), (2, 4, 8))
        return [(1, n, bk, w, 1, 3) for n, bk, w in grid if bk <= k and (bk >= 1024 or w <= 4)]
    if stages:  # 32-row tiles: the weight read twice for 64 rows, not four times (16-row) or on fewer programs (64)
        splits = (1,) if gated else (1, 2, 4)
        return list(itertools.product((32,), (32, 64), (128, 256), (4, 8), splits, (3,)))
    if fp8:  # 64 rows, fp8 weights: a small grid around the bf16 table's winners
        grid = itertools.product((16, 64), (32, 64), (128, 256), (8,), (1,) if gated else (1, 4))
        return [(bm, n, bk, w, s, 4 if bm == 64 else 3) for bm, n, bk, w, s in grid]
    block_ms = (16,) if m <= 16 else (16, 64)
    splits = (1,) if gated else (1, 2, 4, 8)
    grid = itertools.product(block_ms, (16, 32, 64), (128, 256), (4, 8), splits)
    return [(bm, n, k, w, s, 3) for bm, n, k, w, s in grid]


def graph_time(calls) -> float:
    """Microseconds per call of a list of closures, replayed as one CUDA graph."""
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (5 * len(calls))


def main(ms=(1, 16, 64)):
    mode = sys.argv[1] if sys.argv[1:] else "all"
    if mode == "sample":
        return sample_timings()
    if mode == "gemv":  # one row only
        ms = (1,)
    if mode in ("batched", "fp8batched"):  # 64 rows: the current configs against 64-row tiles
        ms = (64,)
    if mode == "fp8":
        ms = (1,)
    if mode.endswith("prefill"):
        ms = (256,)
    wide = mode == "wide"
    if wide:
        ms = (128, 256)
    fp8 = mode.startswith("fp8")
    torch.manual_seed(0)
    best_table = {}
    for name, (n, k, gated) in SHAPES.items():
        if fp8 and ("head" in name or "proj" in name):  # not quantized (`Csm.to_fp8`)
            continue
        if mode.endswith("prefill") and (not name.startswith("bb") or "head" in name):  # prefill: the layers
            continue
        if wide and name in ("dec proj", "bb head"):  # once a frame each: they keep the 64-row tiles
            continue
        rows = 2 * n if gated else n
        nbytes = rows * k * (1 if fp8 else 2)
        copies = max(4, min(64, (512 << 20) // nbytes))
        weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        stored = [w.to(torch.float8_e4m3fn) for w in weights] if fp8 else weights
        scale = torch.ones(rows, device="cuda") if fp8 else None
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            norm = torch.ones(k, device="cuda", dtype=torch.bfloat16)
            results = []
            configs = candidates(m, k, gated, stages=mode == "batched", fp8=fp8, wide=wide)
            current = kernels.linear_config(m, n, k, gated, fp8)
            for config in configs + [current] * (current not in configs):
                try:
                    if wide:
                        us = graph_time(wide_calls(name, x, stored, gated, config))
                    else:
                        us = graph_time([lambda w=w, c=config, x=x, norm=norm, gated=gated, scale=scale:
                                         kernels.linear(x, w, scale=scale, norm=norm, eps=1e-5, gated=gated, config=c)
                                         for w in stored])
                except Exception as e:  # a config this Triton cannot build: skip it
                    print(f"  {name} m={m} {config}: {type(e).__name__}", file=sys.stderr)
                    continue
                results.append((us, config))
            results.sort()
            now = next((us for us, c in results if c == current), float("nan"))
            cublas = graph_time([lambda w=w, x=x, k=k, norm=norm: F.linear(F.rms_norm(x, (k,), norm, 1e-5), w)
                                 for w in weights])
            us, config = results[0]
            best_table[(name, m)] = config
            print(f"{name:9s} m={m:<3d} best {config!s:25s} {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s | "
                  f"current {current!s:25s} {now:7.1f} us | cuBLAS+norm {cublas:7.1f} us | "
                  f"top3 {[(round(u, 1), c) for u, c in results[:3]]}", flush=True)
    print("BEST =", best_table)
    if mode == "all":
        sample_timings()


def wide_calls(name: str, x, weights, gated: bool, config):
    """One product per weight copy as an engine of 64+ slots launches it (`generate.FrameStepper`): normed products
    (QKV, gate/up, heads; the heads' weights row-major `[N, K]` like the others, as `Csm.decode_codebooks` reads
    them) on folded weights with the rows' squares handed on, the output and down projections with a residual and
    their output's squares."""
    m = x.shape[0]
    if "qkv" in name or "w13" in name or "head" in name:
        squares = torch.rand(m, 4, device="cuda") * x.shape[1]  # [M, parts]: the RMS from the squares handed on
        return [lambda w=w: kernels.linear(x, w, norm_folded=True, eps=1e-5, squares=squares, gated=gated,
                                           config=config) for w in weights]
    residual = torch.randn(m, weights[0].shape[0], device="cuda", dtype=x.dtype)  # [M, N]
    return [lambda w=w: kernels.linear_with_squares(x, w, residual=residual, config=config) for w in weights]


def sample_timings(vocab=2051):
    """The sampling kernel (top-k 50, temperature 0.9) by warps per row and radix digit bits, batch 1 and 64."""
    default = kernels.SAMPLE_WARPS, kernels.SAMPLE_RADIX_BITS
    for batch in (1, 64):
        logits = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16)
        temperature = torch.full((batch, 1), 0.9, device="cuda")
        kth = torch.full((batch, 1), 49, device="cuda", dtype=torch.long)
        gumbel = torch.randn(batch, vocab, device="cuda")
        for warps, bits in itertools.product((8, 16, 32), (1, 2, 4, 8)):
            kernels.SAMPLE_WARPS, kernels.SAMPLE_RADIX_BITS = warps, bits
            args = (logits, temperature, kth, gumbel)
            us = graph_time([lambda args=args: kernels.sample(*args)] * 32)
            print(f"sample B={batch} warps {warps} radix bits {bits}: {us:.1f} us", flush=True)
    kernels.SAMPLE_WARPS, kernels.SAMPLE_RADIX_BITS = default


if __name__ == "__main__":
    main()
