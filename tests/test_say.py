"""`csmcli say` end to end on a tiny random checkpoint, run in a subprocess as a user runs it (issue #4).

Random weights essentially never emit EOS (an all-zero frame), so every sentence runs to --max-seconds:
0.8 s = 10 frames of 1920 samples.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from clirun import FRAME, FRAMES, RATE, SHORT, TEXT, command, env, model_args, seeded_say, session_runs

from csmcli import speak
from csmcli.errors import CsmError

SUMMARY = re.compile(r"^0\.80 s of audio in [\d.]+ s \(RTF [\d.]+, [\d.]+ ms/frame, first audio \d+ ms\)$")
SEED_LINE = re.compile(r"^seed (\d+) \(pass --seed \1 to repeat\)$")
THREE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog. Speech synthesis turns text into sound today. "
    "Hello there, how are you doing on this fine day?"
)  # each piece long enough that split_sentences keeps it on its own
TO_FILES = ("-o", "out.wav", "--save-codes", "codes.npy")

# case -> (arguments after `say`, start of the error line); the files they name are made by the `runs` fixture
BAD = {
    "empty text": (("",), "text is empty"),
    "missing text file": (("-f", "no-such.txt"), "no-such.txt: cannot read text"),
    "missing ref audio": ((TEXT, "--ref-audio", "no-such.wav", "--ref-text", "hi"), "audio file not found"),
    "corrupt ref audio": ((TEXT, "--ref-audio", "garbage.wav", "--ref-text", "hi"), "cannot read audio file"),
    "ref audio without ref text": ((TEXT, "--ref-audio", "ref.wav"), "--ref-audio and --ref-text go together"),
    "unknown extension": ((TEXT, "-o", "out.xyz"), "out.xyz: unsupported output format '.xyz'"),
    "missing output directory": ((TEXT, "-o", "no/such/out.wav"), "cannot write no/such/out.wav: directory"),
    "context not a list": ((TEXT, "--context", "turns.yaml"), "turns.yaml: expected a list of turns"),
    "malformed context": ((TEXT, "--context", "broken.yaml"), "broken.yaml: not valid JSON/YAML"),  # multi-line
    "fractional speaker": ((TEXT, "--context", "speaker.yaml"), "speaker.yaml: turn 1: speaker must be an integer"),
    "missing tokenizer": ((TEXT, "--tokenizer", "/no/such/tok"), "/no/such/tok: no such tokenizer directory"),
    "missing codec": ((TEXT, "--codec", "/no/such/mimi"), "/no/such/mimi: no such Mimi checkpoint"),
    "missing model": ((TEXT, "--model", "/no/such/dir"), "/no/such/dir: no such directory"),
    "corrupt weights": ((TEXT, "--model", "corrupt"), "corrupt/model.safetensors: not a readable safetensors file"),
    "flac into a fifo": ((TEXT, "-o", "pipe.flac"), "pipe.flac is not a regular file: only WAV (or --raw) can be"),
    "codes over the audio": ((TEXT, "-o", "same.npy", "--raw", "--save-codes", "./same.npy"),
                             "-o same.npy is the file given to --save-codes: the codes would replace the audio"),
    "audio over the text": (("-f", "text.txt", "-o", "text.txt", "--raw"),
                            "-o text.txt is the file given to -f: it would be overwritten"),
    "audio over the reference": ((TEXT, "--ref-audio", "ref.wav", "--ref-text", "hi", "-o", "ref.wav"),
                                 "-o ref.wav is the file given to --ref-audio: it would be overwritten"),
}


def sine_wav(path, rate: int = 16000, seconds: float = 0.5) -> None:
    """Stereo at 16 kHz, so loading it resamples to 24 kHz and mixes down to mono."""
    t = np.arange(int(rate * seconds)) / rate
    sf.write(path, 0.3 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], axis=1), rate)


def _bad_input_files(directory, checkpoint, case: str) -> None:
    (directory / "garbage.wav").write_bytes(b"this is not audio at all" * 40)
    sine_wav(directory / "ref.wav")
    (directory / "turns.yaml").write_text("speaker: 0\ntext: not a list\n")
    (directory / "broken.yaml").write_text("- speaker: 0\n  text: [unclosed\n")  # the parser's message spans lines
    (directory / "speaker.yaml").write_text("- {speaker: 1.7, text: Hello there.}\n")
    (directory / "text.txt").write_text("Hello there.\n")
    if case == "flac into a fifo":
        os.mkfifo(directory / "pipe.flac")  # nobody reads it: opening it would block, so it must be refused first
    if case != "corrupt weights":
        return
    (directory / "corrupt").mkdir(exist_ok=True)
    for f in checkpoint.iterdir():  # the real config and tokenizer, garbage weights (4 MB: for that case alone)
        garbage = f.name == "model.safetensors"
        (directory / "corrupt" / f.name).write_bytes(b"\x00garbage" * 100 if garbage else f.read_bytes())


@pytest.fixture(scope="module")
def runs(hf_checkpoint, tmp_path_factory):
    """Every plain run this module reads, started at once (two at a time); tests wait for the ones they need."""
    runs, model = session_runs(tmp_path_factory), model_args(hf_checkpoint)
    runs.start("seeded", *seeded_say(hf_checkpoint))
    runs.start("greedy", "say", TEXT, *SHORT, "-t", "0", *TO_FILES, *model)
    runs.start("fp8", "say", TEXT, *SHORT, "-t", "0", "--fp8", *TO_FILES, *model)
    runs.start("greedy-quiet", "--quiet", "say", TEXT, *SHORT, "-t", "0", *TO_FILES, *model)
    runs.start("greedy-verbose", "--verbose", "say", TEXT, *SHORT, "-t", "0", *TO_FILES, *model)
    runs.start("seeded-stdout", "say", TEXT, *SHORT, "--seed", "5", "-o", "-", "--save-codes", "codes.npy", *model)
    runs.start("seeded-raw", "say", TEXT, *SHORT, "--seed", "5", "-o", "-", "--raw", *model)
    runs.start("three", "say", THREE_SENTENCES, "--max-seconds", "0.4", *TO_FILES, *model)
    (runs.dir("unwritable codes") / "full.npy").symlink_to("/dev/full")  # opens, then every write fails: ENOSPC
    runs.start("unwritable codes", "say", TEXT, *SHORT, "-t", "0", "--dtype", "bfloat16", "-o", "out.wav",
               "--save-codes", "full.npy", *model)
    (runs.dir("audio to a full disk") / "full.wav").symlink_to("/dev/full")
    runs.start("audio to a full disk", "say", TEXT, *SHORT, "-t", "0", "-o", "full.wav", *model)
    runs.start("audio to /dev/null", "say", TEXT, *SHORT, "-t", "0", "-o", "/dev/null", *model)
    for case, (args, _) in BAD.items():
        _bad_input_files(runs.dir(f"bad {case}"), hf_checkpoint, case)
        runs.start(f"bad {case}", "say", *args, *model[:2], *(() if "--model" in args else model[2:]))
    sine_wav(runs.dir("ref") / "ref.wav")
    runs.start("ref", "say", TEXT, *SHORT, "-t", "0", "--ref-audio", "ref.wav", "--ref-text", "Hello there.",
               *TO_FILES, *model)
    sine_wav(runs.dir("context") / "clip.wav")
    (runs.dir("context") / "turns.yaml").write_text(
        "- {speaker: 1, text: The quick brown fox., audio: clip.wav}\n- {speaker: 0, text: Hello there.}\n"
    )
    runs.start("context", "say", TEXT, *SHORT, "-t", "0", "--context", "turns.yaml", *TO_FILES, *model)
    yield runs
    runs.cancel_pending()


def assert_ok(result) -> None:
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------- to a file


def test_wav_holds_one_frame_of_audio_per_saved_code_frame(runs):
    result = runs("seeded")
    assert_ok(result)
    codes = result.codes()
    assert codes.shape == (FRAMES, 32) and codes.dtype == np.int64
    assert sf.info(result.dir / "out.wav").samplerate == RATE
    assert len(result.wav()) == len(codes) * FRAME


def test_summary_on_stderr_and_nothing_on_stdout(runs):
    result = runs("seeded")
    assert result.stdout == b""
    assert SUMMARY.match(result.lines[-1]), result.lines
    assert not any(line.startswith("seed ") for line in result.lines)  # --seed given: nothing to repeat


def test_quiet_silences_stderr(runs):
    result = runs("greedy-quiet")
    assert_ok(result)
    assert result.stderr == ""  # transformers' config warnings included
    assert len(result.wav()) == FRAMES * FRAME


def test_verbose_times_loading_and_warm_up_and_speaks_the_same(runs, hf_checkpoint):
    result, plain = runs("greedy-verbose"), runs("greedy")
    assert_ok(result)
    assert re.search(rf"^loaded {re.escape(str(hf_checkpoint))} on cpu in \d+\.\d s$", result.stderr, re.M), \
        result.stderr
    assert re.search(r"^warmed up \(kernels, CUDA graphs, Mimi\) in \d+\.\d s$", result.stderr, re.M), result.stderr
    np.testing.assert_array_equal(result.codes(), plain.codes())


def test_audio_equals_transformers_decode_of_the_codes(runs, hf_model):
    result = runs("seeded")
    codes = torch.from_numpy(result.codes()).T[None]  # [1, 32, frames]
    # CSM's audio vocabulary has 2051 ids, Mimi's codebooks 2048: the pipeline clamps, so the reference must too
    with torch.no_grad():
        reference = hf_model.codec_model.decode(codes.clamp(0, 2047)).audio_values[0, 0].numpy()  # [frames * 1920]
    reference = np.clip(reference, -1.0, 1.0)
    peak = np.abs(reference).max()
    assert peak > 1e-3  # a silent reference would compare equal to anything quiet
    # int16 rounding (half a step) + the streaming decoder's chunk seams (float rounding, ~1e-6 of the peak)
    np.testing.assert_allclose(result.wav() / 32767.0, reference, rtol=0, atol=1 / 32767 + 1e-5 * peak)


# ----------------------------------------------------------------------------------------------- determinism


def test_fp8_on_the_cpu_speaks_and_warns_that_it_is_slower(runs):
    result, greedy = runs("fp8"), runs("greedy")
    assert_ok(result)
    assert "warning: fp8 weights without the fused kernels" in " ".join(result.stderr.split())
    assert "fp8" not in greedy.stderr
    assert sf.info(result.dir / "out.wav").samplerate == RATE
    assert len(result.wav()) == len(result.codes()) * FRAME > 0


def test_greedy_is_deterministic(runs):
    first, second = runs("greedy"), runs("greedy-quiet")
    assert_ok(first)
    np.testing.assert_array_equal(first.codes(), second.codes())
    assert not any(line.startswith("seed ") for line in first.lines)  # greedy needs no seed


def test_same_seed_same_codes(runs):
    again = runs("seeded-stdout")
    assert_ok(again)
    np.testing.assert_array_equal(again.codes(), runs("seeded").codes())
    assert not np.array_equal(runs("seeded").codes(), runs("greedy").codes())  # the temperature did sample


def test_without_seed_the_chosen_seed_is_printed(runs):
    result = runs("three")
    assert_ok(result)
    assert any(SEED_LINE.match(line) for line in result.lines), result.lines


# ---------------------------------------------------------------------------------------------------- stdout


def test_stdout_wav_equals_the_file(runs):
    result = runs("seeded-stdout")
    assert_ok(result)
    assert result.stdout[:4] == b"RIFF"
    np.testing.assert_array_equal(result.stdout_wav(), runs("seeded").wav())


def test_stdout_raw_is_the_files_samples(runs):
    result = runs("seeded-raw")
    assert_ok(result)
    np.testing.assert_array_equal(np.frombuffer(result.stdout, dtype="<i2"), runs("seeded").wav())


def test_reader_closing_the_pipe_early_is_not_an_error(hf_checkpoint, tmp_path):
    # 1.6 s of 16-bit audio is 77 kB, more than a pipe buffers (64 kB): writes go on after `head` has gone
    say = shlex.join(command("say", TEXT, "--max-seconds", "1.6", "--seed", "1", "-o", "-", *model_args(hf_checkpoint)))
    shell = f"{say} | head -c 1000 > head.out; exit ${{PIPESTATUS[0]}}"
    p = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env())
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr and "error" not in p.stderr
    assert (tmp_path / "head.out").read_bytes()[:4] == b"RIFF"
    seconds = float(p.stderr.splitlines()[-1].split()[0])  # the totals line, as far as the reader took it
    assert seconds < 1.6, p.stderr  # it stopped at the closed pipe: that path really ran


# ---------------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize(("cmd", "sig", "name", "code"), [
    (("say",), signal.SIGINT, "long.wav", 130), (("stream", "--no-play"), signal.SIGINT, "long.wav", 130),
    (("say",), signal.SIGTERM, "long.flac", 143),  # `kill`, `timeout`: a FLAC is valid only once closed
    (("say",), (signal.SIGINT, signal.SIGINT, signal.SIGTERM), "long.flac", 130),  # an impatient user
])
def test_ctrl_c_leaves_a_valid_file_and_prints_the_totals(hf_checkpoint, tmp_path, cmd, sig, name, code):
    """Also `stream`, whose live table must not keep its running totals beside the summary line; SIGTERM, which
    stops a run as Ctrl-C does (exit 128 + 15); and more signals during the clean-up after the first, which are
    ignored: no traceback, and the FLAC is still finished."""
    wav = tmp_path / name
    proc = subprocess.Popen(command(*cmd[:1], TEXT, *cmd[1:], "--max-seconds", "60", "-o", str(wav),
                                    *model_args(hf_checkpoint)),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    try:
        deadline = time.monotonic() + 240
        while not (wav.exists() and wav.stat().st_size > 0):  # written with the first chunk's samples (an empty
            # file may show for a moment before the model loads: the writability check's probe)
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "no audio written in time"
            time.sleep(0.05)
        for i, one in enumerate(sig if isinstance(sig, tuple) else (sig,)):
            time.sleep(0.02 if i else 0)
            proc.send_signal(one)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == code, err
    assert out == b"" and "Traceback" not in err and "Exception ignored" not in err
    samples = sf.read(wav, dtype="int16")[0]
    assert len(samples) > 0 and len(samples) % FRAME == 0
    assert len(samples) < 60 / 0.08 * FRAME  # it did stop early
    assert re.match(r"^[\d.]+ s of audio in [\d.]+ s \(RTF", err.splitlines()[-1]), err
    assert err.count(" s of audio in ") == 1, err


def test_codes_that_cannot_be_written_fail_the_run_but_keep_the_audio(runs):
    """--save-codes into a file that takes no data (a full disk; here /dev/full, which passes the check before the
    model loads: it opens) fails only at the end: the audio is kept, the totals printed, and the run fails with one
    error line. The CPU also says it ignores --dtype bfloat16."""
    result = runs("unwritable codes")
    assert result.code == 2 and "Traceback" not in result.stderr
    assert result.lines[0] == "warning: dtype bfloat16 runs as float32 on the cpu"
    assert SUMMARY.match(result.lines[-2]), result.lines
    assert result.lines[-1] == "error: cannot write full.npy: No space left on device", result.lines
    assert len(result.wav()) == FRAMES * FRAME


def test_audio_into_a_full_disk_is_one_error_line_after_the_summary(runs):
    """Output that fills up (/dev/full, a device: streamed WAV, every write fails with ENOSPC) ends the run with the
    totals and one error line naming the file and the reason, exit 2, not an OSError and exit 1. (A regular file on
    a full disk, where libsndfile says only "System error.": tests/test_audio.py.)"""
    result = runs("audio to a full disk")
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.lines[-1] == "error: cannot write full.wav: No space left on device", result.lines


def test_audio_into_dev_null_or_a_fifo_is_streamed_wav(runs, hf_checkpoint, tmp_path):
    """/dev/null and a FIFO are no regular files (libsndfile cannot seek back to finish a header there): they get
    the WAV that `-o -` streams, and the FIFO's reader reads every frame."""
    assert_ok(runs("audio to /dev/null"))
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    proc = subprocess.Popen(command("say", TEXT, *SHORT, "-t", "0", "-o", str(fifo), *model_args(hf_checkpoint)),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    with open(fifo, "rb") as reader:  # blocks until the writer opens its end
        data = reader.read()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out == b"", err.decode()
    assert len(sf.read(io.BytesIO(data), dtype="int16")[0]) == FRAMES * FRAME


@pytest.mark.parametrize("args", [("say", TEXT, *SHORT, "-o", "-"), ("info", "--json"), ("stream", "--list-devices"),
                                  ("bench", "--tiny", "--suggest")])
def test_a_closed_stdout_is_one_error_line(hf_checkpoint, tmp_path, args):
    """Started with stdout closed (`>&-`): one line and exit 2, not an AttributeError on None and exit 1."""
    cmd = shlex.join(command(*args, *(model_args(hf_checkpoint) if args[0] == "say" else ())))
    p = subprocess.run(["bash", "-c", f"{cmd} >&-"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=env())
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines()[-1].startswith("error: stdout is closed"), p.stderr


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_exit_2(runs, case):
    result = runs(f"bad {case}")
    assert result.code == 2, result.stderr
    assert result.stdout == b""
    assert len(result.lines) == 1 and result.lines[0].startswith(f"error: {BAD[case][1]}"), result.lines
    assert not (result.dir / "out.wav").exists()  # refused before any output was made


@pytest.mark.parametrize(("text", "stdin"), [("", ""), ("  \n ", ""), ("-", " \n\n"), ("\u200b\ufeff\u200d\x07 ", ""),
                                            ("\u00a0\u3000", "")])
def test_blank_text_is_refused(text, stdin):
    with pytest.raises(CsmError, match="text is empty"):
        speak.read_text(text, None, io.StringIO(stdin))


# ------------------------------------------------------------------------------------------ voice and context


def test_ref_audio_voice_prompt_changes_the_speech(runs):
    result = runs("ref")
    assert_ok(result)
    assert result.codes().shape == (FRAMES, 32) and len(result.wav()) == FRAMES * FRAME
    # greedy both: only the prompt differs, so different codes show the voice prompt reached the model
    assert not np.array_equal(result.codes(), runs("greedy").codes())


def test_context_file_turns_change_the_speech(runs):
    result = runs("context")
    assert_ok(result)
    assert result.codes().shape == (FRAMES, 32) and len(result.wav()) == FRAMES * FRAME
    assert not np.array_equal(result.codes(), runs("greedy").codes())
    assert not np.array_equal(result.codes(), runs("ref").codes())


def test_long_text_is_spoken_sentence_by_sentence(runs):
    result = runs("three")
    assert_ok(result)
    assert result.codes().shape == (3 * 5, 32)  # 3 sentences x 0.4 s
    assert len(result.wav()) == 3 * 5 * FRAME
    limits = [line for line in result.lines if "hit the 0.4 s limit" in line]
    assert [line.split()[2] for line in limits] == ["1", "2", "3"], result.lines
