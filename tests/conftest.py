"""Shared fixtures: tiny random CSM checkpoints saved in the real formats, loaded through the real loaders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run in one process per core (pytest -n, pyproject's addopts): one thread each, or OpenMP's spin-waits of
    # two processes' thread pools fight over the same cores. Before torch is imported: OpenMP reads it once.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: no test may reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # the Triton kernels' tests run on the CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tiny


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown without it (the GPU box has none)
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): two processes on the CPU, where the Triton interpreter's tests are
    single-threaded Python; one where a GPU is visible, so that the CUDA test files (full-size CSM-1B engines of up
    to 64 slots) never share a card."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    tiny.save_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def hf_model():
    return tiny.tiny_hf_model()


@pytest.fixture(scope="session")
def hf_checkpoint(hf_model, tokenizer_dir, tmp_path_factory) -> Path:
    return tiny.save_hf_checkpoint(hf_model, tmp_path_factory.mktemp("csm-hf"), tokenizer_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: intra-op threads gain nothing there, and on two shared cores OpenMP's
    spin-waits made such a module several times slower. Restored afterwards for the other modules."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
