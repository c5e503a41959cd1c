"""The `csmcli` command line: parse flags, call the modules that do the work, report through `ui`.

Nothing heavy is imported at module level (torch above all), so `csmcli --help` starts instantly.
"""

import os
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from csmcli import __version__, ui
from csmcli.errors import DEBUG_ENV, CsmError


class CsmGroup(TyperGroup):
    """Turns exceptions from any command into one line and an exit code (0 ok, 1 bug, 2 user error, 130 Ctrl-C)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CsmError as e:
            _report(e, f"{e}", code=2)
        except BrokenPipeError:
            # The reader went away (`csmcli stream ... | head`): nothing to report. Point stdout at /dev/null so
            # the interpreter's final flush does not raise a second time.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            # Older Click turns Ctrl-C into "Aborted!" and exit 1; the shell convention is 128 + SIGINT.
            raise typer.Exit(130) from None
        except Exception as e:
            if hasattr(e, "exit_code"):  # typer.Exit / Abort / usage errors: Typer reports those itself
                raise
            _report(e, f"{type(e).__name__}: {e} (set {DEBUG_ENV}=1 to see the traceback)", code=1)


def _report(exc: BaseException, line: str, code: int) -> None:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        ui.console.print_exception(show_locals=False)
    else:
        ui.error(line)
    raise typer.Exit(code) from exc


app = typer.Typer(
    cls=CsmGroup,
    name="csmcli",
    help="Text to speech with Sesame's CSM-1B, tuned for your GPU.",
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
    int | None, typer.Option("--chunk-frames", min=1, help="Frames (80 ms each) in every later audio chunk.")
]
BatchOpt = Annotated[int | None, typer.Option("--batch", min=1, help="Most requests generated at once.")]
DtypeOpt = Annotated[Dtype | None, typer.Option("--dtype", help="Weight and activation dtype.")]
CudaGraphsOpt = Annotated[
    bool | None,
    typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay each frame step as a CUDA graph (default: preset)."),
]
CompileOpt = Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the frame step.")]


def preset_overrides(
    first_chunk_frames: int | None = None,
    chunk_frames: int | None = None,
    batch: int | None = None,
    dtype: Dtype | None = None,
    cuda_graphs: bool | None = None,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Flag values as `presets.apply_overrides` keywords (None = flag not given)."""
    return {
        "first_chunk_frames": first_chunk_frames,
        "chunk_frames": chunk_frames,
        "max_batch": batch,
        "dtype": dtype.value if dtype is not None else None,
        "cuda_graphs": cuda_graphs,
        "compile": compile,
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
    """Text to speech with Sesame's CSM-1B, tuned for your GPU.

    Audio and JSON go to stdout; messages go to stderr.
    """
    ui.set_verbosity(quiet=quiet, verbose=verbose)


# ---- commands ------------------------------------------------------------------------------------------------------


def _not_implemented(command: str) -> None:
    raise CsmError(f"`csmcli {command}` is not implemented yet")


@app.command()
def say() -> None:
    """Speak text into an audio file (or the speakers).

    Example: csmcli say "Hello there." -o hello.wav
    """
    _not_implemented("say")


@app.command()
def stream() -> None:
    """Speak text as it is generated: raw PCM on stdout or live playback, first audio in a few hundred ms.

    Example: csmcli stream "Hello there." | aplay -f S16_LE -r 24000
    """
    _not_implemented("stream")


@app.command()
def bench() -> None:
    """Measure time to first audio, real-time factor and throughput on this machine.

    Example: csmcli bench --batch 8
    """
    _not_implemented("bench")


@app.command()
def info(
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON object to stdout, not a table.")] = False,
    preset: PresetOpt = None,
) -> None:
    """Show the GPU, driver, library versions, the preset that would be used and why, cached checkpoint, audio out.

    Example: csmcli info --json
    """
    from csmcli import info as report  # imports torch: keep it out of `csmcli --help`

    data = report.gather(preset)
    if json_output:
        ui.print_json(data)
    else:
        ui.console.print(report.render(data))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="csmcli")
