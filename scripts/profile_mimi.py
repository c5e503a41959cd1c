"""Where a 64-stream rep's time outside the frame steps goes (CUDA): the Mimi decode of a chunk (graphed, as the
bench runs it; its eager kernel census; the what-ifs below), and the
admission of 64 prompts (wall time against the prefill graphs' own GPU time: the host's share; its GPU gaps and
busiest host calls). `profile_mimi.py admission`: only the admission, then a 1-slot engine's warm-up with either
table of prefill length buckets; `profile_mimi.py wide`: both at 256
streams. What-ifs (not what csmcli runs): cuDNN autotuning, TF32 matmuls, a bf16 decoder transformer.
`profile_mimi.py layouts`: the SEANet's convs channels-first against channels-last, the stride-8 transposed conv's
two paths and the attention's two forms, layer by layer at 16-256 streams; `profile_mimi.py chunks`: a graphed
chunk at 1-256 streams; `profile_mimi.py matmuls`: the transformer's products by block size against cuBLAS."""

import contextlib
import functools
import itertools
import sys
import time
from collections import deque

import torch
import torch.nn.functional as F
import triton
from profile_frame import census, timed  # scripts/ is on the path when a script runs

from csmcli import codec as codec_module
from csmcli.checkpoint import random_model
from csmcli.engine import PREFILL_BUCKETS, PREFILL_BUCKETS_FEW_SLOTS, ChunkDecoder, Engine, Request, prefill_length
from csmcli.model import CSM_1B, Csm
from csmcli.pipeline import random_codec
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams


def mimi(batch: int, chunk: int) -> None:
    codec = random_codec(torch.device("cuda"))
    codes = torch.randint(0, 2048, (batch, 32, chunk), device="cuda")  # [B, 32, n]
    tf32 = torch.backends.cuda.matmul
    for label, setup in (("as run", lambda: None),
                         ("torch ops", lambda: None),  # no Mimi kernels: cuBLAS products, unfused SEANet passes
                         ("cudnn.benchmark", lambda: setattr(torch.backends.cudnn, "benchmark", True)),
                         # TF32 for what cuBLAS still runs (attention; products of fewer than MATMUL_F32_MIN_ROWS)
                         ("tf32 matmuls", lambda: setattr(tf32, "allow_tf32", True)),
                         ("bf16 transformer", lambda: (setattr(tf32, "allow_tf32", False),
                                                       codec.decoder.set_transformer_dtype(torch.bfloat16)))):
        setup()
        chunks = ChunkDecoder(codec.decoder, batch, 32, fused_kernels=label != "torch ops")
        chunks.warmup([chunk])
        ms = timed(lambda c=chunks: c.decode(codes))
        print(f"mimi B={batch:3d} chunk={chunk} {label:17s} graphed {ms:7.2f} ms/chunk", flush=True)
        if label in ("as run", "torch ops"):
            with torch.no_grad():
                census(lambda c=chunks: codec.decoder.decode_chunk(codes, c.fused_kernels),
                       f"mimi B={batch} chunk={chunk} {label} eager", top=20)
        if label == "as run":
            with torch.no_grad():
                parts(codec.decoder, codes)
        chunks.close()
    torch.backends.cudnn.benchmark = False
    tf32.allow_tf32 = False


def parts(decoder, codes) -> None:
    latents = decoder.upsample(decoder.quantizer(codes)).transpose(1, 2)  # [B, 2n, hidden]
    steps = decoder.decoder_transformer(latents).float().transpose(1, 2)  # [B, hidden, 2n]
    timings = {"quantizer+upsample": lambda: decoder.upsample(decoder.quantizer(codes)),
               "transformer, cuBLAS": lambda: decoder.decoder_transformer(latents, False),
               "transformer, fused": lambda: decoder.decoder_transformer(latents, True),
               "seanet, torch ops": lambda: decoder.decoder(steps, False),
               "seanet, fused": lambda: decoder.decoder(steps, True)}
    for name, fn in timings.items():
        print(f"  part {name:24s} eager {timed(fn):7.2f} ms", flush=True)
    # the stride-8 transposed conv as a matmul (codec.BY_STEPS_ROWS / BY_STEPS_STREAMS) against cuDNN
    layer, inputs = decoder.decoder.layers[2], {}
    hook = layer.register_forward_pre_hook(functools.partial(_catch, inputs))
    decoder.decoder(steps)
    hook.remove()
    for path in ("matmul", "cuDNN"):
        with stride8_path(path):
            ms = timed(lambda: layer(inputs[layer]))
        print(f"  seanet layer 2 {path}: {ms:7.3f} ms", flush=True)


@contextlib.contextmanager
def stride8_path(path: str):
    """The stride-8 transposed conv as a matmul ("matmul") or through cuDNN, whatever the streams and steps."""
    saved = codec_module.BY_STEPS_ROWS, codec_module.BY_STEPS_STREAMS
    codec_module.BY_STEPS_ROWS, codec_module.BY_STEPS_STREAMS = (0 if path == "matmul" else 10**9), 10**9
    try:
        yield
    finally:
        codec_module.BY_STEPS_ROWS, codec_module.BY_STEPS_STREAMS = saved


def layouts(batches=(16, 64, 128, 256), chunk: int = 8) -> None:
    """What-ifs for the SEANet and the transformer's attention, layer by layer (not what csmcli runs): each conv as
    run (channels first, which cuDNN's NHWC kernels transpose around) against the same conv on channels-last
    inputs (conv2d over a height of 1, the layout kept between layers); the stride-8 transposed conv as a matmul
    against cuDNN at each batch; the attention by SDPA against two matmuls and a softmax. Channels-first is how
    csmcli ran before the twenty-sixth session; since then it runs channels-last."""
    decoder = random_codec(torch.device("cuda")).decoder
    for batch in batches:
        codes = torch.randint(0, 2048, (batch, 32, chunk), device="cuda")  # [B, 32, n]
        with torch.no_grad(), decoder.streaming(batch):
            latents = decoder.upsample(decoder.quantizer(codes)).transpose(1, 2)  # [B, 2n, hidden]
            steps = decoder.decoder_transformer(latents).float().transpose(1, 2)  # [B, hidden, 2n]
            inputs = {}
            convs = (codec_module._CausalConv1d, codec_module._CausalConvTranspose1d)
            hooks = [m.register_forward_pre_hook(functools.partial(_catch, inputs))
                     for m in decoder.decoder.modules() if isinstance(m, convs)]
            decoder.decoder(steps)
            for h in hooks:
                h.remove()
            first = last = 0.0
            for module, x in inputs.items():
                a, c = _conv_layouts(batch, module, x)
                first, last = first + a, last + c
            print(f"B={batch:3d} all {len(inputs)} convs: channels first {first:.2f} ms, channels last {last:.2f} ms",
                  flush=True)
            layer = decoder.decoder.layers[2]
            for path in ("matmul", "cuDNN"):
                with stride8_path(path):
                    ms = timed(functools.partial(layer, inputs[layer]))
                print(f"B={batch:3d} stride-8 convT {path:8s} {ms:7.3f} ms", flush=True)
            _attention_what_if(batch, decoder.decoder_transformer.layers[0].self_attn, 2 * chunk)


def graphed_chunks(batches=(1, 16, 64, 128, 256), chunk: int = 8) -> None:
    """A graphed chunk as the engine decodes it, at each number of streams, with the Mimi kernels (as run: the
    SEANet's passes fused, the transformer's wide products by `kernels.matmul_f32`) and with torch ops. (In the
    twenty-sixth session this step ran the SEANet channels-first, the layout before it, for comparison.)"""
    decoder = random_codec(torch.device("cuda")).decoder
    for batch in batches:
        codes = torch.randint(0, 2048, (batch, 32, chunk), device="cuda")  # [B, 32, n]
        for fused in (True, False):
            chunks = ChunkDecoder(decoder, batch, 32, fused_kernels=fused)
            chunks.warmup([chunk])
            ms = timed(functools.partial(chunks.decode, codes))
            chunks.close()
            how = "fused kernels" if fused else "torch ops"
            print(f"mimi B={batch:3d} chunk={chunk} {how:13s} graphed {ms:7.2f} ms/chunk", flush=True)


def matmuls(batches=(1, 16, 64, 128, 256), chunk: int = 8) -> None:
    """The Mimi transformer's products (rows = streams x 2 steps a frame) by `kernels.matmul_f32` (tf32x3) at a
    few block sizes, against cuBLAS in float32 (as torch runs them) and in TF32 (the approximation not taken)."""
    from csmcli import kernels

    shapes = {"qkvo": (512, 512), "fc1": (2048, 512), "fc2": (512, 2048)}
    chosen = kernels.matmul_f32_blocks
    for batch in batches:
        m = batch * 2 * chunk
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device="cuda")
            w = torch.randn(n, k, device="cuda") / k**0.5
            want = x.double() @ w.double().T
            results = [f"cuBLAS f32 {graphed_us(lambda x=x, w=w: x @ w.T):6.1f}"]
            torch.backends.cuda.matmul.allow_tf32 = True
            tf32 = graphed_us(lambda x=x, w=w: x @ w.T)
            tf32_error = ((x @ w.T).double() - want).abs().max() / want.abs().max()
            torch.backends.cuda.matmul.allow_tf32 = False
            results.append(f"cuBLAS tf32 {tf32:6.1f} (err {tf32_error:.0e})")
            for blocks in ((16, 64, 32), (32, 64, 32), (64, 64, 32), (64, 128, 32), (128, 64, 32), (128, 128, 32),
                           (64, 64, 64)):
                if blocks[0] > max(16, triton.next_power_of_2(m)):
                    continue
                kernels.matmul_f32_blocks = lambda m, n, b=blocks: b
                us = graphed_us(lambda x=x, w=w: kernels.matmul_f32(x, w))
                error = (kernels.matmul_f32(x, w).double() - want).abs().max() / want.abs().max()
                mark = "*" if blocks == chosen(m, n) else ""
                results.append(f"{blocks}{mark} {us:6.1f} (err {error:.0e})")
            kernels.matmul_f32_blocks = chosen
            print(f"matmul M={m:5d} {name}: " + ", ".join(results) + " us", flush=True)


def graphed_us(fn, calls: int = 20) -> float:
    """Microseconds a call inside a CUDA graph of `calls` calls (as the engine replays them: no host launch cost)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay, 20) * 1000 / calls


def _catch(inputs: dict, module, args) -> None:
    x = args[0]  # a stride-1 conv's input is a `codec._Activation`: its value
    inputs.setdefault(module, x.write(False, False) if isinstance(x, codec_module._Activation) else x)


def _conv_layouts(batch: int, module, x) -> tuple[float, float]:
    conv = module.conv
    transposed = isinstance(module, codec_module._CausalConvTranspose1d)
    if not transposed and module.context:
        x = torch.cat([x.new_zeros(*x.shape[:-1], module.context), x], -1)  # [B, C_in, context + T]
    x, w, b = x.contiguous(), conv.weight.contiguous(), conv.bias  # channels-first
    x_cl = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # [B, C, 1, T] stored as [B, 1, T, C]
    w_cl = w.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    if transposed:
        ref = functools.partial(F.conv_transpose1d, x, w, b, conv.stride, groups=conv.groups)
        alt = functools.partial(F.conv_transpose2d, x_cl, w_cl, b, (1, conv.stride[0]), groups=conv.groups)
    else:
        ref = functools.partial(F.conv1d, x, w, b, dilation=conv.dilation)
        alt = functools.partial(F.conv2d, x_cl, w_cl, b, dilation=(1, conv.dilation[0]))
    diff = (ref() - alt().squeeze(2)).abs().max().item()
    a, c = timed(ref), timed(alt)
    print(f"B={batch:3d} {'convT' if transposed else 'conv '} {tuple(w.shape)!s:16s} in {tuple(x.shape)!s:20s} "
          f"channels first {a:7.3f} ms, channels last {c:7.3f} ms (max diff {diff:.1e})", flush=True)
    return a, c


def _attention_what_if(batch: int, attention, steps: int) -> None:
    slots, d = attention.slots, attention.head_dim
    q = torch.randn(batch, attention.n_heads, steps, d, device="cuda")  # [B, H, T, D]
    k, v = (torch.randn(batch, attention.n_kv_heads, slots, d, device="cuda") for _ in "kv")  # [B, H, slots, D]
    mask = torch.rand(steps, slots, device="cuda") < 0.9  # [T, slots]
    mask[:, 0] = True
    bias = torch.zeros(steps, slots, device="cuda").masked_fill_(~mask, float("-inf"))

    def by_matmuls():  # as codec._Attention (call c of the 26th session timed `(q @ k^T * s + bias).softmax @ v`)
        scores = torch.baddbmm(bias, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), alpha=d**-0.5)
        return (scores.softmax(-1) @ v.flatten(0, 1)).view_as(q)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    diff = (sdpa() - by_matmuls()).abs().max().item()
    print(f"B={batch:3d} attention ({steps} steps, {slots} slots): SDPA {timed(sdpa):.3f} ms, matmuls "
          f"{timed(by_matmuls):.3f} ms a layer (max diff {diff:.1e})", flush=True)


def admission(batch: int, rows: int = 200) -> None:
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    engine = Engine(model, max_batch=batch)
    start = time.perf_counter()
    engine.warmup()
    engine.prepare([rows])  # the prompts' prefill graph, as bench captures it before its reps
    print(f"engine warm-up (frame and {len(engine._prefill_graphs)} prefill graphs): "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    def admit_all(profiler=None) -> float:
        waiting = deque(Request(synthetic_prompt(rows, seed=i), SamplingParams(0.9, 50, seed=i), 60)
                        for i in range(batch))
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profiler or contextlib.nullcontext():
            engine.admit(waiting)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000
        for slot in engine.slots:
            if slot is not None:
                engine.release(slot.request)
        return wall

    for _ in range(3):
        wall = admit_all()
        print(f"admit {batch} prompts of {rows} rows: {wall:.1f} ms wall ({wall / batch:.2f} per prompt)", flush=True)
    length = prefill_length(rows, engine.stepper.max_seq_len, engine.prefill_buckets)
    graph, size = engine._prefill_graphs[length], engine.group_size(length)
    gpu = timed(lambda: graph.graph.replay())
    groups = -(-batch // size)
    print(f"prefill graph {length} x {size}: {gpu:.2f} ms GPU, x {groups} groups = {gpu * groups:.1f} ms")
    # Where the wall time beyond the graphs goes: the GPU's idle gaps, and the host's busiest calls.
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
    wall = admit_all(profiler)
    kernels = sorted((e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1000
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) / 1000
    gaps = sorted(((b.time_range.start - a.time_range.end) / 1000, a.name[:40], b.name[:40])
                  for a, b in itertools.pairwise(kernels))[::-1]
    print(f"profiled admission: {wall:.1f} ms wall, GPU span {span:.1f} ms, kernels busy {busy:.1f} ms, "
          f"{len(kernels)} kernels; gaps over 0.1 ms: {sum(g for g, *_ in gaps if g > 0.1):.1f} ms in "
          f"{sum(g > 0.1 for g, *_ in gaps)}")
    for gap, before, after in gaps[:8]:
        print(f"  gap {gap:6.3f} ms after {before} before {after}")
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1000)
    for name, times in sorted(by_name.items(), key=lambda item: -sum(item[1]))[:16]:
        print(f"  kernel {sum(times):7.2f} ms {len(times):5d}x  {name[:100]}")
    hosts = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    for e in sorted(hosts, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  host {e.self_cpu_time_total / 1000:7.2f} ms {e.count:5d}x  {e.key[:90]}")


def bucket_warmups(model: Csm) -> None:
    """A 1-slot engine's warm-up with every prefill length bucket captured (what `say` waited for before its first
    request until prefill graphs were captured on first use), with its buckets and with those of larger engines
    (each bucket is a graph capture), each timed twice in alternating order."""
    first = Engine(model, max_batch=1)
    first.warmup()  # kernels compiled and loaded once, before the timings
    first.prefill_buckets = PREFILL_BUCKETS
    first._capture_prefills()  # every fine bucket's shapes too (the coarse ones are among them)
    first.close()
    tables = [("PREFILL_BUCKETS_FEW_SLOTS", PREFILL_BUCKETS_FEW_SLOTS), ("PREFILL_BUCKETS", PREFILL_BUCKETS)]
    for name, table in tables * 2:
        engine = Engine(model, max_batch=1)
        engine.prefill_buckets = table
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.warmup()
        engine._capture_prefills()
        torch.cuda.synchronize()
        print(f"1-slot engine warm-up, {len(table)} prefill buckets ({name}): {time.perf_counter() - start:.2f} s",
              flush=True)
        engine.close()


def main():
    if sys.argv[1:] == ["admission"]:
        admission(64)
        bucket_warmups(random_model(CSM_1B, "cuda", torch.bfloat16))
        return
    if sys.argv[1:] == ["chunks"]:
        torch.backends.cudnn.allow_tf32 = True
        graphed_chunks()
        return
    if sys.argv[1:] == ["matmuls"]:
        matmuls()
        return
    if sys.argv[1:] == ["layouts"]:
        torch.backends.cudnn.allow_tf32 = True
        layouts()
        return
    if sys.argv[1:] == ["wide"]:  # 256 streams: where the rep's Mimi and prefill shares go
        torch.backends.cudnn.allow_tf32 = True
        mimi(256, 8)
        admission(256)
        return
    torch.backends.cudnn.allow_tf32 = True  # torch's default, as the CLI runs
    for batch, chunk in ((64, 8), (64, 2), (1, 8)):
        mimi(batch, chunk)
    admission(64)


if __name__ == "__main__":
    main()
