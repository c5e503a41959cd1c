"""Diagnose graph-vs-eager code differences at batch 8: is eager itself deterministic, and which SDPA backend?"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from csmcli.checkpoint import random_model
from csmcli.engine import Engine, Request
from csmcli.model import CSM_1B
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams


def run(model, graphs, backends=None, n=8, frames=24):
    reqs = [Request(synthetic_prompt(17 + 13 * i, seed=i), SamplingParams(0.0), frames) for i in range(n)]
    engine = Engine(model, max_batch=n, cuda_graphs=graphs)
    out = {r.id: [] for r in reqs}
    ctx = sdpa_kernel(backends) if backends else torch.enable_grad()
    with ctx:
        for r, c in engine.generate(reqs, 2, 4):
            out[r.id].append(c.codes)
    return [torch.cat(out[r.id]) for r in reqs]


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        rows = (x != y).any(-1).nonzero()
        if len(rows):
            return f"slot {i} frame {int(rows[0])}"
    return "identical"


model = random_model(CSM_1B, "cuda", torch.bfloat16, seed=1)
e1, e2 = run(model, False), run(model, False)
g1, g2 = run(model, True), run(model, True)
print("eager vs eager:", first_diff(e1, e2))
print("graph vs graph:", first_diff(g1, g2))
print("eager vs graph:", first_diff(e1, g1))
for name, be in [("math", [SDPBackend.MATH]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION])]:
    try:
        a, b = run(model, False, be), run(model, True, be)
        print(f"{name}: eager vs graph:", first_diff(a, b))
    except Exception as ex:
        print(name, "failed:", type(ex).__name__, str(ex)[:200])
