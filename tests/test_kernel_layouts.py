"""The batched products compiled for Hopper (sm_90; on the CPU, no GPU needed): the row count must not change how
any of them adds numbers up.

An engine of 64 slots with one busy slot replays its 1-row frame graph with the 64-row block sizes, and that slot
must draw the same codes as in a full batch (tests/test_engine_cuda.py checks it on a GPU). Block sizes follow the
engine, but Triton also compiles every int argument equal to 1 as a constant, so with one row M is a constant: a
load whose address uses M as a stride can get another register layout, and a reduction over it another order of
additions. That happened to the rows' sums of squares stored `[parts, M]` (the GPU test failed); stored `[M, parts]`,
M is no stride. Here each product the engine runs at 64 rows is compiled as Triton specializes it for 64 rows and
for one, and the layouts of its values and of every reduction's input must be the same."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from csmcli import kernels
from csmcli.model import CSM_1B

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "launch_pdl")


class Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def ttgir(fn, args, kwargs) -> str:
    """`fn` compiled for sm_90 with the arguments of one launch, specialized as Triton's launcher specializes them:
    an int equal to 1 becomes a constant, ints and pointers divisible by 16 are marked so."""
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, value) in enumerate(zip(fn.arg_names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and value == 1:
            signature[name] = "constexpr"
            constexprs[(index,)] = value
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    for index, name in enumerate(fn.arg_names[len(args):], start=len(args)):
        signature[name] = "constexpr"
        constexprs[(index,)] = kwargs[name]
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS[:2]}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton_compile(source, options)


def triton_compile(source, options) -> str:
    import triton

    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ttgir"]


def layouts(ir: str) -> tuple[list[str], list[list[str]]]:
    """Every layout the kernel uses, and the layouts of each reduction's operands (names resolved)."""
    definitions = dict(re.findall(r"(#[\w]+) = (#ttg\.[a-z_]+<[^>]*>)", ir))
    lines = ir.splitlines()
    reductions = []
    for i, line in enumerate(lines):
        if '"tt.reduce"' in line:  # the operand's type closes the op's region a few lines on
            types = re.findall(r"tensor<[^>]*?(#\w+)>", "\n".join(lines[i : i + 8]))
            reductions.append([definitions.get(t, t) for t in types])
    return sorted(set(definitions.values())), reductions


def engine_products(rows: int) -> list[tuple[object, tuple, dict]]:
    """The launches of every 64-slot engine product that makes or takes rows' sums of squares, at `rows` rows, as
    `model.Block.step` and the codebook heads call them (CSM-1B's shapes; nothing runs)."""
    recorders = {name: Recorder(getattr(kernels, name)) for name in ("_linear_kernel", "_split_k_sum_kernel")}
    for name, recorder in recorders.items():
        setattr(kernels, name, recorder)
    try:
        bf16 = dict(dtype=torch.bfloat16)
        for cfg in (CSM_1B.backbone, CSM_1B.decoder):
            dim, inner, attended_dim = cfg.dim, cfg.intermediate_size, cfg.n_heads * cfg.head_dim
            qkv_rows = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
            x, attended = torch.empty(rows, dim, **bf16), torch.empty(rows, attended_dim, **bf16)
            x, squares = kernels.linear_with_squares(attended, torch.empty(dim, attended_dim, **bf16), residual=x,
                                                     batch=64)
            hidden = kernels.linear(x, torch.empty(2 * inner, dim, **bf16), norm_folded=True, eps=1e-5,
                                    squares=squares, gated=True, batch=64)
            x, squares = kernels.linear_with_squares(hidden, torch.empty(dim, inner, **bf16), residual=x, batch=64)
            kernels.linear(x, torch.empty(qkv_rows, dim, **bf16), norm_folded=True, eps=1e-5, squares=squares,
                           batch=64)
            if cfg is CSM_1B.decoder:  # a codebook head, on the decoder's last rows
                head = torch.empty(CSM_1B.audio_vocab_size, dim, **bf16)
                kernels.linear(x, head, norm_folded=True, eps=1e-5, squares=squares, batch=64)
    finally:
        for name, recorder in recorders.items():
            setattr(kernels, name, recorder.fn)
    return [(recorder.fn, args, kwargs) for recorder in recorders.values() for args, kwargs in recorder.launches]


def check_layouts() -> None:
    full, alone = engine_products(64), engine_products(1)
    assert len(full) == len(alone)
    # squares taken by gate/up and QKV of both transformers and by the head; made by their output and down
    # projections (by the split-K sum where the product is split)
    assert sum(bool(kwargs.get("PARTS_IN")) for _, _, kwargs in full) == 5
    assert sum(bool(kwargs.get("SQUARES_OUT")) for _, _, kwargs in full) == 4
    compiled: dict = {}

    def compiled_layouts(fn, args, kwargs):
        key = (fn.fn.__name__, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args),
               tuple(sorted(kwargs.items())))
        if key not in compiled:
            compiled[key] = layouts(ttgir(fn, args, kwargs))
        return compiled[key]

    for (fn, args_full, kwargs_full), (_, args_alone, kwargs_alone) in zip(full, alone, strict=True):
        assert kwargs_full == kwargs_alone  # the same block sizes: they follow the engine's 64 slots
        assert args_alone[fn.arg_names.index("M")] == 1 and args_full[fn.arg_names.index("M")] == 64
        assert compiled_layouts(fn, args_full, kwargs_full) == compiled_layouts(fn, args_alone, kwargs_full), \
            (fn.fn.__name__, kwargs_full)


def test_no_product_adds_up_differently_for_one_row():
    if kernels.INTERPRET:  # the interpreter's kernels cannot be compiled: check in a process without it
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0 and done.stdout.strip().endswith("same layouts"), done.stdout + done.stderr
        return
    check_layouts()


if __name__ == "__main__":
    check_layouts()
    print("same layouts")
