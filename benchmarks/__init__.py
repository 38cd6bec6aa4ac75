"""Benchmark scripts (not tests): `make bench` runs them all through run_all.py.

segpipe's side of every comparison runs in the environment segpipe's tile workers start
with (pipeline.engine.process_env.worker_env: glibc allocator settings, passive OpenMP waits;
`common.in_worker_env`), as a default run's model does; MONAI's side runs in the
environment the benchmark was started in, as MONAI users run it.
"""
