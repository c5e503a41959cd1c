"""Terminal output: one Rich console on stderr for people, plain JSON on stdout for programs.

Data (JSON, raw audio) goes to stdout and nothing else does, so `csmcli ... | other-tool` stays clean.
"""

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.text import Text

from csmcli.errors import CsmError

console = Console(stderr=True)

_quiet = False
_verbose = False


def set_verbosity(quiet: bool, verbose: bool) -> None:
    """Set the process-wide verbosity. Both at once is a usage error."""
    global _quiet, _verbose
    if quiet and verbose:
        raise CsmError("--quiet and --verbose cannot be used together")
    _quiet, _verbose = quiet, verbose


def is_quiet() -> bool:
    return _quiet


def is_verbose() -> bool:
    return _verbose


def _line(text: str, style: str) -> None:
    # Text instead of a markup string: messages carry user text such as "[speaker]" that Rich would eat as markup.
    # soft_wrap keeps a long message on one line when stderr is not a terminal (Rich would wrap at 80 columns).
    console.print(Text(text, style=style), soft_wrap=True, highlight=False)


def info(msg: str) -> None:
    """Progress and results for people; hidden by --quiet."""
    if not _quiet:
        _line(msg, "")


def warn(msg: str) -> None:
    """A yellow `warning:` line; hidden by --quiet."""
    if not _quiet:
        _line(f"warning: {msg}", "yellow")


def debug(msg: str) -> None:
    """Details shown only with --verbose."""
    if _verbose:
        _line(msg, "dim")


def error(msg: str) -> None:
    """A red `error:` line; always shown, even with --quiet. Messages from libraries that span lines (a YAML
    parser's caret diagram, torch's unpickling advice) are joined into one."""
    _line("error: " + " ".join(msg.split()), "bold red")


def require_stdout(what: str) -> None:
    """Refuse to run a command whose result goes to stdout when stdout is closed (`>&-`): Python then has no
    sys.stdout, and typer.echo would drop the text without a word."""
    if sys.stdout is None:
        raise CsmError(f"stdout is closed: nowhere to write {what}")


def print_json(obj: Any) -> None:
    """Write `obj` as JSON to stdout (not through Rich, so pipes get exact, uncoloured text)."""
    require_stdout("the JSON")
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def library_warnings_hidden() -> Iterator[None]:
    """transformers logs its checks of a checkpoint's config.json as warnings ("pad_token_id must be ... within
    the vocabulary", from a model's config read for the codec, or from building a model for --compare):
    noise around our own messages that --quiet did not silence. Shown with --verbose; restored afterwards."""
    if _verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
