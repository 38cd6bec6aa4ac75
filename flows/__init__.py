"""Prefect flows and the `segpipe` command line over the pipeline library."""
