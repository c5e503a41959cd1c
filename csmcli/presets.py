"""Performance presets: one TOML file per GPU memory tier, chosen by VRAM, overridable by flags.

"GB" in this module means GiB (2**30 bytes), the unit nvidia-smi and NVML report.
"""

import dataclasses
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csmcli.errors import CsmError
from csmcli.gpu import GpuInfo

DTYPES = ("bfloat16", "float16", "float32")
CPU_PRESET = "cpu"

# Fields a command-line flag may change; the rest describe the tier itself.
OVERRIDABLE = ("dtype", "first_chunk_frames", "chunk_frames", "max_batch", "cuda_graphs", "compile", "fused_kernels",
               "fp8")

# Memory model behind the tiers' max_batch (checked by tests/test_presets.py).
MODEL_PARAMS = 1.77e9  # backbone + depth decoder + embeddings/heads + Mimi, as in the HF checkpoint
RUNTIME_OVERHEAD_GB = 1.0  # CUDA context, cuBLAS workspaces, Mimi decode activations
KV_ELEMENTS_PER_SLOT = 16 * 2 * 8 * 64 * 2048  # backbone: layers x (k, v) x kv heads x head_dim x positions
SLOT_SLACK = 1.25  # per-slot activations, depth-decoder cache and CUDA-graph pools on top of the KV cache
# Engines of more than 16 slots keep the QKV and gate/up weights again with their norms folded in
# (kernels.folds_norms; not with fp8): backbone 16 x (3072 + 16384) x 2048, decoder 4 x (1536 + 16384) x 1024.
FOLDED_PARAMS = 16 * (3072 + 16384) * 2048 + 4 * (1536 + 16384) * 1024
FOLDED_ABOVE_SLOTS = 16
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    min_vram_gb: float
    dtype: str
    first_chunk_frames: int
    chunk_frames: int
    max_batch: int
    cuda_graphs: bool
    compile: bool
    fused_kernels: bool
    fp8: bool  # the transformer layers' weights in fp8 (`Csm.to_fp8`): an approximation, so off unless asked


_FIELD_TYPES: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Preset)}  # type: ignore[misc]


def estimate_vram_gb(preset: Preset) -> float:
    """Rough GPU memory the engine needs with this preset: weights (and their folded copies) + overhead +
    max_batch KV-cache slots."""
    nbytes = _DTYPE_BYTES[preset.dtype]
    weights = MODEL_PARAMS * nbytes
    if preset.max_batch > FOLDED_ABOVE_SLOTS and preset.fused_kernels and not preset.fp8:
        weights += FOLDED_PARAMS * nbytes
    slots = preset.max_batch * KV_ELEMENTS_PER_SLOT * nbytes * SLOT_SLACK
    return (weights + slots) / 2**30 + RUNTIME_OVERHEAD_GB


# ---- loading and validation -------------------------------------------------------------------------------------


def presets_dir() -> Path:
    """The shipped presets: inside the package for a wheel install, at the repo root for an editable one."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "presets", here.parent / "presets"):
        if candidate.is_dir():
            return candidate
    raise CsmError(f"no presets directory found (looked in {here / 'presets'} and {here.parent / 'presets'})")


def load_presets(directory: Path | str | None = None,
                 skip: Callable[[Path, CsmError], None] | None = None) -> dict[str, Preset]:
    """Load and validate every `*.toml` in `directory` (default: the shipped presets), smallest tier first. A file
    that does not load is an error; with `skip`, it is handed to `skip` (path, error) and left out instead, so that
    one hand-edited file does not stop every command."""
    root = Path(directory) if directory is not None else presets_dir()
    files = sorted(root.glob("*.toml"))
    if not files:
        raise CsmError(f"no preset files (*.toml) in {root}")
    presets = []
    for path in files:
        try:
            presets.append(load_preset_file(path))
        except CsmError as e:
            if skip is None:
                raise
            skip(path, e)
    presets.sort(key=lambda p: (p.min_vram_gb, p.name))
    return {p.name: p for p in presets}


# Keys newer than the preset format: files written before them (bench --write-preset) load with these values.
_ADDED_LATER: dict[str, Any] = {"fused_kernels": True, "fp8": False}  # the Triton kernels only ever run on CUDA


def load_preset_file(path: Path) -> Preset:
    """Parse one preset file; any problem becomes a CsmError naming the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CsmError(f"{path}: cannot read preset file: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise CsmError(f"{path}: invalid TOML: {e}") from e
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise CsmError(f"{path}: unknown key '{unknown[0]}' (known keys: {', '.join(_FIELD_TYPES)})")
    data = {**_ADDED_LATER, **data}
    missing = [key for key in _FIELD_TYPES if key not in data]
    if missing:
        raise CsmError(f"{path}: missing key '{missing[0]}'")
    for key, value in data.items():
        problem = _check_value(key, value)
        if problem:
            raise CsmError(f"{path}: key '{key}' {problem}")
    if data["name"] != path.stem:
        # --preset NAME looks presets up by name, so a name that differs from the file name only confuses.
        raise CsmError(f"{path}: key 'name' must match the file name '{path.stem}', got {data['name']!r}")
    if data["min_vram_gb"] == 0 and data["name"] != CPU_PRESET:
        raise CsmError(f"{path}: key 'min_vram_gb' must be > 0 for GPU presets (only '{CPU_PRESET}' may use 0)")
    return Preset(**{**data, "min_vram_gb": float(data["min_vram_gb"])})


def _check_value(key: str, value: Any) -> str | None:
    """Why `value` is not acceptable for field `key`, or None when it is."""
    expected = _FIELD_TYPES[key]
    if expected is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if isinstance(value, bool):  # bool is an int subclass; `max_batch = true` is a mistake, not 1
        return f"must be a number, got {value!r}"
    if expected is int:
        if not isinstance(value, int) or value < 1:
            return f"must be an integer >= 1, got {value!r}"
        return None
    if expected is float:
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            return f"must be a number >= 0, got {value!r}"
        return None
    if not isinstance(value, str) or not value.strip():
        return f"must be a non-empty string, got {value!r}"
    if key == "dtype" and value not in DTYPES:
        return f"must be one of {', '.join(DTYPES)}, got {value!r}"
    return None


# ---- choosing and overriding ------------------------------------------------------------------------------------


def choose_preset(
    total_vram_gb: float | None, free_vram_gb: float | None, *, presets: dict[str, Preset] | None = None
) -> tuple[Preset, str]:
    """Pick the largest tier the GPU's total memory allows, stepping down when too little of it is free.

    `total_vram_gb=None` means no usable GPU. Returns the preset and a one-line reason for people.
    """
    presets = load_presets() if presets is None else presets
    cpu = _cpu_preset(presets)
    if total_vram_gb is None:
        return cpu, "no CUDA GPU found"
    tiers = sorted((p for p in presets.values() if p.name != CPU_PRESET), key=lambda p: p.min_vram_gb)
    fitting = [p for p in tiers if p.min_vram_gb <= total_vram_gb]
    if not fitting:
        smallest = f" (the smallest GPU preset, {tiers[0].name}, needs {tiers[0].min_vram_gb:g} GB)" if tiers else ""
        return cpu, f"GPU has only {total_vram_gb:.1f} GB{smallest}"
    best = fitting[-1]
    reason = f"GPU has {total_vram_gb:.1f} GB; {best.name} is the largest preset for {best.min_vram_gb:g} GB or more"
    if free_vram_gb is None or estimate_vram_gb(best) <= free_vram_gb:
        return best, reason
    affordable = [p for p in fitting if estimate_vram_gb(p) <= free_vram_gb]
    if not affordable:
        need = estimate_vram_gb(fitting[0])
        return cpu, (
            f"GPU has {total_vram_gb:.1f} GB but only {free_vram_gb:.1f} GB free; even {fitting[0].name} needs "
            f"~{need:.1f} GB (close other GPU programs, or pick one with --preset)"
        )
    chosen = affordable[-1]
    return chosen, (
        f"{reason}, but only {free_vram_gb:.1f} GB is free (it needs ~{estimate_vram_gb(best):.1f} GB), "
        f"so {chosen.name} (~{estimate_vram_gb(chosen):.1f} GB)"
    )


def apply_overrides(preset: Preset, **overrides: Any) -> Preset:
    """Return `preset` with the given fields replaced; a None value means the flag was not given."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise TypeError(f"apply_overrides() got unknown field(s): {', '.join(unknown)}")
    given = {key: _plain(value) for key, value in overrides.items() if value is not None}
    for key, value in given.items():
        problem = _check_value(key, value)
        if problem:
            raise CsmError(f"{key} {problem}")
    return dataclasses.replace(preset, **given)


def resolve_preset(
    name: str | None, gpu: GpuInfo | None, *, presets: dict[str, Preset] | None = None, **overrides: Any
) -> tuple[Preset, str]:
    """The preset a command runs with: `--preset NAME` or the VRAM choice, adjusted to the GPU, then flags."""
    presets = load_presets() if presets is None else presets
    if name is not None:
        preset, reason = get_preset(name, presets), f"chosen with --preset {name}"
    elif gpu is None:
        preset, reason = choose_preset(None, None, presets=presets)
    else:
        preset, reason = choose_preset(gpu.total_vram_gb, gpu.free_vram_gb, presets=presets)
    if gpu is not None and not gpu.bf16_supported and preset.dtype == "bfloat16" and overrides.get("dtype") is None:
        preset = dataclasses.replace(preset, dtype="float16")
        reason += f"; {gpu.name} has no bfloat16, so float16"
    given = sorted(key for key, value in overrides.items() if value is not None)
    preset = apply_overrides(preset, **overrides)
    if given:
        reason += "; flags set " + ", ".join(f"{key}={getattr(preset, key)}" for key in given)
    return preset, reason


def get_preset(name: str, presets: dict[str, Preset] | None = None) -> Preset:
    presets = load_presets() if presets is None else presets
    if name in presets:
        return presets[name]
    path = presets_dir() / f"{name}.toml"
    if path.is_file():  # left out because it does not load: its own error, not "unknown"
        load_preset_file(path)
    raise CsmError(f"unknown preset '{name}' (available: {', '.join(presets)})")


def presets_for(name: str | None, warn: Callable[[str], None]) -> dict[str, Preset]:
    """The presets a command chooses from: a file that does not load is left out with a warning, unless it is the
    one `--preset` names (then its error is the command's, from `get_preset`)."""

    def skip(path: Path, error: CsmError) -> None:
        if path.stem != name:
            warn(f"{error} (left out)")

    return load_presets(skip=skip)


def _cpu_preset(presets: dict[str, Preset]) -> Preset:
    if CPU_PRESET not in presets:
        raise CsmError(f"no '{CPU_PRESET}' preset found (available: {', '.join(presets)})")
    return presets[CPU_PRESET]


def _plain(value: Any) -> Any:
    # CLI enums (e.g. a StrEnum for --dtype) arrive as enum members; store their plain value.
    return getattr(value, "value", value)
