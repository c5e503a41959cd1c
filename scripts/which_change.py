"""Device check: run the 64-slot alone-vs-crowd engine test with one of this session's changes switched off
(argument: a kernels constant and its value), to find which one makes a row depend on the others."""
import sys

import pytest

from csmcli import kernels

name, value = sys.argv[1], int(sys.argv[2])
setattr(kernels, name, bool(value) if name == "SHARE_SQUARES" else value)
print(name, "=", getattr(kernels, name), flush=True)
sys.exit(pytest.main(["-q", "-x", "tests/test_engine_cuda.py", "-k", "alone_and_in_a_full and 64",
                      "-p", "no:cacheprovider"]))
