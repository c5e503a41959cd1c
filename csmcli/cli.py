"""The `csmcli` command line: parse flags, call the modules that do the work, report through `ui`.

Nothing heavy is imported at module level (torch above all), so `csmcli --help` starts instantly.
"""

import contextlib
import math
import os
import signal
import sys
import threading
import time
from enum import StrEnum
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from csmcli import __version__, ui
from csmcli.errors import DEBUG_ENV, CsmError


class CsmGroup(TyperGroup):
    """Turns exceptions from any command into one line and an exit code (0 ok, 1 bug, 2 user error or out of GPU
    memory, 130 Ctrl-C, 143 SIGTERM)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Usage errors (an unknown option, a value out of range) as one line too, not Click's boxed panel."""
        standalone = kwargs.pop("standalone_mode", True)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:  # end of input at a prompt, or Ctrl-C while the arguments are still parsed
            if not standalone:
                raise
            sys.exit(130)
        except Exception as e:  # Click's usage errors (typer >= 0.21 vendors Click: no common import for both)
            if not standalone or not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)):
                raise
            context = getattr(e, "ctx", None)
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            if e.format_message():  # none when a bare `csmcli` has printed its help
                ui.error(f"{e.format_message()}{hint}")
            sys.exit(e.exit_code)
        if not standalone:
            return code
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        previous = _stop_like_ctrl_c()
        try:
            return super().invoke(ctx)
        except CsmError as e:
            _report(e, f"{e}", code=2)
        except BrokenPipeError:
            # The reader went away (`csmcli stream ... | head`): nothing to report. Point stdout at /dev/null so
            # the interpreter's final flush does not raise a second time.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            # Older Click turns Ctrl-C into "Aborted!" and exit 1; the shell convention is 128 + the signal.
            raise typer.Exit(128 + signal.SIGTERM if isinstance(e, Terminated) else 130) from None
        except Exception as e:
            if hasattr(e, "exit_code"):  # typer.Exit / Abort / usage errors: Typer reports those itself
                raise
            if type(e).__name__ == "OutOfMemoryError":  # torch's (not imported here): the GPU, not a bug
                from csmcli.gpu import out_of_memory_summary

                _report(e, f"out of GPU memory: {out_of_memory_summary(e)} (`csmcli info` shows what other programs "
                           "leave free)", code=2)
            else:
                _report(e, f"{type(e).__name__}: {e} (set {DEBUG_ENV}=1 to see the traceback)", code=1)
        finally:
            stopped = any(signal.getsignal(sig) is _ignore_more for sig in previous)
            if not (stopped and _exits_after_command):  # the process exits next: keep ignoring them until then
                for sig, handler in previous.items():
                    signal.signal(sig, handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, systemd stopping a service), raised where Ctrl-C would be: the same clean-up
    runs (the audio file is closed valid, the totals printed), then exit 143."""


def _raise_interrupt(signum: int, frame: Any) -> None:
    # The first Ctrl-C or SIGTERM stops the run; later ones are ignored, so that they cannot cut short the clean-up
    # that keeps the audio file valid (they would also surface as "Exception ignored" tracebacks from generators
    # being closed). Ctrl-\ (SIGQUIT) still ends a clean-up that hangs. A handler that does nothing, not SIG_IGN:
    # a second signal already noted while the first was handled would otherwise raise "Signal ... ignored due to
    # race condition".
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is _raise_interrupt:
            signal.signal(sig, _ignore_more)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _ignore_more(signum: int, frame: Any) -> None:
    pass


_exits_after_command = False
"""Set by the console script (`main`), whose process ends with the command: after an interrupt the handlers stay
ignoring until then. Run in-process (tests, typer's CliRunner, an embedding program), they are restored."""


def _stop_like_ctrl_c() -> dict[int, Any]:
    """Route Ctrl-C to KeyboardInterrupt and SIGTERM to `Terminated` while a command runs, once (main thread only);
    returns the handlers to restore. A signal ignored when we started (`csmcli ... &` in a script: the shell keeps
    the terminal's Ctrl-C away from it) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(sig) != signal.SIG_IGN}


def _report(exc: BaseException, line: str, code: int) -> None:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        ui.console.print_exception(show_locals=False)
    else:
        ui.error(line)
    raise typer.Exit(code) from exc


app = typer.Typer(
    cls=CsmGroup,
    name="csmcli",
    help="Text to speech with Sesame's CSM-1B, tuned for your GPU. Audio and JSON go to stdout; messages go to stderr.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


# ---- shared option types (used by say / stream / bench) ----------------------------------------------------------


class Dtype(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", metavar="NAME", help="Preset to use (cpu, 8gb, ..., 80gb); default: chosen by VRAM."),
]
FirstChunkFramesOpt = Annotated[
    int | None,
    typer.Option("--first-chunk-frames", min=1, help="Frames (80 ms each) in the first audio chunk: lower = sooner."),
]
ChunkFramesOpt = Annotated[
    int | None,
    typer.Option("--chunk-frames", min=1,
                 help="Largest audio chunk (frames): after the first, sizes double, capped at this."),
]
DtypeOpt = Annotated[
    Dtype | None, typer.Option("--dtype", help="Weight and activation dtype on CUDA (the CPU runs float32).")
]
CudaGraphsOpt = Annotated[
    bool | None,
    typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay each frame step as a CUDA graph (default: preset)."),
]
CompileOpt = Annotated[
    bool | None,
    typer.Option("--compile/--no-compile", help="torch.compile the frame step (turns the fused kernels off; the first "
                 "run compiles for minutes; slower than the fused kernels)."),
]
FusedKernelsOpt = Annotated[
    bool | None,
    typer.Option(
        "--fused-kernels/--no-fused-kernels",
        help="Triton kernels for the one-token decode steps, the prompt prefill and the Mimi decode (CUDA); off: "
        "plain torch ops.",
    ),
]
Fp8Opt = Annotated[
    bool | None,
    typer.Option(
        "--fp8/--no-fp8",
        help="Transformer weights in fp8 (e4m3, a scale per row): about half the bytes per frame, faster for one "
        "stream on Ada/Hopper GPUs (slower than bf16 for many), but an approximation of the model "
        "(default: preset, off).",
    ),
]


def preset_overrides(
    first_chunk_frames: int | None = None,
    chunk_frames: int | None = None,
    batch: int | None = None,
    dtype: Dtype | None = None,
    cuda_graphs: bool | None = None,
    compile: bool | None = None,
    fused_kernels: bool | None = None,
    fp8: bool | None = None,
) -> dict[str, Any]:
    """Flag values as `presets.apply_overrides` keywords (None = flag not given)."""
    return {
        "first_chunk_frames": first_chunk_frames,
        "chunk_frames": chunk_frames,
        "max_batch": batch,
        "dtype": dtype.value if dtype is not None else None,
        "cuda_graphs": cuda_graphs,
        "compile": compile,
        "fused_kernels": fused_kernels,
        "fp8": fp8,
    }


# ---- global options ------------------------------------------------------------------------------------------------


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"csmcli {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug details on stderr.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show only errors on stderr.")] = False,
) -> None:
    """The options every command shares (the app's help text says what csmcli is)."""
    ui.set_verbosity(quiet=quiet, verbose=verbose)


# ---- model and generation options (say / stream / bench) ---------------------------------------------------------


def _given(flag: str, what: str):
    """A callback refusing an empty value (an unset shell variable): `--model ""` fell back to the default model,
    `--tokenizer ""` was ignored, `-o ""` named the current directory."""

    def check(value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise CsmError(f"{flag} is empty: give {what}")
        return value

    return check

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="PATH_OR_ID",
        help="Checkpoint directory (HF format or original Sesame) or hub id (default: sesame/csm-1b).",
        callback=_given("--model", "a checkpoint directory or hub id"),
    ),
]
RandomWeightsOpt = Annotated[
    bool,
    typer.Option("--random-weights", help="Full-size CSM-1B with random weights: no download, noise audio "
                 "(say / stream: with --tokenizer DIR)."),
]
CodecOpt = Annotated[
    str | None, typer.Option("--codec", metavar="DIR", help="HF-format Mimi checkpoint (for original-format models).",
                             callback=_given("--codec", "a Mimi checkpoint directory"))
]
TokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", metavar="DIR", help="Llama-3 tokenizer directory, if not beside the model.",
                             callback=_given("--tokenizer", "a tokenizer directory"))
]
TorchDeviceOpt = Annotated[
    str | None,
    typer.Option("--torch-device", metavar="DEV",
                 help="cpu, cuda or cuda:N (default: cuda if present, unless the preset is cpu)."),
]
TextArg = Annotated[str | None, typer.Argument(help="Text to speak; '-' reads stdin.", show_default=False)]
TextFileOpt = Annotated[str | None, typer.Option("--file", "-f", metavar="FILE", help="Read the text from FILE.",
                                                 callback=_given("--file", "a text file"))]
SpeakerOpt = Annotated[int, typer.Option("--speaker", "-s", min=0, help="Speaker id of the generated voice.")]
RefAudioOpt = Annotated[
    str | None, typer.Option("--ref-audio", metavar="FILE", help="Voice prompt audio (any rate; resampled to 24 kHz).",
                             callback=_given("--ref-audio", "an audio file"))
]
RefTextOpt = Annotated[str | None, typer.Option("--ref-text", metavar="TEXT", help="The words spoken in --ref-audio.")]
ContextOpt = Annotated[
    str | None,
    typer.Option(
        "--context", metavar="FILE", help="JSON/YAML list of earlier turns: {speaker, text, audio (optional path)}.",
        callback=_given("--context", "a JSON or YAML file"),
    ),
]
def _finite(flag: str):
    """A callback refusing NaN (it passes Click's min= check) and inf, which would fail only after the model loads."""

    def check(value: float) -> float:
        if not math.isfinite(value):
            raise CsmError(f"{flag} {value}: not a finite number")
        return value

    return check


TemperatureOpt = Annotated[
    float, typer.Option("--temperature", "-t", min=0.0, callback=_finite("--temperature"), help="0 = greedy.")
]
TopkOpt = Annotated[int, typer.Option("--topk", min=1, help="Sample among the k most likely codes.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", min=0, max=2**63 - 1,
                                             help="Seed; printed when chosen at random.")]
MaxSecondsOpt = Annotated[
    float,
    typer.Option("--max-seconds", min=0.08, callback=_finite("--max-seconds"),
                 help="Stop a sentence after this much audio (runaway guard)."),
]
RawOpt = Annotated[bool, typer.Option("--raw", help="Headerless s16le PCM instead of WAV (stdout or any file name).")]
AudioDeviceOpt = Annotated[
    str | None, typer.Option("--device", "-d", metavar="NAME|INDEX", help="Audio output device for playback.",
                             callback=_given("--device", "a device name or index"))
]
SaveCodesOpt = Annotated[
    str | None,
    typer.Option("--save-codes", metavar="FILE.npy", help="Also save the codes: an int64 array of frames x 32.",
                 callback=_given("--save-codes", "a FILE.npy path")),
]


def _pipeline(model, random_weights, codec, tokenizer, torch_device, preset_name, overrides):
    from csmcli.engine import FP8_ON_TORCH_OPS
    from csmcli.pipeline import Pipeline, check_weights_choice, choose_preset

    check_weights_choice(model, "--random-weights" if random_weights else None)
    if random_weights and tokenizer is None:  # found out only after building 1B random weights otherwise
        raise CsmError("random weights come without a tokenizer: pass --tokenizer DIR (a Llama-3 tokenizer.json)")
    preset, reason = choose_preset(preset_name, torch_device, overrides)
    ui.debug(f"preset {preset.name}: {reason}")
    if random_weights:
        ui.warn("random weights: the audio is noise; use them for speed, not sound")
    spinner = ui.console.status("loading model", spinner="dots") if not ui.is_quiet() else contextlib.nullcontext()
    with spinner as status, ui.library_warnings_hidden():
        start = time.perf_counter()
        pipeline = Pipeline.load(
            model,
            preset,
            device=torch_device,
            random_weights=random_weights,
            codec_path=codec,
            tokenizer_path=tokenizer,
            warn=ui.warn,
        )
        if pipeline.codec is None:  # would write an empty file and report seconds of audio
            raise CsmError("this checkpoint has no Mimi codec: pass --codec DIR (an HF-format Mimi checkpoint)")
        if pipeline.model.fp8 and not pipeline.engine.fused_kernels:  # before a --compile warm-up's minutes
            ui.warn(FP8_ON_TORCH_OPS)
        loaded = time.perf_counter()
        ui.debug(f"loaded {pipeline.checkpoint.source} on {pipeline.device} in {loaded - start:.1f} s")
        if status is not None:
            status.update("warming up")
        pipeline.warmup()
        ui.debug(f"warmed up (kernels, CUDA graphs, Mimi) in {time.perf_counter() - loaded:.1f} s")
    return pipeline


_OVERRIDE_FLAGS = ("first_chunk_frames", "chunk_frames", "dtype", "cuda_graphs", "compile", "fused_kernels", "fp8")


def _speak(live: bool, params: dict[str, Any]) -> None:
    """The body of `say` and `stream`; `params` are the command's parameters (its `locals()`)."""
    from csmcli import speak

    kw = {k: v for k, v in params.items() if k != "list_devices"}
    kw["overrides"] = {k: kw.pop(k) for k in _OVERRIDE_FLAGS}
    kw["audio_device"] = kw.pop("device")
    inputs = {"-f": kw["text_file"], "--context": kw["context"], "--ref-audio": kw["ref_audio"]}
    text = speak.read_text(kw.pop("text"), kw.pop("text_file"), sys.stdin)
    context = speak.load_context(kw.pop("context"), kw.pop("ref_audio"), kw.pop("ref_text"), kw["speaker"])
    # before the seconds that loading the model takes
    speak.check_outputs(kw["output"], kw["raw"], kw["play"], kw["audio_device"], kw["save_codes"], inputs)
    pipeline = _pipeline(
        kw.pop("model"),
        kw.pop("random_weights"),
        kw.pop("codec"),
        kw.pop("tokenizer"),
        kw.pop("torch_device"),
        kw.pop("preset"),
        preset_overrides(**kw.pop("overrides")),
    )
    speak.run(pipeline, speak.SpeakJob(text=text, context=context, live_table=live, **kw))


# ---- commands ------------------------------------------------------------------------------------------------------


@app.command()
def say(
    text: TextArg = None,
    text_file: TextFileOpt = None,
    output: Annotated[
        str, typer.Option("--output", "-o", help="Audio file (.wav/.flac/.ogg), or '-' for stdout.",
                          callback=_given("-o", "a file path (or '-' for stdout)"))
    ] = "out.wav",
    play: Annotated[bool, typer.Option("--play", help="Also play the audio while it is generated.")] = False,
    speaker: SpeakerOpt = 0,
    ref_audio: RefAudioOpt = None,
    ref_text: RefTextOpt = None,
    context: ContextOpt = None,
    temperature: TemperatureOpt = 0.9,
    topk: TopkOpt = 50,
    seed: SeedOpt = None,
    max_seconds: MaxSecondsOpt = 90.0,
    raw: RawOpt = False,
    device: AudioDeviceOpt = None,
    save_codes: SaveCodesOpt = None,
    model: ModelOpt = None,
    random_weights: RandomWeightsOpt = False,
    codec: CodecOpt = None,
    tokenizer: TokenizerOpt = None,
    torch_device: TorchDeviceOpt = None,
    preset: PresetOpt = None,
    first_chunk_frames: FirstChunkFramesOpt = None,
    chunk_frames: ChunkFramesOpt = None,
    dtype: DtypeOpt = None,
    cuda_graphs: CudaGraphsOpt = None,
    compile: CompileOpt = None,
    fused_kernels: FusedKernelsOpt = None,
    fp8: Fp8Opt = None,
) -> None:
    """Speak text into an audio file (and optionally the speakers).

    Long text is spoken sentence by sentence, earlier sentences kept as context so the voice stays the same.

    Examples:
      csmcli say "Hello there." -o hello.wav
      echo "Read from stdin." | csmcli say - --play
      csmcli say -f story.txt --ref-audio me.wav --ref-text "What I said in me.wav." -o story.flac
    """
    _speak(False, locals())


@app.command()
def stream(
    text: TextArg = None,
    text_file: TextFileOpt = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Also save the audio (.wav/.flac/.ogg, or '-' for stdout).",
                                 callback=_given("-o", "a file path (or '-' for stdout)"))
    ] = None,
    play: Annotated[bool, typer.Option("--play/--no-play", help="Play through the speakers as it is made.")] = True,
    list_devices: Annotated[bool, typer.Option("--list-devices", help="List audio output devices and exit.")] = False,
    speaker: SpeakerOpt = 0,
    ref_audio: RefAudioOpt = None,
    ref_text: RefTextOpt = None,
    context: ContextOpt = None,
    temperature: TemperatureOpt = 0.9,
    topk: TopkOpt = 50,
    seed: SeedOpt = None,
    max_seconds: MaxSecondsOpt = 90.0,
    raw: RawOpt = False,
    device: AudioDeviceOpt = None,
    save_codes: SaveCodesOpt = None,
    model: ModelOpt = None,
    random_weights: RandomWeightsOpt = False,
    codec: CodecOpt = None,
    tokenizer: TokenizerOpt = None,
    torch_device: TorchDeviceOpt = None,
    preset: PresetOpt = None,
    first_chunk_frames: FirstChunkFramesOpt = None,
    chunk_frames: ChunkFramesOpt = None,
    dtype: DtypeOpt = None,
    cuda_graphs: CudaGraphsOpt = None,
    compile: CompileOpt = None,
    fused_kernels: FusedKernelsOpt = None,
    fp8: Fp8Opt = None,
) -> None:
    """Speak text live: playback starts with the first chunk while the rest is generated.

    A live table on stderr shows each chunk's generation and decode time, RTF, audio buffered ahead of playback
    and underruns. Ctrl-C stops cleanly and prints the totals.

    Examples:
      csmcli stream "Hello there."
      csmcli stream "Hello there." --no-play -o - --raw | aplay -f S16_LE -r 24000 -c 1
      csmcli stream --list-devices
    """
    if list_devices:
        from csmcli import audio

        ui.require_stdout("the device list")
        devices = audio.list_devices()
        if not devices:  # would print nothing and exit 0
            raise CsmError("audio playback unavailable: PortAudio finds no output device")
        for d in devices:
            typer.echo(f"{d['index']:>3}  {d['name']}{'  (default)' if d['default'] else ''}")
        return
    if not play and output is None:
        raise CsmError("nothing to do: --no-play needs -o FILE or -o -")
    _speak(True, locals())


def _int_list(value: str, flag: str, most: int) -> list[int]:
    """A comma list of whole numbers in 1..most; a repeated value is measured once (warned)."""
    try:
        values = [int(v) for v in value.split(",")]  # an empty item ("1,,4", "") is a typo, not nothing
    except ValueError:
        raise CsmError(f"{flag} takes a comma list of whole numbers, like 1,4,16; got {value!r}") from None
    if not values or min(values) < 1 or max(values) > most:
        raise CsmError(f"{flag} takes numbers from 1 to {most}, got {value!r}")
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        ui.warn(f"{flag} {value}: each value is measured once ({','.join(map(str, unique))})")
    return unique


MAX_BENCH_BATCH = 1024
"""The most streams `bench --batch` takes: their caches of 2048 positions alone take ~70 GB in bf16 (256 streams
took 36 GB in all on an H200, by nvidia-smi), so a digit too many is refused at once; a size that the GPU cannot hold
is left out with a warning."""


@app.command()
def bench(
    model: ModelOpt = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Full-size CSM-1B with random weights: no download (speed only).")
    ] = False,
    tiny: Annotated[bool, typer.Option("--tiny", help="A tiny random model: tests the whole path on a CPU.")] = False,
    batch: Annotated[str | None, typer.Option("--batch", metavar="LIST", help="Batch sizes, e.g. 1,4,16,64.")] = None,
    chunk_frames: Annotated[
        str | None,
        typer.Option("--chunk-frames", metavar="LIST", help="Largest chunk sizes, e.g. 2,8 (chunks ramp up to it)."),
    ] = None,
    first_chunk_frames: FirstChunkFramesOpt = None,
    frames: Annotated[int, typer.Option("--frames", min=2, help="Frames per stream (80 ms each).")] = 100,
    prompt_rows: Annotated[int, typer.Option("--prompt-rows", min=2, help="Prompt length in rows.")] = 200,
    reps: Annotated[int, typer.Option("--reps", min=1, help="Timed repetitions per configuration.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed repetitions first.")] = 1,
    decode: Annotated[bool, typer.Option("--decode/--no-decode", help="Include streaming Mimi decode.")] = True,
    compare: Annotated[
        str | None, typer.Option("--compare", metavar="transformers", help="Also time transformers' generate.")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write results to .json, .md or .csv.",
                                               callback=_given("-o", "a .json, .md or .csv path"))] = None,
    suggest: Annotated[bool, typer.Option("--suggest", help="Print the preset these measurements suggest.")] = False,
    write_preset: Annotated[
        str | None, typer.Option("--write-preset", metavar="NAME", help="With --suggest: save it as preset NAME.")
    ] = None,
    codec: CodecOpt = None,
    torch_device: TorchDeviceOpt = None,
    preset: PresetOpt = None,
    dtype: DtypeOpt = None,
    cuda_graphs: CudaGraphsOpt = None,
    compile: CompileOpt = None,
    fused_kernels: FusedKernelsOpt = None,
    fp8: Fp8Opt = None,
) -> None:
    """Measure ms/frame, time to first audio, real-time factor and throughput on this machine.

    Without --model, random weights are used when no CSM-1B checkpoint is cached (said loudly).
    Warm-up repetitions are excluded; EOS is ignored so every stream makes --frames frames.

    Examples:
      csmcli bench --random-weights --frames 20
      csmcli bench --batch 1,4,16,64 --chunk-frames 2,8 -o results.json
      csmcli bench --tiny --torch-device cpu --compare transformers
    """
    from pathlib import Path

    from csmcli import bench as b

    if compare not in (None, "transformers"):
        raise CsmError(f"--compare knows only 'transformers', got {compare!r}")
    if write_preset is not None and not suggest:
        raise CsmError("--write-preset needs --suggest")
    if prompt_rows + frames > 2048:  # CSM-1B's positions; bench would otherwise time clamped garbage
        raise CsmError(f"--prompt-rows {prompt_rows} + --frames {frames} exceed the model's 2048 positions")
    batches = _int_list(batch, "--batch", MAX_BENCH_BATCH) if batch is not None else [1]
    chunks = _int_list(chunk_frames, "--chunk-frames", 2048) if chunk_frames is not None else None
    if ui.is_quiet() and not output and not suggest:  # the table is all there would be, and --quiet hides it
        raise CsmError("--quiet hides bench's table: give -o FILE (or --suggest) to keep the measurements")
    if output:  # refused now, not after the measurements
        b.check_report_path(Path(output))
    if write_preset is not None:
        b.check_preset_name(write_preset)
    if suggest:
        ui.require_stdout("the suggested preset")
    ctx = b.prepare(
        model=model,
        random_weights=random_weights,
        tiny=tiny,
        codec=codec,
        torch_device=torch_device,
        preset_name=preset,
        overrides=preset_overrides(
            first_chunk_frames=first_chunk_frames,
            dtype=dtype,
            cuda_graphs=cuda_graphs,
            compile=compile,
            fused_kernels=fused_kernels,
            fp8=fp8,
        ),
    )
    settings = b.BenchSettings(
        batches=batches,
        chunk_frames=chunks or [ctx.preset.chunk_frames],
        first_chunk_frames=ctx.preset.first_chunk_frames,
        frames=frames,
        prompt_rows=prompt_rows,
        reps=reps,
        warmup=warmup,
        decode_audio=decode,
        compare_transformers=compare == "transformers",
    )
    for size in settings.chunk_frames:  # rows are labelled with the settings: say where they are not what ran
        if size > frames:
            given = "--chunk-frames" if chunks else f"the preset's ({ctx.preset.name}) chunk size"
            ui.warn(f"{given} {size} is more than --frames {frames}: no chunk of that row reaches {size}")
    if write_preset is not None and (tiny or ctx.device.type != "cuda"):
        ui.warn(f"--write-preset {write_preset}: measured {'on the tiny model' if tiny else 'without a GPU'}, the "
                "preset will not describe CSM-1B on a GPU")

    def keep_what_was_measured(partial: b.BenchReport) -> None:
        if not partial.rows:  # nothing to keep: an earlier file of that name must not pass for these results
            ui.info("interrupted before the first measurement" + (f": {output} not written" if output else ""))
        elif output:
            b.write_report(partial, Path(output))
            ui.info(f"wrote {output}: what was measured before the interrupt ({len(partial.rows)} rows)")

    report = b.run_cli(ctx, settings, on_interrupt=keep_what_was_measured)
    if output:
        b.write_report(report, Path(output))
        ui.info(f"wrote {output}")
    if suggest:
        text = b.suggest_preset(report, write_preset or "measured")
        typer.echo(text, nl=False)
        if write_preset is not None:
            ui.info(f"saved preset {b.save_preset(text, write_preset)}")


@app.command()
def info(
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON object to stdout, not a table.")] = False,
    preset: PresetOpt = None,
) -> None:
    """Show the GPU, driver, library versions, the preset that would be used and why, cached checkpoint, audio out.

    Example: csmcli info --json
    """
    from csmcli import info as report  # imports torch: keep it out of `csmcli --help`

    if ui.is_quiet() and not json_output:  # the table is all there would be, and --quiet hides it (as bench's)
        raise CsmError("--quiet hides info's table: give --json to have the report on stdout")
    if json_output:
        ui.require_stdout("the JSON")  # before the probes
    data = report.gather(preset)
    if json_output:
        ui.print_json(data)
    else:
        ui.console.print(report.render(data))


def main() -> None:
    """Console-script entry point."""
    global _exits_after_command
    _exits_after_command = True
    app(prog_name="csmcli")
