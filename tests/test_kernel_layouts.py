"""A 64-slot engine's frame step compiled for Hopper (sm_90; on the CPU, no GPU needed): the number of busy slots
must not change how any kernel adds numbers up.

An engine of 64 slots with one busy slot replays its 1-row frame graph with the 64-row block sizes, and that slot
must draw the same codes as in a full batch (tests/test_engine_cuda.py checks it on a GPU). Block sizes follow the
engine, but Triton also compiles every int argument equal to 1 as a constant, so with one row M is a constant: a
load whose address uses M as a stride can get another register layout, and a reduction over it another order of
additions. That happened to the rows' sums of squares stored `[parts, M]` (the GPU test failed); stored `[M, parts]`,
M is no stride. Here every kernel launch of a full-size frame step (a CSM-1B on the meta device: nothing runs) is
compiled as Triton specializes it for 64 rows and for one, and the layouts of its values and of every reduction's
input must be the same."""

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
from csmcli.generate import FrameStepper
from csmcli.model import CSM_1B, Csm

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "launch_pdl")


class Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` appends the launch to `launches` instead of
    running it."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


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


def frame_launches(stepper: FrameStepper, rows: int | None) -> list[tuple[object, tuple, dict]]:
    """Every kernel launch of `stepper.step(rows)`, recorded instead of run."""
    launches: list[tuple[object, tuple, dict]] = []
    originals = {name: getattr(kernels, name) for name in dir(kernels) if name.startswith("_")
                 and name.endswith("_kernel")}
    for name, fn in originals.items():
        setattr(kernels, name, Recorder(fn, launches))
    try:
        stepper.step(rows)
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
    return launches


def specialization(args: tuple) -> tuple:
    """What Triton compiles a launch's non-constexpr arguments as: dtypes, ints equal to 1, ints divisible by 16."""

    def kind(value):
        if isinstance(value, torch.Tensor):
            return str(value.dtype)
        if isinstance(value, int):
            return "one" if value == 1 else "int, 16 | it" if value % 16 == 0 else "int"
        return "fp32"

    return tuple(kind(a) for a in args)


def check_layouts() -> None:
    with torch.device("meta"):
        model = Csm(CSM_1B).to(torch.bfloat16)
    stepper = FrameStepper(model, 64, fused=True)
    compiled: dict = {}

    def compiled_layouts(fn, args, kwargs):
        key = (fn.fn.__name__, specialization(args), tuple(sorted(kwargs.items())))
        if key not in compiled:
            compiled[key] = layouts(ttgir(fn, args, kwargs))
        return compiled[key]

    shared = kernels.SHARE_SQUARES
    try:
        for share in (False, True):
            kernels.SHARE_SQUARES = share
            with torch.no_grad():
                full, alone = frame_launches(stepper, None), frame_launches(stepper, 1)
            assert len(full) == len(alone) > 900  # a frame: the backbone's step and 32 depth-decoder steps
            # with the squares shared, 5 products a layer step take or make them (per transformer: 2 take, 2 make)
            assert any(kwargs.get("PARTS_IN") for _, _, kwargs in full) == share
            apart = 0
            for (fn, args_full, kwargs_full), (_, args_alone, kwargs_alone) in zip(full, alone, strict=True):
                assert kwargs_full == kwargs_alone  # the same block sizes: they follow the engine's 64 slots
                if specialization(args_full) == specialization(args_alone):
                    continue  # compiled as one kernel
                apart += 1
                assert compiled_layouts(fn, args_full, kwargs_full) == compiled_layouts(fn, args_alone, kwargs_full), \
                    (fn.fn.__name__, kwargs_full)
            assert apart > 0  # one row does compile apart (M == 1)
    finally:
        kernels.SHARE_SQUARES = shared


def test_one_busy_slot_adds_up_as_a_full_batch():
    if kernels.INTERPRET:  # the interpreter's kernels cannot be compiled: check in a process without it
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0 and done.stdout.strip().endswith("same layouts"), done.stdout + done.stderr
        return
    check_layouts()


if __name__ == "__main__":
    check_layouts()
    print("same layouts")
