"""The command line as a user meets it: exit codes, one-line errors, help, and a fast start without torch."""

import os
import subprocess
import sys
import textwrap
from typing import Annotated

import pytest
import torch
import typer
from typer.testing import CliRunner

from csmcli import __version__
from csmcli.cli import (
    ChunkFramesOpt,
    CompileOpt,
    CudaGraphsOpt,
    DtypeOpt,
    FirstChunkFramesOpt,
    Fp8Opt,
    FusedKernelsOpt,
    PresetOpt,
    app,
    preset_overrides,
)
from csmcli.errors import CsmError

COMMANDS = ["say", "stream", "bench", "info"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csmcli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == f"csmcli {__version__}\n"


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_exits_0(command):
    result = run(*filter(None, [command]), "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    if command:  # every command's help shows at least one example invocation
        assert "Example" in result.stdout and f"csmcli {command}" in result.stdout.split("Example", 1)[1]
    assert "<bool>" not in result.stdout  # an on/off flag takes no value (Typer 0.29 labels them as if it did)


def test_no_arguments_shows_help():
    result = run()
    assert result.returncode in (0, 2)  # Click >= 8.2 treats it as a usage error (2), older Click exits 0
    assert "Commands" in result.stdout + result.stderr
    assert "Usage" in result.stdout + result.stderr


def test_importing_the_cli_does_not_import_torch():
    result = run_python("import csmcli.cli, sys; print('torch' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr


def test_subcommand_help_does_not_import_torch():
    result = run_python(
        """
        import sys
        from csmcli.cli import main
        sys.argv = ["csmcli", "info", "--help"]
        try:
            main()
        except SystemExit as e:
            print("exit", e.code, "torch" in sys.modules, file=sys.stderr)
        """
    )
    assert result.stderr.strip().splitlines()[-1] == "exit 0 False"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("say",), "error: no text: give TEXT, '-' to read stdin, or -f FILE"),
        (("stream", "hi", "--no-play"), "error: nothing to do: --no-play needs -o FILE or -o -"),
        (("bench", "--batch", "1,x"), "error: --batch takes a comma list of whole numbers, like 1,4,16; got '1,x'"),
        (("bench", "--compare", "moshi"), "error: --compare knows only 'transformers', got 'moshi'"),
        (("say", "-f", "/no/such/file.txt"), "error: /no/such/file.txt: cannot read text"),
        (("say", "hi", "-f", "/no/such/file.txt"), "error: give TEXT or -f FILE, not both"),
        (("say", "hi", "--torch-device", "gpu"), "error: --torch-device gpu: not a device"),
        (("say", "hi", "--torch-device", ""), "error: --torch-device '': not a device"),
        (("say", "hi", "--torch-device", "cpu:1"), "error: --torch-device cpu:1: there is one CPU device"),
        (("say", "hi", "--save-codes", "/no/such/dir/c.npy"), "error: cannot write /no/such/dir/c.npy"),
        (("say", "hi", "--save-codes", "codes.txt"), "error: --save-codes codes.txt: the file name must end in .npy"),
        (("say", "hi", "--max-seconds", "inf"), "error: --max-seconds inf: not a finite number"),
        (("say", "hi", "-t", "nan"), "error: --temperature nan: not a finite number"),
        (("say", "hi \udcff there"), "error: text is not valid UTF-8"),
        (("say", "hi", "--random-weights"), "error: random weights come without a tokenizer: pass --tokenizer"),
        (("say", "hi", "--random-weights", "--model", "x"), "error: --model and --random-weights exclude each other"),
        (("bench", "--tiny", "--model", "x"), "error: --model and --tiny exclude each other"),
        (("bench", "-o", "/"), "error: cannot write /: it is a directory"),
        (("bench", "-o", "report.txt"), "error: report.txt: unknown report format"),
        (("bench", "--prompt-rows", "3000"), "error: --prompt-rows 3000 + --frames 100 exceed"),
        # Click's usage errors too: one line, not a boxed panel with the usage above it
        (("say", "hi", "-t", "-1"), "error: Invalid value for '--temperature' / '-t': -1.0 is not in the range x>=0.0"),
        (("say", "hi", "--seed", "abc"), "error: Invalid value for '--seed': 'abc' is not a valid int"),
        (("bench", "--frames", "1"), "error: Invalid value for '--frames': 1 is not in the range x>=2."),
        (("say", "hi", "--no-such-flag"), "error: No such option: --no-such-flag (see 'csmcli say --help')"),
        (("bogus",), "error: No such command 'bogus'. (see 'csmcli --help')"),
        (("say", "hi", "--seed", str(2**63)), "error: Invalid value for '--seed': 9223372036854775808 is not in the"),
        (("say", "hi", "--ref-audio", "me.wav", "--ref-text", " "), "error: --ref-text is empty: give the words"),
        (("say", "hi", "--ref-audio", "me.wav", "--ref-text", "\u200b"), "error: --ref-text is empty: give the words"),
        (("say", "hi", "-o", "."), "error: cannot write .: it is a directory"),
        (("say", "hi", "-o", "/proc/out.wav"), "error: cannot write /proc/out.wav: No such file or directory"),
        (("bench", "--tiny", "-o", "/proc/report.json"), "error: cannot write /proc/report.json: No such file"),
        (("-q", "info"), "error: --quiet hides info's table: give --json to have the report on stdout"),
        # empty values (an unset shell variable): --model "" used to fall back to sesame/csm-1b, --tokenizer "" was
        # ignored, -o "" named the current directory
        (("say", "hi", "--model", ""), "error: --model is empty: give a checkpoint directory or hub id"),
        (("say", "hi", "--tokenizer", " "), "error: --tokenizer is empty: give a tokenizer directory"),
        (("say", "hi", "--codec", ""), "error: --codec is empty: give a Mimi checkpoint directory"),
        (("say", "hi", "-o", ""), "error: -o is empty: give a file path (or '-' for stdout)"),
        (("stream", "hi", "--no-play", "-o", ""), "error: -o is empty"),
        (("say", "-f", ""), "error: --file is empty: give a text file"),
        (("say", "hi", "--context", ""), "error: --context is empty: give a JSON or YAML file"),
        (("say", "hi", "--save-codes", ""), "error: --save-codes is empty: give a FILE.npy path"),
        (("bench", "--tiny", "-o", ""), "error: -o is empty: give a .json, .md or .csv path"),
        # names that are all suffix
        (("say", "hi", "-o", ".wav"), "error: .wav: give a file name before .wav, like out.wav"),
        (("say", "hi", "--save-codes", ".npy"), "error: --save-codes .npy: give a file name before .npy"),
        (("say", "hi", "--model", "/etc/passwd"), "error: /etc/passwd: a file, not a checkpoint directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_an_output_path_that_is_a_directory_is_refused_before_any_work(tmp_path):
    """A directory named like the file (codes.npy, report.json, out.wav) would fail only after generating or
    measuring."""
    for args, name in [(("say", "hi", "--save-codes"), "codes.npy"), (("bench", "--tiny", "-o"), "report.json"),
                       (("say", "hi", "--model", "/no/such/dir", "-o"), "out.wav"),
                       (("stream", "hi", "--no-play", "--raw", "--model", "/no/such/dir", "-o"), "pcm")]:
        (tmp_path / name).mkdir()
        result = run(*args, str(tmp_path / name))
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"error: cannot write {tmp_path / name}: it is a directory"]


def test_context_and_reference_audio_that_would_mislead_are_refused_before_loading(tmp_path):
    """A misspelt key would drop a voice clip without a word; NaN samples would reach the codec."""
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 800, dtype=np.float32), 24000, subtype="FLOAT")
    sf.write(tmp_path / "loud.wav", np.array([0.1, 50.0, -0.2] * 800, dtype=np.float32), 24000, subtype="FLOAT")
    (tmp_path / "typo.yaml").write_text("- {speaker: 1, text: Hello there., audo: loud.wav}\n")
    (tmp_path / "blank.yaml").write_text("- {speaker: 1, text: Hello there., audio: ''}\n")
    model = ("--model", "/no/such/dir")
    cases = [
        (("--context", str(tmp_path / "typo.yaml")), "turn 1: unknown key 'audo' (a turn has speaker, text, audio)"),
        (("--context", str(tmp_path / "blank.yaml")), "turn 1: audio must be a file path, got ''"),
        (("--ref-audio", str(tmp_path / "nan.wav"), "--ref-text", "Hi."), "samples that are not numbers (NaN or"),
    ]
    for args, part in cases:
        result = run("say", "hi", *args, *model)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and part in result.stderr, result.stderr
    loud = run("say", "hi", "--ref-audio", str(tmp_path / "loud.wav"), "--ref-text", "Hi.", *model)
    assert loud.stderr.splitlines()[0].startswith(f"warning: {tmp_path / 'loud.wav'} peaks at 50, beyond full scale")
    assert loud.returncode == 2 and "/no/such/dir" in loud.stderr.splitlines()[-1]  # a warning, then the model


def test_an_audio_device_without_playback_is_named_as_unused():
    result = run("say", "hi", "--device", "3", "--model", "/no/such/dir")
    assert result.returncode == 2  # the missing model; the warning comes first, before any loading
    assert result.stderr.splitlines()[0] == "warning: --device 3 has no effect without playback (--play)"


def test_raw_without_an_output_is_named_as_unused():
    result = run("stream", "hi", "--raw", "--model", "/no/such/dir")
    assert result.returncode == 2  # no speakers here, or the missing model; the warning comes first
    assert result.stderr.splitlines()[0] == "warning: --raw has no effect without -o (FILE or -)"


@pytest.mark.parametrize(("args", "warned"), [((), "out.wav"), (("-o", "x.FLAC"), "x.FLAC"), (("-o", "x.pcm"), None)])
def test_raw_into_an_audio_file_name_is_named(args, warned):
    result = run("say", "hi", "--raw", *args, "--model", "/no/such/dir")
    assert result.returncode == 2  # the missing model; the warning comes first
    first = result.stderr.splitlines()[0]
    if warned:
        suffix = warned[warned.rindex("."):].lower()
        assert first == f"warning: --raw: {warned} will hold headerless s16le PCM, not {suffix} audio"
    else:
        assert first.startswith("error:")


def test_user_error_in_a_command_is_one_line_and_exit_2():
    result = run("info", "--preset", "no-such-preset")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown preset 'no-such-preset'")


def test_quiet_and_verbose_together_is_a_usage_error():
    result = run("-q", "-v", "info")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: --quiet and --verbose cannot be used together"]


def test_unknown_option_is_exit_2():
    assert run("info", "--no-such-flag").returncode == 2


# A throwaway command on the real app shows how the real entry point handles each kind of failure.
_RAISE = """
import sys
from csmcli.cli import app, main
from csmcli.errors import CsmError

@app.command("boom")
def boom() -> None:
    raise {exc}

sys.argv = ["csmcli", "boom"]
main()
"""


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        ('CsmError("the file x.wav is [not] there")', 2, "error: the file x.wav is [not] there"),
        ('RuntimeError("kaput")', 1, "error: RuntimeError: kaput (set CSMCLI_DEBUG=1 to see the traceback)"),
    ],
)
def test_errors_become_one_line(exc, code, line):
    result = run_python(_RAISE.format(exc=exc), env={"CSMCLI_DEBUG": ""})
    assert result.returncode == code
    assert result.stderr.splitlines() == [line]


@pytest.mark.parametrize(("exc", "code"), [('CsmError("bad input")', 2), ('RuntimeError("kaput")', 1)])
def test_debug_env_shows_the_traceback(exc, code):
    result = run_python(_RAISE.format(exc=exc), env={"CSMCLI_DEBUG": "1"})
    assert result.returncode == code
    assert "Traceback" in result.stderr and "boom" in result.stderr


def test_ctrl_c_exits_130():
    result = run_python(_RAISE.format(exc="KeyboardInterrupt"))
    assert result.returncode == 130
    assert "Traceback" not in result.stderr


def test_closed_stdout_pipe_is_quiet():
    code = _RAISE.format(exc="SystemExit(0)").replace(
        "    raise SystemExit(0)", "    while True:\n        sys.stdout.write('x' * 65536)\n        sys.stdout.flush()"
    )
    shell = f'{sys.executable} -c "$CODE" | head -c 10 >/dev/null; exit ${{PIPESTATUS[0]}}'
    result = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, timeout=60, env={**os.environ, "CODE": code}
    )
    assert result.returncode == 1
    assert result.stderr == ""


def test_long_errors_stay_on_one_line():
    result = run_python(_RAISE.format(exc=f'CsmError("{"x" * 300}")'), env={"COLUMNS": "80"})
    assert len(result.stderr.splitlines()) == 1


def _options_app() -> typer.Typer:
    """A command that only collects the shared preset flags, to check how they parse."""
    app = typer.Typer()

    @app.command()
    def collect(
        preset: PresetOpt = None,
        first_chunk_frames: FirstChunkFramesOpt = None,
        chunk_frames: ChunkFramesOpt = None,
        batch: Annotated[int | None, typer.Option("--batch", min=1)] = None,  # max_batch (bench takes a list)
        dtype: DtypeOpt = None,
        cuda_graphs: CudaGraphsOpt = None,
        compile: CompileOpt = None,
        fused_kernels: FusedKernelsOpt = None,
        fp8: Fp8Opt = None,
    ) -> None:
        overrides = preset_overrides(
            first_chunk_frames, chunk_frames, batch, dtype, cuda_graphs, compile, fused_kernels, fp8
        )
        typer.echo(repr((preset, overrides)))

    return app


def test_preset_flags_default_to_not_given():
    result = CliRunner().invoke(_options_app(), [])
    assert result.exit_code == 0, result.output
    keys = ["first_chunk_frames", "chunk_frames", "max_batch", "dtype", "cuda_graphs", "compile", "fused_kernels",
            "fp8"]
    assert result.output.strip() == repr((None, dict.fromkeys(keys)))


def test_preset_flags_parse_to_override_values():
    args = ["--preset", "8gb", "--first-chunk-frames", "1", "--chunk-frames", "8", "--batch", "3"]
    args += ["--dtype", "float16", "--no-cuda-graphs", "--compile", "--no-fused-kernels", "--fp8"]
    result = CliRunner().invoke(_options_app(), args)
    assert result.exit_code == 0, result.output
    expected = {"first_chunk_frames": 1, "chunk_frames": 8, "max_batch": 3, "dtype": "float16"}
    flags = {"cuda_graphs": False, "compile": True, "fused_kernels": False, "fp8": True}
    assert result.output.strip() == repr(("8gb", {**expected, **flags}))
    result = CliRunner().invoke(_options_app(), ["--fused-kernels"])
    assert result.exit_code == 0, result.output
    assert "'fused_kernels': True" in result.output


def test_every_command_with_compile_takes_fused_kernels_and_fp8():
    commands = typer.main.get_command(app).commands
    with_compile = []
    for name, command in commands.items():
        flags = {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)}
        if "--compile" in flags:
            with_compile.append(name)
            assert {"--no-compile", "--fused-kernels", "--no-fused-kernels", "--fp8", "--no-fp8"} <= flags, name
    assert sorted(with_compile) == ["bench", "say", "stream"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["say", "--fused-kernels"], True),  # the flag beats the cpu preset's false
        (["stream", "--no-play", "-o", "out.wav"], False),  # the cpu preset's value
        (["stream", "--no-play", "-o", "out.wav", "--preset", "8gb"], True),  # the 8gb preset's value
        (["say", "--preset", "8gb", "--no-fused-kernels"], False),  # the flag beats the 8gb preset's true
    ],
)
def test_fused_kernels_reaches_the_engine(args, expected, hf_checkpoint, tmp_path, monkeypatch):
    from csmcli import pipeline

    asked = []

    def engine(model, **kwargs):
        asked.append(kwargs)
        raise CsmError("stopped by the test")  # after the preset was resolved and the model loaded

    monkeypatch.setattr(pipeline, "Engine", engine)
    monkeypatch.chdir(tmp_path)
    command, *rest = args
    result = CliRunner().invoke(app, [command, "Hello.", *rest, "--torch-device", "cpu", "--model", str(hf_checkpoint)])
    assert result.exit_code == 2 and "stopped by the test" in result.output, result.output
    assert [kw["fused_kernels"] for kw in asked] == [expected]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["say"], False),  # no preset stores weights in fp8 unless asked
        (["say", "--fp8"], True),
        (["stream", "--no-play", "-o", "out.wav", "--preset", "8gb", "--fp8"], True),
        (["say", "--fp8", "--no-fp8"], False),
    ],
)
def test_fp8_flag_quantizes_the_model_the_engine_gets(args, expected, hf_checkpoint, tmp_path, monkeypatch):
    from csmcli import pipeline

    got = []

    def engine(model, **kwargs):
        got.append((model.fp8, model.backbone.layers[0].attention.wqkv.weight.dtype))
        raise CsmError("stopped by the test")

    monkeypatch.setattr(pipeline, "Engine", engine)
    monkeypatch.chdir(tmp_path)
    command, *rest = args
    result = CliRunner().invoke(app, [command, "Hello.", *rest, "--torch-device", "cpu", "--model", str(hf_checkpoint)])
    assert result.exit_code == 2 and "stopped by the test" in result.output, result.output
    assert got == [(expected, torch.float8_e4m3fn if expected else torch.float32)]


@pytest.mark.parametrize("args", [["--batch", "0"], ["--chunk-frames", "x"], ["--dtype", "float64"]])
def test_bad_preset_flag_values_are_usage_errors(args):
    assert CliRunner().invoke(_options_app(), args).exit_code == 2


def test_an_interrupted_command_run_in_process_gives_the_signal_handlers_back(monkeypatch):
    """Run in-process (typer's CliRunner, an embedding program), a command stopped by Ctrl-C exits 130 and leaves
    SIGINT and SIGTERM as they were: ignoring later signals is only for the console script, whose process ends."""
    import signal

    from csmcli import info

    def interrupted(preset_name=None):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(info, "gather", interrupted)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 130, result.output
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_running_out_of_gpu_memory_is_one_line_not_a_bug(monkeypatch):
    """torch's CUDA out-of-memory error (another program holds the GPU, a model too large for it) is the machine's
    limit, not a csmcli bug: one line with what was asked for, what was free and who holds the rest, exit 2; not
    torch's lines of accounting and allocator advice."""
    import torch

    from csmcli import info

    def out_of_memory(preset_name=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity "
                                     "of 7.60 GiB of which 3.12 MiB is free. Process 4242 has 7.59 GiB memory in use.\n"
                                     "Of the allocated memory 7.1 GiB is allocated by PyTorch. See documentation for "
                                     "Memory Management")

    monkeypatch.setattr(info, "gather", out_of_memory)
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: out of GPU memory: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 "
                                     "has a total capacity of 7.60 GiB of which 3.12 MiB is free. Process 4242 has "
                                     "7.59 GiB memory in use (`csmcli info` shows what other programs leave free)")


def test_a_signal_ignored_from_the_start_stays_ignored():
    """`csmcli ... &` in a script: the shell starts it with SIGINT ignored, so the terminal's Ctrl-C is not for it."""
    import signal

    from csmcli import cli

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        restore = cli._stop_like_ctrl_c()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.SIGINT not in restore
        assert signal.getsignal(signal.SIGTERM) is cli._raise_interrupt
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, previous)
