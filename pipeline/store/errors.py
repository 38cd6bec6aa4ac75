"""The store's error types, apart so that every module of the package can raise them, and
the one rule that turns storage refusing a write into a segpipe error."""

from __future__ import annotations

import errno

from pipeline.errors import SegpipeError


class StoreError(SegpipeError, ValueError):
    """An output store does not match the request, or a write would break invariant 1."""


class NotAStoreError(StoreError):
    """Nothing, or something other than a segpipe output store, lies at the path."""


# errno -> what the user is told: the storage refuses, and retrying will not help until
# someone frees space, remounts or grants access
_REFUSALS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
}


def storage_refusal(exc: BaseException) -> StoreError | None:
    """A StoreError naming the path for an OSError that means the storage refuses (full,
    read-only, forbidden, a file where a folder should be); None for anything else."""
    if not isinstance(exc, OSError) or exc.errno not in _REFUSALS:
        return None
    where = exc.filename if exc.filename is not None else "output storage"
    code = errno.errorcode.get(exc.errno, str(exc.errno))
    return StoreError(f"{where}: {_REFUSALS[exc.errno]} ({code})")
