"""Block sizes for csmcli.kernels.linear on this GPU (CUDA): every CSM matmul shape at batch rows 1 / 16 / 64,
each candidate config timed inside a CUDA graph over enough weight copies to defeat L2 (as in a real frame,
where ~9 GB of weights stream through per frame). Prints the best config per shape next to the current choice
and cuBLAS (torch.nn.functional.linear), in microseconds and weight GB/s."""

import itertools
import sys

import torch
import torch.nn.functional as F

from csmcli import kernels

SHAPES = {  # name: (N, K, gated, weight stored [K, N])
    "dec qkv": (1536, 1024, False, False), "dec o": (1024, 1024, False, False),
    "dec w13": (8192, 1024, True, False), "dec w2": (1024, 8192, False, False),
    "dec proj": (1024, 2048, False, False), "dec head": (2051, 1024, False, True),
    "bb qkv": (3072, 2048, False, False), "bb o": (2048, 2048, False, False),
    "bb w13": (8192, 2048, True, False), "bb w2": (2048, 8192, False, False), "bb head": (2051, 2048, False, False),
}


def candidates(m: int, transposed: bool):
    if m == 1 and transposed:
        return [(1, n, k, w) for n, k, w in itertools.product((16, 32, 64), (32, 64, 128), (4,))]
    if m == 1:
        return [(1, n, k, w) for n, k, w in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8))]
    block_m = min(64, max(16, 1 << (m - 1).bit_length()))
    return [(block_m, n, k, w) for n, k, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8))]


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
    torch.manual_seed(0)
    best_table = {}
    for name, (n, k, gated, transposed) in SHAPES.items():
        rows = 2 * n if gated else n
        nbytes = rows * k * 2
        copies = max(4, min(64, (512 << 20) // nbytes))
        weights = [torch.randn(k, rows, device="cuda", dtype=torch.bfloat16).T if transposed
                   else torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            norm = torch.ones(k, device="cuda", dtype=torch.bfloat16)
            results = []
            for config in candidates(m, transposed):
                try:
                    us = graph_time([lambda w=w, c=config, x=x, norm=norm, gated=gated: kernels.linear(
                        x, w, norm=norm, eps=1e-5, gated=gated, config=c) for w in weights])
                except Exception as e:  # a config this Triton cannot build: skip it
                    print(f"  {name} m={m} {config}: {type(e).__name__}", file=sys.stderr)
                    continue
                results.append((us, config))
            results.sort()
            current = kernels.linear_config(m, n // 2 if gated else n, k, gated, kernels._sm_count(0))
            now = next((us for us, c in results if c == current), float("nan"))
            cublas = graph_time([lambda w=w, x=x, k=k, norm=norm: F.linear(F.rms_norm(x, (k,), norm, 1e-5), w)
                                 for w in weights])
            us, config = results[0]
            best_table[(name, m)] = config
            print(f"{name:9s} m={m:<3d} best {config!s:22s} {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s | "
                  f"current {current!s:22s} {now:7.1f} us | cuBLAS+norm {cublas:7.1f} us | "
                  f"top3 {[(round(u, 1), c) for u, c in results[:3]]}", flush=True)
    print("BEST =", best_table)


if __name__ == "__main__":
    main()
