"""How long a `say` warm-up takes with an empty Triton cache: with its kernels compiled ahead on threads, as
`Pipeline.warmup` does (`engine.compile_ahead`), or one at a time as each is first launched (`plain`).

Usage: python3 scripts/compile_probe.py ahead|plain   (random weights, the tests' tokenizer, an empty cache)
(The thirtieth session's call c ran this probe's first version, d64854c: a dry run of the whole warm-up.)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-probe-")


def main() -> None:
    import torch

    sys.path.insert(0, "tests")
    import tiny

    from csmcli import engine, pipeline
    from csmcli.sampling import SamplingParams

    if sys.argv[1] == "plain":
        engine.compile_ahead = lambda device, calls: False
    tokenizer = Path(tempfile.mkdtemp())
    tiny.save_tokenizer(tokenizer)
    preset, _ = pipeline.choose_preset(None, None, {})
    start = time.perf_counter()
    p = pipeline.Pipeline.load(None, preset, random_weights=True, tokenizer_path=str(tokenizer))
    torch.cuda.synchronize()
    print(f"{time.perf_counter() - start:7.2f} s  load (random weights)", flush=True)
    start = time.perf_counter()
    p.warmup()
    torch.cuda.synchronize()
    print(f"{time.perf_counter() - start:7.2f} s  warm-up ({sys.argv[1]})", flush=True)
    start = time.perf_counter()
    chunks = list(p.speak("Hello there.", 0, SamplingParams(seed=7), max_seconds=1.0))
    print(f"{time.perf_counter() - start:7.2f} s  speak: {len(chunks)} chunks", flush=True)


if __name__ == "__main__":
    main()
