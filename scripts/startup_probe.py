"""Where `say`'s start-up goes, phase by phase, as `Pipeline.load` + `Pipeline.warmup` run it (scripts/device_run.sh
step `startup`, after the cold and warm `say` runs; run it with an empty TRITON_CACHE_DIR to see compile times).

Usage: python3 scripts/startup_probe.py CHECKPOINT_DIR
"""

from __future__ import annotations

import sys
import time

T0 = time.perf_counter()


def report_first_dynamo_import() -> None:
    """Print where torch._dynamo is first imported (~1.3 s of a start-up when it is)."""
    import builtins
    import traceback

    real = builtins.__import__

    def watch(name, *args, **kwargs):
        if name.startswith("torch._dynamo") and "torch._dynamo" not in sys.modules:
            builtins.__import__ = real
            print("torch._dynamo first imported from:", flush=True)
            traceback.print_stack(limit=12, file=sys.stdout)
        return real(name, *args, **kwargs)

    builtins.__import__ = watch


def main() -> None:
    report_first_dynamo_import()
    last = T0

    def mark(what: str) -> None:
        nonlocal last
        now = time.perf_counter()
        print(f"{now - last:7.2f} s  {what}", flush=True)
        last = now

    import torch

    mark("import torch")
    from csmcli.engine import chunk_sizes
    from csmcli.pipeline import Pipeline, choose_preset, load_codec, pick_device

    mark("import csmcli (triton)")
    preset, _ = choose_preset(None, None, {})
    device = pick_device(None, preset)
    torch.zeros(1, device=device)
    mark(f"CUDA context, preset {preset.name}")
    from csmcli.checkpoint import load

    ck = load(sys.argv[1], device=device, dtype=getattr(torch, preset.dtype))
    torch.cuda.synchronize()
    mark("checkpoint: weights to the GPU, tokenizer")
    codec = load_codec(ck, None, device)
    print("transformers imported:", "transformers" in sys.modules, flush=True)
    mark("Mimi codec")
    pipeline = Pipeline(ck, codec, preset, device)
    torch.cuda.synchronize()
    mark("Engine and ChunkDecoder built (weights prepared, caches allocated)")
    engine = pipeline.engine
    engine._warm_admission()
    torch.cuda.synchronize()
    mark("one admission (its prefill graph captured)")
    engine.warmup()
    torch.cuda.synchronize()
    mark(f"frame graphs for buckets {engine.buckets}")
    pipeline.prepare([], 0, "Hello there from a probe.")
    torch.cuda.synchronize()
    mark("Pipeline.prepare: the first prompt's prefill graph")
    sizes = chunk_sizes(preset.first_chunk_frames, preset.chunk_frames)
    pipeline.decoder.warmup(sizes)
    torch.cuda.synchronize()
    mark(f"Mimi graphs for chunk sizes {sorted(set(sizes) | {1})}")
    print(f"{time.perf_counter() - T0:7.2f} s  in all (after the interpreter's start); torch._dynamo imported: "
          f"{'torch._dynamo' in sys.modules}", flush=True)
    engine._capture_prefills()
    torch.cuda.synchronize()
    mark(f"beyond a start-up: every other prefill graph ({len(engine._prefill_graphs)} in all)")


if __name__ == "__main__":
    main()
