"""Finding a checkpoint on disk, and reading its files into the page cache in the background from a command's
first moment.

A start-up whose checkpoint is not in memory (the first run after a boot) reads gigabytes from disk, and it did so
only after Python had imported torch and started CUDA, seconds in which the disk was idle. The kernel's read-ahead
(`posix_fadvise(WILLNEED)`) fills the page cache meanwhile; the loader's later reads then find it there. Nothing
here imports torch or touches the network, and any failure only leaves the loader to read the files itself.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from csmcli.errors import CsmError

WEIGHT_FILES = ("*.safetensors", "*.pt")


DEFAULT_MODEL = "sesame/csm-1b"


def locate(source: str | None) -> Path | str:
    """Where a checkpoint named on the command line is: its directory (given as the directory or as a file in it),
    or a hub id (`owner/name`) to find in the Hugging Face cache; `None` is the default model."""
    source = source or DEFAULT_MODEL
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():  # a file of the checkpoint (model.safetensors): its directory
        if not (path.parent / "config.json").exists():
            raise CsmError(f"{source}: a file, not a checkpoint directory ({path.parent} holds no config.json)")
        return path.parent
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise CsmError(f"{source}: no such directory, and not a hub id of the form owner/name")
    return source


def local_checkpoint(source: str | None) -> Path | None:
    """`locate`'s directory, or a hub id's snapshot already in the Hugging Face cache, without network access;
    None where there is none on disk (errors are left for the loader to report)."""
    try:
        where = locate(source)
    except CsmError:
        return None
    if isinstance(where, Path):
        return where
    from csmcli.info import checkpoint_cache_status

    path = checkpoint_cache_status(where)["path"]
    return Path(path) if path else None


def read_ahead(*directories: Path | None) -> threading.Thread | None:
    """Start reading the weight files of `directories` into the page cache on a daemon thread (None: nothing to
    read, or a platform without `posix_fadvise`)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    files = [f for d in directories if d is not None for pattern in WEIGHT_FILES for f in sorted(d.glob(pattern))]
    if not files:
        return None

    def run() -> None:
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)  # whole file; blocks only while queueing reads
            except OSError:
                pass
            finally:
                os.close(fd)

    thread = threading.Thread(target=run, name="csmcli-read-ahead", daemon=True)
    thread.start()
    return thread
