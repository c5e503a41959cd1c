"""GPU facts for choosing presets and for `csmcli info`.

NVML (nvidia-ml-py) is asked first: it needs no CUDA context and reports free memory. torch.cuda is the fallback
when NVML is missing or broken. Neither "no GPU" nor "no NVML" is an error: both give an empty list.
VRAM is in GiB (2**30 bytes), as nvidia-smi reports it.
"""

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

_GIB = 2**30


@dataclass
class GpuInfo:
    index: int  # CUDA device index, after CUDA_VISIBLE_DEVICES
    name: str
    compute_capability: tuple[int, int] | None
    total_vram_gb: float
    free_vram_gb: float | None  # None when only torch was asked: measuring it would create a CUDA context
    driver_version: str | None
    cuda_version: str | None  # highest CUDA version the driver supports
    bf16_supported: bool

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        cc = self.compute_capability
        data["compute_capability"] = f"{cc[0]}.{cc[1]}" if cc else None
        data["total_vram_gb"] = round(self.total_vram_gb, 2)
        data["free_vram_gb"] = None if self.free_vram_gb is None else round(self.free_vram_gb, 2)
        return data


@dataclass
class GpuProbe:
    gpus: list[GpuInfo]
    source: str  # "nvml", "torch" or "none"
    notes: list[str] = field(default_factory=list)  # why a source was skipped, for `csmcli info`


def detect_gpus() -> list[GpuInfo]:
    """The CUDA GPUs this process can use, device 0 first; [] without a GPU, a driver or NVML."""
    return probe_gpus().gpus


def probe_gpus() -> GpuProbe:
    """Like detect_gpus(), and also says where the facts came from and why other sources were skipped."""
    nvml_devices, nvml_note = _nvml_gpus()
    if nvml_devices is not None:
        return GpuProbe(_visible_to_cuda(nvml_devices), "nvml")
    torch_devices, torch_note = _torch_gpus()
    if torch_devices is not None:
        return GpuProbe(torch_devices, "torch", [nvml_note])
    return GpuProbe([], "none", [nvml_note, torch_note])


_OUT_OF_MEMORY_ADVICE = ("Including non-PyTorch memory", "Of the allocated memory", "If reserved", "See documentation")


def out_of_memory_summary(error: BaseException) -> str:
    """torch's CUDA out-of-memory message on one line, up to its own process's accounting and its advice on
    PyTorch's allocator: what was asked for, what was free, and which other processes hold memory."""
    text = " ".join(str(error).split())  # one line: some allocator backends' messages have several
    for marker in _OUT_OF_MEMORY_ADVICE:
        text = text.split(marker)[0]
    return text.strip().rstrip(".")


def bf16_native(compute_capability: tuple[int, int] | None) -> bool:
    # Ampere (8.0) and newer have bfloat16 tensor cores; older cards emulate it slowly.
    return compute_capability is not None and compute_capability >= (8, 0)


def torch_versions() -> dict[str, Any]:
    """torch's version and CUDA build facts; imports torch, so only call it when they are needed."""
    try:
        import torch
    except ImportError:
        return {"torch": None, "cuda_runtime": None, "cudnn": None, "cuda_available": False}
    # Neither call creates a CUDA context (checked with NVML on an H100: no process, no memory until an
    # allocation); cudnn.version() does run torch's lazy CUDA init.
    available = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if available else None,
        "cuda_available": available,
    }


def _nvml_gpus() -> tuple[list[tuple[GpuInfo, str]] | None, str]:
    """(GpuInfo, uuid) per device in NVML order, or None and the reason NVML could not be used."""
    try:
        import pynvml
    except ImportError:
        return None, "NVML: nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no driver / libnvidia-ml.so, e.g. on a CPU-only machine
        return None, f"NVML: {e}"
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = _cuda_version_text(pynvml.nvmlSystemGetCudaDriverVersion())
        devices = [_nvml_device(pynvml, i, driver, cuda) for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError as e:
        return None, f"NVML: {e}"
    finally:
        pynvml.nvmlShutdown()
    return devices, "ok"


def _nvml_device(pynvml: Any, index: int, driver: str, cuda: str) -> tuple[GpuInfo, str]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
    info = GpuInfo(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        compute_capability=(int(cc[0]), int(cc[1])),
        total_vram_gb=memory.total / _GIB,
        free_vram_gb=memory.free / _GIB,
        driver_version=driver,
        cuda_version=cuda,
        bf16_supported=bf16_native((int(cc[0]), int(cc[1]))),
    )
    return info, _text(pynvml.nvmlDeviceGetUUID(handle))


def _visible_to_cuda(devices: list[tuple[GpuInfo, str]]) -> list[GpuInfo]:
    """Apply CUDA_VISIBLE_DEVICES, which NVML ignores, so index 0 is the device torch will call cuda:0."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [info for info, _ in devices]
    chosen: list[GpuInfo] = []
    for token in (t.strip() for t in env.split(",")):
        match = None
        if token.isdigit() and int(token) < len(devices):
            match = devices[int(token)][0]
        elif token.startswith("GPU-"):
            match = next((info for info, uuid in devices if uuid.startswith(token)), None)
        if match is None:
            break  # CUDA ignores everything from the first invalid entry on ("-1" hides all GPUs)
        chosen.append(dataclasses.replace(match, index=len(chosen)))
    return chosen


def _torch_gpus() -> tuple[list[GpuInfo] | None, str]:
    try:
        import torch
    except ImportError:
        return None, "torch: not installed"
    if not torch.cuda.is_available():
        return None, "torch: no CUDA device available"
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        cc = (props.major, props.minor)
        gpus.append(
            GpuInfo(
                index=index,
                name=props.name,
                compute_capability=cc,
                total_vram_gb=props.total_memory / _GIB,
                free_vram_gb=None,
                driver_version=None,
                cuda_version=None,
                bf16_supported=bf16_native(cc),
            )
        )
    return gpus, "ok"


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"  # NVML encodes 12.4 as 12040
