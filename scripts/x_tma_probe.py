"""Probe: the decoder's 64-row gate/up product as a plain Triton tile, with x's blocks loaded through a host-made TMA
descriptor instead of `tl.load` (the weight stays on `tl.load`), against the same tile with `tl.load` for both and
the engine's fused tile (`kernels.linear`). The `withx` readers (scripts/stream_probe.py) found x's 16.8 MB of L2
reads cost ~3.5 µs through 16-byte loads and ~0.7 µs through the bulk-copy engine; earlier sessions moved the
*weights* to TMA (lost), not x alone. µs a launch in a CUDA graph of 64 launches over 8 weight copies.

Usage: python3 scripts/x_tma_probe.py"""

import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, "scripts")
from gemm64_probe import reference, time_graph

from csmcli import kernels


@triton.jit
def _gate_up(x_desc, x_ptr, w_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_om,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_TMA: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, 64)
    acc = tl.zeros([BLOCK_N, 64], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, 64], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if X_TMA:  # noqa: SIM108 - a constexpr branch, compiled apart
            xk = x_desc.load([0, k0])  # [64, BLOCK_K]
        else:
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :])
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
        acc = tl.dot(tl.load(w_ptrs), tl.trans(xk), acc)
        acc_up = tl.dot(tl.load(w_ptrs + N * stride_wn), tl.trans(xk), acc_up)
    gate = tl.trans(acc).to(out_ptr.dtype.element_ty).to(tl.float32)  # [64, BLOCK_N]
    up = tl.trans(acc_up).to(out_ptr.dtype.element_ty).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    out = (act * up).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out)


def gate_up(x, w, x_tma, block_n=64, block_k=128, warps=8, stages=4, descs={}):  # noqa: B006 - a cache
    n = w.shape[0] // 2
    out = torch.empty(64, n, dtype=x.dtype, device=x.device)
    key = (x.data_ptr(), block_k)
    if key not in descs:
        descs[key] = TensorDescriptor.from_tensor(x, [64, block_k])
    _gate_up[(n // block_n,)](descs[key], x, w, out, n, w.shape[1], x.stride(0), w.stride(0), out.stride(0),
                              BLOCK_N=block_n, BLOCK_K=block_k, X_TMA=x_tma, STAGES=stages, num_warps=warps)
    return out


def main():
    print(torch.cuda.get_device_name(), torch.__version__, "triton", triton.__version__, flush=True)
    for label, k in (("decoder gate/up", 1024), ("backbone gate/up", 2048)):
        n = 8192
        weights = [torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(8)]
        xs = [torch.randn(64, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        nbytes = 2 * n * k * 2
        print(f"== {label}: n={n} k={k}", flush=True)
        ref = reference(xs[0], weights[0], None, True)

        def engine(xs=xs, weights=weights):
            for i in range(64):
                kernels.linear(xs[i % 8], weights[i % 8], gated=True, batch=64)
            return 64

        time_graph(engine, "engine tile (kernels.linear)", nbytes)
        for x_tma in (False, True):
            for block_k, stages in ((128, 4), (64, 6), (128, 3)):
                label = f"plain tile, x by {'TMA' if x_tma else 'tl.load'}, BLOCK_K {block_k}, {stages} stages"
                try:
                    out = gate_up(xs[0], weights[0], x_tma, block_k=block_k, stages=stages)
                except Exception as error:
                    print(f"  {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    continue
                err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
                print(f"  check {label}: {err:.2e} {'OK' if err < 2e-2 else 'FAIL'}", flush=True)

                def calls(xs=xs, weights=weights, x_tma=x_tma, block_k=block_k, stages=stages):
                    for i in range(64):
                        gate_up(xs[i % 8], weights[i % 8], x_tma, block_k=block_k, stages=stages)
                    return 64

                time_graph(calls, label, nbytes)


if __name__ == "__main__":
    main()
