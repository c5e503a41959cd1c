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
import wgmma_source

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


def launch(kernel, grid: int, block: int, smem: int, pdl: bool, pointers: list) -> None:
    """`cuLaunchKernelEx` of an NVRTC-built kernel on the current stream; `pointers`: one address per parameter
    (of its value); `pdl`: with programmatic stream serialization (the kernel's griddepcontrol instructions)."""
    params = (ctypes.c_void_p * len(pointers))(*pointers)
    attr = _Attr(id=6)  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.i = 1
    config = _Config(grid, 1, 1, block, 1, 1, smem, torch.cuda.current_stream().cuda_stream,
                     ctypes.pointer(attr) if pdl else None, 1 if pdl else 0)
    rc = torch.cuda._utils._get_gpu_runtime_library().cuLaunchKernelEx(ctypes.byref(config), kernel.func, params,
                                                                        None)
    assert rc == 0, f"cuLaunchKernelEx: {rc}"


def addresses(values: list) -> list:
    return [ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values]


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

    def __call__(self, x, w, res=None):
        m = x.shape[0]
        out = torch.empty(m, self.n, dtype=x.dtype, device=x.device)
        r = res if res is not None else x
        args = [x.data_ptr(), w.data_ptr(), r.data_ptr(), out.data_ptr()]
        values = [ctypes.c_void_p(a) for a in args] + [ctypes.c_int(v) for v in
                                                       (m, x.stride(0), r.stride(0), out.stride(0))]
        launch(self.kernel, self.grid, self.block, self.smem, self.pdl, addresses(values))
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


def tensor_map(t, box_rows, rows=None):
    """A 2-D TMA map over bf16 `t [rows, K]` (row-major), boxes of 64 K-elements x `box_rows`, 128-byte swizzle;
    rows past `rows` read as zeros."""
    lib = torch.cuda._utils._get_gpu_runtime_library()
    buffer = ctypes.create_string_buffer(128 + 64)
    address = (ctypes.addressof(buffer) + 63) // 64 * 64
    rows = t.shape[0] if rows is None else rows
    dims = (ctypes.c_uint64 * 2)(t.shape[1], rows)
    strides = (ctypes.c_uint64 * 1)(t.stride(0) * 2)
    box = (ctypes.c_uint32 * 2)(64, box_rows)
    steps = (ctypes.c_uint32 * 2)(1, 1)
    rc = lib.cuTensorMapEncodeTiled(ctypes.c_void_p(address), 9, 2, ctypes.c_void_p(t.data_ptr()), dims, strides,
                                    box, steps, 0, 3, 3, 0)  # bf16, no interleave, 128B swizzle, L2 256B, zeros
    assert rc == 0, f"cuTensorMapEncodeTiled: {rc}"
    return buffer, address


class WgmmaGemm(Gemm):
    """`wgmma64`: TMA stages, one consumer warpgroup, a producer warp."""

    def __init__(self, n, k, bn, stages, residual, gated=False, pdl=True, tiled=False, x_mode=0, one_per_sm=False,
                 overlap=False, no_mma=False, lane_wait=False):
        self.n, self.k, self.gated, self.residual, self.pdl, self.bn = n, k, gated, residual, pdl, bn
        self.tiled, self.tiles, self.x_mode = tiled, {}, x_mode
        self.name = (f"wgmma bn{bn} stages{stages}{' pdl' if pdl else ''}{' tiled' if tiled else ''}"
                     + ("", " x tiled", " x resident", " x resident by tile")[x_mode]
                     + (" 1/SM" if one_per_sm else "") + (" overlap" if overlap else "")
                     + (" NO PRODUCTS (timing only)" if no_mma else "") + (" lane-wait" if lane_wait else ""))
        self.timing_only = no_mma
        source = wgmma_source.source(bn=bn, k=k, stages=stages, gated=gated, residual=residual, pdl=pdl, n_half=n,
                                     tiled=tiled, x_mode=x_mode, overlap=overlap, no_mma=no_mma,
                                     lane_wait=lane_wait)
        self.kernel = torch.cuda._compile_kernel(source, "wgmma64", compute_capability="90a")  # wgmma: sm_90a
        self.smem = wgmma_source.smem_bytes(bn=bn, stages=stages, k=k, x_mode=x_mode)
        if one_per_sm:  # more than half an SM's shared memory: the scheduler cannot put two CTAs on one SM
            self.smem = max(self.smem, 120 * 1024)
        self.kernel.set_shared_memory_config(self.smem)
        self.grid = (2 * n if gated else n) // bn
        self.block = 160
        self.maps = {}

    def _map(self, t, box_rows, rows=None):
        key = (t.data_ptr(), box_rows, rows)
        if key not in self.maps:
            self.maps[key] = tensor_map(t, box_rows, rows)
        return self.maps[key][1]

    def __call__(self, x, w, res=None):
        m = x.shape[0]
        out = torch.empty(m, self.n, dtype=x.dtype, device=x.device)
        r = res if res is not None else x
        w_map = self._map(w, self.bn // 2 if self.gated else self.bn)
        x_map = self._map(x, 64, m)
        if self.tiled and w.data_ptr() not in self.tiles:  # the weight's stage images, made once (as at load)
            self.tiles[w.data_ptr()] = wgmma_source.tile_weight(w, self.bn, self.gated)
        tiles = self.tiles[w.data_ptr()] if self.tiled else w
        x_key = ("x", x.data_ptr(), m)
        if self.x_mode and x_key not in self.tiles:  # as the kernel that wrote x would lay it out
            padded = torch.zeros(64, x.shape[1], dtype=x.dtype, device=x.device)
            padded[:m] = x
            self.tiles[x_key] = wgmma_source.tile_weight(padded, 64, False)
        x_tiles = self.tiles[x_key] if self.x_mode else x
        values = [ctypes.c_void_p(r.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(m),
                  ctypes.c_int(r.stride(0)), ctypes.c_int(out.stride(0)), ctypes.c_void_p(tiles.data_ptr()),
                  ctypes.c_void_p(x_tiles.data_ptr())]
        launch(self.kernel, self.grid, self.block, self.smem, self.pdl,
               [ctypes.c_void_p(w_map), ctypes.c_void_p(x_map), *addresses(values)])
        return out


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
        if not ok and not getattr(gemm, "timing_only", False):
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
    if "wgmma" in sys.argv[1:]:
        def builds(*pairs):
            return [dict(kind=WgmmaGemm, bn=bn, stages=stages) for bn, stages in pairs]
        def tiled(*triples, one=False, overlap=False):
            return [dict(kind=WgmmaGemm, bn=bn, stages=stages, tiled=True, x_mode=x_mode, one_per_sm=one,
                         overlap=overlap) for bn, stages, x_mode in triples]
        lane = [dict(kind=WgmmaGemm, bn=128, stages=stages, tiled=True, x_mode=x_mode, lane_wait=True, overlap=ov,
                     no_mma=nm) for stages, x_mode, ov, nm in ((4, 1, False, True), (4, 1, False, False),
                                                              (4, 1, True, False), (6, 1, True, False),
                                                              (4, 3, True, False))]
        shape_runs("decoder gate/up", 8192, 1024, True, False, tiled((128, 4, 1)) + lane, quick)
        return
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
