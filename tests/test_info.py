"""`csmcli info` and GPU detection, on this machine as it is and with NVML / PortAudio taken away."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from csmcli import gpu, info
from csmcli.gpu import GpuInfo
from csmcli.info import checkpoint_cache_status, render
from csmcli.presets import load_presets

TOP_KEYS = {
    "versions",
    "platform",
    "cuda_available",
    "gpu_source",
    "gpu_notes",
    "gpus",
    "preset",
    "checkpoint",
    "audio",
}
GPU_KEYS = {f for f in GpuInfo.__dataclass_fields__}

# Runs the real entry point after taking pynvml away, the way a machine without nvidia-ml-py looks.
_NO_PYNVML = """
import sys
sys.modules["pynvml"] = None
from csmcli.cli import main
sys.argv = ["csmcli", "info", "--json"]
main()
"""


def _run(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    # An empty HF cache and no GPU hiding games: every run sees a known, offline state.
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "no-cache-here"), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(args, capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)


def _check_report(report: dict) -> None:
    assert set(report) == TOP_KEYS
    assert report["versions"]["csmcli"] and report["versions"]["transformers"]
    for item in report["gpus"]:
        assert set(item) == GPU_KEYS
    assert report["preset"]["name"] in load_presets()
    assert report["preset"]["reason"]
    assert isinstance(report["preset"]["compile"], bool) and isinstance(report["preset"]["fused_kernels"], bool)
    if not report["gpus"]:
        assert report["preset"]["name"] == "cpu"
    assert report["checkpoint"]["repo"] == "sesame/csm-1b"
    assert set(report["audio"]) == {"portaudio", "output_device", "playback", "detail"}


def test_info_json_on_this_machine(tmp_path):
    result = _run([sys.executable, "-m", "csmcli", "info", "--json"], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    _check_report(report)
    assert report["checkpoint"]["cached"] is False  # the cache dir does not even exist
    assert report["checkpoint"]["cache_dir"] == str(tmp_path / "no-cache-here")


def test_info_without_pynvml_or_portaudio(tmp_path):
    # sounddevice raises OSError at import when libportaudio is missing; a stand-in module does exactly that.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sounddevice.py").write_text('raise OSError("PortAudio library not found")\n')
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))}
    result = _run([sys.executable, "-c", textwrap.dedent(_NO_PYNVML)], env, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    _check_report(report)
    assert report["gpu_source"] in ("torch", "none")
    assert any("pynvml" in note for note in report["gpu_notes"])
    assert report["audio"]["portaudio"] is False and report["audio"]["playback"] is False
    assert "apt-get install libportaudio2" in report["audio"]["detail"]


def test_info_table_goes_to_stderr_and_honours_preset(tmp_path):
    result = _run([sys.executable, "-m", "csmcli", "info", "--preset", "24gb"], {"COLUMNS": "200"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "24gb: chosen with --preset 24gb" in result.stderr
    assert "compile off, fused kernels on" in result.stderr
    assert "sesame/csm-1b: not cached" in result.stderr


@pytest.mark.parametrize("cuda", [False, True])
def test_a_gpu_preset_without_cuda_says_what_the_cpu_runs(monkeypatch, cuda):
    facts = {"torch": "2", "cuda_runtime": None, "cudnn": None, "cuda_available": cuda}
    monkeypatch.setattr(info, "torch_versions", lambda: facts)
    monkeypatch.setattr(info, "audio_output_status", lambda: {})  # PortAudio's probing is not under test
    note = ("; no CUDA here, so it runs on the CPU in float32, without CUDA graphs or fused kernels (below: the"
            " preset's own settings, for a GPU)")
    reason = info.gather("24gb")["preset"]["reason"]
    assert reason == "chosen with --preset 24gb" + ("" if cuda else note)
    assert note not in info.gather("cpu")["preset"]["reason"]  # its settings are what the CPU runs


def _fake_hub_cache(root: Path, files: list[str]) -> Path:
    """The layout huggingface_hub writes: refs/main names a snapshot directory holding the files."""
    repo = root / "models--sesame--csm-1b"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")
    return snapshot


def test_checkpoint_found_in_the_cache(tmp_path):
    snapshot = _fake_hub_cache(tmp_path, ["config.json", "model.safetensors"])
    status = checkpoint_cache_status(cache_dir=str(tmp_path))
    assert status["cached"] is True
    assert Path(status["path"]) == snapshot


def test_checkpoint_without_weights_is_not_cached(tmp_path):
    _fake_hub_cache(tmp_path, ["config.json"])
    status = checkpoint_cache_status(cache_dir=str(tmp_path))
    assert status["cached"] is False and "partly" in status["detail"]


@pytest.mark.parametrize("offline", [False, True])
def test_a_missing_checkpoint_says_whether_it_can_be_downloaded(tmp_path, monkeypatch, offline):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    detail = checkpoint_cache_status(cache_dir=str(tmp_path))["detail"]
    if offline:  # it said "downloaded on first use" here too
        assert detail.startswith("not cached, and HF_HUB_OFFLINE is set: download it once online"), detail
    else:
        assert detail.startswith("not cached; downloaded on first use"), detail


def test_checkpoint_with_missing_cache_dir(tmp_path):
    status = checkpoint_cache_status(cache_dir=str(tmp_path / "missing"))
    assert (status["cached"], status["path"]) == (False, None)


def _devices() -> list[tuple[GpuInfo, str]]:
    def make(index: int, name: str) -> GpuInfo:
        return GpuInfo(index, name, (9, 0), 79.6, 79.0, "560.35", "12.6", True)

    return [(make(0, "A"), "GPU-aaaa-1111"), (make(1, "B"), "GPU-bbbb-2222"), (make(2, "C"), "GPU-cccc-3333")]


@pytest.mark.parametrize(
    ("visible", "names"),
    [
        (None, ["A", "B", "C"]),
        ("2,0", ["C", "A"]),
        ("GPU-bbbb", ["B"]),  # UUID prefixes work too
        ("1,7,2", ["B"]),  # CUDA stops at the first invalid entry
        ("-1", []),
        ("", []),
    ],
)
def test_cuda_visible_devices_picks_and_renumbers(monkeypatch, visible, names):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    gpus = gpu._visible_to_cuda(_devices())
    assert [g.name for g in gpus] == names
    assert [g.index for g in gpus] == list(range(len(names)))


def test_gpu_info_json_form():
    data = GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 79.6451, None, "560.35", "12.6", True).to_dict()
    assert data["compute_capability"] == "9.0"
    assert (data["total_vram_gb"], data["free_vram_gb"]) == (79.65, None)


def test_bf16_needs_ampere():
    assert [gpu.bf16_native(cc) for cc in [(7, 0), (7, 5), (8, 0), (8, 9), (9, 0), None]] == [
        False,
        False,
        True,
        True,
        True,
        False,
    ]


def test_table_lists_every_gpu():
    report = {
        "versions": dict.fromkeys(["csmcli", "python", "torch", "torch_cuda", "cudnn"], "1"),
        "platform": "Linux",
        "gpus": [g.to_dict() for g, _ in _devices()[:2]],
        "gpu_notes": [],
        "preset": {**vars(load_presets()["80gb"]), "reason": "because"},
        "checkpoint": {"repo": "sesame/csm-1b", "detail": "cached", "path": "/x"},
        "audio": {"playback": True, "output_device": "Speakers", "detail": "ok"},
    }
    report["versions"].update(dict.fromkeys(["transformers", "huggingface-hub", "safetensors", "typer", "numpy"]))
    console = Console(file=io.StringIO(), width=200)
    console.print(render(report))
    text = console.file.getvalue()
    assert "GPU 0" in text and "GPU 1" in text and "560.35" in text and "Speakers" in text
    assert "compile off, fused kernels on" in text
    report["preset"] |= {"compile": True, "fused_kernels": False}
    console = Console(file=io.StringIO(), width=200)
    console.print(render(report))
    assert "compile on, fused kernels off" in console.file.getvalue()
