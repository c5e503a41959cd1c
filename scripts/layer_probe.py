"""Probe (CUDA, Hopper): does bulk-prefetching a layer's MLP weights into L2 while its attention half runs shorten
a depth-decoder layer step? Times 16 distinct decoder layers (888 MB, far past L2) as the engine runs them
(QKV+norm, attention, output+residual, gate/up+norm, down+residual) in one CUDA graph, at 1 / 16 / 64 rows, with:

  base   as the engine runs today;
  nopdl  the same without programmatic dependent launch;
  same   a prefetch kernel on the same stream: gate/up weights before QKV, down weights before gate/up;
  side   the same prefetches on a second stream of the graph (no serialisation: forked at the layer's start and
         before gate/up, joined at the end).

`layer_probe.py backbone`: the same over 8 backbone layers. `layer_probe.py hotcold`: the decoder's 64-row QKV,
output and gate/up matmuls alone over a few tile configs, with the fused RMSNorm and without, and cuBLAS.
"""

# ruff: noqa: B023  (every closure here runs, or is captured into a graph, before its loop variables move on)
import sys

import torch
import triton
import triton.language as tl

from csmcli import kernels

PTX = tl.constexpr(
    "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }"
)


@triton.jit
def _prefetch_kernel(ptr, nbytes, per_lane, LANES: tl.constexpr):
    lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
    start = lane.to(tl.int64) * per_lane
    size = tl.minimum(nbytes - start, per_lane)
    size = tl.where(size > 0, size, 0).to(tl.int32)
    tl.inline_asm_elementwise(
        PTX, "=r,l,r", [ptr.to(tl.pointer_type(tl.int8)) + start, size], dtype=tl.int32, is_pure=False, pack=1
    )


def prefetch(t: torch.Tensor, programs: int = 16) -> None:
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
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    torch.manual_seed(0)
    layers, dim, hidden, heads, kv_heads, head_dim = 16, 1024, 8192, 8, 2, 128
    if sys.argv[1:] == ["backbone"]:
        layers, dim, hidden, heads, kv_heads, head_dim = 8, 2048, 8192, 32, 8, 64
    dev, bf = "cuda", torch.bfloat16
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    w = [
        dict(
            qkv=torch.randn(qkv_rows, dim, device=dev, dtype=bf) * 0.02,
            o=torch.randn(dim, heads * head_dim, device=dev, dtype=bf) * 0.02,
            w13=torch.randn(2 * hidden, dim, device=dev, dtype=bf) * 0.02,
            w2=torch.randn(dim, hidden, device=dev, dtype=bf) * 0.02,
            n1=torch.ones(dim, device=dev, dtype=bf),
            n2=torch.ones(dim, device=dev, dtype=bf),
        )
        for _ in range(layers)
    ]
    inv = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device=dev).float() / head_dim))
    freqs = torch.outer(torch.arange(64, device=dev).float(), inv)
    cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(bf)
    sin = torch.cat([freqs.sin(), freqs.sin()], -1).to(bf)
    side = torch.cuda.Stream()
    for batch in (1, 16, 64):
        x0 = torch.randn(batch, dim, device=dev, dtype=bf)
        kc = torch.zeros(batch, kv_heads, 64, head_dim, device=dev, dtype=bf)
        vc = torch.zeros_like(kc)

        def run(mode: str) -> torch.Tensor:
            x = x0
            main = torch.cuda.current_stream()
            events = []
            for layer in w:
                if mode == "same":
                    prefetch(layer["w13"])
                if mode == "side":
                    ev = torch.cuda.Event()
                    ev.record(main)
                    side.wait_event(ev)
                    with torch.cuda.stream(side):
                        prefetch(layer["w13"])
                qkv = kernels.linear(x, layer["qkv"], norm=layer["n1"], eps=1e-5, batch=batch)
                att = kernels.decode_attention(qkv, cos, sin, kc, vc, 5, heads, kv_heads)
                x = kernels.linear(att, layer["o"], residual=x, batch=batch)
                if mode == "same":
                    prefetch(layer["w2"])
                if mode == "side":
                    ev = torch.cuda.Event()
                    ev.record(main)
                    side.wait_event(ev)
                    with torch.cuda.stream(side):
                        prefetch(layer["w2"])
                h = kernels.linear(x, layer["w13"], norm=layer["n2"], eps=1e-5, gated=True, batch=batch)
                x = kernels.linear(h, layer["w2"], residual=x, batch=batch)
            if mode == "side":
                ev = torch.cuda.Event()
                ev.record(side)
                main.wait_event(ev)
            del events
            return x

        outs = {}
        for mode in ("base", "same", "side", "nopdl"):
            kernels.pdl_allowed = mode != "nopdl"
            ms = graph_ms(lambda m=mode: outs.__setitem__(m, run(m)))
            print(f"B={batch:3d} {mode:5s} {ms * 1000 / layers:7.1f} us/layer", flush=True)
        print(
            f"  same==base {torch.equal(outs['same'], outs['base'])} side==base "
            f"{torch.equal(outs['side'], outs['base'])} nopdl==base {torch.equal(outs['nopdl'], outs['base'])}",
            flush=True,
        )


if __name__ == "__main__" and sys.argv[1:] != ["hotcold"]:
    main()


def hot_cold() -> None:
    """64-row decoder matmuls alone, weights cold (32 copies, past L2), with and without the fused RMSNorm, over a
    few tile configs: is the norm in the K loop what holds the 64-row tiles back?"""
    dev, bf = "cuda", torch.bfloat16
    shapes = {"dec qkv": (1536, 1024, False), "dec o": (1024, 1024, False), "dec w13": (8192, 1024, True)}
    extra = {
        "dec w13": [
            (64, 64, 128, 8, 1, 4),
            (64, 64, 64, 4, 1, 4),
            (64, 128, 64, 8, 1, 3),
            (64, 64, 128, 4, 1, 3),
            (64, 32, 128, 4, 1, 4),
            (16, 64, 128, 8, 1, 3),
        ],
        "dec qkv": [
            (16, 64, 128, 8, 1, 3),
            (64, 64, 128, 4, 1, 3),
            (64, 32, 256, 4, 1, 3),
            (16, 32, 256, 4, 1, 3),
            (16, 16, 256, 4, 1, 3),
            (16, 32, 128, 4, 2, 3),
        ],
        "dec o": [
            (16, 32, 256, 4, 1, 3),
            (64, 32, 128, 4, 1, 3),
            (16, 16, 256, 4, 1, 3),
            (16, 32, 128, 4, 2, 3),
            (64, 64, 128, 4, 1, 3),
        ],
    }
    for name, (n, k, gated) in shapes.items():
        rows = 2 * n if gated else n
        copies = [torch.randn(rows, k, device=dev, dtype=bf) * 0.02 for _ in range(32)]
        x = torch.randn(64, k, device=dev, dtype=bf)
        for norm in (torch.ones(k, device=dev, dtype=bf), None) if name != "dec o" else (None,):
            for config in extra[name]:
                try:
                    us = (
                        graph_ms(
                            lambda: [
                                kernels.linear(x, c, norm=norm, eps=1e-5, gated=gated, config=config) for c in copies
                            ]
                        )
                        * 1000
                        / 32
                    )
                except Exception as e:
                    print(f"{name} {config}: {type(e).__name__}", flush=True)
                    continue
                print(
                    f"{name:8s} B=64 {'norm' if norm is not None else 'plain'} {config!s:26s} {us:6.1f} us", flush=True
                )
        cublas = graph_ms(lambda: [torch.nn.functional.linear(x, c) for c in copies]) * 1000 / 32
        print(f"{name:8s} B=64 cuBLAS plain {cublas:6.1f} us", flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["hotcold"]:
    hot_cold()
