"""Does pinning the depth decoder's small weights in L2 speed up the 64-row frame graph?

At 64 rows the decoder's QKV (3.1 MB a layer) and output projection (2.1 MB) are latency chains that read their
weights from HBM every step: between two steps of one layer the 50 MB gate/up and down weights of four layers stream
through L2 and evict them. This probe copies those weights of all decoder layers into one buffer (one access-policy
window can cover only one address range), sets aside persisting L2 lines, and marks every kernel node of the frame
graph with an access-policy window over the buffer (persisting hits, streaming misses). Each variant's graph is timed
against the plain graph in back-to-back pairs. Prints µs a frame; changes nothing in csmcli.

Usage: l2_persist_probe.py [ROWS] [engine | once]   (default 64)
  engine: csmcli's own windows (`kernels.reserve_l2` + `linear(..., l2_hint=True)`) on the depth decoder's weights
  only (the twentieth session's variants): the small weights, the small weights plus a share of the MLP weights'
  lines, the small weights with the MLP's lines streaming; each against no windows
  once: the decoder's windows against the same plus the read-once weights streaming, which is what the engine
  registers since the twenty-first session (`FrameStepper.l2_weights`)
"""

import ctypes
import statistics
import sys

import torch
from profile_frame import timed  # scripts/ is on the path when a script runs

from csmcli import kernels
from csmcli.checkpoint import random_model
from csmcli.engine import state_kept
from csmcli.generate import FrameStepper
from csmcli.model import CSM_1B

FRAMES = 40
ROUNDS = 5
LIMIT_PERSISTING_L2 = 0x06  # cudaLimitPersistingL2CacheSize
ATTR_MAX_PERSISTING_L2 = 108  # cudaDevAttrMaxPersistingL2CacheSize
ATTR_MAX_WINDOW = 109  # cudaDevAttrMaxAccessPolicyWindowSize
NODE_KERNEL = 0  # cudaGraphNodeTypeKernel
NODE_ATTR_WINDOW = 1  # cudaKernelNodeAttributeAccessPolicyWindow
PERSISTING, STREAMING = 2, 1  # cudaAccessProperty


Window, AttrValue = kernels.AccessPolicyWindow, kernels.LaunchAttributeValue


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: cudaError {status}")


def kernel_nodes(rt: ctypes.CDLL, graph: torch.cuda.CUDAGraph) -> list[ctypes.c_void_p]:
    """The kernel nodes of a graph captured with keep_graph=True."""
    raw = ctypes.c_void_p(graph.raw_cuda_graph())
    count = ctypes.c_size_t(0)
    check(rt.cudaGraphGetNodes(raw, None, ctypes.byref(count)), "nodes")
    nodes = (ctypes.c_void_p * count.value)()
    check(rt.cudaGraphGetNodes(raw, nodes, ctypes.byref(count)), "nodes")
    found = []
    for node in nodes:
        kind = ctypes.c_int(-1)
        check(rt.cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)), "node type")
        if kind.value == NODE_KERNEL:
            found.append(ctypes.c_void_p(node))
    return found


def stepper_at(rows: int) -> tuple[torch.nn.Module, FrameStepper]:
    """Full-size random weights and a stepper of `rows` slots at position 200 (a ~200-row prompt's frames)."""
    torch.manual_seed(0)
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    stepper = FrameStepper(model, rows, fused=True)
    stepper.positions.fill_(200)
    stepper.hidden.normal_()
    return model, stepper


def time_ms(stepper: FrameStepper, graph: torch.cuda.CUDAGraph) -> float:
    with state_kept(stepper.state()):
        return timed(graph.replay, FRAMES)


def compare(stepper: FrameStepper, label: str, graph: torch.cuda.CUDAGraph, base: torch.cuda.CUDAGraph,
            base_ms: float) -> None:
    """`graph`'s ms a frame minus `base`'s, timed back to back, ROUNDS times: the median and every round's."""
    diffs = []
    for _ in range(ROUNDS):
        b = time_ms(stepper, base)
        diffs.append(time_ms(stepper, graph) - b)
    diff = statistics.median(diffs)
    sure = max(diffs) < 0 and diff < -0.002 * base_ms
    print(f"{label:44s} {diff * 1000:+7.1f} us/frame {'WIN' if sure else '   '} "
          f"{[round(d * 1000, 1) for d in diffs]}", flush=True)


def engine_windows(rows: int) -> None:
    model, stepper = stepper_at(rows)

    def capture() -> torch.cuda.CUDAGraph:
        with state_kept(stepper.state()):
            stepper.step(rows)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                stepper.step(rows)
        return graph

    base = capture()
    base_ms = time_ms(stepper, base)
    print(f"rows {rows}: no windows {base_ms:.3f} ms/frame", flush=True)
    small, mlp = model.decoder.l2_weights(rows)
    for label, streaming, share in (("small weights", [], False), ("small weights + MLP share", mlp, True),
                                    ("small weights + MLP streaming", mlp, False)):
        kernels._l2_ratio.clear()
        size = kernels.reserve_l2(small, streaming, share)
        ratios = sorted({round(r, 3) for r in kernels._l2_ratio.values()})
        graph = capture()
        compare(stepper, f"{label} ({size / 2**20:.1f} MiB set aside, ratios {ratios})", graph, base, base_ms)
        del graph


def main() -> None:
    rows = int(sys.argv[1]) if sys.argv[1:] else 64
    if "engine" in sys.argv[2:]:
        engine_windows(rows)
        return
    model, stepper = stepper_at(rows)
    rt = kernels.cudart()
    value = ctypes.c_int(0)
    check(rt.cudaDeviceGetAttribute(ctypes.byref(value), ATTR_MAX_PERSISTING_L2, 0), "max persisting")
    max_persisting = value.value
    check(rt.cudaDeviceGetAttribute(ctypes.byref(value), ATTR_MAX_WINDOW, 0), "max window")
    max_window = value.value
    print(f"max persisting L2 {max_persisting / 2**20:.1f} MiB, max window {max_window / 2**20:.1f} MiB", flush=True)

    def capture(window: tuple[int, int, float] | None = None, on_stream: bool = False) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with state_kept(stepper.state()), torch.cuda.stream(stream):
            for _ in range(2):
                stepper.step(rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph(keep_graph=True)
        attr = AttrValue()
        if window is not None:
            base, size, ratio = window
            attr.window = Window(base, size, ratio, PERSISTING, STREAMING)
        with state_kept(stepper.state()), torch.cuda.graph(graph):
            if on_stream:  # the capture stream's attribute: does capture copy it into the kernel nodes?
                stream_handle = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
                check(rt.cudaStreamSetAttribute(stream_handle, NODE_ATTR_WINDOW, ctypes.byref(attr)), "stream")
            stepper.step(rows)
            if on_stream:
                check(rt.cudaStreamSetAttribute(stream_handle, NODE_ATTR_WINDOW, ctypes.byref(AttrValue())), "s")
        if on_stream:
            nodes = kernel_nodes(rt, graph)
            carried = 0
            for node in nodes:
                got = AttrValue()
                check(rt.cudaGraphKernelNodeGetAttribute(node, NODE_ATTR_WINDOW, ctypes.byref(got)), "get window")
                carried += got.window.num_bytes == attr.window.num_bytes and got.window.base_ptr is not None
            print(f"  stream attribute: {carried} of {len(nodes)} kernel nodes carry the window", flush=True)
        elif window is not None:
            nodes = kernel_nodes(rt, graph)
            for node in nodes:
                check(rt.cudaGraphKernelNodeSetAttribute(node, NODE_ATTR_WINDOW, ctypes.byref(attr)), "set window")
            print(f"  window {size / 2**20:.1f} MiB, hit ratio {ratio:.2f}: {len(nodes)} kernel nodes", flush=True)
        graph.instantiate()
        return graph

    base = capture()
    base_ms = time_ms(stepper, base)
    print(f"rows {rows}: plain graph {base_ms:.3f} ms/frame", flush=True)

    # One buffer: every decoder layer's output projection, then every layer's (folded) QKV.
    layers = model.decoder.layers
    qkv_name = "wqkv_folded" if layers[0].wqkv_folded is not None else None
    parts = [layer.attention.wo.weight for layer in layers]
    parts += [getattr(layer, qkv_name) if qkv_name else layer.attention.wqkv.weight for layer in layers]
    buffer = torch.empty(sum(p.numel() for p in parts), dtype=parts[0].dtype, device="cuda")
    offset, views = 0, []
    for p in parts:
        view = buffer[offset: offset + p.numel()].view(p.shape)
        view.copy_(p)
        views.append(view)
        offset += p.numel()
    n = len(layers)
    for layer, view in zip(layers, views[:n], strict=True):
        layer.attention.wo.weight.data = view
    for layer, view in zip(layers, views[n:], strict=True):
        if qkv_name:
            setattr(layer, qkv_name, view)
        else:
            layer.attention.wqkv.weight.data = view
    o_bytes = sum(v.numel() for v in views[:n]) * buffer.element_size()
    all_bytes = buffer.numel() * buffer.element_size()
    print(f"buffer: o {o_bytes / 2**20:.1f} MiB, o + QKV {all_bytes / 2**20:.1f} MiB ({qkv_name or 'wqkv'})",
          flush=True)
    compare(stepper, "weights in one buffer, no window", capture(), base, base_ms)

    setaside = min(max_persisting, all_bytes)
    check(rt.cudaDeviceSetLimit(LIMIT_PERSISTING_L2, ctypes.c_size_t(setaside)), "set limit")
    print(f"persisting L2 set aside: {setaside / 2**20:.1f} MiB", flush=True)
    compare(stepper, "set-aside only, no window", capture(), base, base_ms)
    ptr = buffer.data_ptr()
    for label, size in (("window: o", o_bytes), ("window: o + QKV", all_bytes)):
        size = min(size, max_window)
        ratio = min(1.0, setaside / size)
        graph = capture((ptr, size, ratio))
        compare(stepper, label, graph, base, base_ms)
        del graph
        check(rt.cudaCtxResetPersistingL2Cache(), "reset persisting")
    graph = capture((ptr, all_bytes, min(1.0, setaside / all_bytes)), on_stream=True)
    compare(stepper, "stream attribute: o + QKV", graph, base, base_ms)
    check(rt.cudaDeviceSetLimit(LIMIT_PERSISTING_L2, ctypes.c_size_t(0)), "reset limit")


if __name__ == "__main__":
    main()
