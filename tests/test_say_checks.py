"""Problems found before any output is touched: no codec, no tokenizer; the device follows the cpu preset."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from csmcli.errors import CsmError
from csmcli.pipeline import choose_preset, frames_within, pick_device
from csmcli.presets import get_preset


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "csmcli", *args, "--torch-device", "cpu"], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def original_dir(hf_model, tmp_path_factory):
    import tiny

    return tiny.save_original_checkpoint(hf_model, tmp_path_factory.mktemp("orig"))


@pytest.fixture(scope="module")
def mimi_dir(hf_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mimi")
    hf_model.codec_model.save_pretrained(str(directory))
    return directory


def test_original_checkpoint_without_codec_is_refused_and_writes_nothing(original_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "out.wav"
    result = run("say", "Hello there.", "--model", str(original_dir), "--tokenizer", str(tokenizer_dir),
                 "-o", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: this checkpoint has no Mimi codec: pass --codec")
    assert not out.exists()


def test_missing_tokenizer_leaves_an_existing_file_alone(original_dir, mimi_dir, tmp_path):
    keep = tmp_path / "keep.wav"
    keep.write_bytes(b"precious")
    result = run("say", "Hello there.", "--model", str(original_dir), "--codec", str(mimi_dir), "-o", str(keep))
    assert result.returncode == 2
    assert "no tokenizer" in result.stderr and "Traceback" not in result.stderr
    assert keep.read_bytes() == b"precious"


def test_original_checkpoint_with_codec_and_tokenizer_speaks(original_dir, mimi_dir, tokenizer_dir, tmp_path):
    import soundfile as sf

    out, codes = tmp_path / "o.wav", tmp_path / "c.npy"
    result = run("say", "Hello there.", "--model", str(original_dir), "--codec", str(mimi_dir), "--tokenizer",
                 str(tokenizer_dir), "-o", str(out), "--max-seconds", "0.4", "-t", "0", "--save-codes", str(codes))
    assert result.returncode == 0, result.stderr
    import numpy as np

    assert sf.info(str(out)).frames == np.load(codes).shape[0] * 1920 > 0


def test_cpu_preset_runs_on_the_cpu_even_with_a_gpu():
    assert pick_device(None, get_preset("cpu")) == torch.device("cpu")
    assert pick_device("cpu", get_preset("80gb")) == torch.device("cpu")


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ("", "--torch-device '': not a device"),  # an unset shell variable: not "the default device"
        ("banana", "--torch-device banana: not a device"),
        ("cpu:1", "--torch-device cpu:1: there is one CPU device"),  # torch would accept it
        ("meta", "--torch-device meta: csmcli runs on cpu or cuda"),
    ],
)
def test_a_torch_device_that_cannot_run_is_refused(requested, message):
    with pytest.raises(CsmError, match=f"^{re.escape(message)}"):
        pick_device(requested)
    with pytest.raises(CsmError, match=f"^{re.escape(message)}"):  # before the preset is chosen by GPU memory
        choose_preset(None, requested, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("requested", ["cuda", "cuda:7"])
def test_cuda_is_refused_where_there_is_none(requested):
    with pytest.raises(CsmError, match=f"^--torch-device {requested}: CUDA is not available here"):
        pick_device(requested)


@pytest.mark.parametrize(("seconds", "frames"), [(0.08, 1), (0.1, 1), (0.2, 2), (0.24, 3), (0.3, 3), (0.4, 5),
                                                 (0.8, 10), (1.6, 20), (90.0, 1125)])
def test_max_seconds_is_never_exceeded(seconds, frames):
    assert frames_within(seconds) == frames
    assert frames * 0.08 <= seconds + 1e-9  # 0.3 used to make 4 frames (0.32 s) and warn of "the 0.3 s limit"


@pytest.mark.parametrize(("overrides", "warned"), [
    ({}, []),
    ({"cuda_graphs": True}, ["CUDA graphs need a GPU: off on the cpu"]),
    ({"cuda_graphs": True, "fused_kernels": True}, ["CUDA graphs and fused kernels need a GPU: off on the cpu"]),
    ({"dtype": "bfloat16", "fused_kernels": True},
     ["dtype bfloat16 runs as float32 on the cpu", "fused kernels need a GPU: off on the cpu"]),
])
def test_gpu_only_settings_on_the_cpu_are_named(overrides, warned):
    """--cuda-graphs / --fused-kernels (or a GPU preset) on the CPU were dropped without a word; dtype was named."""
    from csmcli.bench import TINY, tiny_mimi_config
    from csmcli.pipeline import load_model_and_codec
    from csmcli.presets import apply_overrides

    seen = []
    preset = apply_overrides(get_preset("cpu"), **overrides)
    load_model_and_codec(None, preset, device="cpu", random_weights=True, config=TINY,
                         codec_config=tiny_mimi_config(), warn=seen.append)
    assert seen == warned
