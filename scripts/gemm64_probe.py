"""Probe: a hand-written CUDA C++ 64-row product (scripts/gemm64_source.py) against the engine's Triton tiles
(`kernels.linear`), on the depth decoder's shapes at 64 rows, full size, random bf16 weights.

For each shape and build: the largest difference from a float32 torch reference (and from the Triton tile), then µs
per product in a CUDA graph of 64 products cycling through 8 copies of the weight (more than L2 holds, as in the frame
step). Results: docs/BENCHMARKS.md, twenty-third session.

Usage: python3 scripts/gemm64_probe.py [quick | small]   (small: one gate/up and four down builds, all qkv / o)"""

import ctypes
import sys

import torch

sys.path.insert(0, "scripts")
import gemm64_source as src

from csmcli import kernels

DEV = "cuda"
COPIES = 8
REPLAYS = 20


class _Value(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("align", ctypes.c_uint64), ("i", ctypes.c_int)]


class _Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _Value)]


class _Config(ctypes.Structure):
    _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint), ("bx", ctypes.c_uint),
                ("by", ctypes.c_uint), ("bz", ctypes.c_uint), ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attr)), ("nattrs", ctypes.c_uint)]


class Gemm:
    def __init__(self, n, k, wn, wk, split, gated, residual, depth, pdl=False, l2_256=False):
        self.n, self.k, self.gated, self.residual, self.pdl = n, k, gated, residual, pdl
        self.name = f"wn{wn} wk{wk} split{split} depth{depth}{' pdl' if pdl else ''}{' l2_256' if l2_256 else ''}"
        source = src.defines(n=n, k=k, wn=wn, wk=wk, split=split, gated=gated, residual=residual, depth=depth,
                             pdl=pdl, l2_256=l2_256) + src.SOURCE
        self.kernel = torch.cuda._compile_kernel(source, "gemm64")
        self.smem = src.smem_bytes(k=k, wn=wn, wk=wk, split=split)
        self.kernel.set_shared_memory_config(self.smem)
        self.grid = src.grid(n=n, wn=wn, split=split, gated=gated)
        self.block = wn * wk * 32
        self.lib = torch.cuda._utils._get_gpu_runtime_library()

    def __call__(self, x, w, res=None):
        m = x.shape[0]
        out = torch.empty(m, self.n, dtype=x.dtype, device=x.device)
        r = res if res is not None else x
        args = [x.data_ptr(), w.data_ptr(), r.data_ptr(), out.data_ptr()]
        values = [ctypes.c_void_p(a) for a in args] + [ctypes.c_int(v) for v in
                                                       (m, x.stride(0), r.stride(0), out.stride(0))]
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        attr = _Attr(id=6)  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.i = 1
        config = _Config(self.grid, 1, 1, self.block, 1, 1, self.smem, torch.cuda.current_stream().cuda_stream,
                         ctypes.pointer(attr) if self.pdl else None, 1 if self.pdl else 0)
        rc = self.lib.cuLaunchKernelEx(ctypes.byref(config), self.kernel.func, params, None)
        assert rc == 0, f"cuLaunchKernelEx: {rc}"
        return out


class SmallGemm(Gemm):
    """`gemm64_small`: 32 weight rows a CTA, no shared stage, partial tiles added across the cluster."""

    def __init__(self, n, k, wk, split, residual, gated=False, pdl=True):
        assert not gated
        self.n, self.k, self.gated, self.residual, self.pdl = n, k, False, residual, pdl
        self.name = f"small wk{wk} split{split}{' pdl' if pdl else ''}"
        source = src.small_defines(n=n, k=k, wk=wk, split=split, residual=residual, pdl=pdl) + src.SMALL_SOURCE
        self.kernel = torch.cuda._compile_kernel(source, "gemm64_small")
        self.smem = 0
        self.grid = n // 32 * split
        self.block = wk * 32
        self.lib = torch.cuda._utils._get_gpu_runtime_library()


def reference(x, w, res, gated):
    if gated:
        half = w.shape[0] // 2
        gate = (x.float() @ w[:half].float().T).bfloat16()
        up = (x.float() @ w[half:].float().T).bfloat16()
        return (torch.nn.functional.silu(gate.float()).bfloat16().float() * up.float()).bfloat16()
    out = (x.float() @ w.float().T).bfloat16()
    return out if res is None else (out.float() + res.float()).bfloat16()


def triton_linear(x, w, res, gated):
    return kernels.linear(x, w, residual=res, gated=gated, batch=64)


def time_graph(fn, label, bytes_per_call):
    torch.cuda.synchronize()
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls = fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    times.sort()
    us = times[len(times) // 2]
    print(f"  {label:44s} {us:8.2f} us  ({bytes_per_call / us / 1e6:5.2f} TB/s weights)  min {times[0]:.2f}",
          flush=True)
    return us


def check(name, got, ref, tri):
    scale = ref.float().abs().max().item()
    err = (got.float() - ref.float()).abs().max().item() / scale
    tri_err = (tri.float() - ref.float()).abs().max().item() / scale
    mism = (got != tri).float().mean().item()
    ok = err < 2e-2
    print(f"  check {name}: max |ours - ref| / max|ref| {err:.2e} (triton {tri_err:.2e}), "
          f"differs from triton in {mism:.1%} {'OK' if ok else 'FAIL'}", flush=True)
    return ok


def shape_runs(label, n, k, gated, residual, builds, quick):
    print(f"== {label}: n={n} k={k} gated={gated} residual={residual}", flush=True)
    rows_w = 2 * n if gated else n
    weights = [torch.randn(rows_w, k, device=DEV, dtype=torch.bfloat16) * 0.03 for _ in range(COPIES)]
    xs = [torch.randn(64, k, device=DEV, dtype=torch.bfloat16) for _ in range(COPIES)]
    res = torch.randn(64, n, device=DEV, dtype=torch.bfloat16) if residual else None
    nbytes = rows_w * k * 2
    tri_out = triton_linear(xs[0], weights[0], res, gated)
    ref = reference(xs[0], weights[0], res, gated)
    check("triton", tri_out, ref, tri_out)

    def triton_calls():
        for i in range(64):
            triton_linear(xs[i % COPIES], weights[i % COPIES], res, gated)
        return 64

    results = {"triton": time_graph(triton_calls, "triton (kernels.linear)", nbytes)}
    for config in builds:
        try:
            kind = config.pop("kind", Gemm)
            gemm = kind(n, k, gated=gated, residual=residual, **config)
        except Exception as error:
            print(f"  build {config}: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        out = gemm(xs[0], weights[0], res)
        ok = check(gemm.name, out, ref, tri_out)
        part = gemm(xs[1][:40], weights[1], res[:40] if res is not None else None)
        ok &= check(gemm.name + " m=40", part, reference(xs[1][:40], weights[1], res[:40] if res is not None else None,
                                                          gated), part)
        if not ok:
            continue

        def ours(gemm=gemm):
            for i in range(64):
                gemm(xs[i % COPIES], weights[i % COPIES], res)
            return 64

        results[gemm.name] = time_graph(ours, gemm.name, nbytes)
    return results


def main():
    quick = "quick" in sys.argv[1:]
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    gateup = [dict(wn=4, wk=2, split=1, depth=d, pdl=p) for d in (2, 3, 4) for p in (False, True)]
    gateup += [dict(wn=4, wk=2, split=1, depth=3, pdl=True, l2_256=True), dict(wn=2, wk=4, split=1, depth=2, pdl=True),
               dict(wn=8, wk=1, split=1, depth=3, pdl=True)]
    down = [dict(wn=2, wk=4, split=8, depth=d, pdl=p) for d in (2, 3, 4) for p in (False, True)]
    down += [dict(wn=1, wk=8, split=8, depth=2, pdl=True), dict(wn=2, wk=4, split=8, depth=3, pdl=True, l2_256=True),
             dict(wn=1, wk=4, split=8, depth=2, pdl=True), dict(wn=2, wk=2, split=8, depth=2, pdl=True)]
    qkv = [dict(wn=1, wk=8, split=2, depth=1, pdl=True), dict(wn=1, wk=4, split=4, depth=1, pdl=True),
           dict(wn=2, wk=4, split=4, depth=1, pdl=True), dict(wn=1, wk=2, split=8, depth=1, pdl=True),
           dict(wn=1, wk=4, split=2, depth=2, pdl=True), dict(wn=2, wk=2, split=8, depth=1, pdl=True),
           dict(wn=1, wk=1, split=16 // 2, depth=2, pdl=True), dict(wn=1, wk=4, split=4, depth=1)]
    o = [dict(wn=1, wk=4, split=4, depth=1, pdl=True), dict(wn=1, wk=2, split=8, depth=1, pdl=True),
         dict(wn=1, wk=8, split=2, depth=1, pdl=True), dict(wn=1, wk=4, split=2, depth=2, pdl=True),
         dict(wn=1, wk=1, split=8, depth=2, pdl=True), dict(wn=2, wk=2, split=4, depth=1, pdl=True)]
    if "small" in sys.argv[1:]:
        gateup, down = gateup[3:4], down[3:4] + down[6:]
    if "small2" in sys.argv[1:]:
        def smalls(*pairs):
            return [dict(kind=SmallGemm, wk=wk, split=split) for wk, split in pairs]
        shape_runs("decoder qkv", 1536, 1024, False, False, smalls((4, 4), (2, 8), (4, 2), (1, 16 // 2), (2, 4),
                                                                  (4, 1), (1, 4)), quick)
        shape_runs("decoder o", 1024, 1024, False, True, smalls((4, 4), (2, 8), (4, 2), (1, 8), (2, 4), (1, 4)),
                   quick)
        shape_runs("backbone qkv", 3072, 2048, False, False, smalls((4, 8), (4, 4), (2, 8), (4, 2)), quick)
        shape_runs("backbone o", 2048, 2048, False, True, smalls((4, 8), (4, 4), (2, 8), (4, 2)), quick)
        return
    if quick:
        gateup, down, qkv, o = gateup[:2], down[:2], qkv[:1], o[:1]
    shape_runs("decoder gate/up", 8192, 1024, True, False, gateup, quick)
    shape_runs("decoder down", 1024, 8192, False, True, down, quick)
    shape_runs("decoder qkv", 1536, 1024, False, False, qkv, quick)
    shape_runs("decoder o", 1024, 1024, False, True, o, quick)


if __name__ == "__main__":
    main()
