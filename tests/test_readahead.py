"""Finding a checkpoint on disk before torch is imported, and reading its weight files ahead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csmcli import readahead
from csmcli.errors import CsmError


def _checkpoint(directory: Path, weights: tuple[str, ...] = ("model.safetensors",)) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    for name in weights:
        (directory / name).write_bytes(os.urandom(4096))
    return directory


def test_locate_finds_what_the_loader_loads(tmp_path):
    ck = _checkpoint(tmp_path / "ck")
    assert readahead.locate(str(ck)) == ck
    assert readahead.locate(str(ck / "model.safetensors")) == ck  # a file of it: its directory
    assert readahead.locate("owner/name") == "owner/name"
    assert readahead.locate(None) == readahead.DEFAULT_MODEL
    (tmp_path / "loose.safetensors").write_bytes(b"x")
    with pytest.raises(CsmError, match="a file, not a checkpoint directory"):
        readahead.locate(str(tmp_path / "loose.safetensors"))
    with pytest.raises(CsmError, match="no such directory, and not a hub id"):
        readahead.locate("./missing/dir")


def test_local_checkpoint_finds_a_hub_id_in_the_cache_without_the_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert readahead.local_checkpoint(None) is None  # not cached (and no download is tried)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--sesame--csm-1b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = _checkpoint(repo / "snapshots" / commit)
    assert readahead.local_checkpoint(None) == snapshot
    assert readahead.local_checkpoint("sesame/csm-1b") == snapshot
    assert readahead.local_checkpoint("./not/there") is None  # the loader reports it


def test_read_ahead_advises_every_weight_file_once(tmp_path, monkeypatch):
    model = _checkpoint(tmp_path / "model", ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"))
    original = _checkpoint(tmp_path / "original", ("ckpt.pt",))
    codec = _checkpoint(tmp_path / "codec")
    advised = []

    def fadvise(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    readahead.read_ahead(model, None, codec, original).join(timeout=10)
    whole = (0, 0, os.POSIX_FADV_WILLNEED)
    assert sorted(advised) == sorted(
        (str(f), *whole) for f in [*model.glob("*.safetensors"), codec / "model.safetensors", original / "ckpt.pt"]
    )
    assert readahead.read_ahead(tmp_path / "nothing-here", None) is None


def test_say_reads_its_checkpoint_ahead_and_random_weights_read_nothing(hf_checkpoint, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from csmcli.cli import app

    seen = []
    monkeypatch.setattr(readahead, "read_ahead", lambda *dirs: seen.append(dirs))
    out = tmp_path / "a.wav"
    args = ["say", "Hi.", "--torch-device", "cpu", "--max-seconds", "0.08", "--seed", "1", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--model", str(hf_checkpoint)])
    assert result.exit_code == 0, result.output
    assert seen == [(hf_checkpoint, None)]
    result = CliRunner().invoke(app, [*args, "--random-weights"])  # refused (no tokenizer) once past read-ahead
    assert result.exit_code == 2 and "random weights come without a tokenizer" in result.output
    assert seen == [(hf_checkpoint, None)]
