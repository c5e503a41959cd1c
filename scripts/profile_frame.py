"""Where one frame's time goes (CUDA): graphed full step vs its parts, torch ops vs the fused Triton kernels, and
the eager kernel census of one frame. `profile_frame.py fp8`: the same with fp8 weights (fused kernels only)."""

import sys

import torch

from csmcli.checkpoint import random_model
from csmcli.engine import CapturedCall
from csmcli.generate import FrameStepper
from csmcli.model import CSM_1B
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams


def timed(fn, n=50):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def census(stepper: FrameStepper, label: str) -> None:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        stepper.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"{label}: eager B={stepper.max_batch} frame {count} kernels, {total / 1000:.2f} ms of kernel time")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"{e.self_device_time_total / 1000:8.3f} ms {e.count:5d}x  {e.key[:90]}")


def main():
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    fp8 = sys.argv[1:] == ["fp8"]  # the layers' weights in fp8 (`--fp8`): fused kernels only
    if fp8:
        model.to_fp8()
    for fused in (True,) if fp8 else (False, True):
        label = ("fused fp8" if fp8 else "fused kernels") if fused else "torch ops"
        for batch in (1, 16, 64):
            stepper = FrameStepper(model, batch, fused=fused)
            for slot in range(batch):
                stepper.prefill(slot, synthetic_prompt(200, slot), SamplingParams(0.9, 50, seed=slot))
            parts = {"full frame step": stepper.step, "depth decoder + sampling": stepper.decode,
                     "backbone step": lambda s=stepper: s.advance(s.codes)}
            with torch.no_grad():
                for name, fn in parts.items():
                    graph = CapturedCall(fn)
                    print(f"{label:13s} B={batch:>3} {name:26s} graphed {timed(graph):7.2f} ms", flush=True)
        for batch in (1, 64) if fused else (1,):
            census(FrameStepper(model, batch, fused=fused), label)


if __name__ == "__main__":
    main()
