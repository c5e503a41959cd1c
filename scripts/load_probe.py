"""Where loading a checkpoint onto the GPU goes (scripts/device_run.sh step `loadprobe`): the loader's parts, and ways
of moving a float32 safetensors file's tensors to the GPU in bf16, each timed with the file in the page cache.

Usage: python3 scripts/load_probe.py CHECKPOINT_DIR
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(what: str, fn, repeat: int = 2):
    for i in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        print(f"{time.perf_counter() - start:7.2f} s  {what}{' (again)' if i else ''}", flush=True)
    return out


def main() -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from csmcli import checkpoint
    from csmcli.model import Csm

    directory = Path(sys.argv[1])
    f = directory / "model.safetensors"
    cuda = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: to try the script
    torch.zeros(1, device=cuda)

    def read_all() -> None:
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass

    timed("read the file into memory (the second time from the page cache)", read_all)

    def per_tensor(device: str, pin: bool = False):
        with safe_open(str(f), framework="pt", device=device) as h:
            for k in h.keys():  # noqa: SIM118 - safe_open is not iterable
                t = h.get_tensor(k)
                if pin and cuda.type == "cuda":
                    t = t.pin_memory()
                t = t.to(cuda, non_blocking=pin).to(torch.bfloat16)

    timed("safe_open cpu, get_tensor, .to(cuda), cast", lambda: per_tensor("cpu"))
    timed("safe_open cpu, get_tensor, pin, .to(cuda), cast", lambda: per_tensor("cpu", pin=True))
    timed("safe_open cuda:0, get_tensor, cast", lambda: per_tensor(str(cuda)))
    timed("load_file cpu, then each .to(cuda), cast",
          lambda: [t.to(cuda).to(torch.bfloat16) for t in load_file(str(f)).values()])
    timed("load_file device=cuda:0, cast", lambda: [t.to(torch.bfloat16) for t in load_file(str(f), device=str(cuda))
                                                    .values()])

    def on_meta() -> None:
        with torch.device("meta"):
            Csm(checkpoint.CSM_1B)

    timed("Csm(CSM_1B) on meta", on_meta)
    timed("tokenizer", lambda: checkpoint.load_tokenizer(directory))
    timed("checkpoint.load (csmcli's loader, all of it)",
          lambda: checkpoint.load(str(directory), device=cuda, dtype=torch.bfloat16))
    profile = cProfile.Profile()
    profile.enable()
    checkpoint.load(str(directory), device=cuda, dtype=torch.bfloat16)
    sync()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
