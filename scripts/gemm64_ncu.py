"""Driver for Nsight Compute: the hand-written 64-row products (scripts/gemm64_source.py) and the Triton tiles on
the decoder's gate/up, down and qkv shapes, each launched once on a fresh weight copy between
cudaProfilerStart/Stop (scripts/device_run.sh gemm64ncu)."""

import sys

import torch

sys.path.insert(0, "scripts")
from gemm64_probe import Gemm, WgmmaGemm

from csmcli import kernels

CASES = (("gate/up", 8192, 1024, True, False, dict(wn=4, wk=2, split=1, depth=2)),
         ("down", 1024, 8192, False, True, dict(wn=2, wk=4, split=8, depth=3)),
         ("qkv", 1536, 1024, False, False, dict(wn=2, wk=4, split=4, depth=1)))
if "wgmma" in sys.argv[1:]:
    CASES = (("gate/up", 8192, 1024, True, False, dict(kind=WgmmaGemm, bn=128, stages=4, tiled=True, x_mode=1)),)

for label, n, k, gated, residual, config in CASES:
    rows = 2 * n if gated else n
    weights = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(4)]
    x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(64, n, device="cuda", dtype=torch.bfloat16) if residual else None
    kind = config.pop("kind", Gemm)
    gemm = kind(n, k, gated=gated, residual=residual, **config)
    gemm(x, weights[0], res)
    gemm(x, weights[2], res)  # a tiled build lays the weight out here, outside the profiled range
    kernels.linear(x, weights[1], residual=res, gated=gated, batch=64)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    gemm(x, weights[2], res)
    kernels.linear(x, weights[3], residual=res, gated=gated, batch=64)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(label, "done", flush=True)
