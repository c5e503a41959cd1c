"""Triton kernels for the one-token decode step: a few large kernels per layer instead of ~25 small ones.

A CSM frame is 33 one-token transformer steps (backbone once, depth decoder 32 times), each reading ~55-120 MB
of weights with M = batch rows of activations. With plain torch ops a step is launch-bound: norms, RoPE, cache
writes, casts and adds are kernels of their own. Here one layer is five kernels:

  1. RMSNorm folded into the QKV matmul (`linear(..., norm=)`),
  2. RoPE + KV-cache write + attention over the slot's positions (`decode_attention`),
  3. output projection with the residual add (`linear(..., residual=)`),
  4. RMSNorm + gate/up matmul + SiLU * up (`linear(..., norm=, gated=True)`),
  5. down projection with the residual add;

and a codebook's draw is one kernel (`sample`: top-k threshold by radix select instead of a sort), the frame's
sampling noise another (`gumbel_noise`). The block table may also send a plain product (no norm to fold in) to
cuBLAS (`CUBLAS`); since the 64-row split-K tiles, none of CSM-1B's bf16 products measures faster there.

Every kernel rounds where torch rounds (matmul output, RoPE products, softmax probabilities, ...) so results stay
within bf16 rounding of the torch path, and no reduction mixes rows or depends on timing (split-K partial sums are
added in a fixed order, never with atomics): a row's result does not depend on the other rows (a slot joining does
not change its neighbours' codes) and replays are bit-exact. Block sizes are fixed per shape and engine batch (no
autotuning: they decide the summation order, so they must not vary by run).

On Hopper the kernels use programmatic dependent launch (PDL): a kernel starts while the kernel before it is still
running and only then waits for the earlier kernel's results (`gdc_wait`, which also orders every write after the
earlier kernels' reads). Without it each of the ~900 kernels of a frame pays a launch ramp of a few microseconds
with the memory system idle. One-row kernels (an engine of one slot) let the next kernel launch at once and load
what never changes (weight tiles, RoPE tables) before they wait; batched kernels let it launch only when their main
loop is done (`use_pdl`).

A few serve a prompt's prefill (`model`: `embed_sum`, `rope`, `silu_mul`, `add_rms_norm`, `write_kv`), and three the
Mimi decode (`codec`): `seanet_sum`, a SEANet conv's bias with the resnet residual and the ELU in one pass,
`matmul_f32`, the transformer's float32 products on the tensor cores, and `mimi_attention`, its attention.

Runs on CUDA; on the CPU only under `TRITON_INTERPRET=1` (the tests), where `tl.dot` takes float32 inputs.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NO_PDL_ENV = "CSMCLI_NO_PDL"
pdl_allowed = os.environ.get(NO_PDL_ENV) != "1"  # tests switch it to compare both launch modes


@contextmanager
def compiling_only(threads: int) -> Iterator[bool]:
    """Inside, a Triton launch compiles its kernel on a pool of `threads` threads and runs nothing, so a pass
    through code that launches many kernels compiles them all at once instead of one at a time as each is first
    launched (an empty Triton cache: a `say` warm-up's kernels in 6.3 s on 16 threads against 17.0 s,
    docs/BENCHMARKS.md). Leaving waits for every compile and leaves the kernels in Triton's in-memory cache,
    where the real launches find them; a compile error is raised there, as the launch would have raised it.
    Nothing written by a kernel exists inside: run only code that reads none of it on the host or in torch ops
    that could fail on it (`engine.compile_ahead` traces into a graph it never replays). Meanwhile every Triton
    launch in the process runs nothing, from any thread (another thread's compiles in the foreground): csmcli
    launches from one thread. No autotuned kernel may be launched inside (it would time launches that do
    nothing). Yields False, and does nothing, with a Triton that lacks the means (its `AsyncCompileMode` is not
    public API)."""
    try:
        from triton.runtime import _async_compile
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield False
        return
    from concurrent.futures import ThreadPoolExecutor

    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool, \
            _async_compile.AsyncCompileMode(pool):
        JITFunction.run = compile_only
        try:
            yield True
        finally:
            JITFunction.run = run


def use_pdl(t: Tensor, one_row: bool) -> int:
    """Programmatic dependent launch for a kernel on `t`'s device: Hopper or newer (`griddepcontrol`), Triton with
    `gdc_wait`, not the interpreter, not switched off (`CSMCLI_NO_PDL=1`). 0: off. 1, one-row work (the GEMV path,
    one row of attention / sampling): the next kernel may launch as soon as this one starts, and loads its weights
    before it waits. 2, batched work: the next kernel may launch once this one's main loop is done — launching it
    at the start (as for one row) measured 1.5-2 ms per frame slower (an H100, B=4 9.0 vs 7.5 ms, B=64 13.1 vs
    11.1: the waiting programs sit on SMs the running kernel needs); launching it at the end saves ~6% at 4-16
    streams (H200, B=4 6.11 -> 5.77 ms/frame)."""
    if not (pdl_allowed and not INTERPRET and t.is_cuda and _pdl_capable(t.device.index or 0)):
        return 0
    return 1 if one_row else 2


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    import triton.language.extra.cuda as cuda_extra

    return hasattr(cuda_extra, "gdc_wait") and torch.cuda.get_device_capability(device_index) >= (9, 0)


@triton.jit
def _wait_for_inputs(PDL: tl.constexpr):
    """Wait until the kernels before this one have finished and their writes are visible (PDL 1: letting the next
    kernel launch first). Everything a kernel reads that an earlier kernel writes, and everything it writes, comes
    after this."""
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL > 0:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _let_next_launch(PDL: tl.constexpr):
    """PDL 2 (batched): the next kernel may launch now, while this one finishes."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    """`acc + a @ b`; F32: exact float32 products (float32 models, and the interpreter, which lacks bf16 dot)."""
    if F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _x_block(x_base, offs_k, k_ok, m_ok, norm_ptr, rstd, HAS_NORM: tl.constexpr, dtype: tl.constexpr):
    """Activations `[BLOCK_M, BLOCK_K]`, RMS-normalised and rounded to their dtype (as torch's norm output is)."""
    xk = tl.load(x_base + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    if HAS_NORM:
        weight = tl.load(norm_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        xk = (xk.to(tl.float32) * rstd[:, None] * weight[None, :]).to(dtype)
    return xk


@triton.jit
def _row_squares(x_base, k0, K, m_ok, BLOCK_K: tl.constexpr):
    """Sum of squares of the rows' elements k0..k0+BLOCK_K `[BLOCK_M]` (float32), for their RMS."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    xn = tl.load(x_base + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
    return tl.sum(xn * xn, axis=1)


@triton.jit
def _accumulate(acc, xk, w, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr, SWAP_AB: tl.constexpr):
    if BLOCK_M == 1:  # GEMV: products summed per lane, one reduction after the loop
        acc = acc + xk.to(tl.float32) * w.to(tl.float32)
    elif SWAP_AB:  # `[BLOCK_N, BLOCK_M]`: weight rows fill the MMA's long side, the few batch rows its short one
        acc = _dot(w.to(xk.dtype), tl.trans(xk), acc, DOT_F32)  # fp8 weights: exact in bf16, as the MMA wants
    else:
        acc = _dot(xk, tl.trans(w.to(xk.dtype)), acc, DOT_F32)
    return acc


@triton.jit
def _linear_kernel(
    x_ptr, norm_ptr, w_ptr, scale_ptr, res_ptr, out_ptr, partial_ptr, squares_in_ptr, squares_out_ptr,
    M, N, K, k_per_split, eps, parts_in,
    stride_xm, stride_wn, stride_wk, stride_rm, stride_om,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr,
    DOT_F32: tl.constexpr, PDL: tl.constexpr, ONE_BLOCK: tl.constexpr, SWAP_AB: tl.constexpr, NORM_K: tl.constexpr,
    NORM_AFTER: tl.constexpr, PARTS_IN: tl.constexpr, SQUARES_OUT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    k_lo = tl.program_id(2) * k_per_split  # split-K: this program's share of K; partial sums to `partial_ptr`
    k_hi = tl.minimum(K, k_lo + k_per_split)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    dtype = out_ptr.dtype.element_ty
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    k_ok = offs_k < k_hi
    if BLOCK_M == 1:  # GEMV: the first weight block is loaded before waiting for the previous kernel
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
        w_ok = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        w_up = w
        if GATED:  # up-projection rows sit N rows below the gate rows
            w_up = tl.load(w_ptrs + N * stride_wn, mask=w_ok, other=0.0)
        k_rest = k_lo + BLOCK_K
    else:  # tl.dot: the loop as written, for Triton's software pipelining of its loads
        k_rest = k_lo
    norm_weight = tl.zeros([BLOCK_K], dtype=tl.float32)
    if ONE_BLOCK and HAS_NORM:
        norm_weight = tl.load(norm_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    scale = tl.zeros([BLOCK_N], dtype=tl.float32)
    scale_up = scale
    if HAS_SCALE:  # fp8 weights: one float32 scale per weight row (never changes: before the wait)
        scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
        if GATED:
            scale_up = tl.load(scale_ptr + N + offs_n, mask=n_ok, other=0.0)
    _wait_for_inputs(PDL)
    out_ok = m_ok[:, None] & n_ok[None, :]
    residual = tl.zeros([BLOCK_M, BLOCK_N], dtype=dtype)
    if HAS_RESIDUAL and not PARTIAL:  # loaded now, in flight with the activations, not after the products
        residual = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_ok, other=0.0)
    x_base = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    elif SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ONE_BLOCK:  # the whole row in one block: its RMS from the same load (the same sum as the loop below)
        xk = tl.load(x_base + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if HAS_NORM:
            x32 = xk.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=1) / K + eps)
            xk = (x32 * rstd[:, None] * norm_weight[None, :]).to(dtype)
    else:
        if HAS_NORM and PARTS_IN > 0:  # the kernel that wrote x summed its rows' squares: `parts_in` partial sums
            # Row-major [M, parts]: M never sets a stride here, so the load's layout, and with it the order the
            # parts are added in, is the same for any row count (Triton compiles M == 1 as a constant of its own).
            parts = tl.arange(0, PARTS_IN)
            part_sums = tl.load(squares_in_ptr + offs_m[:, None] * parts_in + parts[None, :],
                                mask=m_ok[:, None] & (parts < parts_in)[None, :], other=0.0)  # [BLOCK_M, PARTS_IN]
            rstd = 1.0 / tl.sqrt(tl.sum(part_sums, axis=1) / K + eps)
        elif HAS_NORM:  # every program recomputes the rows' RMS: x is a few KB, read from L2
            squares = tl.zeros([BLOCK_M], dtype=tl.float32)
            if NORM_K > 0:  # unrolled: every block's load in flight at once, not one round trip each (same sum)
                for k0 in tl.static_range(0, NORM_K, BLOCK_K):
                    squares += _row_squares(x_base, k0, K, m_ok, BLOCK_K)
            else:
                for k0 in range(0, K, BLOCK_K):
                    squares += _row_squares(x_base, k0, K, m_ok, BLOCK_K)
            rstd = 1.0 / tl.sqrt(squares / K + eps)
        xk = _x_block(x_base, offs_k, k_ok, m_ok, norm_ptr, rstd, HAS_NORM and not NORM_AFTER, dtype)
    if BLOCK_M == 1:
        acc = _accumulate(acc, xk, w, BLOCK_M, DOT_F32, SWAP_AB)
        if GATED:
            acc_up = _accumulate(acc_up, xk, w_up, BLOCK_M, DOT_F32, SWAP_AB)
    for k0 in range(k_rest, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        xk = _x_block(x_base, offs_k, k_ok, m_ok, norm_ptr, rstd, HAS_NORM and not NORM_AFTER, dtype)
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        w_ok = n_ok[:, None] & k_ok[None, :]
        acc = _accumulate(acc, xk, tl.load(w_ptrs, mask=w_ok, other=0.0), BLOCK_M, DOT_F32, SWAP_AB)
        if GATED:
            acc_up = _accumulate(acc_up, xk, tl.load(w_ptrs + N * stride_wn, mask=w_ok, other=0.0), BLOCK_M,
                                 DOT_F32, SWAP_AB)
    _let_next_launch(PDL)
    if BLOCK_M == 1:
        total = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        total = tl.trans(acc) if SWAP_AB else acc
    if NORM_AFTER:  # x @ (w * norm).T scaled by each row's 1 / RMS: the norm's weight is in the weight's columns
        total = total * rstd[:, None]
    if HAS_SCALE:  # (x @ w8.T) * scale in float32, rounded once below
        total = total * scale[None, :]
    if PARTIAL:  # split K: float32 partial sums [splits, M, N]; `_split_k_sum_kernel` adds them in a fixed order
        partial = partial_ptr + tl.program_id(2) * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial, total, mask=out_ok)
        return
    out = total.to(dtype)
    if GATED:  # silu(gate) * up, each step rounded as torch rounds it
        if BLOCK_M == 1:
            up = tl.sum(acc_up, axis=1)[None, :]
        else:
            up = tl.trans(acc_up) if SWAP_AB else acc_up
        if HAS_SCALE:
            up = up * scale_up[None, :]
        if NORM_AFTER:
            up = up * rstd[:, None]
        up = up.to(dtype)
        gate = out.to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate))).to(dtype)
        out = (out.to(tl.float32) * up.to(tl.float32)).to(dtype)
    if HAS_RESIDUAL:
        out = (out.to(tl.float32) + residual.to(tl.float32)).to(dtype)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=out_ok)
    if SQUARES_OUT:  # the output rows' squares over this program's columns, for the next normed product
        out32 = tl.where(out_ok, out.to(tl.float32), 0.0)
        tl.store(squares_out_ptr + offs_m * tl.num_programs(0) + pid_n, tl.sum(out32 * out32, axis=1), mask=m_ok)


def _dot_f32(x: Tensor) -> bool:
    return INTERPRET or x.dtype == torch.float32


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def _split_k_sum_kernel(partial_ptr, res_ptr, out_ptr, squares_out_ptr, M, N, stride_rm, stride_om,
                        SPLITS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                        SQUARES_OUT: tl.constexpr, PDL: tl.constexpr):
    _wait_for_inputs(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    m = offs // N
    n = offs % N
    residual = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_RESIDUAL:  # in flight with the partial sums
        residual = tl.load(res_ptr + m * stride_rm + n, mask=ok, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    # Unrolled: every split's load in flight at once. A loop over a runtime count waited for each in turn (one
    # L2 round trip per split); the sum is the same, split 0 first.
    for split in tl.static_range(SPLITS):
        total += tl.load(partial_ptr + split * M * N + offs, mask=ok, other=0.0)
    _let_next_launch(PDL)
    dtype = out_ptr.dtype.element_ty
    out = total.to(dtype)
    if HAS_RESIDUAL:
        out = (out.to(tl.float32) + residual).to(dtype)
    tl.store(out_ptr + m * stride_om + n, out, mask=ok)
    if SQUARES_OUT:  # BLOCK divides N: the program's outputs are one part of one row
        start = tl.program_id(0) * BLOCK
        out32 = tl.where(ok, out.to(tl.float32), 0.0)
        tl.store(squares_out_ptr + start // BLOCK, tl.sum(out32 * out32, axis=0))  # [M, N // BLOCK] row-major


SPLIT_SUM_BLOCK = 256
"""Outputs per program of `_split_k_sum_kernel` (4 warps)."""


LinearConfig = tuple[int, int, int, int, int, int]
"""(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, SPLIT_K, num_stages): num_stages only matters for the tl.dot path (loads
in flight in Triton's software pipeline; 3 is its default). Tiles of 64 rows are computed as weight @ x.T (the
weight's rows on the MMA's long side): 64-row gate/up 18.7 vs 23.3 us on an H100; every other 64- and 16-row shape
measured as fast or faster with 16-row tiles the usual way round (scripts/tune_kernels.py, 2026-11-23)."""

CUBLAS: LinearConfig = (0, 0, 0, 0, 0, 0)
"""Not a tile: the product through cuBLAS (plain matmuls, no norm / gate: those need the kernel)."""

_LINEAR_CONFIGS: dict[tuple[int, int, int, bool], LinearConfig] = {
    # (rows bucket, N, K, gated) of CSM-1B's matmuls: the fastest measured on an H100 (scripts/tune_kernels.py,
    # one row with programmatic dependent launch: 2026-11-24; batched: 2026-11-23). Long K blocks keep more loads
    # in flight. One row, then refined inside the whole frame graph on an H200 (scripts/tune_in_graph.py,
    # 2026-11-28, two rounds: the decoder's o, gate/up and down, the backbone's qkv, gate/up and down; `bench`
    # B=1 4.39 -> 4.13 ms/frame); the decoder's o on 4 warps after the draw's narrower rows (-14 us a frame).
    (1, 1536, 1024, False): (1, 8, 1024, 4, 1, 3), (1, 1024, 1024, False): (1, 4, 1024, 4, 1, 3),
    (1, 8192, 1024, True): (1, 2, 1024, 4, 1, 3), (1, 1024, 8192, False): (1, 4, 4096, 8, 1, 3),
    (1, 1024, 2048, False): (1, 8, 2048, 4, 1, 3), (1, 2051, 1024, False): (1, 2, 1024, 2, 1, 3),
    (1, 3072, 2048, False): (1, 8, 2048, 8, 1, 3), (1, 2048, 2048, False): (1, 8, 2048, 8, 1, 3),
    (1, 8192, 2048, True): (1, 2, 2048, 4, 1, 3), (1, 2048, 8192, False): (1, 4, 2048, 8, 1, 3),
    (1, 2051, 2048, False): (1, 8, 2048, 8, 1, 3),
    # Batched rows: small N with long K is split, 16 rows x 64 columns per program leave most SMs idle otherwise.
    # The decoder's 16-row gate/up and down on 4 stages, not 3: in the frame graph on an H200 -14 and -92 us a frame
    # (scripts/tune_in_graph.py 16 dec, 2026-11-28).
    (16, 1536, 1024, False): (16, 16, 256, 4, 1, 3), (16, 1024, 1024, False): (16, 16, 256, 4, 1, 3),
    (16, 8192, 1024, True): (16, 64, 128, 8, 1, 4), (16, 1024, 8192, False): (16, 64, 128, 8, 8, 4),
    (16, 1024, 2048, False): (16, 64, 128, 8, 8, 3), (16, 2051, 1024, False): (16, 16, 256, 4, 1, 3),
    (16, 3072, 2048, False): (16, 64, 128, 8, 4, 3), (16, 2048, 2048, False): (16, 64, 128, 8, 4, 3),
    (16, 8192, 2048, True): (16, 64, 128, 8, 1, 3), (16, 2048, 8192, False): (16, 64, 128, 8, 8, 3),
    (16, 2051, 2048, False): (16, 64, 128, 8, 4, 3),
    # 64 rows: the normed products on folded weights (FOLD_NORMS); then the decoder's QKV with K blocks of 256 on 4
    # warps (in the frame graph on an H200: -85 then -41 us a frame, scripts/tune_in_graph.py 64, 2026-11-28); the
    # decoder's down projection on 64-row tiles split 8 ways instead of cuBLAS (-491 us a frame), then on 4 stages
    # (-138), and the backbone's o and down the same way (-35, -71; 2026-11-28, fourteenth session); the decoder's
    # o on K blocks of 512 (-31; K blocks of 512 / 1024 lost for QKV and the heads: scripts/tune_in_graph.py 64 bigk);
    # the decoder's down on 5 stages (-14; its gate/up on K blocks of 64 and 4-8 stages lost: tune_in_graph.py 64
    # deep, 2026-11-29).
    (64, 1536, 1024, False): (16, 64, 256, 4, 1, 3), (64, 1024, 1024, False): (16, 32, 512, 4, 1, 3),
    (64, 8192, 1024, True): (64, 64, 128, 8, 1, 4), (64, 1024, 8192, False): (64, 64, 128, 8, 8, 5),
    (64, 1024, 2048, False): (16, 64, 128, 8, 4, 3), (64, 2051, 1024, False): (16, 64, 128, 8, 1, 3),
    (64, 3072, 2048, False): (64, 128, 128, 8, 4, 3), (64, 2048, 2048, False): (64, 64, 128, 8, 4, 3),
    (64, 8192, 2048, True): (64, 64, 128, 8, 1, 4), (64, 2048, 8192, False): (64, 64, 128, 8, 8, 3),
    (64, 2051, 2048, False): (16, 64, 256, 4, 1, 3),
    # 128 and 256 rows (`bench --batch` beyond 64): tiles of 64-256 rows as weight @ x.T, measured one product at a
    # time on an H200 as a 64+ slot engine runs them (folded norms, squares handed on; scripts/tune_kernels.py
    # wide, 2026-11-29). The 64-row table's tiles over more row blocks read each weight from L2 again per block:
    # the decoder's gate/up 19.0 -> 12.5 us at 128 rows, 33.8 -> 17.9 at 256. The projection and the backbone's
    # head (once a frame) keep the 64-row tiles. Then at 256 in the frame graph (scripts/tune_in_graph.py 256 dec):
    # the decoder's QKV and o on 4 stages, its heads on 64 columns (-313 us a frame together). At 128 (the same,
    # 2026-11-29, each alone against the table): QKV on 4 stages -131, gate/up on 4 warps -104, down on K blocks of
    # 128 -421, heads on 64 columns -47 us a frame; together -440 (tune_in_graph.py's combined run), then `bench`
    # 128 streams 7.46 -> 7.05 ms a frame, 875x -> 910x (twenty-sixth session).
    (128, 1536, 1024, False): (64, 64, 128, 4, 1, 4), (128, 1024, 1024, False): (64, 64, 128, 4, 4, 3),
    (128, 8192, 1024, True): (128, 64, 64, 4, 1, 4), (128, 1024, 8192, False): (128, 64, 128, 8, 8, 4),
    (128, 2051, 1024, False): (64, 64, 128, 4, 4, 3), (128, 3072, 2048, False): (64, 64, 128, 4, 1, 3),
    (128, 2048, 2048, False): (128, 64, 64, 8, 4, 4), (128, 8192, 2048, True): (128, 64, 64, 8, 1, 4),
    (128, 2048, 8192, False): (128, 64, 64, 8, 8, 4),
    (256, 1536, 1024, False): (64, 64, 128, 4, 1, 4), (256, 1024, 1024, False): (64, 64, 128, 4, 1, 4),
    (256, 8192, 1024, True): (128, 128, 64, 8, 1, 4), (256, 1024, 8192, False): (256, 64, 64, 8, 8, 4),
    (256, 2051, 1024, False): (64, 64, 128, 8, 1, 3), (256, 3072, 2048, False): (64, 64, 64, 4, 1, 4),
    (256, 2048, 2048, False): (128, 64, 64, 8, 2, 4), (256, 8192, 2048, True): (128, 128, 64, 8, 1, 4),
    (256, 2048, 8192, False): (256, 64, 64, 8, 4, 4),
}


def _cublas_linear(x: Tensor, weight: Tensor, residual: Tensor | None, batch: int) -> Tensor:
    """`linear` through cuBLAS, always over `batch` rows: cuBLAS picks its algorithm, and with it the summation
    order, by the row count, so fewer rows would round differently. Rows are independent, so padding rows change
    nothing in the real ones."""
    m = x.shape[0]
    if m < batch:
        padded = torch.empty(batch, x.shape[1], dtype=x.dtype, device=x.device)  # [batch, K]
        padded[:m] = x
        x = padded
    out = torch.nn.functional.linear(x, weight)[:m]  # [M, N], rounded to x's dtype as the torch path rounds it
    return out if residual is None else out + residual


_FP8_CONFIGS: dict[tuple[int, int, int, bool], LinearConfig] = {
    # (rows bucket, N, K, gated) with fp8 weights, the layers' shapes, where they differ from bf16's: the fastest
    # measured on an H100 (scripts/tune_kernels.py fp8 / fp8batched, 2026-11-24). One row: shorter blocks (in
    # bytes) than bf16's, on fewer warps: each weight byte costs more instructions (a conversion before the
    # float32 product), so more, smaller programs in flight pay.
    (1, 1536, 1024, False): (1, 4, 1024, 2, 1, 3), (1, 1024, 1024, False): (1, 4, 1024, 2, 1, 3),
    (1, 8192, 1024, True): (1, 4, 512, 2, 1, 3), (1, 1024, 8192, False): (1, 4, 4096, 8, 1, 3),
    (1, 3072, 2048, False): (1, 4, 1024, 4, 1, 3), (1, 2048, 2048, False): (1, 8, 2048, 8, 1, 3),
    (1, 8192, 2048, True): (1, 8, 512, 4, 1, 3), (1, 2048, 8192, False): (1, 8, 2048, 8, 1, 3),
    # 64 rows: the shapes bf16 sent to cuBLAS (which has no fp8-weight product) until its 64-row split-K tiles, on
    # 16-row tiles; the decoder's down with K blocks of 256 (in the frame graph on an H200: -78 us a frame,
    # scripts/tune_in_graph.py 64 fp8 dec, 2026-11-28).
    (64, 1024, 8192, False): (16, 64, 256, 8, 4, 3), (64, 2048, 2048, False): (16, 64, 128, 8, 1, 3),
    (64, 2048, 8192, False): (16, 64, 128, 8, 4, 3),
}


def rows_bucket(m: int) -> int:
    """The row count whose tuned launch settings an `m`-row product uses: 1, 16, 64, 128 or 256 (rows beyond 256
    run as more row blocks of the same sizes)."""
    return 1 if m == 1 else 16 if m <= 16 else 64 if m <= 64 else 128 if m <= 128 else 256


def linear_config(m: int, n: int, k: int, gated: bool, fp8: bool = False) -> LinearConfig:
    """Block sizes for an `[m, k] x [k, n]` product (n output columns; gated: the weight has 2n rows; fp8: 1-byte
    weights), from H100 and H200 measurements (scripts/tune_kernels.py, scripts/tune_in_graph.py). They fix the
    summation order, so they depend only on the shape and the engine's rows bucket, not on how many rows run."""
    bucket = rows_bucket(m)
    if bucket > 64 and (fp8 or (bucket, n, k, gated) not in _LINEAR_CONFIGS):  # not measured wider: 64-row tiles
        bucket = 64
    if fp8 and (bucket, n, k, gated) in _FP8_CONFIGS:
        return _FP8_CONFIGS[(bucket, n, k, gated)]
    if m == 1 and (1, n, k, gated) in _LINEAR_CONFIGS:
        return _LINEAR_CONFIGS[(1, n, k, gated)]
    if m == 1:  # GEMV: small N blocks so every SM streams weights, long K blocks
        if gated:
            return 1, 16, 512 if k >= 2048 else 256, 4, 1, 3
        return 1, 8 if n > 2048 else 4, min(1024, _pow2(k)), 8, 1, 3
    config = _LINEAR_CONFIGS.get((bucket, n, k, gated), (16, 64, 128, 8, 1, 3))
    if config == CUBLAS and fp8:  # cuBLAS has no fp8-weight x bf16 product: the 16-row tiles of the shape
        return linear_config(16, n, k, gated)
    return config


FOLD_NORMS = True
"""Engines of more than 16 slots run their RMS-normed products (QKV, gate/up) on copies of the weights with the
norm's weight multiplied into their columns (`model.Block.fold_norms`; bf16 / float32 weights): the tiles then
read x as it is, like a plain operand, and scale each row's sums by its 1 / RMS (from the pre-pass) after the
product, instead of normalising every x block before the MMA. In the frame graph on an H200 at 64 rows: -329 us a
frame (the RMS summed in the main loop instead of a pre-pass was slower than not folding: +469)."""


def folds_norms(batch: int) -> bool:
    """Whether an engine of `batch` slots runs its normed products on folded weights (`FOLD_NORMS`)."""
    return FOLD_NORMS and rows_bucket(batch) >= 64


def fold_norm(weight: Tensor, norm: Tensor) -> Tensor:
    """`weight [N, K]` with RMSNorm weight `norm [K]` multiplied into its columns, rounded to its dtype: the weight
    of `linear(..., norm_folded=True)`."""
    return (weight.float() * norm.float()).to(weight.dtype)


L2_PERSISTING = True
"""L2 cache hints in the frame graphs: the kernels that read a weight carry an access-policy window over it
(`linear(..., l2_hint=True)`, set while a graph is captured, which keeps it per kernel node), and the engine sets
persisting L2 lines aside (`reserve_l2`). The depth decoder's QKV and output weights (20 MB at full size, bf16; read
32 times a frame) persist whole; its MLP weights (200 MB) and the weights a frame reads once (backbone layers and
heads, 2.1 GB) are marked streaming (evicted first), so that they no longer push everything else out of L2 as they
pass through (`FrameStepper.l2_weights`). Caching only: the same results. `bench` on an H200, ms a frame: the small
weights alone B=1 3.73 -> 3.72, B=4 5.15 -> 5.13, B=16 5.41 -> 5.34, B=64 5.83 -> 5.80; with the MLP streaming
B=1 3.67, B=4 5.03, B=16 5.27 (2026-11-29, twentieth session), B=64 5.81 -> 5.74; the read-once weights streaming
as well, in the frame graph -18 / -54 / -12 us a frame at 1 / 16 / 64 rows, `bench` 0.02-0.04 ms a frame faster at
every size in two calls (twenty-first session). A share of the persisting lines for the MLP weights as well
(`reserve_l2(..., share=True)`) made B=64 0.28 ms a frame slower: 37.5 MB of persisting lines stay in L2 after the
frame graph and leave prefill and Mimi 12.5 MB of it; resetting them after each chunk
(cudaCtxResetPersistingL2Cache) made every size slower still (B=1 3.87, B=64 6.17)."""


_LIMIT_PERSISTING_L2 = 0x06  # cudaLimitPersistingL2CacheSize
_ATTR_MAX_PERSISTING_L2 = 108  # cudaDevAttrMaxPersistingL2CacheSize
_ATTR_MAX_WINDOW = 109  # cudaDevAttrMaxAccessPolicyWindowSize
ACCESS_POLICY_WINDOW = 1  # cudaLaunchAttributeAccessPolicyWindow: valid for streams and graph kernel nodes
_PERSISTING, _STREAMING = 2, 1  # cudaAccessProperty


class AccessPolicyWindow(ctypes.Structure):
    _fields_ = [("base_ptr", ctypes.c_void_p), ("num_bytes", ctypes.c_size_t), ("hit_ratio", ctypes.c_float),
                ("hit_prop", ctypes.c_int), ("miss_prop", ctypes.c_int)]


class LaunchAttributeValue(ctypes.Union):  # cudaLaunchAttributeValue: 64 bytes
    _fields_ = [("window", AccessPolicyWindow), ("pad", ctypes.c_char * 64)]


@functools.cache
def cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library torch loaded (None where none is loaded, e.g. a torch linked with it statically: then
    no L2 hints). Opened with RTLD_NOLOAD: found by its soname among the libraries already loaded, never a second
    runtime loaded beside torch's."""
    major = (torch.version.cuda or "").split(".")[0]
    for name in ([f"libcudart.so.{major}"] if major else []) + ["libcudart.so"]:
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
        except (OSError, AttributeError):  # not loaded; AttributeError: no RTLD_NOLOAD on this platform
            continue
    return None


# Hints `reserve_l2` registered: (device index, weight's data_ptr) -> the window's hit ratio; and by device index
# the largest window the GPU takes, in bytes. Only caching follows from them: a stale entry changes no result.
_l2_ratio: dict[tuple[int, int], float] = {}
_l2_max_window: dict[int, int] = {}
# By device index: how many reservations are held (`release_l2` undoes the last), and the persisting-L2 limit
# before the first of them.
_l2_holders: dict[int, int] = {}
_l2_limit_before: dict[int, int] = {}


def _l2_failed(rt: ctypes.CDLL) -> None:
    """A runtime call failed: take its error off the thread (torch's next launch check would raise it) and stop
    hinting in this process."""
    rt.cudaGetLastError()
    _l2_ratio.clear()


def reserve_l2(weights: Sequence[Tensor], streaming: Sequence[Tensor] = (), share: bool = False) -> int:
    """Set aside persisting L2 lines for `weights` (CUDA tensors that `linear(..., l2_hint=True)` will mark), as
    many as the GPU allows, never fewer than an earlier call set; returns the bytes set aside (0: none, e.g. no
    CUDA runtime found, a GPU without persisting L2, or `L2_PERSISTING` off). Where fewer bytes than the weights'
    are set aside, their windows mark that fraction of their lines persisting. `streaming`: weights whose windows
    mark their lines streaming; with `share` (an experiment: scripts/l2_persist_probe.py), the lines set aside
    beyond `weights` persist as a fraction of theirs. One thread launches: the limit changes device-wide."""
    if not L2_PERSISTING or INTERPRET or not weights or not weights[0].is_cuda:
        return 0
    rt = cudart()
    if rt is None:
        return 0
    index = weights[0].device.index
    need = sum(w.numel() * w.element_size() for w in weights)
    extra = sum(w.numel() * w.element_size() for w in streaming) if share else 0
    max_persisting, max_window, size = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_size_t(0)
    try:
        with torch.cuda.device(index):
            if (rt.cudaDeviceGetAttribute(ctypes.byref(max_persisting), _ATTR_MAX_PERSISTING_L2, index)
                    or rt.cudaDeviceGetAttribute(ctypes.byref(max_window), _ATTR_MAX_WINDOW, index)
                    or rt.cudaDeviceGetLimit(ctypes.byref(size), _LIMIT_PERSISTING_L2)):
                _l2_failed(rt)
                return 0
            before = size.value
            wanted = min(max_persisting.value, need + extra)
            if wanted > size.value and (rt.cudaDeviceSetLimit(_LIMIT_PERSISTING_L2, ctypes.c_size_t(wanted))
                                        or rt.cudaDeviceGetLimit(ctypes.byref(size), _LIMIT_PERSISTING_L2)):
                _l2_failed(rt)  # what the driver granted is read back: it may round
                return 0
    except AttributeError:  # a runtime without these calls
        return 0
    if size.value:
        _l2_limit_before.setdefault(index, before)
        _l2_holders[index] = _l2_holders.get(index, 0) + 1
        _l2_max_window[index] = max_window.value
        for w in weights:
            _l2_ratio[(index, w.data_ptr())] = min(1.0, size.value / need)
        for w in streaming:
            _l2_ratio[(index, w.data_ptr())] = min(1.0, max(0, size.value - need) / extra) if extra else 0.0
    return size.value


def release_l2(index: int) -> None:
    """Undo one `reserve_l2` that set lines aside on device `index` (an engine closing). The last one drops the
    registered hints, turns the persisting lines back into normal ones (they would otherwise keep their share of L2
    from whatever runs next) and restores the limit as it was before the first reservation."""
    holders = _l2_holders.get(index, 0) - 1
    if holders > 0:
        _l2_holders[index] = holders
        return
    if holders < 0:
        return
    del _l2_holders[index]
    for key in [key for key in _l2_ratio if key[0] == index]:
        del _l2_ratio[key]
    _l2_max_window.pop(index, None)
    before = _l2_limit_before.pop(index, 0)
    rt = cudart()
    if rt is None:
        return
    # The runtime's own calls, which return codes: torch's would raise again a CUDA error already on the device,
    # in place of the one that ends the run (an engine is closed in `finally` blocks).
    current = ctypes.c_int(-1)
    if rt.cudaGetDevice(ctypes.byref(current)) or rt.cudaSetDevice(index):
        _l2_failed(rt)
        return
    if (rt.cudaDeviceSynchronize()  # no kernel with a window still running
            or rt.cudaCtxResetPersistingL2Cache()
            or rt.cudaDeviceSetLimit(_LIMIT_PERSISTING_L2, ctypes.c_size_t(before))):
        _l2_failed(rt)
    rt.cudaSetDevice(current.value)


@contextmanager
def l2_window(weight: Tensor) -> Iterator[None]:
    """While a graph is captured on the current stream, the launches inside carry an access-policy window over
    `weight` with the hit ratio `reserve_l2` registered for it (that fraction of its lines persisting, the rest
    streaming; nothing where it registered none); the stream's window is cleared after."""
    index = weight.device.index if weight.is_cuda else None
    ratio = _l2_ratio.get((index, weight.data_ptr())) if index is not None else None
    size = weight.numel() * weight.element_size()
    if (ratio is None or not weight.is_contiguous() or size > _l2_max_window.get(index, 0)
            or not torch.cuda.is_current_stream_capturing()):  # eagerly, two runtime calls a product cost more
        yield
        return
    rt = cudart()
    stream = ctypes.c_void_p(torch.cuda.current_stream(weight.device).cuda_stream)
    value = LaunchAttributeValue()
    value.window = AccessPolicyWindow(weight.data_ptr(), size, ratio, _PERSISTING, _STREAMING)
    if rt.cudaStreamSetAttribute(stream, ACCESS_POLICY_WINDOW, ctypes.byref(value)):
        _l2_failed(rt)
        yield
        return
    try:
        yield
    finally:  # a zero window: later launches on the stream get the default policy
        if rt.cudaStreamSetAttribute(stream, ACCESS_POLICY_WINDOW, ctypes.byref(LaunchAttributeValue())):
            _l2_failed(rt)


NORM_UNROLL_BLOCKS = 16
"""The RMS pre-pass of a tile is unrolled when K spans at most this many blocks (every CSM matmul with a norm: K is
1024 or 2048, blocks 128 or wider): all its loads in flight at once, the same sum in the same order as the loop."""


SHARE_SQUARES = True
"""In engines of more than 16 slots, the products that write a layer's residual stream (output and down
projections) also write its rows' sums of squares, by parts (`linear_with_squares`), and the normed product after
each takes its RMS from those instead of every program re-reading x for a pre-pass: 64-row tiles read all of x, 128
KB (decoder) or 256 KB (backbone), before their first weight block. The pre-pass alone, in an H200's graph at 64
rows: decoder gate/up 1.4 us of 12.9, head 0.4, backbone QKV 2.4, gate/up 3.8 (`scripts/layer_probe.py folded`);
in the frame graph -149 us a frame (2026-11-29).

The squares are stored `[M, parts]`: stored `[parts, M]`, a slot alone in a 64-slot engine drew other codes than in
a full batch (M == 1 compiles apart and set the load's layout; tests/test_kernel_layouts.py). The engine's CUDA
tests pass with it (`scripts/device_run.sh OUT squarestests`, H200, 2026-11-29)."""


def shares_squares(batch: int) -> bool:
    """Whether an engine of `batch` slots hands its rows' sums of squares to the next normed product
    (`SHARE_SQUARES`)."""
    return SHARE_SQUARES and rows_bucket(batch) >= 64


def linear(x: Tensor, weight: Tensor, *, scale: Tensor | None = None, norm: Tensor | None = None, eps: float = 0.0,
           norm_folded: bool = False, squares: Tensor | None = None, residual: Tensor | None = None,
           gated: bool = False, batch: int | None = None, config: LinearConfig | None = None,
           l2_hint: bool = False) -> Tensor:
    """`x [M, K] @ weight.T` for `weight [N, K]` (any strides), with optional fusions:

    - `scale [N]` (float32): `weight` holds fp8 values and the product is `(x @ weight.T) * scale`, in float32,
      rounded once (`model.Linear`'s fp8 weights);
    - `norm [K]`: RMSNorm of x's rows (weight `norm`, `eps`) first;
    - `norm_folded`: the same with the norm's weight already in `weight` (`fold_norm`): the product of the rows as
      they are, each row then scaled by its 1 / RMS (`eps`); batched tiles only (`FOLD_NORMS`);
    - `squares [M, P]` (with a norm): x's rows' sums of squares in P parts, as `linear_with_squares` returns them,
      for the RMS (the parts are added in a fixed order); without, each program sums x's squares itself;
    - `gated`: `weight` holds gate rows then up rows `[2I, K]`; returns `silu(x @ gate.T) * (x @ up.T)` `[M, I]`;
    - `residual [M, N]`: added to the result.

    Block sizes follow `batch` (default M): an engine passes its slot count, so a row's result is the same however
    many of the slots run (the frame graphs for fewer active slots compute exactly what the full batch would).

    `l2_hint`: in a graph being captured, the launches carry the L2 cache hint `reserve_l2` registered for
    `weight` (`l2_window`): persisting or streaming, as the engine registered it (`FrameStepper.l2_weights`).
    """
    with l2_window(weight) if l2_hint else nullcontext():
        return _linear(x, weight, scale, norm, eps, norm_folded, squares, residual, gated, batch, config, False)[0]


def linear_with_squares(x: Tensor, weight: Tensor, *, scale: Tensor | None = None, residual: Tensor | None = None,
                        batch: int | None = None, config: LinearConfig | None = None,
                        l2_hint: bool = False) -> tuple[Tensor, Tensor | None]:
    """`linear` (a plain product, optionally fp8 and with a residual), and its output rows' sums of squares (of the
    rounded values it stores) in parts `[M, P]` float32, for a normed product of the result (`linear(...,
    squares=)`); None where the product's tiles cannot split its rows into parts (cuBLAS)."""
    with l2_window(weight) if l2_hint else nullcontext():
        return _linear(x, weight, scale, None, 0.0, False, None, residual, False, batch, config, True)


def _linear(x: Tensor, weight: Tensor, scale: Tensor | None, norm: Tensor | None, eps: float, norm_folded: bool,
            squares: Tensor | None, residual: Tensor | None, gated: bool, batch: int | None,
            config: LinearConfig | None, squares_out: bool) -> tuple[Tensor, Tensor | None]:
    m = x.shape[0]
    n, k = weight.shape
    n = n // 2 if gated else n
    fp8 = scale is not None
    config = config or linear_config(batch or m, n, k, gated, fp8)
    if config == CUBLAS and norm is None and not norm_folded and not gated and not fp8:
        return _cublas_linear(x, weight, residual, batch or m), None
    if config == CUBLAS:  # a fused or fp8 product of a shape cuBLAS serves plain: the shape's 16-row tiles
        config = linear_config(16, n, k, gated, fp8)
    assert not fp8 or (scale.dtype == torch.float32 and scale.shape == (weight.shape[0],) and scale.stride(0) == 1)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    block_m, block_n, block_k, warps, split_k, stages = config
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1) and not (gated and split_k > 1)
    assert not norm_folded or (norm is None and block_m > 1)
    assert squares is None or (squares.dtype == torch.float32 and squares.shape[0] == m and squares.is_contiguous())
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), triton.cdiv(k, k_per_split))
    split = grid[2] > 1
    out_squares = None
    if squares_out and not (split and n % SPLIT_SUM_BLOCK):  # parts: the split-K sum's programs, or the tiles'
        parts = n // SPLIT_SUM_BLOCK if split else grid[0]
        out_squares = torch.empty(m, parts, dtype=torch.float32, device=x.device)  # [M, P]
    pdl = use_pdl(x, block_m == 1)
    one_block = block_m == 1 and block_k >= k
    has_norm = norm is not None or norm_folded
    norm_k = k if has_norm and not one_block and triton.cdiv(k, block_k) <= NORM_UNROLL_BLOCKS else 0
    parts_in = squares.shape[1] if squares is not None and has_norm else 0
    _linear_kernel[grid](
        x, norm if norm is not None else x, weight,
        scale if fp8 else x, residual if residual is not None else x, out, partial,
        squares if parts_in else x, out_squares if out_squares is not None and not split else x,
        m, n, k, k_per_split, eps, parts_in,
        x.stride(0), weight.stride(0), weight.stride(1), residual.stride(0) if residual is not None else 0,
        out.stride(0),
        HAS_NORM=has_norm, HAS_RESIDUAL=residual is not None, GATED=gated,
        HAS_SCALE=fp8, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PARTIAL=split, DOT_F32=_dot_f32(x),
        PDL=pdl, ONE_BLOCK=one_block, SWAP_AB=block_m >= 64, NORM_K=norm_k, NORM_AFTER=norm_folded,
        PARTS_IN=max(2, _pow2(parts_in)) if parts_in else 0, SQUARES_OUT=out_squares is not None and not split,
        num_warps=warps, num_stages=stages, launch_pdl=pdl > 0,
    )
    if split:
        _split_k_sum_kernel[(triton.cdiv(m * n, SPLIT_SUM_BLOCK),)](
            partial, residual if residual is not None else out, out, out_squares if out_squares is not None else out,
            m, n, residual.stride(0) if residual is not None else 0, out.stride(0),
            SPLITS=grid[2], HAS_RESIDUAL=residual is not None, BLOCK=SPLIT_SUM_BLOCK,
            SQUARES_OUT=out_squares is not None, PDL=pdl, launch_pdl=pdl > 0,
        )
    return out, out_squares


@triton.jit
def _widen_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, tl.load(src_ptr + offs, mask=ok).to(out_ptr.dtype.element_ty), mask=ok)


def widen(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """`weight.to(dtype)` for fp8 (e4m3) weights, exact, at memory speed: torch's own conversion from fp8 runs
    element by element (~330 GB/s on an H200), and a prompt's prefill converts every layer's weights."""
    assert weight.is_contiguous() and weight.dtype == torch.float8_e4m3fn
    assert weight.numel() < 2**31  # int32 offsets (CSM's largest layer: 34M weights)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    block = 4096
    _widen_kernel[(triton.cdiv(weight.numel(), block),)](weight, out, weight.numel(), BLOCK=block, num_warps=8)
    return out


@triton.jit
def _rope(x1, x2, cos1, cos2, sin1, sin2, dtype: tl.constexpr):
    """`x * cos + rotate_half(x) * sin` on the two halves of x, with torch's bf16 roundings."""
    out1 = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def _rope_rows_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, heads, stride_xb, stride_xt, stride_xh, stride_cb,
                      stride_ct, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)  # b * T + t
    b, t = row // T, row % T
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    ok = (h < heads)[:, None]
    x = x_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x, mask=ok, other=0.0).to(tl.float32)  # [BLOCK_H, HALF]
    x2 = tl.load(x + HALF, mask=ok, other=0.0).to(tl.float32)
    table = b.to(tl.int64) * stride_cb + t.to(tl.int64) * stride_ct + d
    cos1, cos2 = tl.load(cos_ptr + table).to(tl.float32), tl.load(cos_ptr + table + HALF).to(tl.float32)
    sin1, sin2 = tl.load(sin_ptr + table).to(tl.float32), tl.load(sin_ptr + table + HALF).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    out1, out2 = _rope(x1, x2, cos1[None, :], cos2[None, :], sin1[None, :], sin2[None, :], dtype)
    out = out_ptr + row.to(tl.int64) * heads * 2 * HALF + h[:, None] * 2 * HALF + d[None, :]
    tl.store(out, out1, mask=ok)
    tl.store(out + HALF, out2, mask=ok)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`x * cos + rotate_half(x) * sin` for `x [b, T, heads, D]` (any strides but the last) and `cos, sin` as
    the torch path broadcasts them, `[T, 1, D]` or `[b, T, 1, D]`: bit for bit torch's three roundings, in one
    pass instead of five kernels (three of them strided). Returns a contiguous `[b, T, heads, D]`."""
    b, t, heads, d = x.shape
    assert x.stride(-1) == 1 and cos.shape == sin.shape and cos.stride() == sin.stride() and cos.stride(-1) == 1
    stride_cb = cos.stride(0) if cos.dim() == 4 else 0
    out = torch.empty(b, t, heads, d, dtype=x.dtype, device=x.device)  # [b, T, heads, D]
    block_h = min(16, _pow2(heads))
    _rope_rows_kernel[(b * t, triton.cdiv(heads, block_h))](
        x, cos, sin, out, t, heads, x.stride(0), x.stride(1), x.stride(2), stride_cb, cos.stride(-3),
        HALF=d // 2, BLOCK_H=block_h, num_warps=4, enable_fp_fusion=False)  # a fused multiply-add rounds once
    return out


@triton.jit
def _silu_mul_kernel(h_ptr, out_ptr, inner, stride_h, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inner
    gate = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + inner + offs, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # torch's silu: x / (1 + expf(-x)) in float32, IEEE division (tl's `/` may approximate), then rounded
    silu = tl.math.div_rn(gate, 1.0 + _exp(-gate, LIBDEVICE)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * inner + offs, (silu * up).to(dtype), mask=ok)


def silu_mul(h: Tensor) -> Tensor:
    """`silu(gate) * up` of `h [..., 2I]` = (gate, up) side by side (the fused gate/up projection's output), in
    one pass: the torch ops read the two strided halves in separate, unvectorised kernels. torch's roundings."""
    inner = h.shape[-1] // 2
    rows = h.reshape(-1, 2 * inner)  # [R, 2I]
    assert rows.stride(-1) == 1
    out = torch.empty(*h.shape[:-1], inner, dtype=h.dtype, device=h.device)  # [..., I]
    block = 1024
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(inner, block))](rows, out, inner, rows.stride(0), BLOCK=block,
                                                                LIBDEVICE=not INTERPRET, num_warps=4)
    return out


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, D, eps, stride_x, stride_d,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:  # torch's add: in float32, rounded to the activations' dtype
        x = (x + tl.load(delta_ptr + row * stride_d + offs, mask=ok, other=0.0).to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row * D + offs, x, mask=ok)
        x = x.to(tl.float32)
    if LIBDEVICE:  # CUDA's rsqrtf, as torch's norm kernel
        rstd = libdevice.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    weight = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (weight * (x * rstd)).to(dtype), mask=ok)


def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`s = x + delta` (None: `s = x`) and `F.rms_norm(s, weight, eps)` for `x, delta [..., D]`, in one pass
    instead of two kernels (a prefill's residual sums and norms): the sum exactly as torch rounds it, the norm in
    float32 and rounded once as torch's, its sum of squares in another order (on an H200: at most an ulp apart in
    bf16 / fp16, a few ulps in float32).
    Returns `(s, norm)`, contiguous (`s` is `x` itself when `delta` is None)."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)  # [R, D]
    deltas = delta.reshape(-1, d) if delta is not None else rows
    assert rows.stride(-1) == 1 and deltas.stride(-1) == 1 and deltas.shape == rows.shape and weight.shape == (d,)
    total = torch.empty_like(rows) if delta is not None else rows  # [R, D]
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)  # [R, D]
    _add_rms_norm_kernel[(rows.shape[0],)](rows, deltas, weight, total, out, d, eps, rows.stride(0), deltas.stride(0),
                                           HAS_DELTA=delta is not None, BLOCK=_pow2(d), LIBDEVICE=not INTERPRET,
                                           num_warps=4 if d <= 2048 else 8)
    shape = (*x.shape[:-1], d)
    return (total.view(shape) if delta is not None else x), out.view(shape)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, rows_ptr, start, T, kv_heads, stride_kb, stride_kh,
                     stride_kt, stride_vb, stride_vh, stride_vt, stride_cb, stride_ch, stride_ct,
                     D: tl.constexpr, BLOCK_T: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // kv_heads, bh % kv_heads
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    ok = (t < T)[:, None]
    row = tl.load(rows_ptr + b).to(tl.int64)
    cache = row * stride_cb + h.to(tl.int64) * stride_ch + (start + t[:, None]).to(tl.int64) * stride_ct + d[None, :]
    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh + t[:, None] * stride_kt + d[None, :], mask=ok)
    v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + t[:, None] * stride_vt + d[None, :], mask=ok)
    tl.store(k_cache_ptr + cache, k, mask=ok)
    tl.store(v_cache_ptr + cache, v, mask=ok)


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, start: int) -> None:
    """`k_cache[rows, :, start:start + T] = k` and the same for v, `k, v [b, Hkv, T, D]` (any strides but the
    last), caches `[B, Hkv, S, D]`: a prefill's cache write in one kernel instead of two of torch's generic
    indexed writes."""
    b, heads, t, d = k.shape
    assert v.shape == k.shape and k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(-1) == 1 and start + t <= k_cache.shape[2] and d == _pow2(d)
    assert k_cache.shape == v_cache.shape and k_cache.shape[1] == heads and k_cache.shape[3] == d
    assert rows.shape == (b,) and rows.is_contiguous()  # the kernel reads rows[i] at rows_ptr + i
    block_t = 32
    _write_kv_kernel[(b * heads, triton.cdiv(t, block_t))](
        k, v, k_cache, v_cache, rows, start, t, heads, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), D=d, BLOCK_T=block_t, num_warps=4)


@triton.jit
def _cache_block(row, cur1, cur2, pos, s0, stride_cs, d, BLOCK_S: tl.constexpr, HALF: tl.constexpr):
    """Cached keys or values `[BLOCK_S, HALF]` (both halves) for positions s0..: earlier steps' from the cache, this
    step's (`cur1`, `cur2`, `[HALF]`) from registers, so no read waits for this kernel's own cache write."""
    s = s0 + tl.arange(0, BLOCK_S)
    ptrs = row + s[:, None] * stride_cs + d[None, :]  # [BLOCK_S, HALF]
    x1 = tl.load(ptrs, mask=(s < pos)[:, None], other=0.0)
    x2 = tl.load(ptrs + HALF, mask=(s < pos)[:, None], other=0.0)
    now = (s == pos)[:, None]
    return tl.where(now, cur1[None, :], x1), tl.where(now, cur2[None, :], x2)


@triton.jit
def _scores(q1, q2, k1, k2, pos, s0, scale, dtype: tl.constexpr, BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr):
    """Scaled scores `[G_PAD, BLOCK_S]` of the group's queries against keys `[BLOCK_S, HALF]` at positions s0..,
    -inf past `pos`."""
    s = s0 + tl.arange(0, BLOCK_S)
    raw = tl.zeros([q1.shape[0], BLOCK_S], dtype=tl.float32)
    raw = _dot(q2, tl.trans(k2), _dot(q1, tl.trans(k1), raw, DOT_F32), DOT_F32)
    scores = (raw.to(dtype).to(tl.float32) * scale).to(dtype).to(tl.float32)  # q @ k.T, then * scale, in bf16
    return tl.where((s <= pos)[None, :], scores, float("-inf"))


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, out_ptr, pos_ptr, pos_value, scale,
    stride_qkv, stride_cb, stride_ch, stride_cs, stride_out,
    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, G_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    POS_FROM_PTR: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    G: tl.constexpr = H // HKV
    D: tl.constexpr = 2 * HALF
    if POS_FROM_PTR:  # positions are written by earlier kernels
        _wait_for_inputs(PDL)
        pos = tl.load(pos_ptr + b).to(tl.int32)
    else:
        pos = pos_value
    dtype = out_ptr.dtype.element_ty
    d = tl.arange(0, HALF)
    cos1 = tl.load(cos_ptr + pos * D + d).to(tl.float32)  # RoPE tables never change: loaded before the wait
    cos2 = tl.load(cos_ptr + pos * D + HALF + d).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * D + d).to(tl.float32)
    sin2 = tl.load(sin_ptr + pos * D + HALF + d).to(tl.float32)
    if not POS_FROM_PTR:
        _wait_for_inputs(PDL)
    row = qkv_ptr + b.to(tl.int64) * stride_qkv
    cache_row = b.to(tl.int64) * stride_cb + kvh * stride_ch
    k_row = k_ptr + cache_row
    v_row = v_ptr + cache_row
    # This step's key (rotated) and value; the G query heads sharing this KV head, padded to G_PAD rows for tl.dot.
    k1 = tl.load(row + (H + kvh) * D + d).to(tl.float32)
    k2 = tl.load(row + (H + kvh) * D + HALF + d).to(tl.float32)
    v1 = tl.load(row + (H + HKV + kvh) * D + d)
    v2 = tl.load(row + (H + HKV + kvh) * D + HALF + d)
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    q_ptrs = row + (kvh * G + g)[:, None] * D + d[None, :]  # [G_PAD, HALF]
    q1 = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_ptrs + HALF, mask=g_ok[:, None], other=0.0).to(tl.float32)
    k1, k2 = _rope(k1, k2, cos1, cos2, sin1, sin2, dtype)
    q1, q2 = _rope(q1, q2, cos1[None, :], cos2[None, :], sin1[None, :], sin2[None, :], dtype)
    acc1 = tl.zeros([G_PAD, HALF], dtype=tl.float32)
    acc2 = tl.zeros([G_PAD, HALF], dtype=tl.float32)
    if pos < BLOCK_S:  # one block of positions (the depth decoder, short prompts): scores computed once
        key1, key2 = _cache_block(k_row, k1, k2, pos, 0, stride_cs, d, BLOCK_S, HALF)
        value1, value2 = _cache_block(v_row, v1, v2, pos, 0, stride_cs, d, BLOCK_S, HALF)
        scores = _scores(q1, q2, key1, key2, pos, 0, scale, dtype, BLOCK_S, DOT_F32)
        exps = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        probs = (exps / tl.sum(exps, axis=1)[:, None]).to(dtype)  # the two-pass loop's result for one block
        acc1 = _dot(probs, value1, acc1, DOT_F32)
        acc2 = _dot(probs, value2, acc2, DOT_F32)
    else:
        # Two passes, as torch's softmax: max and sum first, then probabilities rounded to bf16 before `@ v`.
        m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        total = tl.zeros([G_PAD], dtype=tl.float32)
        for s0 in range(0, pos + 1, BLOCK_S):
            key1, key2 = _cache_block(k_row, k1, k2, pos, s0, stride_cs, d, BLOCK_S, HALF)
            scores = _scores(q1, q2, key1, key2, pos, s0, scale, dtype, BLOCK_S, DOT_F32)
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(scores - m_new[:, None]), axis=1)
            m = m_new
        for s0 in range(0, pos + 1, BLOCK_S):
            key1, key2 = _cache_block(k_row, k1, k2, pos, s0, stride_cs, d, BLOCK_S, HALF)
            scores = _scores(q1, q2, key1, key2, pos, s0, scale, dtype, BLOCK_S, DOT_F32)
            probs = (tl.exp(scores - m[:, None]) / total[:, None]).to(dtype)  # [G_PAD, BLOCK_S]
            value1, value2 = _cache_block(v_row, v1, v2, pos, s0, stride_cs, d, BLOCK_S, HALF)
            acc1 = _dot(probs, value1, acc1, DOT_F32)
            acc2 = _dot(probs, value2, acc2, DOT_F32)
    _let_next_launch(PDL)
    # The cache write: nothing in this kernel reads it back (this step's entries come from registers above).
    tl.store(k_row + pos * stride_cs + d, k1)
    tl.store(k_row + pos * stride_cs + HALF + d, k2)
    tl.store(v_row + pos * stride_cs + d, v1)
    tl.store(v_row + pos * stride_cs + HALF + d, v2)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_out + (kvh * G + g)[:, None] * D + d[None, :]
    tl.store(out_ptrs, acc1.to(dtype), mask=g_ok[:, None])
    tl.store(out_ptrs + HALF, acc2.to(dtype), mask=g_ok[:, None])


ATTENTION_POSITIONS = 256
"""Cached positions per block of `decode_attention` when positions vary by row (the backbone), in engines of up to
16 slots: each block is one link of the chain of dependent loads, dots and reductions a (row, KV head) program
walks, twice (the two-pass softmax; a position below the block takes the one-pass path), so longer blocks mean
fewer links but more masked-out lanes. With at most 16 x 8 programs the GPU is mostly idle but for them: in the
frame graph on an H200 (200-row prompts, so positions up to ~260 take the one-pass path), against 64: one row 256
-52 us a frame (six rounds -44 ... -57), 128 -11, 32 +60; 16 rows 256 -61 (six rounds -59 ... -63), 128 -10, 32
+53 (scripts/tune_in_graph.py R knobs, 2026-11-29)."""

ATTENTION_POSITIONS_64 = 64
"""`ATTENTION_POSITIONS` for engines of more than 16 slots (512 programs at 64 rows): against 64, 32 +30 us a frame,
128 +83, 256 +97 (H200, 2026-11-29)."""

ATTENTION_WARPS = 8
"""Warps per (row, KV head) program of `decode_attention` in engines of up to 16 slots. It sets how the softmax's
max and sum are reduced across threads, so a change can round differently: measure it with
scripts/tune_in_graph.py, then run the CUDA tests. In the frame graph on an H200: 8 rather than 4 warps -76 us a
frame at one row, 4 rather than 8 +50 at 16 rows."""
ATTENTION_WARPS_64 = 4
"""`ATTENTION_WARPS` for engines of more than 16 slots: 4 rather than 8 warps -82 us a frame at 64 rows."""


def decode_attention(qkv: Tensor, rope_cos: Tensor, rope_sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                     positions: Tensor | int, n_heads: int, n_kv_heads: int, batch: int | None = None) -> Tensor:
    """One token per row: `qkv [B, (H + 2 Hkv) * D]` (q heads, k heads, v heads) at `positions` (`[B]`, or one
    int for all rows). Rotates q and k (tables `rope_cos/sin [S, D]`), writes k and v into the caches
    `[B, Hkv, S, D]` at each row's position and attends over positions 0..position. Returns `[B, H * D]`.
    `batch`: the engine's slot count, which sets the warps (as `linear`'s block sizes: see there)."""
    b, _, _, head_dim = k_cache.shape
    out = torch.empty(b, n_heads * head_dim, dtype=qkv.dtype, device=qkv.device)  # [B, H * D]
    group = n_heads // n_kv_heads
    pdl = use_pdl(qkv, b == 1)
    from_ptr = isinstance(positions, Tensor)
    # One block of positions; at a known position (the depth decoder's steps) only as wide as it needs to be, so
    # no lanes go to masked-out positions (16 at least: tl.dot's smallest side).
    few_rows = rows_bucket(batch or b) <= 16
    block_s = (ATTENTION_POSITIONS if few_rows else ATTENTION_POSITIONS_64) if from_ptr \
        else min(64, max(16, _pow2(positions + 1)))
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and qkv.stride(-1) == 1
    assert k_cache.dtype == v_cache.dtype == qkv.dtype  # this step's k / v stand in for cache entries
    assert qkv.shape[0] == b and (not from_ptr or positions.stride(0) == 1)  # positions: clamped by the caller
    _decode_attention_kernel[(b, n_kv_heads)](
        qkv, rope_cos, rope_sin, k_cache, v_cache, out, positions if from_ptr else qkv, 0 if from_ptr else positions,
        head_dim**-0.5, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        H=n_heads, HKV=n_kv_heads, HALF=head_dim // 2, G_PAD=max(16, _pow2(group)), BLOCK_S=block_s,
        POS_FROM_PTR=from_ptr, DOT_F32=_dot_f32(qkv), PDL=pdl,
        num_warps=ATTENTION_WARPS if few_rows else ATTENTION_WARPS_64, launch_pdl=pdl > 0,
    )
    return out


@triton.jit
def _order_keys(scaled):
    """float32 -> uint32 keys that order as the floats do."""
    bits = scaled.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.uint32, bitcast=True) ^ 0x80000000


@triton.jit
def _radix_digit(key, threshold, s, RADIX_BITS: tl.constexpr):
    """Each key's RADIX_BITS-bit digit at bit `s` (int32), and whether the key's bits above it equal the
    threshold's (the keys a radix pass counts)."""
    same_prefix = (((key ^ threshold) >> s) >> RADIX_BITS) == 0  # two shifts: s + RADIX_BITS may be 32
    return ((key >> s) & ((1 << RADIX_BITS) - 1)).to(tl.int32), same_prefix


@triton.jit
def _sample_kernel(logits_ptr, temperature_ptr, kth_ptr, gumbel_ptr, out_ptr, table_ptr, rows_out_ptr, row_offset,
                   V, D, stride_lb, stride_gb, stride_t, stride_ro,
                   BLOCK_V: tl.constexpr, TAIL_V: tl.constexpr, BLOCK_D: tl.constexpr, RADIX_BITS: tl.constexpr,
                   NUM_BINS: tl.constexpr, HAS_TABLE: tl.constexpr, KEY_LOW_BIT: tl.constexpr, PDL: tl.constexpr):
    _wait_for_inputs(PDL)
    b = tl.program_id(0)
    # The row is a power-of-two block plus a short tail (2051 = 2048 + 3): padding it to one block of 4096 would
    # double every pass's work. Tail keys are counted by comparison (a few keys), the block's by histogram.
    offs = tl.arange(0, BLOCK_V)
    ok = offs < V
    tail_offs = BLOCK_V + tl.arange(0, TAIL_V)
    tail_ok = tail_offs < V
    logits = tl.load(logits_ptr + b * stride_lb + offs, mask=ok, other=0.0).to(tl.float32)
    tail_logits = tl.load(logits_ptr + b * stride_lb + tail_offs, mask=tail_ok, other=0.0).to(tl.float32)
    gumbel = tl.load(gumbel_ptr + b * stride_gb + offs, mask=ok, other=0.0)  # in flight during the search
    tail_gumbel = tl.load(gumbel_ptr + b * stride_gb + tail_offs, mask=tail_ok, other=0.0)
    # IEEE division as torch's on CUDA (`/` may be 2 ulp off); div_rn wants operands of one shape.
    temperature = tl.load(temperature_ptr + b)
    scaled = tl.div_rn(logits, tl.zeros([BLOCK_V], dtype=tl.float32) + temperature)
    tail_scaled = tl.div_rn(tail_logits, tl.zeros([TAIL_V], dtype=tl.float32) + temperature)
    k = (tl.load(kth_ptr + b) + 1).to(tl.int32)
    # Top k by radix select on order-preserving unsigned keys, RADIX_BITS at a time from the most significant:
    # `threshold` is the largest value with at least k keys >= it, and the search stops as soon as exactly k are,
    # or at KEY_LOW_BIT. Each pass counts the next digit of the keys that share the threshold's decided bits in
    # one histogram (warp ballots; NUM_BINS >= 32, a bin per lane, the ones past 2^RADIX_BITS stay empty): one
    # look at each key a pass, where comparing it with every candidate digit cost 2^RADIX_BITS.
    # The keys are the logits' own, not the scaled values': dividing by T > 0 keeps their order (and makes equal
    # only what it rounds together, which the float comparisons below keep, as torch does), so the k-th logit
    # gives the k-th scaled value. bf16 logits are the top 16 bits of their float32 keys (KEY_LOW_BIT 16): when
    # several tie at the k-th value, as bf16 logits often do, the search ends after 16 bits instead of 32.
    key = _order_keys(logits)
    tail_key = _order_keys(tail_logits)
    bins = tl.arange(0, NUM_BINS)  # [NB]
    threshold = tl.zeros([], dtype=tl.uint32)
    count = tl.zeros([], dtype=tl.int32) + V  # keys >= threshold
    shift = tl.full([], 32 - RADIX_BITS, dtype=tl.int32)
    while (shift >= KEY_LOW_BIT) & (count != k):
        s = shift.to(tl.uint32)
        key_digit, same_prefix = _radix_digit(key, threshold, s, RADIX_BITS)
        hist = tl.histogram(key_digit, NUM_BINS, mask=ok & same_prefix)  # [NB]
        tail_digit, tail_same_prefix = _radix_digit(tail_key, threshold, s, RADIX_BITS)
        tail_counted = tail_ok & tail_same_prefix
        hist += tl.sum(((tail_digit[:, None] == bins[None, :]) & tail_counted[:, None]).to(tl.int32), axis=0)
        above = count - tl.cumsum(hist, 0) + hist  # [NB] keys >= threshold | bin << shift, non-increasing
        digit = tl.sum(((above >= k) & (bins < (1 << RADIX_BITS))).to(tl.int32), axis=0) - 1  # keeps k keys
        threshold = threshold | (digit.to(tl.uint32) << s)
        count = tl.sum(tl.where(bins == digit, above, 0), axis=0)
        shift -= RADIX_BITS
    _let_next_launch(PDL)
    # The k-th value as a float, compared as floats: ties with it (and -0.0 against 0.0) kept, as torch keeps them.
    kth = tl.minimum(tl.min(tl.where(ok & (key >= threshold), scaled, float("inf")), axis=0),
                     tl.min(tl.where(tail_ok & (tail_key >= threshold), tail_scaled, float("inf")), axis=0))
    value = tl.where(ok & (scaled >= kth), scaled + gumbel, float("-inf"))
    tail_value = tl.where(tail_ok & (tail_scaled >= kth), tail_scaled + tail_gumbel, float("-inf"))
    # argmax's first index on a tie, as torch's: the block's indices come before the tail's
    token = tl.argmax(value, axis=0).to(tl.int64)
    tail_token = BLOCK_V + tl.argmax(tail_value, axis=0).to(tl.int64)
    token = tl.where(tl.max(tail_value, axis=0) > tl.max(value, axis=0), tail_token, token)
    tl.store(out_ptr + b, token)
    if HAS_TABLE:  # the drawn token's table row, the next step's input: no gather kernel of its own
        cols = tl.arange(0, BLOCK_D)
        row = tl.load(table_ptr + (row_offset + token) * stride_t + cols, mask=cols < D)
        tl.store(rows_out_ptr + b * stride_ro + cols, row, mask=cols < D)


# Measured on an H200 inside the frame graph (scripts/tune_in_graph.py knobs): 4-bit digits counted by a histogram
# took 47 us a frame less at one row than 2-bit digits counted by comparisons (-58 at 64 rows); 8-bit digits +45.
# (Timed alone, draw after draw, an earlier histogram draw had measured slower at one row on an H100.)
SAMPLE_WARPS = 16
SAMPLE_RADIX_BITS = 4
"""Bits of the digit each radix pass of `sample` decides: 1, 2, 4 or 8."""
SAMPLE_SPLIT_TAIL = True
"""Draw over a power-of-two block plus a tail of at most `SAMPLE_TAIL_MAX` (2051 = 2048 + 3) instead of one
block padded to the next power of two (4096): in the frame graph on an H200 -108, -150 and -146 us a frame at 1, 16
and 64 rows (scripts/tune_in_graph.py knobs, 2026-11-28)."""
SAMPLE_TAIL_MAX = 64
SAMPLE_BF16_KEY_LOW_BIT = 16
"""The lowest key bit the draw's radix search decides for bf16 logits (their float32 keys' low 16 bits say nothing)."""


def sample_blocks(v: int) -> tuple[int, int]:
    """(block, tail) sizes the draw splits a row of `v` logits into; tail sizes are powers of two >= 2, masked
    past `v` (an empty tail when `v` fits the block)."""
    block = 1 << (v.bit_length() - 1)
    if block == v or not SAMPLE_SPLIT_TAIL or v - block > SAMPLE_TAIL_MAX:
        return _pow2(v), 2
    return block, max(2, _pow2(v - block))


def sample(logits: Tensor, temperature: Tensor, kth: Tensor, gumbel: Tensor, table: Tensor | None = None,
           row_offset: int = 0) -> tuple[Tensor, Tensor | None]:
    """`sampling.sample` in one kernel: `argmax(logits / T + gumbel)` over each row's top k (ties at the k-th
    value kept, as the sort-based threshold keeps them). `logits [B, V]`, `temperature [B, 1]`, `kth [B, 1]`
    (k - 1), `gumbel [B, V]`. Returns tokens `[B]` int64 and, given a `table [R, D]`, each token's row
    `table[row_offset + token]` `[B, D]` (else None)."""
    b, v = logits.shape
    out = torch.empty(b, dtype=torch.long, device=logits.device)
    rows = torch.empty(b, table.shape[1], dtype=table.dtype, device=logits.device) if table is not None else None
    assert logits.stride(-1) == 1 and gumbel.stride(-1) == 1 and temperature.stride(0) == 1 and kth.stride(0) == 1
    assert table is None or table.stride(1) == 1
    assert SAMPLE_RADIX_BITS in (1, 2, 4, 8)
    pdl = use_pdl(logits, b == 1)
    block_v, tail_v = sample_blocks(v)
    _sample_kernel[(b,)](
        logits, temperature, kth, gumbel, out, table if table is not None else out, rows if rows is not None else out,
        row_offset, v, table.shape[1] if table is not None else 1, logits.stride(0), gumbel.stride(0),
        table.stride(0) if table is not None else 0, rows.stride(0) if rows is not None else 0,
        BLOCK_V=block_v, TAIL_V=tail_v, BLOCK_D=_pow2(table.shape[1]) if table is not None else 1,
        RADIX_BITS=SAMPLE_RADIX_BITS, NUM_BINS=max(32, 1 << SAMPLE_RADIX_BITS), HAS_TABLE=table is not None,
        KEY_LOW_BIT=SAMPLE_BF16_KEY_LOW_BIT if logits.dtype == torch.bfloat16 else 0, PDL=pdl,
        num_warps=SAMPLE_WARPS, launch_pdl=pdl > 0,
    )
    return out, rows


@triton.jit
def _hash32(x):
    """`sampling._hash32` on uint32 (its int64 products masked to 32 bits are uint32 products that wrap)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def _log(x, LIBDEVICE: tl.constexpr):
    """CUDA's own logf (libdevice), as torch.log calls it, where tl.log may lower to an approximation; the
    interpreter has no libdevice (its tl.log is numpy's)."""
    if LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    """CUDA's own expf, as torch's kernels call it: `_log`'s twin."""
    if LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _expm1(x, LIBDEVICE: tl.constexpr):
    """CUDA's own expm1f (torch's ELU); the interpreter's exp - 1 for arguments <= 0."""
    if LIBDEVICE:
        return libdevice.expm1(x)
    else:
        return tl.exp(tl.minimum(x, 0.0)) - 1.0  # clamped: numpy's exp warns of overflow


@triton.jit
def _gumbel_noise_kernel(seed_ptr, frame_ptr, tokens_ptr, temperature_ptr, out_ptr, C, V, stride_ob, stride_oc,
                         BLOCK_V: tl.constexpr, LIBDEVICE: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    offs = tl.arange(0, BLOCK_V)
    ok = offs < V
    tokens = tl.load(tokens_ptr + offs, mask=ok, other=0).to(tl.uint32)  # never change: before the wait
    _wait_for_inputs(PDL)
    seed = tl.load(seed_ptr + b)
    key = _hash32((tl.load(frame_ptr + b) * 64 + c).to(tl.uint32))  # .to(uint32) keeps the low 32 bits
    key = _hash32((seed >> 32).to(tl.uint32) ^ key)
    key = _hash32(seed.to(tl.uint32) ^ key)
    bits = _hash32(_hash32(key ^ tokens))
    uniform = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # / 2**23, exactly
    gumbel = -_log(-_log(uniform, LIBDEVICE), LIBDEVICE)
    greedy = tl.load(temperature_ptr + b) <= 0
    gumbel = tl.where(greedy, 0.0, gumbel)
    _let_next_launch(PDL)
    tl.store(out_ptr + b * stride_ob + c * stride_oc + offs, gumbel, mask=ok)


def gumbel_noise(seed: Tensor, frame: Tensor, codebooks: int, tokens: Tensor, temperature: Tensor) -> Tensor:
    """`sampling.gumbel_noise` in one kernel (~60 small torch ops otherwise): `[B, codebooks, V]` float32."""
    b, v = seed.shape[0], tokens.shape[0]
    out = torch.empty(b, codebooks, v, dtype=torch.float32, device=seed.device)  # [B, C, V]
    assert seed.stride(0) == 1 and frame.stride(0) == 1 and temperature.stride(0) == 1 and tokens.stride(0) == 1
    pdl = use_pdl(seed, b == 1)
    _gumbel_noise_kernel[(b, codebooks)](seed, frame, tokens, temperature, out, codebooks, v, out.stride(0),
                                         out.stride(1), BLOCK_V=_pow2(v), LIBDEVICE=not INTERPRET, PDL=pdl, num_warps=4,
                                         launch_pdl=pdl > 0)
    return out


@triton.jit
def _embed_sum_kernel(table_ptr, codes_ptr, mask_ptr, text_ptr, out_ptr, D, vocab, stride_t, stride_cb, stride_mb,
                      stride_tt, stride_ob, C: tl.constexpr, HAS_MASK: tl.constexpr, HAS_TEXT: tl.constexpr,
                      BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    _wait_for_inputs(PDL)
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Codebooks in order (the sum's rounding never depends on the batch), unrolled: every row's load in flight at
    # once instead of one round trip per codebook. Masked-out entries are never read: they add nothing.
    for c in tl.static_range(C + HAS_TEXT):
        token = tl.load(codes_ptr + b * stride_cb + c)
        keep = ok
        if HAS_MASK:  # (broadcast before the compare: the interpreter cannot mask with a scalar's bool)
            keep = keep & ((tl.load(mask_ptr + b * stride_mb + c).to(tl.int32) + tl.zeros_like(d)) != 0)
        if c < C:
            row = table_ptr + (token + c * vocab).to(tl.int64) * stride_t
        else:  # the text column, last
            row = text_ptr + token.to(tl.int64) * stride_tt
        total += tl.load(row + d, mask=keep, other=0.0).to(tl.float32)
    _let_next_launch(PDL)
    tl.store(out_ptr + b * stride_ob + d, total.to(out_ptr.dtype.element_ty), mask=ok)


def embed_sum(table: Tensor, codes: Tensor, vocab: int, mask: Tensor | None = None,
              text_table: Tensor | None = None) -> Tensor:
    """`sum_c table[codes[:, c] + c * vocab]`: a frame's codes `[B, C]` as one embedding row each `[B, dim]`
    (`Csm.embed_frame` in one kernel, summed in codebook order, in float32, rounded once). Prompt rows
    (`Csm.embed_rows`): with `text_table`, the last column of `codes` is a text token whose row of `text_table` is
    added last; with `mask` (bool, `codes`' shape), only the entries it keeps are summed."""
    b, columns = codes.shape
    d = table.shape[1]
    assert codes.stride(1) == 1 and table.stride(1) == 1
    assert mask is None or (mask.shape == codes.shape and mask.stride(1) == 1 and mask.dtype == torch.bool)
    assert text_table is None or (text_table.stride(1) == 1 and text_table.shape[1] == d)
    out = torch.empty(b, d, dtype=table.dtype, device=table.device)  # [B, dim]
    block_d = 1024
    pdl = use_pdl(table, b == 1)
    has_text = text_table is not None
    _embed_sum_kernel[(b, triton.cdiv(d, block_d))](
        table, codes, mask.view(torch.uint8) if mask is not None else codes, text_table if has_text else table, out,
        d, vocab,
        table.stride(0), codes.stride(0), mask.stride(0) if mask is not None else 0,
        text_table.stride(0) if has_text else 0, out.stride(0),
        C=columns - has_text, HAS_MASK=mask is not None, HAS_TEXT=has_text, BLOCK_D=block_d, PDL=pdl, num_warps=4,
        launch_pdl=pdl > 0)
    return out


# ---------------------------------------------------------------------------------------------------- Mimi


@triton.jit
def _seanet_sum_kernel(x_ptr, bias_ptr, skip_ptr, skip_bias_ptr, out_ptr, n, C, stride_xb, stride_sb, stride_ob,
                       HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_SKIP_BIAS: tl.constexpr,
                       ELU: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    stream = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # within the stream's [T, C] block
    ok = offs < n
    y = tl.load(x_ptr + stream * stride_xb + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs % C, mask=ok, other=0.0)
    if HAS_SKIP:
        skip = tl.load(skip_ptr + stream * stride_sb + offs, mask=ok, other=0.0)
        if HAS_SKIP_BIAS:
            skip = skip + tl.load(skip_bias_ptr + offs % C, mask=ok, other=0.0)
        y = skip + y
    if ELU:  # torch's ELU (alpha 1): expm1 below zero
        y = tl.where(y > 0, y, _expm1(y, LIBDEVICE))
    tl.store(out_ptr + stream * stride_ob + offs, y, mask=ok)


SEANET_SUM_BLOCK = 2048


def seanet_sum(x: Tensor, bias: Tensor | None = None, skip: Tensor | None = None, skip_bias: Tensor | None = None,
               elu: bool = False, out: Tensor | None = None) -> Tensor:
    """`(skip + skip_bias) + (x + bias)`, then ELU if asked, in one pass, with torch's roundings: a SEANet conv's
    bias (cuDNN convs add it in a pass of their own), a resnet block's residual and the ELU before the next conv.
    float32 [B, C, T] tensors stored time-major (each stream's [T, C] contiguous, streams at any stride: slices
    of a padded buffer); biases [C]; into `out` (e.g. the next conv's padded input) or a new time-major tensor."""
    streams, channels, steps = x.shape

    def stream_stride(t: Tensor) -> int:
        assert t.shape == x.shape and t.dtype == torch.float32
        assert (t.stride(1) == 1 or channels == 1) and (t.stride(2) == channels or steps == 1), "not time-major"
        return t.stride(0)

    assert all(b is None or (b.shape == (channels,) and b.is_contiguous()) for b in (bias, skip_bias))
    assert skip is not None or skip_bias is None
    if out is None:
        out = x.new_empty(streams, steps, channels).transpose(1, 2)  # [B, C, T], time-major
    n = steps * channels
    assert n <= 2**31 - SEANET_SUM_BLOCK  # int32 offsets within a stream, the last block's too
    _seanet_sum_kernel[(triton.cdiv(n, SEANET_SUM_BLOCK), streams)](
        x, bias if bias is not None else x, skip if skip is not None else x,
        skip_bias if skip_bias is not None else x, out, n, channels, stream_stride(x),
        stream_stride(skip) if skip is not None else 0, stream_stride(out),
        HAS_BIAS=bias is not None, HAS_SKIP=skip is not None, HAS_SKIP_BIAS=skip_bias is not None, ELU=elu,
        LIBDEVICE=not INTERPRET, BLOCK=SEANET_SUM_BLOCK, num_warps=4,
    )
    return out


@triton.jit
def _gelu(x, LIBDEVICE: tl.constexpr):
    """torch's exact (erf) GELU in float32: x * 0.5 * (1 + erf(x / sqrt 2)), CUDA's own erff."""
    if LIBDEVICE:
        erf = libdevice.erf(x * 0.7071067811865476)
    else:
        erf = tl.erf(x * 0.7071067811865476)
    return x * 0.5 * (1.0 + erf)


@triton.jit
def _matmul_f32_kernel(x_ptr, w_ptr, bias_ptr, scale_ptr, res_ptr, out_ptr, M, N, K,
                       HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr,
                       PRECISION: tl.constexpr, LIBDEVICE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)  # [BLOCK_K, BLOCK_N]: the weight [N, K] read transposed
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if GELU:
        acc = _gelu(acc, LIBDEVICE)
    if HAS_SCALE:
        acc = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :] * acc
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        acc = tl.load(res_ptr + out_offs, mask=ok, other=0.0) + acc
    tl.store(out_ptr + out_offs, acc, mask=ok)


MATMUL_F32_MIN_ROWS = 512
"""Rows from which `matmul_f32` runs a product instead of cuBLAS's float32 GEMM (callers send fewer rows to torch).
At Mimi's shapes on an H200 (twenty-seventh session, `profile_mimi.py matmuls`, inside CUDA graphs): at 1024 rows
(64 streams' 8-frame chunk) a layer's six products took 137 instead of 193 us, at 4096 374 instead of 583; at 256
rows the K = 2048 product (fc2) lost at every block size (29 against 22 us at best), at 16 rows fc1 tied and the
others lost. 512 itself was not measured: it lies between the 256 rows that lost and the 1024 that won."""


def matmul_f32_blocks(m: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of `matmul_f32`: the fastest of seven sizes at Mimi's products (`profile_mimi.py
    matmuls`); below 128 rows (tests) one tile's rows."""
    if m < 128:
        return max(16, min(64, _pow2(m))), 64, 32
    return (128, 64, 32) if m > 2048 or n >= 2048 else (64, 64, 64)


MATMUL_F32_STAGES = 3


def matmul_f32_stages(blocks: tuple[int, int, int], shared_memory: int) -> int:
    """Pipeline stages of `matmul_f32`: 3 (as measured on an H200, 227 KB of shared memory a block) where the
    operand tiles of 3 stages fit in the GPU's `shared_memory` with 16 KB to spare, else 2: 3 stages of 64x64x64
    float32 tiles need 96 KB, and Ampere and Ada consumer / inference GPUs (sm86, sm89) offer a block 99 KB."""
    block_m, block_n, block_k = blocks
    tile_bytes = (block_m + block_n) * block_k * 4
    return MATMUL_F32_STAGES if MATMUL_F32_STAGES * tile_bytes + 16 * 1024 <= shared_memory else 2


@functools.cache
def _shared_memory(device_index: int) -> int:
    """Bytes of shared memory a block may opt in to (unknown: the 48 KB every GPU gives, so 2 stages)."""
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", 48 * 1024)


def matmul_f32(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None,
               residual: Tensor | None = None, gelu: bool = False) -> Tensor:
    """`residual + scale * gelu(x @ weight.T + bias)` (each part optional) of float32 `x [..., K]`, `weight [N, K]`: the
    Mimi transformer's products, where cuBLAS's float32 GEMMs run on the CUDA cores (no TF32: torch's default).
    Here the tensor cores compute each product as three TF32 products (Triton's `tf32x3`: the operands split into
    high and low TF32 parts), as accurate as float32 to ~1e-6, and the bias, the GELU, the layer scale and the
    residual add are the epilogue, in float32 in torch's order (the compiler may fuse a multiply and an add)."""
    assert x.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
    k = x.shape[-1]
    rows = x.reshape(-1, k).contiguous()  # [M, K]
    m, n = rows.shape[0], weight.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)  # [M, N]
    if residual is not None:
        residual = residual.reshape(m, n).contiguous()
    assert all(v is None or (v.shape == (n,) and v.is_contiguous()) for v in (bias, scale))
    blocks = block_m, block_n, block_k = matmul_f32_blocks(m, n)
    stages = MATMUL_F32_STAGES if INTERPRET else matmul_f32_stages(blocks, _shared_memory(x.device.index or 0))
    _matmul_f32_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        rows, weight, bias if bias is not None else out, scale if scale is not None else out,
        residual if residual is not None else out, out, m, n, k,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_RESIDUAL=residual is not None, GELU=gelu,
        PRECISION="ieee" if INTERPRET else "tf32x3", LIBDEVICE=not INTERPRET,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages,
    )
    return out.view(*x.shape[:-1], n)


@triton.jit
def _mimi_attention_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_ring_ptr, v_ring_ptr, ring_ptr, mask_ptr, out_ptr,
                           T, heads, slots, scale, stride_qb, stride_qt, stride_kb, stride_kt, stride_vb, stride_vt,
                           stride_rb, stride_rh, stride_ob, stride_ot,
                           HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                           PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b, h = (bh // heads).to(tl.int64), bh % heads
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)  # a half head; BLOCK_D >= 16 for the dots (the tests' heads are smaller)
    d_ok = d < HALF
    t_ok = (t < T)[:, None] & d_ok[None, :]
    col = h * 2 * HALF + d[None, :]  # this head's first half in a [.., H D] row
    table = t[:, None] * 2 * HALF + d[None, :]
    cos1 = tl.load(cos_ptr + table, mask=t_ok, other=0.0)
    cos2 = tl.load(cos_ptr + table + HALF, mask=t_ok, other=0.0)
    sin1 = tl.load(sin_ptr + table, mask=t_ok, other=0.0)
    sin2 = tl.load(sin_ptr + table + HALF, mask=t_ok, other=0.0)
    # RoPE as `codec._rotate` rounds it (float32: x * cos, then cat(-x2, x1) * sin, then their sum)
    q = q_ptr + b * stride_qb + t[:, None] * stride_qt + col
    q1, q2 = _rope(tl.load(q, mask=t_ok, other=0.0), tl.load(q + HALF, mask=t_ok, other=0.0), cos1, cos2, sin1, sin2,
                   tl.float32)
    k = k_ptr + b * stride_kb + t[:, None] * stride_kt + col
    k1, k2 = _rope(tl.load(k, mask=t_ok, other=0.0), tl.load(k + HALF, mask=t_ok, other=0.0), cos1, cos2, sin1, sin2,
                   tl.float32)
    # this piece's keys and values into their ring slots, then attention over the whole ring
    ring = tl.load(ring_ptr + t, mask=t < T, other=0)
    at = b * stride_rb + h * stride_rh + ring[:, None] * 2 * HALF + d[None, :]
    tl.store(k_ring_ptr + at, k1, mask=t_ok)
    tl.store(k_ring_ptr + at + HALF, k2, mask=t_ok)
    v = v_ptr + b * stride_vb + t[:, None] * stride_vt + col
    tl.store(v_ring_ptr + at, tl.load(v, mask=t_ok, other=0.0), mask=t_ok)
    tl.store(v_ring_ptr + at + HALF, tl.load(v + HALF, mask=t_ok, other=0.0), mask=t_ok)
    tl.debug_barrier()  # the block's writes above are visible to all its threads below
    top = tl.full([BLOCK_T], -1.0e30, tl.float32)  # finite: a block of masked slots gives exp(-inf) = 0, not NaN
    total = tl.zeros([BLOCK_T], tl.float32)
    acc1 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    base = b * stride_rb + h * stride_rh
    for s0 in range(0, slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < slots
        keys = base + s[None, :] * 2 * HALF + d[:, None]  # [BLOCK_D, BLOCK_S]: the keys transposed
        key_ok = d_ok[:, None] & s_ok[None, :]
        dots = tl.dot(q1, tl.load(k_ring_ptr + keys, mask=key_ok, other=0.0), input_precision=PRECISION)
        dots = tl.dot(q2, tl.load(k_ring_ptr + keys + HALF, mask=key_ok, other=0.0), dots, input_precision=PRECISION)
        row_ok = (t < T)[:, None]
        seen = tl.load(mask_ptr + t[:, None] * slots + s[None, :], mask=row_ok & s_ok[None, :], other=float("-inf"))
        scores = tl.where(row_ok, scale * dots + seen, 0.0)  # [BLOCK_T, BLOCK_S]; padded rows stay finite
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        probs = tl.exp(scores - new_top[:, None])
        shrink = tl.exp(top - new_top)
        total = total * shrink + tl.sum(probs, axis=1)
        values = base + s[:, None] * 2 * HALF + d[None, :]  # [BLOCK_S, BLOCK_D]
        value_ok = s_ok[:, None] & d_ok[None, :]
        acc1 = tl.dot(probs, tl.load(v_ring_ptr + values, mask=value_ok, other=0.0), acc1 * shrink[:, None],
                      input_precision=PRECISION)
        acc2 = tl.dot(probs, tl.load(v_ring_ptr + values + HALF, mask=value_ok, other=0.0), acc2 * shrink[:, None],
                      input_precision=PRECISION)
        top = new_top
    out = out_ptr + b * stride_ob + t[:, None] * stride_ot + col
    tl.store(out, acc1 / total[:, None], mask=t_ok)
    tl.store(out + HALF, acc2 / total[:, None], mask=t_ok)


def mimi_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_ring: Tensor, v_ring: Tensor,
                   ring: Tensor, mask: Tensor, scale: float) -> Tensor:
    """The Mimi transformer's attention for a piece of `T` steps in one kernel: q, k, v `[B, T, H D]` (the
    projections, float32, rows of any stride), RoPE by `cos, sin [T, D]` on q and k as `codec._rotate` rounds it,
    k and v written into ring slots `ring [T]` of `k_ring, v_ring [B, H, slots, D]`, then softmax(scale q k^T +
    mask) v over the whole ring (`mask [T, slots]`: 0 or -inf). The products run as three TF32 products each
    (`tf32x3`, as `matmul_f32`) and the softmax online over blocks of slots: float32-level (~1e-6) against
    `codec._Attention`'s torch ops, whose ~15 kernels a layer (RoPE's, the ring writes, two batched float32 GEMMs
    on the CUDA cores, the softmax, a transposing copy) this replaces. Returns `[B, T, H D]`."""
    b, t, width = q.shape
    heads, slots, d = k_ring.shape[1], k_ring.shape[2], k_ring.shape[3]
    assert width == heads * d and k.shape == v.shape == q.shape and v_ring.shape == k_ring.shape
    assert k_ring.shape[0] == b and t <= slots  # one program per stream and head; distinct slots for the steps
    assert ring.shape == (t,) and ring.is_contiguous()
    assert all(x.dtype == torch.float32 and x.stride(-1) == 1 for x in (q, k, v, cos, sin, k_ring, v_ring, mask))
    assert k_ring.is_contiguous() and v_ring.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    assert cos.shape == sin.shape == (t, d) and mask.shape == (t, slots) and mask.is_contiguous() and d % 2 == 0
    out = torch.empty(b, t, width, dtype=torch.float32, device=q.device)  # [B, T, H D]
    _mimi_attention_kernel[(b * heads,)](
        q, k, v, cos, sin, k_ring, v_ring, ring, mask, out, t, heads, slots, scale, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_ring.stride(0), k_ring.stride(1), out.stride(0),
        out.stride(1), HALF=d // 2, BLOCK_D=max(16, _pow2(d // 2)),
        BLOCK_T=max(16, _pow2(t)), BLOCK_S=64, PRECISION="ieee" if INTERPRET else "tf32x3",
        num_warps=4, enable_fp_fusion=False)  # RoPE rounds as torch
    return out
