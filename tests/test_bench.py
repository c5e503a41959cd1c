"""`csmcli bench` on the tiny random model (CPU): reports, the arithmetic behind every number, sweeps, presets.

The CLI runs in-process (CliRunner) on a few frames. The arithmetic is checked on the real engine and the real
streaming Mimi decoder driven by a fake clock: every duration is scripted, so each reported number has one right
value, computed here from what the engine and decoder were asked to do, not from bench's own bookkeeping.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from csmcli import bench, presets
from csmcli.checkpoint import random_model
from csmcli.cli import app
from csmcli.engine import ChunkDecoder, Engine
from csmcli.errors import CsmError
from csmcli.generate import FRAME_SECONDS
from csmcli.pipeline import random_codec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_RUN = ("bench", "--tiny", "--torch-device", "cpu", "--frames", "4", "--reps", "1", "--warmup", "0",
            "--prompt-rows", "20")
ROW_FIELDS = [f.name for f in dataclasses.fields(bench.Row)]
CPU_WARNING = "warning: no GPU: these numbers only check that the benchmark runs; they are not meaningful"




@pytest.fixture(scope="module")
def header_keys() -> list[str]:
    settings = bench.BenchSettings(batches=[1], chunk_frames=[1])
    return list(bench.header(torch.device("cpu"), "w", "cpu", "float32", False, False, False, settings))


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def run_ok(*args: str):
    result = cli(*TINY_RUN, *args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return result


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One run: batches 1,2 x chunks 1,2, compared with transformers, written as JSON."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    result = run_ok("--batch", "1,2", "--chunk-frames", "1,2", "--compare", "transformers", "-o", str(path))
    return result, json.loads(path.read_text()), path


def test_json_report_holds_every_field(sweep, header_keys):
    result, data, path = sweep
    assert list(data) == ["header", "rows"] and list(data["header"]) == header_keys
    assert all(list(row) == ROW_FIELDS for row in data["rows"])
    head = data["header"]
    assert head["weights"] == "random weights (tiny config)" and head["meaningful"] is False
    assert head["device"] == "cpu" and head["frames"] == 4 and head["reps"] == 1 and head["warmup_reps"] == 0
    assert (head["cuda_graphs"], head["compile"], head["fused_kernels"]) == (False, False, False)  # cpu preset
    lines = result.stderr.splitlines()
    assert lines[0] == CPU_WARNING and f"wrote {path}" in lines  # on its own line, after the table
    assert result.stdout == ""


@pytest.mark.parametrize("suffix", [".md", ".csv"])
def test_md_and_csv_reports_hold_every_field(suffix, tmp_path, header_keys):
    path = tmp_path / f"results{suffix}"
    result = run_ok("-o", str(path))
    assert result.stderr.splitlines()[0] == CPU_WARNING
    text = path.read_text()
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        assert len(rows) == 1
        assert set(rows[0]) == set(ROW_FIELDS) | set(header_keys)
        head, row = rows[0], rows[0]
    else:
        lines = text.splitlines()
        head = dict(cell.split(": ", 1) for cell in lines[0].strip("| ").split(" | "))
        assert list(head) == header_keys and lines[1] == ""
        titles = lines[2].strip("| ").split(" | ")
        assert set(lines[3].split("|")) == {"", "---"} and len(lines[3].split("|")) == len(titles) + 2
        assert len(lines) == 5
        row = dict(zip(titles, lines[4].strip("| ").split(" | "), strict=True))
        shown = {key: title for key, title in bench.COLUMNS}
        assert {shown.get(name, name) for name in ROW_FIELDS} == set(titles)
        row = {name: row[shown.get(name, name)] for name in ROW_FIELDS}
    assert head["weights"] == "random weights (tiny config)" and head["meaningful"] == "false"  # as in the JSON
    assert row["batch"] == "1" and row["frames"] == "4" and float(row["ms_per_frame_p50"]) > 0


@pytest.mark.parametrize(
    ("flag", "requested", "ran"),
    [(None, False, True), ("--fused-kernels", True, True), ("--fused-kernels", True, False),
     ("--no-fused-kernels", False, True)],
)
def test_fused_kernels_reach_the_engine_and_the_header_says_what_ran(flag, requested, ran, tmp_path, monkeypatch):
    asked, built = [], []

    class SpyEngine(Engine):
        def __init__(self, model, **kwargs):
            built.append(kwargs["fused_kernels"])
            super().__init__(model, **kwargs)

    # `ran`: what the engine would do with the request (off on CPU, or without Triton, or CSMCLI_NO_FUSED_KERNELS=1)
    monkeypatch.setattr(bench, "fused_kernels_enabled",
                        lambda want, model, compile: asked.append(want) or (want and ran))
    monkeypatch.setattr(bench, "Engine", SpyEngine)
    path = tmp_path / "r.json"
    run_ok("--no-decode", "-o", str(path), *filter(None, [flag]))
    assert asked == [requested]  # the cpu preset says false; the flag beats it
    assert json.loads(path.read_text())["header"]["fused_kernels"] is (requested and ran)
    assert built == [requested and ran]


def test_repeated_values_are_measured_once_and_warned(tmp_path):
    result = run_ok("--batch", "1,1", "--chunk-frames", "2,2,1", "-o", str(tmp_path / "r.json"))
    assert "warning: --batch 1,1: each value is measured once (1)" in result.stderr
    assert "warning: --chunk-frames 2,2,1: each value is measured once (2,1)" in result.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["batch"], r["chunk_frames"]) for r in rows] == [(1, 2), (1, 1)]  # two rows, not six


def test_the_preset_chunk_beyond_frames_is_not_blamed_on_a_flag():
    result = run_ok("--frames", "2")  # the cpu preset's chunk of 4 frames is longer than the run
    assert "warning: the preset's (cpu) chunk size 4 is more than --frames 2" in result.stderr, result.stderr
    assert "--chunk-frames" not in result.stderr
    result = run_ok("--frames", "2", "--chunk-frames", "3")
    assert "warning: --chunk-frames 3 is more than --frames 2" in result.stderr


def test_git_commit_is_csmcli_s_own_not_an_enclosing_repository_s(tmp_path, monkeypatch):
    """An installed csmcli inside another project's .venv must not report that project's commit."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "another project"], check=True)
    package = tmp_path / ".venv" / "lib" / "csmcli"
    package.mkdir(parents=True)
    copy = package / "bench.py"
    copy.write_text(Path(bench.__file__).read_text())
    spec = importlib.util.spec_from_file_location("copied_bench", copy)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "copied_bench", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.git_commit() is None
    ours = bench.git_commit()  # this checkout (tests run from one): its commit, "-dirty" while edited
    assert ours is None or re.fullmatch(r"[0-9a-f]{7,}(-dirty)?", ours), ours


def test_sweep_gives_one_row_per_combination_in_order(sweep):
    rows = sweep[1]["rows"]
    assert [(r["batch"], r["chunk_frames"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["frames"] == 4 and r["reps"] == 1 and r["prompt_rows"] == 20 for r in rows)
    assert all(r["ms_per_frame_p50"] > 0 and r["first_audio_ms_p50"] > r["prefill_ms"] > 0 for r in rows)


def test_compare_transformers(sweep):
    rows = sweep[1]["rows"]
    hf = rows[0]["transformers_ms_per_frame"]
    assert hf > 0 and all(r["transformers_ms_per_frame"] == hf for r in rows)
    for r in rows:  # batch 2 rows check the per-stream factor
        assert r["speedup_vs_transformers"] == pytest.approx(hf / r["ms_per_frame_p50"] * r["batch"], rel=1e-12)


@pytest.fixture(scope="module")
def quiet_no_decode(tmp_path_factory):
    path = tmp_path_factory.mktemp("quiet") / "r.json"
    result = cli("-q", *TINY_RUN, "--no-decode", "-o", str(path))
    assert result.exit_code == 0, result.exception
    return result, json.loads(path.read_text())


def test_quiet_without_a_report_is_refused_before_measuring():
    result = cli("-q", *TINY_RUN)  # measured, then shown nowhere: minutes lost on a GPU
    assert one_error_line(result) == ("error: --quiet hides bench's table: give -o FILE (or --suggest) to keep the "
                                      "measurements")


def test_quiet_prints_nothing_on_stderr(quiet_no_decode):
    result, _ = quiet_no_decode
    assert result.stderr == "" and result.stdout == ""


def test_no_decode_leaves_decode_fields_null(quiet_no_decode, sweep):
    row = quiet_no_decode[1]["rows"][0]
    assert row["decode_ms_per_chunk_p50"] is None and row["rtf_with_decode"] is None
    assert row["rtf_codes"] > 0
    decoded = sweep[1]["rows"][0]  # with decode (the default) both are numbers
    assert decoded["decode_ms_per_chunk_p50"] > 0 and decoded["rtf_with_decode"] > decoded["rtf_codes"]


# ---------------------------------------------------------------- presets


@pytest.fixture
def tmp_presets(tmp_path, monkeypatch) -> Path:
    """A copy of the shipped presets that `presets_dir()` points at, so no test writes into the repo."""
    directory = tmp_path / "presets"
    shutil.copytree(presets.presets_dir(), directory)
    monkeypatch.setattr(presets, "presets_dir", lambda: directory)
    return directory


def test_suggest_writes_a_loadable_preset(tmp_presets, tmp_path):
    shipped = {p.name: p.read_text() for p in tmp_presets.iterdir()}
    result = run_ok("--suggest", "--write-preset", "mine")
    text = result.stdout
    assert text.startswith("# measured by `csmcli bench --suggest` on cpu") and 'name = "mine"' in text
    printed = tmp_path / "mine.toml"
    printed.write_text(text)
    preset = presets.load_preset_file(printed)
    assert (preset.name, preset.dtype, preset.max_batch, preset.chunk_frames) == ("mine", "float32", 1, 4)
    assert (preset.cuda_graphs, preset.compile, preset.fused_kernels) == (False, False, False)
    assert "\nfused_kernels = false\n" in text
    assert (tmp_presets / "mine.toml").read_text() == text
    assert presets.load_presets()["mine"] == preset  # every later command still loads the presets
    assert {p.name: p.read_text() for p in tmp_presets.iterdir() if p.name != "mine.toml"} == shipped
    assert f"saved preset {tmp_presets / 'mine.toml'}" in result.stderr


def test_suggest_after_an_fp8_run_writes_an_fp8_preset(tmp_presets):
    result = run_ok("--fp8", "--suggest", "--write-preset", "mine8")
    assert "\nfp8 = true\n" in result.stdout
    assert presets.load_presets()["mine8"].fp8 is True


def test_save_preset_replaces_a_measured_preset_but_not_a_shipped_one(tmp_presets):
    text = (tmp_presets / "cpu.toml").read_text()
    with pytest.raises(CsmError, match="ships with csmcli"):
        bench.save_preset(text, "cpu")
    measured = f"# {bench.MEASURED_MARK} on cpu\n" + text.replace('"cpu"', '"again"').replace(
        "min_vram_gb = 0", "min_vram_gb = 1")
    bench.save_preset(measured, "again")
    bench.save_preset(measured.replace("max_batch = 1", "max_batch = 3"), "again")
    assert presets.load_presets()["again"].max_batch == 3


def test_save_preset_writes_nothing_invalid(tmp_presets):
    bad = (tmp_presets / "cpu.toml").read_text().replace('"cpu"', '"broken"')  # min_vram_gb 0: only cpu may
    with pytest.raises(CsmError, match="min_vram_gb"):
        bench.save_preset(bad, "broken")
    assert not (tmp_presets / "broken.toml").exists()
    presets.load_presets()


def test_a_measured_preset_is_the_automatic_choice_on_its_gpu(sweep, tmp_presets):
    """min_vram_gb just under the GPU's memory: on a 15.0 GB GPU the shipped 16gb tier (14.5) must not win."""
    _, data, _ = sweep
    header = {**data["header"], "gpu": "Tesla T4", "vram_gb": 15.0, "device": "cuda:0"}
    report = bench.BenchReport(header, [bench.Row(**row) for row in data["rows"]])
    bench.save_preset(bench.suggest_preset(report, "t4"), "t4")
    assert presets.load_presets()["t4"].min_vram_gb == pytest.approx(14.9)
    assert presets.choose_preset(15.0, None)[0].name == "t4"
    assert presets.choose_preset(14.8, None)[0].name == "16gb"  # a smaller GPU keeps its tier


def test_an_interrupted_bench_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) after an hour of a sweep must not lose the rows already measured: the table and -o get
    them, marked interrupted, and the exit code is the interrupt's."""
    real, calls = bench.measure, []

    def measure_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "measure", measure_then_ctrl_c)
    path = tmp_path / "partial.json"
    result = cli(*TINY_RUN, "--batch", "1,2", "-o", str(path))
    assert result.exit_code == 130, (result.stderr, result.exception)
    data = json.loads(path.read_text())
    assert data["header"]["interrupted"] is True and [row["batch"] for row in data["rows"]] == [1]
    assert f"wrote {path}: what was measured before the interrupt (1 rows)" in result.stderr
    assert re.search(r"^│\s+1 │", result.stderr, re.MULTILINE), result.stderr  # the table of that row


OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                 "1.20 GiB is free. Including non-PyTorch memory, this process has 77.98 GiB memory in use. If "
                 "reserved but unallocated memory is large try setting "
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


def test_batch_sizes_the_gpu_cannot_hold_are_left_out_with_a_warning(tmp_path, monkeypatch):
    """`--batch 1,3,4,2`, and the GPU runs out of memory at 3 streams partway (its second chunk size): the row it
    measured is kept, 3 and the larger 4 are left out (each warned, listed in the header), the smaller 2 after them
    is still measured, the run ends well (exit 0) and --suggest still suggests."""
    real = bench.measure

    def measure(engine, chunks, settings, batch, chunk, *args):
        if (batch, chunk) == (3, 3):
            raise torch.OutOfMemoryError(OUT_OF_MEMORY)
        return real(engine, chunks, settings, batch, chunk, *args)

    monkeypatch.setattr(bench, "measure", measure)
    path = tmp_path / "results.json"
    result = cli(*TINY_RUN, "--batch", "1,3,4,2", "--chunk-frames", "2,3", "-o", str(path), "--suggest")
    assert result.exit_code == 0, (result.stderr, result.exception)
    data = json.loads(path.read_text())
    assert [(row["batch"], row["chunk_frames"]) for row in data["rows"]] == [(1, 2), (1, 3), (3, 2), (2, 2), (2, 3)]
    assert data["header"]["out_of_memory_batches"] == [3, 4]
    summary = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
               "1.20 GiB is free")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[-2:] == [f"warning: out of GPU memory at --batch 3: {summary}; left out, with any larger --batch",
                             "warning: --batch 4 left out: a smaller size did not fit in the GPU's memory"]
    assert "max_batch = " in result.stdout


def test_a_bench_where_no_batch_size_fits_is_one_line(tmp_path, monkeypatch):
    """Not even one stream fits: the error names the size and what torch asked for, exit 2, and -o is not
    written."""

    def engine(*args, **kwargs):
        raise torch.OutOfMemoryError(OUT_OF_MEMORY)

    monkeypatch.setattr(bench, "Engine", engine)
    path = tmp_path / "results.json"
    result = cli(*TINY_RUN, "-o", str(path))
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert not path.exists()
    assert result.stderr.splitlines()[-1] == ("error: out of GPU memory at --batch 1: CUDA out of memory. Tried to "
                                              "allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                                              "1.20 GiB is free")


def test_a_bench_interrupted_before_its_first_row_says_so_and_leaves_an_old_report_alone(tmp_path, monkeypatch):
    """Nothing measured: no table, and an existing -o file of that name is left as it was, so the message says it
    was not written (it must not pass for these results)."""

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "measure", ctrl_c)
    path = tmp_path / "old.json"
    path.write_text("old")
    result = cli(*TINY_RUN, "-o", str(path))
    assert result.exit_code == 130, (result.stderr, result.exception)
    assert path.read_text() == "old"
    assert result.stderr.splitlines()[-1] == f"interrupted before the first measurement: {path} not written"


@pytest.mark.parametrize(
    ("name", "message"),
    [("cpu", "error: preset 'cpu' ships with csmcli: choose another --write-preset NAME"),
     ("../escape", "error: --write-preset '../escape': use letters, digits"),
     ("", "error: --write-preset '': use letters, digits"),
     ("mine.toml", "error: --write-preset 'mine.toml': give the name without .toml")],
)
def test_write_preset_refuses_bad_names_before_measuring(tmp_presets, name, message):
    before = (tmp_presets / "cpu.toml").read_text()
    result = cli(*TINY_RUN, "--suggest", "--write-preset", name)
    assert one_error_line(result).startswith(message)
    assert result.stdout == ""  # refused before the run: no preset printed
    assert (tmp_presets / "cpu.toml").read_text() == before and not (tmp_presets.parent / "escape.toml").exists()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--batch", "0"), "error: --batch takes numbers from 1 to 1024, got '0'"),
        # a typo that used to fail inside torch (exit 1, a C++ stack in the message)
        (("--batch", "9" * 20), f"error: --batch takes numbers from 1 to 1024, got '{'9' * 20}'"),
        (("--chunk-frames", "4096"), "error: --chunk-frames takes numbers from 1 to 2048, got '4096'"),
        (("-o", ""), "error: -o is empty: give a .json, .md or .csv path"),
        (("--chunk-frames", "a"), "error: --chunk-frames takes a comma list of whole numbers, like 1,4,16; got 'a'"),
        # an unset shell variable or a doubled comma: was the default batch, or the list without the gap
        (("--batch", ""), "error: --batch takes a comma list of whole numbers, like 1,4,16; got ''"),
        (("--batch", "1,,2"), "error: --batch takes a comma list of whole numbers, like 1,4,16; got '1,,2'"),
        (("-o", "x.txt"), "error: x.txt: unknown report format (use .json, .md or .csv)"),
        # --tiny makes the device cpu only when none is given; an empty value is a mistake, not a default
        (("--torch-device", ""), "error: --torch-device '': not a device (use cpu, cuda or cuda:N)"),
        (("-o", "/no/such/dir/r.json"),
         "error: cannot write /no/such/dir/r.json: directory /no/such/dir does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli(*TINY_RUN, *args)
    assert one_error_line(result) == message
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the arithmetic, on a fake clock


class Script:
    """A fake `time` for bench: the clock moves only when the engine or the decoder says their work took time."""

    WARMUP_SECONDS = 10.0  # far from every timed value: a warm-up rep leaking into a statistic shows

    def __init__(self, warmup: int):
        self.now, self.warmup, self.rng = 100.0, warmup, random.Random(0)
        self.reps: list[dict] = []  # per admit: prefill seconds, chunks (frames, rows, seconds), decode seconds

    def perf_counter(self) -> float:
        return self.now

    def take(self, lo: float, hi: float) -> float:
        seconds = self.WARMUP_SECONDS if len(self.reps) <= self.warmup else self.rng.uniform(lo, hi)
        self.now += seconds
        return seconds

    @property
    def timed(self) -> list[dict]:
        return self.reps[self.warmup:]


class ScriptedEngine(Engine):
    """The real engine; each prefill and chunk 'takes' a scripted time, and what it made is recorded."""

    def __init__(self, model, batch: int, script: Script):
        super().__init__(model, max_batch=batch, cuda_graphs=False)
        self.script = script

    def admit(self, waiting):
        admitted = super().admit(waiting)
        self.script.reps.append({"prefill": 0.0, "chunks": [], "decode": [], "admitted": len(admitted)})
        self.script.reps[-1]["prefill"] = self.script.take(0.05, 0.2)
        return admitted

    def run_chunk(self, frames: int):
        codes = super().run_chunk(frames)  # [frames, B, 32]
        per_frame = self.script.take(0.01, 0.05)
        self.script.now += per_frame * (frames - 1)  # the chunk takes `frames` times a per-frame time
        self.script.reps[-1]["chunks"].append((codes.shape[0], codes.shape[1], per_frame * frames, per_frame))
        return codes


class ScriptedDecoder:
    """The real chunk decoder (streaming Mimi), whose every chunk 'takes' a scripted time."""

    def __init__(self, decoder, batch: int, script: Script):
        self.chunks, self.script, self.resets = ChunkDecoder(decoder, batch, 32), script, 0

    def reset(self) -> None:
        self.resets += 1
        self.chunks.reset()

    def decode(self, codes):
        pcm = self.chunks.decode(codes)  # [B, 32, n] -> [B, 1, n * 1920]
        assert codes.shape[1] == 32 and pcm.shape == (codes.shape[0], 1, codes.shape[2] * 1920)
        self.script.reps[-1]["decode"].append(self.script.take(0.002, 0.01))
        return pcm


@pytest.fixture(scope="module")
def tiny_model():
    return random_model(bench.TINY, "cpu", torch.float32)


@pytest.fixture(scope="module")
def tiny_decoder():
    return random_codec(torch.device("cpu"), bench.tiny_mimi_config()).decoder


@pytest.mark.parametrize(
    ("batch", "first", "chunk", "frames", "reps"),
    [(2, 1, 2, 6, 3), (1, 2, 4, 2, 2)],  # chunks 1+2+2+1 (a short last one); a single first chunk
    ids=["chunks-1-2-2-1", "single-chunk"],
)
def test_numbers_follow_from_measured_times(monkeypatch, tiny_model, tiny_decoder, batch, first, chunk, frames,
                                            reps):
    script = Script(warmup=1)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=script.perf_counter))
    settings = bench.BenchSettings(batches=[batch], chunk_frames=[chunk], first_chunk_frames=first, frames=frames,
                                   prompt_rows=20, reps=reps, warmup=1)
    decoder = ScriptedDecoder(tiny_decoder, batch, script)
    try:
        row = bench.measure(ScriptedEngine(tiny_model, batch, script), decoder, settings, batch, chunk, None,
                            bytes_per_frame=10**6)
    finally:
        decoder.chunks.close()

    assert len(script.reps) == 1 + reps and decoder.resets == 1 + reps  # a fresh utterance per rep
    for rep in script.reps:  # every stream made exactly `frames` frames, `first` of them in the first chunk
        assert rep["admitted"] == batch
        assert sum(n for n, *_ in rep["chunks"]) == frames and {rows for _, rows, *_ in rep["chunks"]} == {batch}
        assert rep["chunks"][0][0] == min(first, frames) and all(n <= chunk for n, *_ in rep["chunks"][1:])
        assert len(rep["decode"]) == len(rep["chunks"])
    timed = script.timed
    gen = [sum(c[2] for c in r["chunks"]) for r in timed]
    dec = [sum(r["decode"]) for r in timed]
    wall = [r["prefill"] + g + d for r, g, d in zip(timed, gen, dec, strict=True)]
    steady = [c[3] * 1000 for r in timed for c in (r["chunks"][1:] or r["chunks"])]  # ms per frame
    first_audio = [(r["prefill"] + r["chunks"][0][2] + r["decode"][0]) * 1000 for r in timed]
    audio = frames * 0.08
    assert FRAME_SECONDS == 0.08

    approx = lambda x: pytest.approx(x, rel=1e-9)  # noqa: E731
    assert row.rtf_codes == approx(statistics.median(gen) / audio)
    assert row.rtf_with_decode == approx(statistics.median(g + d for g, d in zip(gen, dec, strict=True)) / audio)
    assert row.x_realtime == approx(batch * audio / statistics.median(wall))
    assert row.ms_per_frame_p50 == approx(statistics.median(steady))
    assert row.ms_per_frame_p95 == approx(float(np.percentile(steady, 95)))
    assert row.chunk_ms_p50 == approx(statistics.median(c[2] * 1000 for r in timed for c in r["chunks"]))
    assert row.decode_ms_per_chunk_p50 == approx(statistics.median(d * 1000 for r in timed for d in r["decode"]))
    assert row.prefill_ms == approx(statistics.median(r["prefill"] * 1000 / batch for r in timed))
    assert row.first_audio_ms_p50 == approx(statistics.median(first_audio))
    assert row.first_audio_ms_p95 == approx(float(np.percentile(first_audio, 95)))
    assert (row.rep_seconds_min, row.rep_seconds_median, row.rep_seconds_max) == (
        approx(min(wall)), approx(statistics.median(wall)), approx(max(wall)))
    assert row.weight_gbps == approx(10**6 / (statistics.median(steady) / 1000) / 1e9)
    assert (row.batch, row.chunk_frames, row.first_chunk_frames, row.frames, row.reps) == (
        batch, chunk, first, frames, reps)
    assert row.peak_vram_torch_gb is None and row.nominal_gbps is None
    # the row's RTF in its own terms: the median generation time is rtf x frames x 80 ms
    assert row.rtf_codes * frames * 0.08 == approx(statistics.median(gen))


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "values",
    [[3.0], [5.0, 1.0], [4.0, 1.0, 3.0, 2.0, 10.0], [random.Random(1).expovariate(1.0) for _ in range(17)]],
)
def test_percentile_matches_numpy_and_statistics(values):
    for q in (0, 1, 5, 25, 50, 75, 95, 99, 100):
        assert bench.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    if len(values) > 1:
        cuts = statistics.quantiles(values, n=100, method="inclusive")  # cuts[q - 1] is the q-th percentile
        for q in (1, 5, 25, 50, 75, 95, 99):
            assert bench.percentile(values, q) == pytest.approx(cuts[q - 1], rel=1e-12)
    assert bench.percentile(values, 50) == pytest.approx(statistics.median(values), rel=1e-12)
    assert math.isnan(bench.percentile([], 50))


def _transformer_params(t) -> int:
    attention = t.dim * (t.n_heads + 2 * t.n_kv_heads) * t.head_dim + t.n_heads * t.head_dim * t.dim
    feed_forward = 3 * t.dim * t.intermediate_size  # gate, up, down
    return t.n_layers * (attention + feed_forward + 2 * t.dim) + t.dim  # + two norms per layer, final norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bfloat16 + fp8"])
def test_weight_bytes_per_frame_by_hand(tiny_model, dtype):
    cfg = bench.TINY
    bb, dd, vocab = cfg.backbone, cfg.decoder, cfg.audio_vocab_size
    backbone, decoder = _transformer_params(bb), _transformer_params(dd)
    projection = bb.dim * dd.dim
    audio_head = (cfg.num_codebooks - 1) * dd.dim * vocab
    codebook0_head = bb.dim * vocab
    embeddings = cfg.text_vocab_size * bb.dim + cfg.num_codebooks * vocab * bb.dim
    model = tiny_model if dtype == torch.float32 else random_model(cfg, "cpu", torch.bfloat16)
    # the hand count misses no parameter: with the embeddings (left out of a frame's reads) it is the model's size
    assert sum(p.numel() for p in model.parameters()) == (
        backbone + decoder + projection + audio_head + codebook0_head + embeddings)
    per_frame = backbone + 31 * decoder + projection + audio_head + codebook0_head
    if dtype == "bfloat16 + fp8":  # the layers' matmuls at 1 byte, norms, projection and heads at 2
        model.to_fp8()
        matmuls = [_transformer_params(t) - t.n_layers * 2 * t.dim - t.dim for t in (bb, dd)]
        one_byte = matmuls[0] + 31 * matmuls[1]
        assert bench.weight_bytes_per_frame(model) == one_byte + 2 * (per_frame - one_byte)
        return
    assert bench.weight_bytes_per_frame(model) == per_frame * (4 if dtype == torch.float32 else 2)
    # torch ops project every step's input: the projection 31 times
    assert bench.weight_bytes_per_frame(model, fused_kernels=False) == (per_frame + 30 * projection) * (
        4 if dtype == torch.float32 else 2)


def test_fp8_run_says_so_in_header_and_title(tmp_path):
    path = tmp_path / "r.json"
    result = run_ok("--no-decode", "--fp8", "-o", str(path))
    assert json.loads(path.read_text())["header"]["fp8"] is True
    stderr = " ".join(result.stderr.split())
    assert "float32 + fp8 weights" in stderr  # the table's title, however it wraps
    assert "warning: fp8 weights without the fused kernels" in stderr  # on the CPU: slower than bf16, not faster
