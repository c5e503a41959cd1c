"""Probe: why are fp8 weights slower than bf16 at 64 rows (9.8 against 5.7 ms a frame), and what would an fp8 product
with fp8 activations (W8A8, native fp8 `wgmma`) take instead?

For the 64-row frame's largest products (full size, random weights), µs a product in a CUDA graph of 64 launches
cycling through enough copies of the weight that L2 cannot hold them (`gemm64_probe.time_graph`):

- `bf16`: the engine's tile on bf16 weights (norm folded where the engine folds it);
- `fp8 engine`: the engine's tile on fp8 weights as `--fp8` runs it today (the norm inside the K loop);
- `fp8 folded`: the same tile on fp8 weights with the norm folded into them (`norm_folded` with a scale);
- `w8a8 quant`: a tile of this script: x's blocks scaled by the row's 1 / RMS and rounded to e4m3 in the tile, one
  fp8 `tl.dot` a block; the weight's per-row scale and the RMS applied after the loop;
- `w8a8 xq`: the same with x already in e4m3 (as if the kernel before had written it so): the bound of that route;
- `read fp8`: a kernel that only reads the fp8 weight's bytes (`stream_probe.Reader`).

Each variant's largest difference from a float32 reference of the same product is printed (relative to the output's
largest magnitude): fp8 weights cost ~3% of it, fp8 activations add their own rounding.

Usage: python3 scripts/fp8_probe.py [SHAPE,SHAPE...]   (default: every shape below)"""

import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, "scripts")
from gemm64_probe import time_graph
from stream_probe import Reader

from csmcli import kernels

ROWS = 64
SHAPES = {  # (weight rows, K, gated, normed input, a frame)
    "decoder gate/up": (16384, 1024, True, True, 128),
    "decoder down": (1024, 8192, False, False, 128),
    "decoder qkv": (1536, 1024, False, True, 128),
    "decoder o": (1024, 1024, False, False, 128),
    "backbone qkv": (3072, 2048, False, True, 16),
    "backbone o": (2048, 2048, False, False, 16),
    "backbone gate/up": (16384, 2048, True, True, 16),
    "backbone down": (2048, 8192, False, False, 16),
}


@triton.jit
def _w8a8_kernel(x_ptr, rstd_ptr, w_ptr, scale_ptr, out_ptr, partial_ptr, N, K, k_per_split,
                 GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, XQ: tl.constexpr,
                 PARTIAL: tl.constexpr, ROWS_: tl.constexpr, NORMED: tl.constexpr):
    pid_n = tl.program_id(0)
    k_lo = tl.program_id(1) * k_per_split
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, ROWS_)
    scale = tl.load(scale_ptr + offs_n)
    scale_up = scale
    if GATED:
        scale_up = tl.load(scale_ptr + N + offs_n)
    tl.extra.cuda.gdc_wait()
    rstd = tl.load(rstd_ptr + offs_m)  # [ROWS]
    acc = tl.zeros([BLOCK_N, ROWS_], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, ROWS_], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
        if XQ:  # noqa: SIM108 (a Triton constexpr branch)
            xq = tl.load(x_ptrs)  # [ROWS, BLOCK_K] e4m3
        else:
            xq = (tl.load(x_ptrs).to(tl.float32) * rstd[:, None]).to(tl.float8e4nv)
        w_ptrs = w_ptr + offs_n[:, None] * K + offs_k[None, :]
        acc = tl.dot(tl.load(w_ptrs), tl.trans(xq), acc)
        if GATED:
            acc_up = tl.dot(tl.load(w_ptrs + N * K), tl.trans(xq), acc_up)
    tl.extra.cuda.gdc_launch_dependents()
    inv = 1.0 / rstd
    if NORMED:  # the product of the normed rows: x's 1 / RMS stays in
        inv = tl.full([ROWS_], 1.0, tl.float32)
    total = tl.trans(acc * scale[:, None] * inv[None, :])  # [ROWS, BLOCK_N]
    if PARTIAL:
        tl.store(partial_ptr + tl.program_id(1) * ROWS_ * N + offs_m[:, None] * N + offs_n[None, :], total)
        return
    dtype = out_ptr.dtype.element_ty
    out = total.to(dtype)
    if GATED:
        up = tl.trans(acc_up * scale_up[:, None] * inv[None, :]).to(dtype)
        gate = out.to(tl.float32)
        out = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up.to(tl.float32)).to(dtype)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out)


def w8a8(x, rstd, w8, scale, gated, normed, block_n, block_k, warps, stages, split):
    n = w8.shape[0] // 2 if gated else w8.shape[0]
    k = w8.shape[1]
    out = torch.empty(ROWS, n, dtype=torch.bfloat16, device="cuda")
    partial = torch.empty(split, ROWS, n, dtype=torch.float32, device="cuda") if split > 1 else out
    _w8a8_kernel[(n // block_n, split)](
        x, rstd, w8, scale, out, partial, n, k, k // split, GATED=gated, BLOCK_N=block_n, BLOCK_K=block_k,
        XQ=x.dtype == torch.float8_e4m3fn, PARTIAL=split > 1, ROWS_=ROWS, NORMED=normed, num_warps=warps,
        num_stages=stages, launch_pdl=True)
    if split > 1:
        kernels._split_k_sum_kernel[(triton.cdiv(ROWS * n, kernels.SPLIT_SUM_BLOCK),)](
            partial, out, out, out, ROWS, n, 0, out.stride(0), SPLITS=split, HAS_RESIDUAL=False,
            BLOCK=kernels.SPLIT_SUM_BLOCK, SQUARES_OUT=False, PDL=2, launch_pdl=True)
    return out


def to_fp8(w):
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 448.0  # [N]
    return (w.float() / scale[:, None]).to(torch.float8_e4m3fn), scale


def report(label, got, ref):
    err = (got.float() - ref).abs().max().item() / ref.abs().max().item()
    print(f"  {label:44s} max error {err:.4f} of the largest output", flush=True)


def probe(label, rows, k, gated, normed, per_frame):
    n = rows // 2 if gated else rows
    copies = max(8, int(400e6 // (rows * k)))
    print(f"== {label}: {rows} x {k}, {per_frame} a frame, {copies} copies", flush=True)
    w_bf16 = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    norm = (1.0 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
    w_fold = [kernels.fold_norm(w, norm) for w in w_bf16] if normed else w_bf16
    fp8 = [to_fp8(w) for w in w_bf16]
    fp8_fold = [to_fp8(w) for w in w_fold] if normed else fp8
    x = torch.randn(ROWS, k, device="cuda", dtype=torch.bfloat16) * 3
    squares = x.float().square().sum(dim=1, keepdim=True).contiguous()  # [ROWS, 1]: one part
    rstd = torch.rsqrt(squares[:, 0] / k + (1e-5 if normed else 0.0)).contiguous()  # [ROWS]
    xq = (x.float() * rstd[:, None]).to(torch.float8_e4m3fn)
    eps = 1e-5
    del w_bf16

    def reference(w8, scale):
        w = w8.float() * scale[:, None]
        xn = x.float() * rstd[:, None] if normed else x.float()
        y = xn @ w.T
        if gated:
            return torch.nn.functional.silu(y[:, :n]) * y[:, n:]
        return y

    ref_fold = reference(*fp8_fold[0])

    def bf16_calls():
        for i in range(64):
            if normed:
                kernels.linear(x, w_fold[i % copies], norm_folded=True, eps=eps, squares=squares, gated=gated,
                               batch=ROWS)
            else:
                kernels.linear(x, w_fold[i % copies], gated=gated, batch=ROWS)
        return 64

    def fp8_engine_calls():
        for i in range(64):
            w8, scale = fp8[i % copies]
            if normed:
                kernels.linear(x, w8, scale=scale, norm=norm, eps=eps, squares=squares, gated=gated, batch=ROWS)
            else:
                kernels.linear(x, w8, scale=scale, gated=gated, batch=ROWS)
        return 64

    def fp8_folded_calls():
        for i in range(64):
            w8, scale = fp8_fold[i % copies]
            kernels.linear(x, w8, scale=scale, norm_folded=True, eps=eps, squares=squares, gated=gated, batch=ROWS)
        return 64

    results = {}
    results["bf16"] = time_graph(bf16_calls, "bf16 (engine tile)", rows * k * 2)
    results["fp8 engine"] = time_graph(fp8_engine_calls, "fp8 engine tile (norm in the loop)", rows * k)
    if normed:
        try:
            report("fp8 folded", kernels.linear(x, *fp8_fold[0][:1], scale=fp8_fold[0][1], norm_folded=True, eps=eps,
                                                squares=squares, gated=gated, batch=ROWS), ref_fold)
            results["fp8 folded"] = time_graph(fp8_folded_calls, "fp8 engine tile, norm folded", rows * k)
        except Exception as error:  # the engine's assert (fp8 is never folded there)
            print(f"  fp8 folded: {type(error).__name__}: {str(error)[:160]}", flush=True)
    splits = (1,) if gated else (4, 8) if k > 2048 else (1, 2, 4)
    configs = [(block_n, block_k, warps, stages, split) for block_n in (64, 128) for block_k in (128, 256)
               for warps in (4, 8) for stages in (3, 4) for split in splits
               if n % block_n == 0 and (k // split) % block_k == 0]
    for xin, name in ((x, "w8a8 quant"), (xq, "w8a8 xq")):
        timed = []
        for config in configs:
            def calls(config=config, xin=xin):
                for i in range(64):
                    w8, scale = fp8_fold[i % copies]
                    w8a8(xin, rstd, w8, scale, gated, normed, *config)
                return 64
            block_n, block_k, warps, stages, split = config
            try:
                us = time_graph(calls, f"{name} n{block_n} k{block_k} w{warps} s{stages} split{split}", rows * k)
            except Exception as error:
                print(f"  {name} {config}: {type(error).__name__}: {str(error)[:160]}", flush=True)
                continue
            timed.append((us, config))
        if not timed:
            continue
        timed.sort()
        configs = [config for _, config in timed[:4]]  # x already in e4m3: the quantising tile's best four
        us, config = timed[0]
        got = w8a8(xin, rstd, *fp8_fold[0], gated, normed, *config)
        report(f"{name} {config}", got, ref_fold if normed else reference(*fp8[0]))
        results[name] = us
    readers = [Reader("ldg_read", ctas, threads, True, unroll=8) for ctas, threads in ((128, 512), (256, 256))]

    def read_calls(reader):
        for i in range(64):
            reader(fp8[i % copies][0])
        return 64
    results["read fp8"] = min(time_graph(lambda r=r: read_calls(r), r.label + " (fp8 bytes)", rows * k)
                              for r in readers)
    print(f"  SUMMARY {label}: " + ", ".join(f"{key} {us:.2f}" for key, us in results.items())
          + f"; a frame x{per_frame}: " + ", ".join(f"{key} {us * per_frame / 1000:.3f} ms"
                                                    for key, us in results.items()), flush=True)


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    names = [name for name in ",".join(sys.argv[1:]).split(",") if name] or list(SHAPES)
    for label in names:
        probe(label, *SHAPES[label])


if __name__ == "__main__":
    main()
