"""Probe (CUDA, Hopper): does bulk-prefetching a layer's MLP weights into L2 while its attention half runs shorten
a depth-decoder layer step? Times 16 distinct decoder layers (888 MB, far past L2) as the engine runs them
(QKV+norm, attention, output+residual, gate/up+norm, down+residual) in one CUDA graph, at 1 / 16 / 64 rows, with:

  base   as the engine runs today;
  nopdl  the same without programmatic dependent launch;
  same   a prefetch kernel on the same stream: gate/up weights before QKV, down weights before gate/up;
  side   the same prefetches on a second stream of the graph (no serialisation: forked at the layer's start and
         before gate/up, joined at the end).

`layer_probe.py backbone`: the same over 8 backbone layers. `layer_probe.py hotcold`: each layer matmul alone at
1 / 16 / 64 rows, weights cold (past L2) vs hot (in L2). `layer_probe.py norm`: the decoder's 64-row QKV, output
and gate/up matmuls alone over a few tile configs, with the fused RMSNorm and without, and cuBLAS.
"""

# ruff: noqa: B023  (every closure here runs, or is captured into a graph, before its loop variables move on)
import sys

import torch
import triton
import triton.language as tl
from profile_frame import timed  # scripts/ is on the path when a script runs

from csmcli import kernels

PTX = tl.constexpr("{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                   "mov.u32 $0, 0; }")


@triton.jit
def _prefetch_kernel(ptr, nbytes, per_lane, LANES: tl.constexpr):
    lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
    start = lane.to(tl.int64) * per_lane
    size = tl.minimum(nbytes - start, per_lane)
    size = tl.where(size > 0, size, 0).to(tl.int32)
    tl.inline_asm_elementwise(PTX, "=r,l,r", [ptr.to(tl.pointer_type(tl.int8)) + start, size], dtype=tl.int32,
                              is_pure=False, pack=1)


def prefetch(t: torch.Tensor, programs: int = 16) -> None:
    """Bulk-prefetch all of `t` into L2: `programs` one-warp programs, one request per lane."""
    nbytes = t.numel() * t.element_size()
    lanes = 32
    per_lane = triton.cdiv(triton.cdiv(nbytes, programs * lanes), 16) * 16
    _prefetch_kernel[(programs,)](t, nbytes, per_lane, LANES=lanes, num_warps=1)


def graph_ms(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay, reps)


def main() -> None:
    torch.manual_seed(0)
    layers, dim, hidden, heads, kv_heads, head_dim = 16, 1024, 8192, 8, 2, 128
    if sys.argv[1:] == ["backbone"]:
        layers, dim, hidden, heads, kv_heads, head_dim = 8, 2048, 8192, 32, 8, 64
    dev, bf = "cuda", torch.bfloat16
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    w = [dict(qkv=torch.randn(qkv_rows, dim, device=dev, dtype=bf) * 0.02,
              o=torch.randn(dim, heads * head_dim, device=dev, dtype=bf) * 0.02,
              w13=torch.randn(2 * hidden, dim, device=dev, dtype=bf) * 0.02,
              w2=torch.randn(dim, hidden, device=dev, dtype=bf) * 0.02,
              n1=torch.ones(dim, device=dev, dtype=bf), n2=torch.ones(dim, device=dev, dtype=bf))
         for _ in range(layers)]
    inv = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim))
    freqs = torch.outer(torch.arange(64, device=dev).float(), inv)
    cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(bf)
    sin = torch.cat([freqs.sin(), freqs.sin()], -1).to(bf)
    side = torch.cuda.Stream()

    def prefetch_as(mode: str, weight: torch.Tensor) -> None:
        if mode == "same":
            prefetch(weight)
        elif mode == "side":  # forked from the main stream here; joined at the end of `run`
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                prefetch(weight)

    for batch in (1, 16, 64):
        x0 = torch.randn(batch, dim, device=dev, dtype=bf)
        kc = torch.zeros(batch, kv_heads, 64, head_dim, device=dev, dtype=bf)
        vc = torch.zeros_like(kc)

        def run(mode: str) -> torch.Tensor:
            x = x0
            for layer in w:
                prefetch_as(mode, layer["w13"])
                qkv = kernels.linear(x, layer["qkv"], norm=layer["n1"], eps=1e-5, batch=batch)
                att = kernels.decode_attention(qkv, cos, sin, kc, vc, 5, heads, kv_heads)
                x = kernels.linear(att, layer["o"], residual=x, batch=batch)
                prefetch_as(mode, layer["w2"])
                h = kernels.linear(x, layer["w13"], norm=layer["n2"], eps=1e-5, gated=True, batch=batch)
                x = kernels.linear(h, layer["w2"], residual=x, batch=batch)
            if mode == "side":
                torch.cuda.current_stream().wait_stream(side)
            return x

        outs = {}
        for mode in ("base", "same", "side", "nopdl"):
            kernels.pdl_allowed = mode != "nopdl"
            ms = graph_ms(lambda m=mode: outs.__setitem__(m, run(m)))
            print(f"B={batch:3d} {mode:5s} {ms * 1000 / layers:7.1f} us/layer", flush=True)
        same = {mode: torch.equal(out, outs["base"]) for mode, out in outs.items() if mode != "base"}
        print(f"  equal to base: {same}", flush=True)
        kernels.pdl_allowed = True


def hot_cold() -> None:
    """Each decoder / backbone matmul alone, weights cold (32 copies, past L2) vs hot (one copy, from L2): is it
    bound by HBM or by the tile itself?"""
    dev, bf = "cuda", torch.bfloat16
    shapes = {"dec qkv": (1536, 1024, False), "dec o": (1024, 1024, False), "dec w13": (8192, 1024, True),
              "dec w2": (1024, 8192, False), "bb w13": (8192, 2048, True), "bb w2": (2048, 8192, False)}
    for name, (n, k, gated) in shapes.items():
        rows = 2 * n if gated else n
        copies = [torch.randn(rows, k, device=dev, dtype=bf) * 0.02 for _ in range(32)]
        norm = torch.ones(k, device=dev, dtype=bf) if gated or "qkv" in name else None
        for batch in (1, 16, 64):
            x = torch.randn(batch, k, device=dev, dtype=bf)
            cold = graph_ms(lambda: [kernels.linear(x, c, norm=norm, eps=1e-5, gated=gated, batch=batch)
                                     for c in copies]) * 1000 / 32
            hot = graph_ms(lambda: [kernels.linear(x, copies[0], norm=norm, eps=1e-5, gated=gated, batch=batch)
                                    for c in copies]) * 1000 / 32
            mb = rows * k * 2 / 1e6
            print(f"{name:8s} B={batch:3d} cold {cold:6.1f} us ({mb / cold:5.2f} TB/s)  hot {hot:6.1f} us", flush=True)


NORM_CONFIGS = {  # tile configs tried at 64 rows, with and without the fused norm
    "dec w13": [(64, 64, 128, 8, 1, 4), (64, 64, 64, 4, 1, 4), (64, 128, 64, 8, 1, 3), (64, 64, 128, 4, 1, 3),
                (64, 32, 128, 4, 1, 4), (16, 64, 128, 8, 1, 3)],
    "dec qkv": [(16, 64, 128, 8, 1, 3), (64, 64, 128, 4, 1, 3), (64, 32, 256, 4, 1, 3), (16, 32, 256, 4, 1, 3),
                (16, 16, 256, 4, 1, 3), (16, 32, 128, 4, 2, 3)],
    "dec o": [(16, 32, 256, 4, 1, 3), (64, 32, 128, 4, 1, 3), (16, 16, 256, 4, 1, 3), (16, 32, 128, 4, 2, 3),
              (64, 64, 128, 4, 1, 3)],
}


def norm_or_plain() -> None:
    """64-row decoder matmuls alone (cold) over a few tile configs, with the fused RMSNorm and without, and cuBLAS:
    is the norm in the K loop what holds the 64-row tiles back?"""
    dev, bf = "cuda", torch.bfloat16
    shapes = {"dec qkv": (1536, 1024, False), "dec o": (1024, 1024, False), "dec w13": (8192, 1024, True)}
    for name, (n, k, gated) in shapes.items():
        rows = 2 * n if gated else n
        copies = [torch.randn(rows, k, device=dev, dtype=bf) * 0.02 for _ in range(32)]
        x = torch.randn(64, k, device=dev, dtype=bf)
        for norm in (torch.ones(k, device=dev, dtype=bf), None) if name != "dec o" else (None,):
            for config in NORM_CONFIGS[name]:
                try:
                    us = graph_ms(lambda: [kernels.linear(x, c, norm=norm, eps=1e-5, gated=gated, config=config)
                                           for c in copies]) * 1000 / 32
                except Exception as e:  # a config this Triton cannot build
                    print(f"{name} {config}: {type(e).__name__}", flush=True)
                    continue
                label = "norm" if norm is not None else "plain"
                print(f"{name:8s} B=64 {label} {config!s:26s} {us:6.1f} us", flush=True)
        cublas = graph_ms(lambda: [torch.nn.functional.linear(x, c) for c in copies]) * 1000 / 32
        print(f"{name:8s} B=64 cuBLAS plain {cublas:6.1f} us", flush=True)


def folded_or_plain() -> None:
    """64-row normed products as the engine runs them (folded norm: a per-program RMS pre-pass over x, then the
    product, each row scaled after) against the same tile with no norm at all (cold weights): what the pre-pass
    costs, and so what an RMS handed over by the kernel that wrote x could save."""
    dev, bf = "cuda", torch.bfloat16
    shapes = {"dec qkv": (1536, 1024, False), "dec w13": (8192, 1024, True), "dec head": (2051, 1024, False),
              "bb qkv": (3072, 2048, False), "bb w13": (8192, 2048, True)}
    for name, (n, k, gated) in shapes.items():
        rows = 2 * n if gated else n
        copies = [torch.randn(rows, k, device=dev, dtype=bf) * 0.02 for _ in range(16)]
        x = torch.randn(64, k, device=dev, dtype=bf)
        times = {}
        for label, folded in (("folded", True), ("plain", False)):
            times[label] = graph_ms(lambda f=folded: [kernels.linear(x, c, norm_folded=f, eps=1e-5, gated=gated,
                                                                     batch=64) for c in copies]) * 1000 / 16
        print(f"{name:8s} B=64 folded {times['folded']:6.2f} us  plain {times['plain']:6.2f} us  "
              f"pre-pass {times['folded'] - times['plain']:5.2f} us", flush=True)


if __name__ == "__main__":
    modes = {"hotcold": hot_cold, "norm": norm_or_plain, "folded": folded_or_plain}
    modes.get(sys.argv[1] if sys.argv[1:] else "", main)()
