"""What an output records about how it was made (invariant 6), and what it must never
record (invariant 8): patient-identifier keys are refused, values are stored as JSON,
versions are added, and ``same_output`` decides whether a stored output is what a new
run would write."""

from __future__ import annotations

import functools
import json
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from pipeline.config import pixel_settings
from pipeline.identifiers import is_identifier
from pipeline.store.errors import StoreError

_VERSIONED = ("segpipe", "torch", "zarr", "numpy", "dask")


def check_provenance(provenance: Mapping[str, Any], where: str) -> None:
    """Refuse provenance holding a patient-identifier key at any depth (StoreError)."""
    found = _identifier_keys(provenance)
    if found:
        raise StoreError(
            f"{where}: provenance holds patient identifier keys {sorted(set(found))}; "
            "pass only safe metadata"
        )


def _identifier_keys(obj: Any) -> list[str]:
    if isinstance(obj, Mapping):
        own = [str(k) for k in obj if is_identifier(str(k))]
        return own + [k for v in obj.values() for k in _identifier_keys(v)]
    if isinstance(obj, list | tuple):
        return [k for v in obj for k in _identifier_keys(v)]
    return []


def as_json(value: Any, where: str) -> Any:
    """A JSON round trip: tuples become lists, so stored and requested values compare equal."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{where}: provenance is not JSON-able: {exc}") from exc


def versions() -> dict[str, str | None]:
    """Python's version and the installed versions of segpipe and its main libraries."""
    return dict(_versions())


@functools.cache  # read once per process: importlib.metadata took ~15 ms an image in an archive run
def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def identity(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two runs' pixels comparable: input and model hashes, pixel settings."""
    run = provenance.get("run") or {}
    return {
        "input.sha256": (provenance.get("input") or {}).get("sha256"),
        "model.sha256": (provenance.get("model") or {}).get("sha256"),
        **{f"run.{k}": v for k, v in pixel_settings(run).items()},
    }


def same_output(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> bool:
    """Whether an output with provenance ``stored`` is what a run with provenance
    ``requested`` ({"input": {"sha256"}, "model": {"sha256"}, "run": settings}) would write:
    same input and model hashes and pixel settings; execution-only settings may differ."""
    return identity(stored) == identity(as_json(dict(requested), "requested provenance"))
