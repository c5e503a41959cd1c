"""A 64-slot (and 128-, 256-slot) engine's frame step compiled for Hopper (sm_90; on the CPU, no GPU needed): the
number of busy slots must not change how any kernel adds numbers up.

An engine of 64 slots with one busy slot replays its 1-row frame graph with the 64-row block sizes, and that slot
must draw the same codes as in a full batch (tests/test_engine_cuda.py checks it on a GPU). Block sizes follow the
engine, but Triton also compiles every int argument equal to 1 as a constant, so with one row M is a constant: a
load whose address uses M as a stride can get another register layout, and a reduction over it another order of
additions. That happened to the rows' sums of squares stored `[parts, M]` (the GPU test failed); stored `[M, parts]`,
M is no stride. Here every kernel launch of a full-size frame step (a CSM-1B on the meta device: nothing runs) is
compiled as Triton specializes it for all the engine's rows and for one, and the layouts of its values and of every
reduction's input must be the same."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from csmcli import kernels
from csmcli.generate import FrameStepper
from csmcli.model import CSM_1B, Csm

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32"}
COMPILE_OPTIONS = ("num_warps", "num_stages")  # of a launch's keywords; the rest are the kernel's constexprs


class Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` appends the launch to `launches` instead of
    running it."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def kind(value) -> str:
    """What Triton's launcher compiles a non-constexpr argument as: a pointer of its dtype (aligned), an int equal
    to 1 as a constant, an int divisible by 16 marked so, other ints and floats plain."""
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, int):
        return "one" if value == 1 else "i32, 16 | it" if value % 16 == 0 else "i32"
    return "fp32"


def specialization(args: tuple) -> tuple:
    """A launch's arguments as Triton compiles them: launches with equal specializations share one kernel."""
    return tuple(kind(a) for a in args)


def ttgir(fn, args, kwargs) -> str:
    """`fn` compiled for sm_90 with the arguments of one launch, specialized as `kind` says."""
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, value) in enumerate(zip(fn.arg_names, args, strict=False)):
        compiled_as = kind(value)
        if compiled_as == "one":
            signature[name], constexprs[(index,)] = "constexpr", 1
            continue
        signature[name] = "i32" if compiled_as.startswith("i32") else compiled_as
        if isinstance(value, torch.Tensor) or compiled_as == "i32, 16 | it":
            attrs[(index,)] = [["tt.divisibility", 16]]
    for index, name in enumerate(fn.arg_names[len(args):], start=len(args)):
        signature[name], constexprs[(index,)] = "constexpr", kwargs[name]
    options = {k: v for k, v in kwargs.items() if k in COMPILE_OPTIONS}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
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


def check_layouts(slots: int) -> None:
    with torch.device("meta"):
        model = Csm(CSM_1B).to(torch.bfloat16)
    stepper = FrameStepper(model, slots, fused=True)
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
            # the squares path is in the frame exactly when shared
            assert any(kwargs.get("PARTS_IN") for _, _, kwargs in full) == share
            apart = 0
            for (fn, args_full, kwargs_full), (_, args_alone, kwargs_alone) in zip(full, alone, strict=True):
                assert kwargs_full == kwargs_alone  # the same block sizes: they follow the engine's slots
                if specialization(args_full) == specialization(args_alone):
                    continue  # compiled as one kernel
                apart += 1
                assert compiled_layouts(fn, args_full, kwargs_full) == compiled_layouts(fn, args_alone, kwargs_full), \
                    (fn.fn.__name__, kwargs_full)
            assert apart > 0  # one row does compile apart (M == 1)
    finally:
        kernels.SHARE_SQUARES = shared


@pytest.mark.parametrize("slots", [64, 128, 256])  # the 64-, 128- and 256-row tables
def test_one_busy_slot_adds_up_as_a_full_batch(slots):
    if kernels.INTERPRET:  # the interpreter's kernels cannot be compiled: check in a process without it
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        done = subprocess.run([sys.executable, __file__, str(slots)], env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0 and done.stdout.strip().endswith("same layouts"), done.stdout + done.stderr
        return
    check_layouts(slots)


if __name__ == "__main__":
    check_layouts(int(sys.argv[1]))
    print("same layouts")
