"""Benchmark scripts (not tests): `make bench` runs them all through run_all.py.

OpenMP threads wait passively here (OMP_WAIT_POLICY=PASSIVE unless set), on every side of
every comparison: with the default spinning, on a shared 2-core machine, a model called
from the main thread ran up to 2x slower than from a worker thread, and repeated timings
swung 4x. Set before torch loads OpenMP, so scripts import this package first.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
