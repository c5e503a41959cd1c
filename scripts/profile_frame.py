"""Where one frame's time goes (CUDA): graphed full step vs its parts, and the eager kernel census."""

import torch

from csmcli.checkpoint import random_model
from csmcli.engine import CapturedCall
from csmcli.generate import FrameStepper
from csmcli.model import CSM_1B
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams, sample


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


def frame_parts(stepper: FrameStepper) -> dict:
    """The whole step and its two halves, each a callable that can be captured as a graph."""
    m = stepper.model

    def depth_decoder():
        settings = stepper.frame_sampling()
        return m.decode_frame(stepper.hidden, lambda logits, codebook: sample(logits, settings, codebook),
                              stepper.caches.decoder)

    def backbone():
        positions = stepper.positions[:, None].clamp(max=2000)
        return m.backbone(m.embed_frame(stepper.codes), positions, stepper.caches.backbone)

    return {"full frame step": stepper.step, "depth decoder + sampling (31 steps)": depth_decoder,
            "backbone step": backbone}


def main():
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    for batch in (1, 16):
        stepper = FrameStepper(model, batch)
        for slot in range(batch):
            stepper.prefill(slot, synthetic_prompt(200, slot), SamplingParams(0.9, 50, seed=slot))
        for name, fn in frame_parts(stepper).items():
            with torch.inference_mode():
                graph = CapturedCall(fn)
                print(f"B={batch:>3} {name:40s} graphed {timed(graph):7.2f} ms")
        with torch.inference_mode():
            print(f"B={batch:>3} {'full frame step':40s} eager   {timed(stepper.step, 10):7.2f} ms")
    stepper = FrameStepper(model, 1)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        stepper.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"eager B=1: {count} kernels, {total / 1000:.2f} ms of kernel time")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"{e.self_device_time_total / 1000:8.3f} ms {e.count:5d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
