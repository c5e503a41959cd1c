"""csmcli command line (skeleton; filled in by issue #2)."""

import typer

from csmcli import __version__

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)


@app.callback()
def _root() -> None:
    """Text-to-speech with Sesame's CSM-1B."""


@app.command()
def info() -> None:
    """Show GPU, library and model-cache facts."""
    typer.echo(f"csmcli {__version__}")


def main() -> None:
    app()
