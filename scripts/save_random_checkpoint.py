"""Write a full-size CSM-1B checkpoint with random weights in the HF layout (`model.safetensors` with the Mimi codec
under `codec_model.*`, `config.json`, the tests' tiny tokenizer), so that `csmcli say --model DIR` can be timed from
a cold start through the same loader a real download goes through (scripts/device_run.sh step `startup`).

Usage: python3 scripts/save_random_checkpoint.py DIR [float32|bfloat16]   (default float32)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from csmcli.checkpoint import CSM_1B, hf_config, hf_state_dict, random_model
from csmcli.pipeline import random_mimi


def main() -> None:
    import tiny

    directory = Path(sys.argv[1])
    dtype = getattr(torch, sys.argv[2] if len(sys.argv) > 2 else "float32")
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(CSM_1B, device, dtype)
    mimi = random_mimi()
    # copies: the two audio embeddings share one tensor, which safetensors refuses to write twice
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in hf_state_dict(model).items()}
    tensors |= {f"codec_model.{name}": t.contiguous() for name, t in mimi.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    hf_config(CSM_1B, codec_config=mimi.config.to_dict()).save_pretrained(str(directory))
    tiny.save_tokenizer(directory)
    size = (directory / "model.safetensors").stat().st_size
    print(f"{directory}: {len(tensors)} tensors, {size / 1e9:.2f} GB ({dtype}), {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
