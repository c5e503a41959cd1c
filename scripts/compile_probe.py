"""How long a `say` warm-up takes with an empty Triton cache: as csmcli runs it (each kernel compiled at its first
launch, one after another), and after a dry warm-up in which every Triton launch only compiles, on a pool of
threads (Triton's `AsyncCompileMode`). A probe for the next session's decision; csmcli does not do this.

Usage: python3 scripts/compile_probe.py serial|parallel   (random weights, the tests' tokenizer; an empty cache)
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
    from triton.runtime.jit import JITFunction

    sys.path.insert(0, "tests")
    import tiny

    from csmcli.pipeline import Pipeline, choose_preset

    tokenizer = Path(tempfile.mkdtemp())
    tiny.save_tokenizer(tokenizer)
    preset, _ = choose_preset(None, None, {})

    def load() -> Pipeline:
        start = time.perf_counter()
        pipeline = Pipeline.load(None, preset, random_weights=True, tokenizer_path=str(tokenizer))
        torch.cuda.synchronize()
        print(f"{time.perf_counter() - start:7.2f} s  load (random weights)", flush=True)
        return pipeline

    if sys.argv[1] == "parallel":
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime import _async_compile

        dry = load()
        real_run = JITFunction.run

        def compile_only(self, *args, grid, warmup, **kwargs):
            return real_run(self, *args, grid=grid, warmup=True, **kwargs)

        start = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count()) as pool, _async_compile.AsyncCompileMode(pool):
            JITFunction.run = compile_only
            try:
                dry.warmup()
            finally:
                JITFunction.run = real_run
        torch.cuda.synchronize()
        print(f"{time.perf_counter() - start:7.2f} s  dry warm-up, Triton compiling on {os.cpu_count()} threads",
              flush=True)
        del dry
    pipeline = load()
    start = time.perf_counter()
    pipeline.warmup()
    torch.cuda.synchronize()
    print(f"{time.perf_counter() - start:7.2f} s  warm-up ({sys.argv[1]})", flush=True)
    start = time.perf_counter()
    audio = list(pipeline.speak("Hello there.", 0, pipeline_params(), max_seconds=1.0))
    torch.cuda.synchronize()
    print(f"{time.perf_counter() - start:7.2f} s  speak: {len(audio)} chunks", flush=True)


def pipeline_params():
    from csmcli.sampling import SamplingParams

    return SamplingParams(seed=7)


if __name__ == "__main__":
    main()
