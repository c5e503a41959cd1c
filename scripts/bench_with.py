"""`csmcli` with one csmcli.kernels constant changed, e.g. a speed option measured in `bench` before it becomes the
default (bool constants: 0 / 1; ints as given).

Usage: bench_with.py NAME VALUE CSMCLI-ARGS...   e.g. bench_with.py SHARE_SQUARES 0 bench --random-weights --batch 64
"""
import sys

from csmcli import kernels
from csmcli.cli import main

name, value, *rest = sys.argv[1:]
setattr(kernels, name, bool(int(value)) if isinstance(getattr(kernels, name), bool) else int(value))
print(name, "=", getattr(kernels, name), flush=True)
sys.argv = ["csmcli", *rest]
main()
