"""Block sizes for csmcli.kernels.linear measured where they run: inside the whole frame graph (CUDA), with the
kernels before and after each product (programmatic dependent launch lets neighbours overlap, which
scripts/tune_kernels.py, timing one product over and over, cannot see).

For every product shape of one rows bucket, each neighbour of its current config (block N / K and warps halved
or doubled; batched tiles also split K and stages) is captured in its own frame graph over one shared stepper,
and timed against the current table in back-to-back pairs, several rounds. Then the shapes' winners together
against the current table. Also the kernels' launch constants in KNOBS (attention and sampling warps, radix
digit bits), one at a time. Prints ms/frame; changes nothing.

Usage: tune_in_graph.py [1|16|64|128|256] [fp8] [dec|knobs|bigk] [knob=NAME]
  rows bucket (default 1); fp8: the fp8 weights' table; dec: the depth decoder's shapes only; knobs: only KNOBS;
  knob=NAME: of the knobs only NAME; bigk: the batched K = 1024 products without a gate (QKV, o, heads) on K blocks
  of 512 and 1024 (1-3 stages) instead of the neighbours"""

import statistics
import sys

import torch

from csmcli import kernels
from csmcli.checkpoint import random_model
from csmcli.engine import CapturedCall, state_kept
from csmcli.generate import FrameStepper
from csmcli.model import CSM_1B

FRAMES = 40  # per timing: ~0.2 s at one row
ROUNDS = 3
WIDE = (64, 128, 256)  # the rows buckets of more than 16 rows
KNOBS = {  # kernels' module constants read at launch: the values to try besides the current one, the rows buckets
    "ATTENTION_WARPS": ((2, 4, 16), (1, 16)), "ATTENTION_WARPS_64": ((2, 8, 16), WIDE),
    "SAMPLE_WARPS": ((4, 8, 32), (1, 16, *WIDE)), "SAMPLE_RADIX_BITS": ((2, 8), (1, 16, *WIDE)),
    "FOLD_NORMS": ((False,), WIDE), "SAMPLE_SPLIT_TAIL": ((False,), (1, 16, *WIDE)),
    "SPLIT_SUM_BLOCK": ((128, 512, 1024, 2048), (16, *WIDE)), "SHARE_SQUARES": ((False,), WIDE),
    "ATTENTION_POSITIONS": ((64, 128, 512), (1, 16)), "ATTENTION_POSITIONS_64": ((32, 128, 256), WIDE),
}


def neighbours(config: kernels.LinearConfig, k: int, gated: bool, rows: int) -> list[kernels.LinearConfig]:
    if config == kernels.CUBLAS:
        return [(16, 64, 128, 8, 1, 3), (16, 64, 128, 8, 4, 3), (64, 64, 128, 8, 4, 3), (64, 64, 128, 8, 8, 3)]
    bm, bn, bk, warps, split, stages = config
    found = []
    if bm == 1:
        found += [(1, n, bk, warps, 1, stages) for n in (bn // 2, bn * 2) if 1 <= n <= 32]
        found += [(1, bn, b, warps, 1, stages) for b in (bk // 2, bk * 2) if 256 <= b <= k]
        found += [(1, bn, bk, w, 1, stages) for w in (warps // 2, warps * 2) if 1 <= w <= 16]
        return found
    found += [(bm, n, bk, warps, split, stages) for n in (bn // 2, bn * 2) if 16 <= n <= 128]
    found += [(bm, bn, b, warps, split, stages) for b in (bk // 2, bk * 2) if 64 <= b <= 256]
    found += [(bm, bn, bk, w, split, stages) for w in (warps // 2, warps * 2) if 4 <= w <= 8]
    found += [(bm, bn, bk, warps, s, stages) for s in (split // 2, split * 2) if 1 <= s <= 16 and not gated]
    found += [(bm, bn, bk, warps, split, s) for s in (stages - 1, stages + 1) if 2 <= s <= 5]
    found += [(64 if bm == 16 else 16, bn, bk, warps, split, 4 if bm == 16 else 3)]
    found += [(b, bn, bk, warps, split, stages) for b in (bm // 2, bm * 2) if 64 <= b <= rows and bm >= 64]
    if not gated and not (bm == 16 and split == 1):
        found.append(kernels.CUBLAS)
    return found


def main() -> None:
    rows = int(sys.argv[1]) if sys.argv[1:] and sys.argv[1].isdigit() else 1
    fp8 = "fp8" in sys.argv[1:]
    bigk = "bigk" in sys.argv[1:]  # only the K-block trials below: no neighbours, knobs or backbone fold
    deep = "deep" in sys.argv[1:]  # only the deep-pipeline trials below: the decoder's 64-row tiles on more stages
    torch.manual_seed(0)
    model = random_model(CSM_1B, "cuda", torch.bfloat16)
    if fp8:
        model.to_fp8()
    stepper = FrameStepper(model, rows, fused=True)
    stepper.positions.fill_(200)  # a ~200-row prompt's frames: the backbone attends over that many positions
    stepper.hidden.normal_()
    table = kernels._FP8_CONFIGS if fp8 else kernels._LINEAR_CONFIGS
    keys = [key for key in table if key[0] == rows]
    if "dec" in sys.argv[1:]:  # the depth decoder's products only (31 steps a frame: most of the time)
        keys = [(m, n, k, gated) for m, n, k, gated in keys if k == 1024 or (n, k) == (1024, 8192)]
    if "knobs" in sys.argv[1:]:
        keys = []

    def capture() -> CapturedCall:
        with state_kept(stepper.state()):
            return CapturedCall(lambda: stepper.step(rows))

    def time_ms(graph: CapturedCall) -> float:
        with state_kept(stepper.state()):
            graph.graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(FRAMES):
                graph.graph.replay()
            end.record()
            torch.cuda.synchronize()
        return start.elapsed_time(end) / FRAMES

    def paired(graph: CapturedCall, base: CapturedCall, rounds: int = ROUNDS) -> tuple[float, list[float]]:
        """`graph`'s ms/frame minus `base`'s, timed back to back each round: the median and every round's."""
        diffs = []
        for _ in range(rounds):
            b = time_ms(base)
            diffs.append(time_ms(graph) - b)
        return statistics.median(diffs), diffs

    base = capture()
    base_ms = time_ms(base)
    print(f"rows {rows}{' fp8' if fp8 else ''}: current table {base_ms:.3f} ms/frame", flush=True)

    def best_of(label: str, current, values, put) -> tuple | None:
        """The value among `values` that beats `current` in every pair (`put(value)` sets it), or None."""
        results = []
        for value in values:
            put(value)
            try:
                graph = capture()
            except Exception as e:  # a launch this Triton cannot build
                print(f"  {label} {value}: {type(e).__name__}", file=sys.stderr)
                continue
            finally:
                put(current)
            diff, diffs = paired(graph, base)
            results.append((diff, diffs, value))
            del graph
        if not results:
            return None
        results.sort(key=lambda r: r[0])
        diff, diffs, value = results[0]
        sure = max(diffs) < 0 and diff < -0.002 * base_ms
        print(f"{label:28s} current {current!s:24s} best {value!s:24s} {diff * 1000:+7.1f} us/frame "
              f"{'WIN' if sure else '   '} | {[(round(d * 1000, 1), v) for d, _, v in results[:4]]}", flush=True)
        return (label, put, value, current) if sure else None

    def candidates(key) -> list[kernels.LinearConfig]:
        if deep:  # shorter K blocks on more stages: the first block lands sooner, the same bytes stay in flight
            bm, bn, bk, warps, split, stages = table[key]
            stage_bytes = {b: (bm + bn * (2 if key[3] else 1)) * b * 2 for b in (64, 128)}
            return [(bm, bn, b, warps, split, s) for b in (64, 128) for s in range(4, 9)
                    if (b, s) != (bk, stages) and s * stage_bytes[b] <= 200_000]
        if not bigk:
            return neighbours(table[key], key[2], key[3], rows)
        # bigk: the whole K (or half) in one block, all its loads in flight at once, on 1-3 stages
        bm, bn, _, warps, split, _ = table[key]
        return [(bm, bn, b, warps, split, s) for b in (512, 1024) if b <= key[2] for s in (1, 2, 3)]

    if deep:  # the depth decoder's 64-row tiles (gate/up, down)
        keys = [key for key in keys if table[key][0] == 64 and (key[2] == 1024 or key[1:3] == (1024, 8192))]
    if bigk:  # the batched products with K = 1024 that are not gated (QKV, o, the heads)
        keys = [key for key in keys if key[0] > 1 and key[2] == 1024 and not key[3]]
    trials = [(str(key), table[key], candidates(key), lambda v, key=key: table.__setitem__(key, v)) for key in keys]
    only = [a.removeprefix("knob=") for a in sys.argv[1:] if a.startswith("knob=")]
    trials += [(name, getattr(kernels, name), values, lambda v, name=name: setattr(kernels, name, v))
               for name, (values, buckets) in KNOBS.items()
               if rows in buckets and name in (only or [name]) and not (bigk or deep)]
    # the backbone's normed products on unfolded weights instead
    if kernels.folds_norms(rows) and not fp8 and not (bigk or deep):
        folded = [(layer, layer.wqkv_folded, layer.w13_folded) for layer in model.backbone.layers]

        def fold_backbone(on: bool) -> None:
            for layer, qkv, w13 in folded:
                layer.wqkv_folded, layer.w13_folded = (qkv, w13) if on else (None, None)

        trials.append(("fold backbone norms", True, (False,), fold_backbone))
    winners = [found for trial in trials if (found := best_of(*trial))]
    if not winners:
        print("no config beats the current table in the frame graph")
        return
    for _, put, value, _ in winners:
        put(value)
    combined = capture()
    for _, put, _, current in winners:
        put(current)
    diff, diffs = paired(combined, base, rounds=6)
    rounds = [round(d * 1000, 1) for d in diffs]
    print(f"COMBINED {[(label, value) for label, _, value, _ in winners]}\n  current {base_ms:.3f} ms/frame, "
          f"winners together {diff * 1000:+.1f} us/frame ({diff / base_ms:+.1%}), rounds {rounds}", flush=True)


if __name__ == "__main__":
    main()
