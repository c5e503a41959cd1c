"""Probe (CUDA, for Nsight Compute): one 64-row depth-decoder layer step, one codebook head and draw, and one
64-row backbone layer step, exactly as the frame step launches them, between cudaProfilerStart / Stop, so

  ncu --profile-from-start off --clock-control none --set full python3 scripts/ncu_probe.py

reports only those kernels (stall reasons, achieved bandwidth, occupancy). Everything before Start (model, stepper,
Triton compiles) runs once unprofiled.

Usage: ncu_probe.py [ROWS]   (default 64)
"""

import sys

import torch

from csmcli.checkpoint import random_model
from csmcli.generate import FrameStepper
from csmcli.model import CSM_1B


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    stepper = FrameStepper(model, rows, fused=True)
    dec, backbone = model.decoder, model.backbone
    x_dec = torch.randn(rows, dec.cfg.dim, device="cuda", dtype=torch.bfloat16)
    x_bb = torch.randn(rows, backbone.cfg.dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.full((rows,), 260, device="cuda", dtype=torch.long)
    sampling = stepper.frame_sampling()

    def work():
        from csmcli import kernels

        y, squares = dec.layers[0].step(x_dec, dec.rope_cos, dec.rope_sin, 20, stepper.caches.decoder[0], rows)
        logits = kernels.linear(y, stepper.audio_head_rows[19], norm=None if stepper.heads_folded else dec.norm.weight,
                                norm_folded=stepper.heads_folded, eps=dec.norm.eps, squares=squares, batch=rows)
        kernels.sample(logits, sampling.temperature, sampling.kth, sampling.gumbel[:, 20], stepper.code_inputs,
                       20 * model.cfg.audio_vocab_size)
        backbone.layers[0].step(x_bb, backbone.rope_cos, backbone.rope_sin, positions, stepper.caches.backbone[0], rows)

    with torch.no_grad():
        work()  # compiles
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        work()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print("profiled one decoder layer step, a head and draw, one backbone layer step at", rows, "rows")


if __name__ == "__main__":
    main()
