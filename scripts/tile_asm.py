"""Which instructions the batched matmul tiles compile to (CUDA): Hopper's asynchronous tensor-core path (`wgmma`,
fed by TMA or `cp.async`) or the older synchronous `mma.sync`. Compiles `kernels.linear` for the 16- and 64-row
configs of the decoder's matmuls, with and without the fused RMSNorm, into a fresh Triton cache and counts the
telling instructions in each kernel's PTX. Decides what a faster 64-row tile needs (docs/BENCHMARKS.md)."""

import os
import pathlib
import re
import tempfile

cache = pathlib.Path(tempfile.mkdtemp(prefix="csmcli-tile-asm-"))
os.environ["TRITON_CACHE_DIR"] = str(cache)  # before Triton is imported: every kernel compiled below lands here

import torch  # noqa: E402

from csmcli import kernels  # noqa: E402

CASES = {  # name: (rows, N, K, gated, norm)
    "dec qkv + norm": (64, 1536, 1024, False, True),
    "dec o": (64, 1024, 1024, False, False),
    "dec w13 + norm": (64, 8192, 1024, True, True),
    "dec w13 plain": (64, 8192, 1024, True, False),
    "dec w13 + norm, 16 rows": (16, 8192, 1024, True, True),
}
PATTERNS = {"wgmma": r"\bwgmma\.mma_async", "mma.sync": r"\bmma\.sync", "cp.async": r"\bcp\.async\.(ca|cg)",
            "TMA": r"\bcp\.async\.bulk\.tensor", "ldmatrix": r"\bldmatrix"}


def main() -> None:
    dev, bf = "cuda", torch.bfloat16
    for name, (rows, n, k, gated, norm) in CASES.items():
        before = set(cache.rglob("*.ptx"))
        weight = torch.randn(2 * n if gated else n, k, device=dev, dtype=bf)
        x = torch.randn(rows, k, device=dev, dtype=bf)
        norm_weight = torch.ones(k, device=dev, dtype=bf) if norm else None
        kernels.linear(x, weight, norm=norm_weight, eps=1e-5, gated=gated)
        torch.cuda.synchronize()
        config = kernels.linear_config(rows, n, k, gated)
        for ptx in sorted(set(cache.rglob("*.ptx")) - before):
            text = ptx.read_text()
            counts = ", ".join(f"{label} {len(re.findall(p, text))}" for label, p in PATTERNS.items())
            print(f"{name:26s} {config!s:24s} {ptx.stem[:24]:24s} {counts}", flush=True)


if __name__ == "__main__":
    main()
