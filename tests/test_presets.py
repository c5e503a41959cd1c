"""Preset files, VRAM-based choice, validation errors and flag precedence."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from csmcli.errors import CsmError
from csmcli.gpu import GpuInfo
from csmcli.model import CSM_1B
from csmcli.presets import (
    FOLDED_PARAMS,
    apply_overrides,
    choose_preset,
    estimate_vram_gb,
    get_preset,
    load_presets,
    presets_dir,
    resolve_preset,
)

TIERS = ["cpu", "8gb", "12gb", "16gb", "24gb", "40gb", "80gb"]


@pytest.fixture(scope="module")
def presets():
    return load_presets()


def test_shipped_presets_are_the_seven_tiers_smallest_first(presets):
    assert list(presets) == TIERS


def test_cpu_preset_is_plain_float32(presets):
    cpu = presets["cpu"]
    assert (cpu.dtype, cpu.cuda_graphs, cpu.compile, cpu.max_batch, cpu.min_vram_gb) == ("float32", False, False, 1, 0)
    assert cpu.fused_kernels is False


def test_gpu_tiers_fit_their_memory_and_grow(presets):
    gpu_tiers = [presets[name] for name in TIERS[1:]]
    for preset in gpu_tiers:
        assert preset.dtype == "bfloat16" and preset.cuda_graphs and preset.fused_kernels, preset.name
        assert not preset.compile, preset.name  # minutes of compiling before the first request: opt-in only
        # The tier's weights + KV cache for max_batch slots must fit in the smallest card it is chosen for.
        assert estimate_vram_gb(preset) <= preset.min_vram_gb, preset.name
    batches = [p.max_batch for p in gpu_tiers]
    assert batches == sorted(batches) and batches[0] < batches[-1]


def test_estimate_matches_the_kv_cache_arithmetic(presets):
    # 16 layers x 2 x 8 heads x 64 x 2048 positions x 2 bytes = 64 MiB per slot (x1.25 slack) in bf16.
    small, large = presets["8gb"], presets["80gb"]
    folded_gb = FOLDED_PARAMS * 2 / 2**30  # only the large engine keeps folded copies (1.3 GiB)
    assert folded_gb == pytest.approx(1.32, abs=0.01)
    per_slot = (estimate_vram_gb(large) - folded_gb - estimate_vram_gb(small)) / (large.max_batch - small.max_batch)
    assert per_slot == pytest.approx(64 * 1.25 / 1024)
    layers = (CSM_1B.backbone, CSM_1B.decoder)  # every layer's QKV and gate/up weight, once more
    folded = sum(c.n_layers * ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim + 2 * c.intermediate_size) * c.dim
                 for c in layers)
    assert folded == FOLDED_PARAMS
    at_16, at_17 = (dataclasses.replace(large, max_batch=n) for n in (16, 17))
    assert estimate_vram_gb(at_17) - estimate_vram_gb(at_16) == pytest.approx(folded_gb + 64 * 1.25 / 1024)


@pytest.mark.parametrize(
    ("total", "free", "expected"),
    [
        (None, None, "cpu"),  # no GPU
        (3.8, 3.5, "cpu"),  # GTX 1650: too small for any GPU tier
        (7.6, None, "8gb"),  # RTX 3070 as NVML reports it
        (8.0, 7.4, "8gb"),
        (11.0, None, "12gb"),  # RTX 2080 Ti
        (12.0, 11.2, "12gb"),  # RTX 3060 12GB
        (15.0, 14.6, "16gb"),  # Tesla T4
        (16.0, None, "16gb"),
        (22.5, 22.0, "24gb"),  # A10 / L4
        (24.0, 23.5, "24gb"),  # RTX 4090
        (40.0, 39.5, "40gb"),  # A100 40GB
        (45.0, None, "40gb"),  # L40S
        (79.6, 79.0, "80gb"),  # H100
        (139.8, 139.0, "80gb"),  # H200
        (79.6, 6.0, "16gb"),  # big card, mostly taken by another process: step down to what fits
        (79.6, 3.0, "cpu"),  # not even the smallest tier fits in what is free
    ],
)
def test_choose_preset_by_vram(presets, total, free, expected):
    preset, reason = choose_preset(total, free, presets=presets)
    assert preset.name == expected
    assert reason
    if total is not None:
        assert f"{total:.1f}" in reason


def test_choose_preset_steps_down_only_as_far_as_needed(presets):
    preset, reason = choose_preset(79.6, 11.0, presets=presets)  # 80gb needs ~15.6 GB, 40gb ~10.6
    assert preset.name == "40gb"
    assert "free" in reason


def _preset_dir(tmp_path: Path, text: str, name: str = "cpu") -> Path:
    directory = tmp_path / "presets"
    directory.mkdir()
    (directory / f"{name}.toml").write_text(text)
    return directory


def _cpu_text(**changes: str) -> str:
    """The shipped cpu.toml with `key = value` lines replaced or added; a value of None drops the key."""
    lines = []
    for line in (presets_dir() / "cpu.toml").read_text().splitlines():
        key = line.split("=")[0].strip()
        if key not in changes:
            lines.append(line)
    lines += [f"{key} = {value}" for key, value in changes.items() if value is not None]
    return "\n".join(lines) + "\n"


def test_load_presets_from_a_directory(tmp_path):
    directory = tmp_path / "p"
    shutil.copytree(presets_dir(), directory)
    (directory / "8gb.toml").unlink()
    assert list(load_presets(directory)) == [t for t in TIERS if t != "8gb"]


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"chunk_frame": "4"}, "chunk_frame"),  # unknown key (typo)
        ({"dtype": None}, "dtype"),  # missing key
        ({"chunk_frames": '"4"'}, "chunk_frames"),  # string instead of int
        ({"max_batch": "true"}, "max_batch"),  # bool instead of int
        ({"max_batch": "1.5"}, "max_batch"),  # float instead of int
        ({"first_chunk_frames": "0"}, "first_chunk_frames"),  # must be >= 1
        ({"cuda_graphs": "1"}, "cuda_graphs"),  # int instead of bool
        ({"compile": '"yes"'}, "compile"),  # string instead of bool
        ({"fused_kernels": "1"}, "fused_kernels"),  # int instead of bool
        ({"dtype": '"bf16"'}, "dtype"),  # not one of the dtypes
        ({"min_vram_gb": "-1"}, "min_vram_gb"),
        ({"min_vram_gb": '"8"'}, "min_vram_gb"),
        ({"description": '""'}, "description"),
        ({"name": '"other"'}, "name"),  # must match the file name
    ],
)
def test_invalid_preset_names_file_and_key(tmp_path, changes, key):
    directory = _preset_dir(tmp_path, _cpu_text(**changes))
    with pytest.raises(CsmError) as excinfo:
        load_presets(directory)
    message = str(excinfo.value)
    assert "cpu.toml" in message and f"'{key}'" in message


def test_preset_written_before_fused_kernels_existed_loads_with_them_on(tmp_path):
    directory = _preset_dir(tmp_path, _cpu_text(fused_kernels=None))
    assert load_presets(directory)["cpu"].fused_kernels is True


def test_gpu_preset_needs_a_vram_floor(tmp_path):
    directory = _preset_dir(tmp_path, _cpu_text(name='"8gb"'), name="8gb")
    with pytest.raises(CsmError, match=r"8gb\.toml.*'min_vram_gb'"):
        load_presets(directory)


def test_broken_toml_and_empty_directory(tmp_path):
    with pytest.raises(CsmError, match=r"cpu\.toml: invalid TOML"):
        load_presets(_preset_dir(tmp_path, "name = \n"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CsmError, match="no preset files"):
        load_presets(tmp_path / "empty")


def test_the_shipped_cpu_toml_round_trips(tmp_path):
    # Guards the helper above: unchanged text must load, or every failure above could be for the wrong reason.
    assert load_presets(_preset_dir(tmp_path, _cpu_text()))["cpu"] == load_presets()["cpu"]


def test_overrides_beat_preset_values_and_none_means_not_given(presets):
    base = presets["24gb"]
    changed = apply_overrides(base, chunk_frames=9, max_batch=None, cuda_graphs=False, dtype=None, fused_kernels=False)
    assert (changed.chunk_frames, changed.cuda_graphs, changed.fused_kernels) == (9, False, False)
    assert apply_overrides(base, compile=True, fused_kernels=None) == dataclasses.replace(base, compile=True)
    assert (changed.max_batch, changed.dtype, changed.name) == (base.max_batch, base.dtype, base.name)
    assert apply_overrides(base) == base


def test_bad_override_values_are_user_errors(presets):
    with pytest.raises(CsmError, match="chunk_frames"):
        apply_overrides(presets["cpu"], chunk_frames=0)
    with pytest.raises(CsmError, match="dtype"):
        apply_overrides(presets["cpu"], dtype="float64")
    with pytest.raises(CsmError, match="fused_kernels must be true or false"):
        apply_overrides(presets["cpu"], fused_kernels=1)
    with pytest.raises(TypeError, match="min_vram_gb"):
        apply_overrides(presets["cpu"], min_vram_gb=1.0)  # not a flag


def _gpu(total: float, free: float | None, cc: tuple[int, int]) -> GpuInfo:
    return GpuInfo(0, "Test GPU", cc, total, free, "555.0", "12.5", cc >= (8, 0))


def test_resolve_preset_order_name_then_vram_then_gpu_then_flags(presets):
    preset, reason = resolve_preset("8gb", _gpu(79.6, 79.0, (9, 0)), presets=presets, max_batch=2)
    assert (preset.name, preset.max_batch) == ("8gb", 2)
    assert "--preset" in reason and "max_batch=2" in reason

    preset, _ = resolve_preset(None, _gpu(79.6, 79.0, (9, 0)), presets=presets)
    assert preset == presets["80gb"]

    preset, reason = resolve_preset(None, _gpu(79.6, 79.0, (9, 0)), presets=presets, fused_kernels=False)
    assert (preset.name, preset.fused_kernels) == ("80gb", False) and "fused_kernels=False" in reason

    preset, _ = resolve_preset(None, None, presets=presets, dtype="bfloat16")
    assert (preset.name, preset.dtype) == ("cpu", "bfloat16")


def test_resolve_preset_uses_float16_on_gpus_without_bf16(presets):
    preset, reason = resolve_preset(None, _gpu(15.0, 14.6, (7, 5)), presets=presets)  # Tesla T4
    assert (preset.name, preset.dtype) == ("16gb", "float16")
    assert "bfloat16" in reason
    preset, _ = resolve_preset(None, _gpu(15.0, 14.6, (7, 5)), presets=presets, dtype="float32")
    assert preset.dtype == "float32"  # an explicit --dtype still wins


def test_unknown_preset_name_lists_the_choices(presets):
    with pytest.raises(CsmError, match=r"unknown preset 'huge'.*80gb"):
        get_preset("huge", presets)


def test_a_preset_file_that_does_not_load_is_left_out_with_a_warning(tmp_path, monkeypatch):
    """One broken file among the presets (hand-edited) no longer stops every command: it is left out with a
    warning; only `--preset` naming it gets its error (without the warning), and a name without a file is still
    "unknown"."""
    import csmcli.presets as presets_module

    directory = tmp_path / "p"
    shutil.copytree(presets_dir(), directory)
    (directory / "broken.toml").write_text("name = \n")
    monkeypatch.setattr(presets_module, "presets_dir", lambda: directory)
    warned = []
    presets = presets_module.presets_for(None, warned.append)
    assert list(presets) == TIERS
    assert len(warned) == 1 and "broken.toml: invalid TOML" in warned[0] and warned[0].endswith("(left out)")
    warned.clear()
    presets = presets_module.presets_for("broken", warned.append)
    assert not warned
    with pytest.raises(CsmError, match=r"broken\.toml: invalid TOML"):
        presets_module.resolve_preset("broken", None, presets=presets)
    with pytest.raises(CsmError, match=r"unknown preset 'huge'"):
        presets_module.resolve_preset("huge", None, presets=presets)
    assert presets_module.resolve_preset("cpu", None, presets=presets)[0].name == "cpu"
    with pytest.raises(CsmError, match=r"broken\.toml: invalid TOML"):
        load_presets(directory)  # without `skip`, as before
