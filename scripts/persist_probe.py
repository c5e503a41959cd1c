"""Probe (CUDA): would a persistent kernel (programs that wait for each other on a grid barrier) beat a chain of
small kernels at 64 rows?

  census   one eager frame at 64 rows without PDL: every kernel's time grouped by kernel and grid (its shape), so
           each product's microseconds can be set against its bytes;
  barrier  a persistent Triton kernel of P programs crossing R grid barriers (an atomic arrival count, the last
           arrival bumps a generation the others spin on): microseconds per barrier, against a graph of R tiny
           kernels chained with PDL (microseconds per kernel boundary).

Usage: persist_probe.py [census] [barrier]   (default both)
"""

import collections
import json
import os
import sys
import tempfile

import torch
import triton
import triton.language as tl
from layer_probe import graph_ms  # scripts/ is on the path when a script there runs


def census(rows: int = 64) -> None:
    from csmcli import kernels
    from csmcli.checkpoint import random_model
    from csmcli.generate import FrameStepper
    from csmcli.model import CSM_1B
    from csmcli.prompt import synthetic_prompt
    from csmcli.sampling import SamplingParams

    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    stepper = FrameStepper(model, rows, fused=True)
    for slot in range(rows):
        stepper.prefill(slot, synthetic_prompt(200, slot), SamplingParams(0.9, 50, seed=slot))
    for pdl in (False, True):
        kernels.pdl_allowed = pdl
        with torch.no_grad():
            stepper.step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                stepper.step()
                torch.cuda.synchronize()
        path = os.path.join(tempfile.mkdtemp(), "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
        groups = collections.defaultdict(list)
        for e in events:
            args = e.get("args", {})
            groups[(e["name"][:40], tuple(args.get("grid", ())), tuple(args.get("block", ())))].append(e["dur"])
        total = sum(e["dur"] for e in events)
        span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
        print(f"census rows={rows} pdl={pdl}: {len(events)} kernels, {total / 1000:.3f} ms kernel time, "
              f"{span / 1000:.3f} ms span")
        for (name, grid, block), durs in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:24]:
            durs.sort()
            print(f"  {sum(durs) / 1000:7.3f} ms {len(durs):5d}x  median {durs[len(durs) // 2]:6.2f} us  "
                  f"min {durs[0]:6.2f}  {name} grid={grid} block={block}")
    kernels.pdl_allowed = True


@triton.jit
def _grid_barrier(count_ptr, gen_ptr, programs):
    """Every program waits here until all `programs` have arrived; counters set themselves back."""
    tl.debug_barrier()
    gen = tl.atomic_add(gen_ptr, 0, sem="acquire", scope="gpu")
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == programs - 1:
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(gen_ptr, 1, sem="release", scope="gpu")
    else:
        while tl.atomic_add(gen_ptr, 0, sem="acquire", scope="gpu") == gen:
            pass
    tl.debug_barrier()


@triton.jit
def _barrier_kernel(count_ptr, gen_ptr, data_ptr, rounds, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    for _ in range(rounds):
        # each round reads what another program wrote in the round before: the barrier must order it
        src = data_ptr + ((pid + 1) % programs) * BLOCK + offs
        v = tl.load(src, cache_modifier=".cg")
        _grid_barrier(count_ptr, gen_ptr, programs)
        tl.store(data_ptr + pid * BLOCK + offs, v + 1)
        _grid_barrier(count_ptr, gen_ptr, programs)


@triton.jit
def _tiny_kernel(data_ptr, BLOCK: tl.constexpr):
    tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    v = tl.load(data_ptr + ((pid + 1) % tl.num_programs(0)) * BLOCK + offs)
    tl.extra.cuda.gdc_launch_dependents()
    tl.store(data_ptr + pid * BLOCK + offs, v + 1)


def barrier() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block = 128
    rounds = chain = 200
    counters = torch.zeros(2, dtype=torch.int32, device="cuda")
    for programs in (64, 128, sms):
        for warps in (4, 8):
            data = torch.zeros(programs, block, dtype=torch.float32, device="cuda")
            us = 1000 * graph_ms(lambda p=programs, d=data, w=warps: _barrier_kernel[(p,)](
                counters[0:1], counters[1:2], d, rounds, BLOCK=block, num_warps=w))
            ok = bool((data == data[0, 0]).all())
            print(f"barrier: {programs:4d} programs {warps} warps: {us / (2 * rounds):6.2f} us per barrier "
                  f"(counts agree: {ok})", flush=True)
            us = 1000 * graph_ms(lambda p=programs, d=data, w=warps: [
                _tiny_kernel[(p,)](d, BLOCK=block, num_warps=w, launch_pdl=True) for _ in range(chain)])
            print(f"chain:   {programs:4d} programs {warps} warps: {us / chain:6.2f} us per PDL kernel", flush=True)


def main() -> None:
    modes = sys.argv[1:] or ["census", "barrier"]
    if "barrier" in modes:
        barrier()
    if "census" in modes:
        census()


if __name__ == "__main__":
    main()
