"""`csmcli info`: what this machine offers (GPU, libraries, cached checkpoint, audio output) and the preset it gets.

Everything here is local: no network call, and no CUDA context.
"""

import contextlib
import dataclasses
import os
import platform
import sys
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from rich.table import Table
from rich.text import Text

from csmcli import __version__, ui
from csmcli.gpu import probe_gpus, torch_versions
from csmcli.presets import get_preset, presets_for, resolve_preset

DEFAULT_REPO = "sesame/csm-1b"
_LIBRARIES = ("transformers", "huggingface-hub", "safetensors", "typer", "numpy")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def gather(preset_name: str | None = None) -> dict[str, Any]:
    """The whole report as plain JSON-able data."""
    presets = presets_for(preset_name, ui.warn)
    if preset_name is not None:
        get_preset(preset_name, presets)  # a typo should fail before the slow probes
    probe = probe_gpus()
    preset, reason = resolve_preset(preset_name, probe.gpus[0] if probe.gpus else None, presets=presets)
    torch_facts = torch_versions()
    # torch's view, not the probe's: NVML can see a GPU that a CPU-only torch cannot use, and then the CPU runs.
    if not torch_facts["cuda_available"] and (preset.dtype != "float32" or preset.cuda_graphs or preset.fused_kernels):
        reason += ("; no CUDA here, so it runs on the CPU in float32, without CUDA graphs or fused kernels (below:"
                   " the preset's own settings, for a GPU)")
    return {
        "versions": {
            "csmcli": __version__,
            "python": platform.python_version(),
            "torch": torch_facts["torch"],
            "torch_cuda": torch_facts["cuda_runtime"],
            "cudnn": torch_facts["cudnn"],
            **{name: package_version(name) for name in _LIBRARIES},
        },
        "platform": platform.platform(),
        "cuda_available": torch_facts["cuda_available"],
        "gpu_source": probe.source,
        "gpu_notes": probe.notes,
        "gpus": [gpu.to_dict() for gpu in probe.gpus],
        "preset": {**dataclasses.asdict(preset), "reason": reason},
        "checkpoint": checkpoint_cache_status(),
        "audio": audio_output_status(),
    }


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def checkpoint_cache_status(repo_id: str = DEFAULT_REPO, cache_dir: str | None = None) -> dict[str, Any]:
    """Whether `repo_id` is in the local Hugging Face cache (default: HF_HUB_CACHE). Reads only; never downloads."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return {"repo": repo_id, "cached": False, "path": None, "cache_dir": None, "detail": "huggingface_hub missing"}
    cache_dir = cache_dir or str(constants.HF_HUB_CACHE)
    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    weights = [try_to_load_from_cache(repo_id, name, cache_dir=cache_dir) for name in _WEIGHT_FILES]
    # A str is a cached path; None / _CACHED_NO_EXIST mean "not here" (also when the cache dir does not exist).
    cached = isinstance(config, str) and any(isinstance(w, str) for w in weights)
    if cached:
        detail = "cached"
    elif isinstance(config, str):
        detail = "partly cached: config.json without weights"
    elif constants.HF_HUB_OFFLINE:  # nothing will be downloaded: say so, not "on first use"
        detail = "not cached, and HF_HUB_OFFLINE is set: download it once online (or pass --model DIR)"
    else:
        detail = f"not cached; downloaded on first use (gated: accept the license on huggingface.co/{repo_id})"
    return {
        "repo": repo_id,
        "cached": cached,
        "path": os.path.dirname(config) if isinstance(config, str) else None,
        "cache_dir": cache_dir,
        "detail": detail,
    }


def audio_output_status() -> dict[str, Any]:
    """Can we play audio here: is PortAudio loadable and is there a default output device?"""
    from csmcli.audio import load_sounddevice

    with _silenced_stderr_fd():
        sounddevice, reason = load_sounddevice()
        if sounddevice is None:
            return _audio(False, None, reason)
        try:
            device = sounddevice.query_devices(kind="output")
        except Exception as e:  # PortAudioError / ValueError when there is no default output
            return _audio(True, None, f"no default output device ({e})")
    return _audio(True, str(device["name"]), "ok")


def _audio(portaudio: bool, device: str | None, detail: str) -> dict[str, Any]:
    return {"portaudio": portaudio, "output_device": device, "playback": device is not None, "detail": detail}


@contextlib.contextmanager
def _silenced_stderr_fd() -> Iterator[None]:
    # PortAudio's ALSA/JACK probing writes straight to fd 2, past sys.stderr; keep that noise out of our output.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---- human rendering --------------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> Table:
    """The report as a two-column Rich table (for stderr)."""
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    for label, value in _rows(report):
        table.add_row(label, Text(value))  # Text: values are never Rich markup
    return table


def _rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    v = report["versions"]
    rows = [
        ("csmcli", f"{v['csmcli']} (Python {v['python']}, {report['platform']})"),
        ("torch", f"{v['torch'] or 'not installed'} (CUDA runtime {v['torch_cuda'] or 'none'}, cuDNN {v['cudnn']})"),
        ("libraries", ", ".join(f"{k} {v[k] or 'missing'}" for k in _LIBRARIES)),
    ]
    rows += _gpu_rows(report)
    p = report["preset"]
    rows.append(("preset", f"{p['name']}: {p['reason']}"))
    rows.append(("", _preset_summary(p)))
    c = report["checkpoint"]
    rows.append(("checkpoint", f"{c['repo']}: {c['detail']}" + (f" at {c['path']}" if c["path"] else "")))
    a = report["audio"]
    rows.append(("audio out", a["output_device"] if a["playback"] else f"none: {a['detail']}"))
    return rows


def _gpu_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    if not report["gpus"]:
        return [("GPU", "none (" + "; ".join(report["gpu_notes"]) + ")")]
    rows = []
    for gpu in report["gpus"]:
        free = "?" if gpu["free_vram_gb"] is None else f"{gpu['free_vram_gb']:.1f}"
        rows.append(
            (
                f"GPU {gpu['index']}",
                f"{gpu['name']}, compute {gpu['compute_capability']}, {free} of {gpu['total_vram_gb']:.1f} GB free, "
                f"bf16 {'yes' if gpu['bf16_supported'] else 'no'}",
            )
        )
    first = report["gpus"][0]
    rows.append(("driver", f"{first['driver_version'] or '?'} (supports CUDA {first['cuda_version'] or '?'})"))
    return rows


def _preset_summary(p: dict[str, Any]) -> str:
    return (
        f"{p['dtype']}, first chunk {p['first_chunk_frames']} frames, then {p['chunk_frames']}, "
        f"batch up to {p['max_batch']}, CUDA graphs {'on' if p['cuda_graphs'] else 'off'}, "
        f"compile {'on' if p['compile'] else 'off'}, fused kernels {'on' if p['fused_kernels'] else 'off'}"
        + (", fp8 weights" if p.get("fp8") else "")
    )
