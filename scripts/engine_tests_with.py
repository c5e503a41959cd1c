"""The engine's CUDA tests with one csmcli.kernels constant changed, e.g. a speed option that is off by default
until those tests pass with it on a GPU (bool constants: 0 / 1).

Usage: engine_tests_with.py NAME VALUE [-k EXPRESSION]"""
import sys

import pytest

from csmcli import kernels

name, value, *rest = sys.argv[1:]
setattr(kernels, name, bool(int(value)) if isinstance(getattr(kernels, name), bool) else int(value))
print(name, "=", getattr(kernels, name), flush=True)
sys.exit(pytest.main(["-q", "-o", "addopts=-ra", "tests/test_engine_cuda.py", "-p", "no:cacheprovider", *rest]))
