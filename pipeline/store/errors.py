"""The store's error type, apart so that every module of the package can raise it."""

from __future__ import annotations

from pipeline.errors import SegpipeError


class StoreError(SegpipeError, ValueError):
    """An output store does not match the request, or a write would break invariant 1."""
