"""Where a 64-stream rep's time outside the frame steps goes (CUDA): the Mimi decode of a chunk (graphed, as the
bench runs it; its eager kernel census; cuDNN autotuning and a bf16 decoder transformer as what-ifs), and the
admission of 64 prompts (wall time against the prefill graphs' own GPU time: the host's share)."""

import time
from collections import deque

import torch
from profile_frame import census, timed  # scripts/ is on the path when a script runs

from csmcli import codec as codec_module
from csmcli.checkpoint import random_model
from csmcli.engine import ChunkDecoder, Engine, Request
from csmcli.model import CSM_1B
from csmcli.pipeline import random_codec
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams


def mimi(batch: int, chunk: int) -> None:
    codec = random_codec(torch.device("cuda"))
    codes = torch.randint(0, 2048, (batch, 32, chunk), device="cuda")  # [B, 32, n]
    for label, setup in (("as run", lambda: None),
                         ("cudnn.benchmark", lambda: setattr(torch.backends.cudnn, "benchmark", True)),
                         ("bf16 transformer", lambda: codec.decoder.set_transformer_dtype(torch.bfloat16))):
        setup()
        chunks = ChunkDecoder(codec.decoder, batch, 32)
        chunks.warmup([chunk])
        ms = timed(lambda c=chunks: c.decode(codes))
        print(f"mimi B={batch:3d} chunk={chunk} {label:17s} graphed {ms:7.2f} ms/chunk", flush=True)
        if label == "as run":
            with torch.no_grad():
                census(lambda: codec.decoder.decode_chunk(codes), f"mimi B={batch} chunk={chunk} eager", top=20)
                parts(codec.decoder, codes)
        chunks.close()
    torch.backends.cudnn.benchmark = False


def parts(decoder, codes) -> None:
    latents = decoder.upsample(decoder.quantizer(codes)).transpose(1, 2)  # [B, 2n, hidden]
    steps = decoder.decoder_transformer(latents).float().transpose(1, 2)  # [B, hidden, 2n]
    timings = {"quantizer+upsample": lambda: decoder.upsample(decoder.quantizer(codes)),
               "transformer": lambda: decoder.decoder_transformer(latents), "seanet": lambda: decoder.decoder(steps)}
    for name, fn in timings.items():
        print(f"  part {name:20s} eager {timed(fn):7.2f} ms", flush=True)
    inputs = {}  # each SEANet layer's input, caught on the way through
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args[0]))
             for m in decoder.decoder.layers]
    decoder.decoder(steps)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(decoder.decoder.layers):
        x = inputs[layer]
        ms = timed(lambda layer=layer, x=x: layer(x))
        print(f"  seanet layer {i:2d} {type(layer).__name__:24s} in {tuple(x.shape)} {ms:7.3f} ms", flush=True)
    # the stride-8 transposed conv as a matmul (codec.BY_STEPS_ROWS) against cuDNN
    layer = decoder.decoder.layers[2]
    rows = codec_module.BY_STEPS_ROWS
    for from_rows in (0, 10**9):  # the matmul at any row count, then never
        codec_module.BY_STEPS_ROWS = from_rows
        ms = timed(lambda: layer(inputs[layer]))
        print(f"  seanet layer 2 {'by steps' if from_rows == 0 else 'cuDNN'}: {ms:7.3f} ms", flush=True)
    codec_module.BY_STEPS_ROWS = rows


def admission(batch: int) -> None:
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    engine = Engine(model, max_batch=batch)
    engine.warmup()
    for _ in range(3):
        waiting = deque(Request(synthetic_prompt(200, seed=i), SamplingParams(0.9, 50, seed=i), 60)
                        for i in range(batch))
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.admit(waiting)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000
        for slot in engine.slots:
            if slot is not None:
                engine.release(slot.request)
        print(f"admit {batch} prompts of 200 rows: {wall:.1f} ms wall ({wall / batch:.2f} per prompt)", flush=True)
    graph = engine._prefill_graphs[256]
    gpu = timed(lambda: graph.graph.replay())
    groups = batch // engine.group_size(256)
    print(f"prefill graph 256 x {engine.group_size(256)}: {gpu:.2f} ms GPU, x {groups} groups = {gpu * groups:.1f} ms")


def main():
    torch.backends.cudnn.allow_tf32 = True  # torch's default, as the CLI runs
    for batch, chunk in ((64, 8), (64, 2), (1, 8)):
        mimi(batch, chunk)
    admission(64)


if __name__ == "__main__":
    main()
