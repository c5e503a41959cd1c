"""Where one frame's time goes (CUDA): graphed full step vs its parts, torch ops vs the fused Triton kernels, and
the eager kernel census of one frame. `profile_frame.py fp8`: the same with fp8 weights (fused kernels only).
`profile_frame.py prefill`: a prompt's prefill (graphed per length bucket, as the engine runs it), bf16 and fp8, with
its kernel census, and the backbone over several prompts at once (what batched admission would cost)."""

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


def census(fn, label: str, top: int = 12) -> None:
    """The CUDA kernels one eager call of `fn` launches: their count and time, the `top` slowest by name."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f"{label}: {sum(e.count for e in events)} kernels, {total / 1000:.2f} ms of kernel time")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"{e.self_device_time_total / 1000:8.3f} ms {e.count:5d}x  {e.key[:110]}")


def prefill_profile(model) -> None:
    label = "fp8" if model.fp8 else "bf16"
    stepper = FrameStepper(model, 8)
    columns = model.cfg.num_codebooks + 1
    with torch.no_grad():
        for length in (64, 256, 1024):
            tokens = torch.zeros(1, length, columns, dtype=torch.long, device="cuda")  # [1, L, 33]
            mask = torch.ones(1, length, columns, dtype=torch.bool, device="cuda")
            slots_and_last = torch.tensor([[0], [length - 1]], device="cuda")
            graph = CapturedCall(stepper.prefill_rows, tokens, mask, slots_and_last)
            ms = timed(lambda g=graph, a=(tokens, mask, slots_and_last): g(*a))
            print(f"{label} prefill L={length:5d} graphed {ms:7.2f} ms", flush=True)
        for prompts in (1, 4, 8):
            embeds = torch.randn(prompts, 256, model.cfg.backbone.dim, device="cuda", dtype=torch.bfloat16)
            rows = torch.arange(prompts, device="cuda")
            graph = CapturedCall(lambda e=embeds, r=rows: model.backbone(e, 0, stepper.caches.backbone, r))
            print(f"{label} backbone over {prompts} prompts x 256 rows graphed {timed(graph):7.2f} ms", flush=True)
        census(lambda: stepper.prefill_rows(tokens[:, :256], mask[:, :256], torch.tensor([[0], [255]], device="cuda")),
               f"{label} prefill L=256 eager", top=15)


def main():
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    if sys.argv[1:] == ["prefill"]:
        prefill_profile(model)
        model.to_fp8()
        prefill_profile(model)
        return
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
            stepper = FrameStepper(model, batch, fused=fused)
            census(stepper.step, f"{label}: eager B={batch} frame")


if __name__ == "__main__":
    main()
