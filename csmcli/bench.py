"""`csmcli bench`: steady-state speed, first-audio latency and throughput of the engine, measured honestly.

Every number comes from timings taken here: host clocks read after a device sync (the engine syncs once per
chunk, and decode timings sync explicitly). Warm-up repetitions are run and excluded. EOS is ignored so every
configuration produces exactly `--frames` frames per stream.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from csmcli import __version__
from csmcli.audio import check_writable
from csmcli.engine import (
    FP8_ON_TORCH_OPS,
    ChunkDecoder,
    Engine,
    Request,
    chunk_sizes,
    fused_kernels_enabled,
    graphs_enabled,
    next_chunk_frames,
    warm_up,
)
from csmcli.errors import CsmError
from csmcli.generate import FRAME_SECONDS
from csmcli.gpu import out_of_memory_summary
from csmcli.model import Csm, CsmConfig, TransformerConfig
from csmcli.prompt import synthetic_prompt
from csmcli.sampling import SamplingParams

# Small enough for CI on two CPU cores, same vocabularies and codebooks as the real model.
TINY = CsmConfig(
    backbone=TransformerConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128,
                               max_seq_len=2048),
    decoder=TransformerConfig(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64,
                              max_seq_len=33),
)

# Vendor datasheet memory bandwidth (GB/s), to put achieved weight bandwidth in context.
NOMINAL_BANDWIDTH_GBPS = {
    "H200": 4800, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "A100-SXM4-80GB": 2039,
    "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935, "L40S": 864, "L4": 300, "A10G": 600,
    "RTX 4090": 1008, "RTX 3090": 936, "RTX 5090": 1792, "RTX A6000": 768, "RTX 6000 Ada": 960,
}


@dataclass
class BenchSettings:
    batches: list[int]
    chunk_frames: list[int]
    first_chunk_frames: int = 2
    frames: int = 100
    prompt_rows: int = 200
    reps: int = 3
    warmup: int = 1
    decode_audio: bool = True
    compare_transformers: bool = False


@dataclass
class Row:
    """One (batch, chunk) configuration. Times in ms; rtf = generation time / audio duration (< 1: faster than
    real time); x_realtime = audio seconds made per wall second, summed over the batch."""

    batch: int
    chunk_frames: int
    first_chunk_frames: int
    prompt_rows: int
    frames: int
    reps: int
    prefill_ms: float
    ms_per_frame_p50: float
    ms_per_frame_p95: float
    chunk_ms_p50: float
    decode_ms_per_chunk_p50: float | None
    rtf_codes: float
    rtf_with_decode: float | None
    x_realtime: float
    first_audio_ms_p50: float
    first_audio_ms_p95: float
    rep_seconds_min: float
    rep_seconds_median: float
    rep_seconds_max: float
    peak_vram_torch_gb: float | None
    peak_vram_nvml_gb: float | None
    power_w_mean: float | None
    sm_clock_mhz_mean: float | None
    weight_gbps: float | None
    nominal_gbps: float | None
    transformers_ms_per_frame: float | None = None
    speedup_vs_transformers: float | None = None


@dataclass
class BenchReport:
    header: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header, "rows": [asdict(r) for r in self.rows]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def weight_bytes_per_frame(model: Csm, fused_kernels: bool = True) -> int:
    """Bytes of weights one frame step reads: the backbone once, the depth decoder 31 times, each head once, the
    projection once with the fused kernels (the other steps' inputs are rows of a projected table) or at every
    step with torch ops. Embedding and table lookups touch a few rows and are left out."""

    def size(module_or_param) -> int:
        params = [module_or_param] if isinstance(module_or_param, torch.Tensor) else module_or_param.parameters()
        return sum(p.numel() * p.element_size() for p in params)

    steps = model.cfg.num_codebooks - 1
    backbone = size(model.backbone) + size(model.codebook0_head)
    projections = 1 if fused_kernels else steps
    decoder = steps * size(model.decoder) + projections * size(model.projection) + size(model.audio_head)
    return backbone + decoder


def nominal_bandwidth(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    matches = [(len(k), v) for k, v in NOMINAL_BANDWIDTH_GBPS.items() if k in gpu_name]
    return max(matches)[1] if matches else None


class NvmlSampler:
    """Power, SM clock and memory used, sampled every `interval` s on a thread while a configuration runs."""

    def __init__(self, index: int = 0, interval: float = 0.02):
        self.samples: list[tuple[float, float, float]] = []
        self.interval, self._stop = interval, threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # no NVML / no GPU: the report says None
            self._nvml = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        nv, h = self._nvml, self._handle
        while not self._stop.wait(self.interval):
            try:
                self.samples.append((nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                                     float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                                     nv.nvmlDeviceGetMemoryInfo(h).used / 2**30))
            except Exception:
                return

    def __enter__(self) -> NvmlSampler:
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self, i: int) -> float | None:
        return statistics.fmean(s[i] for s in self.samples) if self.samples else None

    def peak(self, i: int) -> float | None:
        return max(s[i] for s in self.samples) if self.samples else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Rep:
    seconds: float
    prefill_ms: float
    chunk_ms: list[float]
    frame_ms: list[float]  # steady chunks only (after each stream's first)
    decode_ms: list[float]
    first_audio_ms: float


def _one_rep(engine: Engine, decoder: ChunkDecoder | None, settings: BenchSettings, batch: int, chunk: int,
             rep: int) -> _Rep:
    device = engine.device
    params = [SamplingParams(0.9, 50, seed=1000 * rep + i) for i in range(batch)]
    waiting = deque(Request(synthetic_prompt(settings.prompt_rows, seed=i), params[i], settings.frames)
                    for i in range(batch))
    chunk_ms, frame_ms, decode_ms = [], [], []
    start = time.perf_counter()
    engine.admit(waiting)
    _sync(device)
    prefill_ms = (time.perf_counter() - start) * 1000 / batch
    first_audio_ms, made = 0.0, 0
    try:
        if decoder is not None:
            decoder.reset()
        n = None
        while made < settings.frames:
            n = min(next_chunk_frames(n, settings.first_chunk_frames, chunk), settings.frames - made)
            t0 = time.perf_counter()
            codes = engine.run_chunk(n)  # [n, B, 32] on the CPU: synced
            t1 = time.perf_counter()
            if decoder is not None:
                decoder.decode(codes.permute(1, 2, 0).to(device))  # [B, 32, n] -> [B, 1, n * 1920]
                _sync(device)
                decode_ms.append((time.perf_counter() - t1) * 1000)
            if made == 0:
                first_audio_ms = (time.perf_counter() - start) * 1000
            if made > 0 or n == settings.frames:  # steady chunks; a single-chunk run has only the first
                frame_ms.append((t1 - t0) * 1000 / n)
            chunk_ms.append((t1 - t0) * 1000)
            made += n
    finally:
        for slot in engine.slots:
            if slot is not None:
                engine.release(slot.request)
    return _Rep(time.perf_counter() - start, prefill_ms, chunk_ms, frame_ms, decode_ms, first_audio_ms)


def measure(engine: Engine, decoder: ChunkDecoder | None, settings: BenchSettings, batch: int, chunk: int,
            gpu_name: str | None, bytes_per_frame: int) -> Row:
    """Warm-up reps (excluded), then `settings.reps` timed reps of `batch` streams of `settings.frames` frames."""
    for w in range(settings.warmup):
        _one_rep(engine, decoder, settings, batch, chunk, rep=-1 - w)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    with NvmlSampler(engine.device.index or 0) as sampler:
        reps = [_one_rep(engine, decoder, settings, batch, chunk, rep=r) for r in range(settings.reps)]
    frame_ms = [x for r in reps for x in r.frame_ms]
    audio_seconds = settings.frames * FRAME_SECONDS
    gen_seconds = [sum(r.chunk_ms) / 1000 for r in reps]
    decode_seconds = [sum(r.decode_ms) / 1000 for r in reps]
    decode = decoder is not None
    ms_p50 = percentile(frame_ms, 50)
    cuda = engine.device.type == "cuda"
    return Row(
        batch=batch, chunk_frames=chunk, first_chunk_frames=min(settings.first_chunk_frames, chunk),
        prompt_rows=settings.prompt_rows, frames=settings.frames, reps=settings.reps,
        prefill_ms=statistics.median(r.prefill_ms for r in reps),
        ms_per_frame_p50=ms_p50, ms_per_frame_p95=percentile(frame_ms, 95),
        chunk_ms_p50=percentile([x for r in reps for x in r.chunk_ms], 50),
        decode_ms_per_chunk_p50=percentile([x for r in reps for x in r.decode_ms], 50) if decode else None,
        rtf_codes=statistics.median(gen_seconds) / audio_seconds,
        rtf_with_decode=statistics.median(g + d for g, d in zip(gen_seconds, decode_seconds, strict=True))
        / audio_seconds if decode else None,
        x_realtime=batch * audio_seconds / statistics.median(r.seconds for r in reps),
        first_audio_ms_p50=percentile([r.first_audio_ms for r in reps], 50),
        first_audio_ms_p95=percentile([r.first_audio_ms for r in reps], 95),
        rep_seconds_min=min(r.seconds for r in reps), rep_seconds_median=statistics.median(r.seconds for r in reps),
        rep_seconds_max=max(r.seconds for r in reps),
        peak_vram_torch_gb=torch.cuda.max_memory_allocated(engine.device) / 2**30 if cuda else None,
        peak_vram_nvml_gb=sampler.peak(2), power_w_mean=sampler.mean(0), sm_clock_mhz_mean=sampler.mean(1),
        weight_gbps=bytes_per_frame / (ms_p50 / 1000) / 1e9 if ms_p50 > 0 else None,
        nominal_gbps=nominal_bandwidth(gpu_name),
    )


def transformers_ms_per_frame(model: Csm, frames: int, prompt_rows: int) -> float:
    """transformers' CsmForConditionalGeneration.generate (static cache, greedy) on the same weights, ms/frame."""
    from transformers import CsmForConditionalGeneration

    from csmcli.checkpoint import hf_config, hf_state_dict
    from csmcli.ui import library_warnings_hidden

    param = model.codebook0_head.weight
    with library_warnings_hidden():  # its config warnings about CSM's token ids are noise here
        config = hf_config(model.cfg, codec_config={"model_type": "mimi"})
        with torch.device(param.device):  # not `meta`: non-persistent buffers (rope, codebook offsets) need init
            hf = CsmForConditionalGeneration(config).to(param.dtype)
    weights = hf_state_dict(model)
    missing = set(hf.state_dict()) - set(weights)
    hf.load_state_dict(weights, strict=False)
    assert all(k.startswith("codec_model.") for k in missing), missing  # the codec is not used by generate
    hf.eval()
    ids = synthetic_prompt(prompt_rows).tokens[:, -1][None].to(param.device)  # [1, T] text ids
    kwargs = dict(max_new_tokens=frames, min_new_tokens=frames, do_sample=False, depth_decoder_do_sample=False,
                  cache_implementation="static", attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        hf.generate(input_ids=ids, **(kwargs | {"max_new_tokens": 2, "min_new_tokens": 2}))  # warm-up
        _sync(param.device)
        start = time.perf_counter()
        out = hf.generate(input_ids=ids, **kwargs)
        _sync(param.device)
    seconds = time.perf_counter() - start
    return seconds * 1000 / out.shape[1]


def git_commit() -> str | None:
    """The commit of a csmcli checkout (with "-dirty" when its files differ from it); None for an installed package:
    a site-packages inside some other repository's .venv must not report that repository's commit."""
    package = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5,
                             cwd=package).stdout.strip()
        if not top or Path(top).resolve() != package.parent:
            return None
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                             text=True, timeout=5, cwd=package)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def header(device: torch.device, weights: str, preset: str, dtype: str, cuda_graphs: bool, compile: bool,
           fused_kernels: bool, settings: BenchSettings, fp8: bool = False) -> dict[str, Any]:
    import transformers

    from csmcli.gpu import detect_gpus

    gpus = detect_gpus() if device.type == "cuda" else []
    gpu = gpus[device.index or 0] if gpus else None
    return {
        "date": time.strftime("%Y-%m-%d"), "csmcli": __version__, "git_commit": git_commit(),
        "device": str(device), "gpu": gpu.name if gpu else None,
        "vram_gb": round(gpu.total_vram_gb, 1) if gpu else None,
        "driver": gpu.driver_version if gpu else None, "cuda": torch.version.cuda,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "preset": preset, "dtype": dtype, "cuda_graphs": cuda_graphs, "compile": compile,
        "fused_kernels": fused_kernels, "fp8": fp8, "weights": weights,
        "warmup_reps": settings.warmup, "reps": settings.reps, "frames": settings.frames,
        "prompt_rows": settings.prompt_rows, "eos": "ignored (every stream makes --frames frames)",
        "meaningful": device.type == "cuda",
    }


# ---------------------------------------------------------------- reports

COLUMNS = [
    ("batch", "B"), ("chunk_frames", "chunk"), ("ms_per_frame_p50", "ms/frame p50"),
    ("ms_per_frame_p95", "p95"), ("first_audio_ms_p50", "1st audio ms"), ("prefill_ms", "prefill ms"),
    ("rtf_codes", "RTF codes"), ("rtf_with_decode", "RTF +mimi"), ("x_realtime", "x realtime"),
    ("weight_gbps", "GB/s"), ("peak_vram_torch_gb", "VRAM GB"), ("power_w_mean", "W"),
    ("transformers_ms_per_frame", "HF ms/frame"), ("speedup_vs_transformers", "speedup"),
]


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):  # as in the JSON
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def to_markdown(report: BenchReport) -> str:
    """The header as one line, then a table: the terminal's columns first, then every other `Row` field."""
    shown = {key for key, _ in COLUMNS}
    columns = COLUMNS + [(name, name) for name in Row.__dataclass_fields__ if name not in shown]
    lines = ["| " + " | ".join(f"{k}: {fmt(v)}" for k, v in report.header.items()) + " |", ""]
    lines.append("| " + " | ".join(title for _, title in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in report.rows:
        lines.append("| " + " | ".join(fmt(getattr(row, key)) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def to_csv(report: BenchReport) -> str:
    """One flat table: every `Row` field, then the header's keys repeated on each row (CSV has no header block)."""
    out = io.StringIO()
    names = list(Row.__dataclass_fields__)
    extra = [key for key in report.header if key not in names]  # `frames`, `reps`, `prompt_rows` are in both
    writer = csv.DictWriter(out, fieldnames=names + extra)
    writer.writeheader()
    for row in report.rows:
        values = asdict(row) | {key: report.header[key] for key in extra}
        writer.writerow({key: fmt(v) if isinstance(v, bool) else v for key, v in values.items()})
    return out.getvalue()


REPORT_FORMATS = {".json": lambda r: json.dumps(r.to_dict(), indent=2) + "\n", ".md": to_markdown, ".csv": to_csv}


def check_report_path(path: Path) -> None:
    """Refuse a bad `-o` before measuring, not after minutes of it."""
    check_writable(path)  # first: `-o /tmp` is a directory, not a file without a suffix
    if path.suffix.lower() not in REPORT_FORMATS:
        raise CsmError(f"{path}: unknown report format (use .json, .md or .csv)")


def write_report(report: BenchReport, path: Path) -> None:
    check_report_path(path)
    try:
        path.write_text(REPORT_FORMATS[path.suffix.lower()](report))
    except OSError as e:
        raise CsmError(f"cannot write {path}: {e.strerror or e}") from None


MEASURED_MARK = "measured by `csmcli bench --suggest`"  # first line of a written preset: it may be overwritten
_PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a plain file stem: no paths, nothing TOML must escape


def suggest_preset(report: BenchReport, name: str) -> str:
    """A preset from measurements: the smallest first chunk and the throughput-best chunk that keep a stream at
    least twice faster than real time, and the largest batch whose streams all still do."""
    rows = report.rows
    fast = [r for r in rows if (r.rtf_with_decode or r.rtf_codes) <= 0.5] or rows
    b1 = [r for r in fast if r.batch == min(x.batch for x in fast)]
    chunk = max(b1, key=lambda r: (r.x_realtime, -r.chunk_frames)).chunk_frames
    first = min(r.first_chunk_frames for r in b1)
    batch = max(r.batch for r in fast)
    h = report.header
    # Just under this GPU's memory, so that the automatic choice (the largest min_vram_gb the GPU holds) takes it
    # here over any shipped tier; at least 1: only the shipped `cpu` preset may claim 0 GB (a CPU run has none).
    min_vram_gb = max(1.0, math.floor((h.get("vram_gb") or 0) * 10 - 1) / 10)
    return (
        f"# {MEASURED_MARK} on {h.get('gpu') or h['device']}, {h['date']}\n"
        f'name = "{name}"\ndescription = "Measured on {h.get("gpu") or h["device"]}"\n'
        f"min_vram_gb = {min_vram_gb}\n"
        f'dtype = "{h["dtype"]}"\nfirst_chunk_frames = {first}\nchunk_frames = {chunk}\nmax_batch = {batch}\n'
        f"cuda_graphs = {str(h['cuda_graphs']).lower()}\ncompile = {str(h['compile']).lower()}\n"
        f"fused_kernels = {str(h['fused_kernels']).lower()}\nfp8 = {str(h.get('fp8', False)).lower()}\n"
    )


def run(model: Csm, decoder, settings: BenchSettings, *, cuda_graphs: bool, compile: bool, fused_kernels: bool,
        head: dict[str, Any], on_row=None, on_out_of_memory=None) -> BenchReport:
    """Every (batch, chunk) combination, one engine per batch size (its graph is captured for that batch).

    A batch size the GPU's memory cannot hold is left out, and so is every larger one; the header lists them
    (`out_of_memory_batches`) and `on_out_of_memory(batch, summary)` hears of each (summary: torch's message cut
    short for the size that failed, None for the larger ones not tried)."""
    report = BenchReport(head)
    bytes_per_frame = weight_bytes_per_frame(model, fused_kernels)
    hf_ms = transformers_ms_per_frame(model, min(settings.frames, 50), settings.prompt_rows) \
        if settings.compare_transformers else None
    too_large: int | None = None  # the smallest batch size that did not fit
    for batch in settings.batches:
        summary = None
        if too_large is None or batch < too_large:
            try:
                _measure_batch(model, decoder, settings, batch, cuda_graphs, compile, fused_kernels, report,
                               hf_ms, bytes_per_frame, on_row)
            except torch.OutOfMemoryError as e:
                summary = out_of_memory_summary(e)
                too_large = batch  # only sizes below an earlier failure are tried: this one is the smallest
            # Out here, where a failure's traceback (which holds the engine) is gone: its memory, for the next size.
            if model.codebook0_head.weight.device.type == "cuda":
                torch.cuda.empty_cache()
            if summary is None:
                continue
        report.header.setdefault("out_of_memory_batches", []).append(batch)
        if on_out_of_memory is not None:
            on_out_of_memory(batch, summary)
    return report


def _measure_batch(model: Csm, decoder, settings: BenchSettings, batch: int, cuda_graphs: bool, compile: bool,
                   fused_kernels: bool, report: BenchReport, hf_ms: float | None, bytes_per_frame: float,
                   on_row) -> None:
    """`batch` streams at each chunk size, on an engine of their own (closed after, also on failure)."""
    engine = Engine(model, max_batch=batch, cuda_graphs=cuda_graphs, compile=compile, fused_kernels=fused_kernels)
    chunks = None
    try:
        chunks = None if decoder is None else ChunkDecoder(decoder, batch, model.cfg.num_codebooks, cuda_graphs,
                                                           fused_kernels)
        warm_up(engine, chunks, [n for c in settings.chunk_frames for n in chunk_sizes(settings.first_chunk_frames, c)])
        engine.prepare([settings.prompt_rows])  # its prefill graph: even with --warmup 0 no timed rep captures it
        for chunk in settings.chunk_frames:
            row = measure(engine, chunks, settings, batch, chunk, report.header.get("gpu"), bytes_per_frame)
            if hf_ms is not None:
                row.transformers_ms_per_frame = hf_ms
                row.speedup_vs_transformers = hf_ms / row.ms_per_frame_p50 * batch
            report.rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        try:
            if chunks is not None:
                chunks.close()
        finally:
            engine.close()


# ---------------------------------------------------------------- CLI glue


@dataclass
class BenchContext:
    model: Csm
    decoder: Any
    preset: Any
    weights: str
    device: torch.device


def prepare(*, model: str | None, random_weights: bool, tiny: bool, codec: str | None, torch_device: str | None,
            preset_name: str | None, overrides: dict[str, Any]) -> BenchContext:
    """Pick the weights (real, or random when asked or when nothing is cached), preset, device and codec."""
    from csmcli import ui
    from csmcli.info import checkpoint_cache_status
    from csmcli.pipeline import check_weights_choice, choose_preset, load_model_and_codec

    check_weights_choice(model, "--tiny" if tiny else "--random-weights" if random_weights else None)
    if tiny:
        torch_device = "cpu" if torch_device is None else torch_device  # "" is refused by pick_device, not made cpu
        random_weights = True
    elif model is None and not random_weights and not checkpoint_cache_status().get("cached"):
        ui.warn("no CSM-1B checkpoint in the Hugging Face cache: benchmarking RANDOM WEIGHTS (speed only; "
                "pass --model to use a checkpoint)")
        random_weights = True
    preset, reason = choose_preset(preset_name, torch_device, overrides)
    ui.debug(f"preset {preset.name}: {reason}")
    tiny_sizes = {"config": TINY, "codec_config": tiny_mimi_config()} if tiny else {}
    # Not a Pipeline: that would build a batch-1 Engine (and its caches) bench never uses.
    ck, mimi, device = load_model_and_codec(model, preset, device=torch_device, random_weights=random_weights,
                                            codec_path=codec, warn=ui.warn, **tiny_sizes)
    decoder = mimi.decoder if mimi is not None else None
    weights = ("random weights (tiny config)" if tiny else "random weights") if random_weights else "real weights"
    return BenchContext(ck.model, decoder, preset, weights, device)


def tiny_mimi_config():
    from transformers import MimiConfig

    return MimiConfig(hidden_size=32, num_filters=4, upsampling_ratios=[8, 6, 5, 4], codebook_dim=16,
                      vector_quantization_hidden_dimension=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=8, intermediate_size=64, sliding_window=16, upsample_groups=32)


def render_table(report: BenchReport):
    from rich.table import Table

    h = report.header
    dtype = f"{h['dtype']} + fp8 weights" if h.get("fp8") else h["dtype"]
    title = (f"csmcli bench: {h.get('gpu') or h['device']}, {h['weights']}, {dtype}, "
             f"graphs {'on' if h['cuda_graphs'] else 'off'}, torch {h['torch']}, {h['date']}")
    table = Table(title=title, caption=None if h["meaningful"] else "CPU run: these numbers are not meaningful",
                  padding=(0, 1, 0, 0))
    # Only columns with a value (no VRAM/power on CPU, no HF without --compare), never cut to "…": on an 80-column
    # terminal a truncated number is worse than a wrapped header.
    shown = [(k, n) for k, n in COLUMNS if not report.rows or any(getattr(r, k) is not None for r in report.rows)]
    for _, name in shown:
        table.add_column(name, justify="right", no_wrap=False, overflow="fold", min_width=4)
    for row in report.rows:
        table.add_row(*[fmt(getattr(row, key)) for key, _ in shown])
    return table


def run_cli(ctx: BenchContext, settings: BenchSettings,
            on_interrupt: Callable[[BenchReport], None] | None = None) -> BenchReport:
    """`run` with the table on stderr (live on a terminal), a warning for each batch size left out for lack of GPU
    memory, and a one-line error if none fitted. Ctrl-C or SIGTERM: the table of the rows measured so far is
    printed and handed to `on_interrupt` (header `interrupted: true`; perhaps no rows) before the interrupt goes
    on."""
    from rich.live import Live

    from csmcli import ui

    cuda_graphs = graphs_enabled(ctx.preset.cuda_graphs, ctx.device)  # what the engine will do, env var included
    # Likewise: CUDA, Triton, the env var, and --compile (which means the torch-ops path).
    fused_kernels = fused_kernels_enabled(ctx.preset.fused_kernels, ctx.model, ctx.preset.compile)
    head = header(ctx.device, ctx.weights, ctx.preset.name, str(ctx.model.codebook0_head.weight.dtype).split(".")[-1],
                  cuda_graphs, ctx.preset.compile, fused_kernels, settings, ctx.model.fp8)
    if not settings.decode_audio:
        ctx.decoder = None
    if not head["meaningful"]:
        ui.warn("no GPU: these numbers only check that the benchmark runs; they are not meaningful")
    if ctx.model.fp8 and not fused_kernels:
        ui.warn(FP8_ON_TORCH_OPS)
    report = BenchReport(head)
    # Live only on a terminal: to a file or pipe Rich leaves its last line unterminated, so print the table once.
    live = Live(render_table(report), console=ui.console, refresh_per_second=4) \
        if not ui.is_quiet() and ui.console.is_terminal else None

    def on_row(row: Row) -> None:
        report.rows.append(row)
        if live is not None:
            live.update(render_table(report))

    failures: list[str] = []

    def on_out_of_memory(batch: int, summary: str | None) -> None:
        if summary is not None:
            failures.append(f"out of GPU memory at --batch {batch}: {summary}")
            ui.warn(f"{failures[-1]}; left out, with any larger --batch")
        else:
            ui.warn(f"--batch {batch} left out: a smaller size did not fit in the GPU's memory")

    try:
        with live if live is not None else contextlib.nullcontext():
            full = run(ctx.model, ctx.decoder, settings, cuda_graphs=cuda_graphs, compile=ctx.preset.compile,
                       fused_kernels=fused_kernels, head=head, on_row=on_row, on_out_of_memory=on_out_of_memory)
    except KeyboardInterrupt:
        report.header["interrupted"] = True
        if live is None and not ui.is_quiet() and report.rows:
            ui.console.print(render_table(report))
        if on_interrupt is not None:
            on_interrupt(report)
        raise
    if not full.rows and failures:
        raise CsmError(failures[0])
    if live is None and not ui.is_quiet():
        ui.console.print(render_table(full))
    return full


def check_preset_name(name: str) -> None:
    """Refuse, before measuring, a --write-preset NAME that is not a plain name or that would replace a shipped
    preset (one written by an earlier --suggest may be replaced)."""
    from csmcli.presets import presets_dir

    if not _PRESET_NAME.fullmatch(name):
        raise CsmError(f"--write-preset {name!r}: use letters, digits, '.', '_' and '-' only")
    if name.lower().endswith(".toml"):
        raise CsmError(f"--write-preset {name!r}: give the name without .toml (it is added)")
    path = presets_dir() / f"{name}.toml"
    if path.exists() and MEASURED_MARK not in path.read_text(encoding="utf-8"):
        raise CsmError(f"preset {name!r} ships with csmcli: choose another --write-preset NAME")
    check_writable(path)  # a read-only install: refused now, not after the measurements


def save_preset(text: str, name: str) -> Path:
    """Write a measured preset next to the shipped ones, validated by the same loader `--preset` uses."""
    from csmcli.presets import load_preset_file, presets_dir

    check_preset_name(name)
    path = presets_dir() / f"{name}.toml"
    # Validate a copy first: an invalid file among the presets would break every later command.
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / path.name
        trial.write_text(text, encoding="utf-8")
        load_preset_file(trial)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise CsmError(f"cannot write preset {path}: {e.strerror or e}") from None
    return path
