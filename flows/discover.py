"""Discovery: the images a run covers, from folders, globs, list files and fsspec URLs.

Every source becomes a `Source` (where to read it, the output name it gets). Folders are
walked recursively; a file is an image when its extension names an image format or, for
any other name (DICOM archives often have none), when its first bytes do (pipeline.io
sniff). A DICOM whole-slide image, a series of instance files, is one image (one
`Source`, its first file by name: `_one_per_slide`). A file named on the command line is
always taken: if it is broken, the run says so instead of skipping it silently. Output stores (and the output root itself) are never
taken as inputs.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from flows.outputs import check_reachable, storage_error
from pipeline.errors import InputError
from pipeline.io import dicomweb
from pipeline.io.dicom_series import members, series_key
from pipeline.io.sniff import sniff
from pipeline.store import output_key, safe_image_id

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".btf",
                            ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".czi"})  # fmt: skip
LIST_SUFFIXES = frozenset({".txt", ".list", ".lst"})
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
_SKIP_NAMES = frozenset({"DICOMDIR"})  # a DICOM index, not an image
_GLOB_CHARS = frozenset("*?[")
_VERSION_CHARS = 12  # hex digits of a cached copy's version (localize)
# fetch errors that happen again on a retry: the object is gone or forbidden, a bad URL,
# a missing fsspec backend (the 's3' extra)
_DETERMINISTIC = (FileNotFoundError, PermissionError, ValueError, ImportError)


class Source(BaseModel):
    """One input image: its location (a local path or an fsspec URL) and output name.

    Invariant 8: the location may name the patient (hospital exports are named after
    them), so it stays on this machine. Prefect stores a flow run's parameters as JSON: a
    Source serializes (and prints) as its image id only; the location travels with the
    object inside this process."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(exclude=True, repr=False)
    image_id: str
    # DICOM attributes known without reading the image (a DICOMweb query's answer), for
    # the selection rules; None: read from the file when the rules need it
    header: dict[str, tuple[str, ...]] | None = Field(default=None, exclude=True, repr=False)

    def __init__(self, uri: str, image_id: str, header: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__(uri=uri, image_id=image_id, header=header)

    @classmethod
    def of(cls, location: str, out_root: str, label: str | None = None) -> Source:
        """The source of one input file or URL, named for the output root `out_root`."""
        where = location if is_url(location) and not location.startswith("file://") else _resolved(location.removeprefix("file://"))
        return cls(where, safe_image_id(where, output_key(out_root), label))

    @property
    def is_remote(self) -> bool:
        return is_url(self.uri) and not self.uri.startswith("file://")

    @property
    def name(self) -> str:
        """The file name (it may name the patient: for this machine's console only)."""
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


class Inputs(BaseModel):
    """What a collection run was asked to cover (folders, globs, list files, URLs), held
    out of Prefect's stored parameters: their names may name patients (invariant 8)."""

    model_config = ConfigDict(frozen=True)

    items: list[str] = Field(exclude=True, repr=False)
    count: int = 0

    def __init__(self, items: list[str]) -> None:
        super().__init__(items=list(items), count=len(items))


def discover(inputs: Iterable[str], out_root: str) -> list[Source]:
    """Every image named by `inputs`, once each, sorted by output name, with the output
    root's non-identifying ids (`safe_image_id`: a keyed hash of the resolved location).

    An input is a folder, a glob, a list file (.txt/.list/.lst, one input per line, '#'
    comments, paths relative to the list), an image file, or an fsspec URL of any of these.
    """
    check_reachable(out_root)  # here, so a run stops before any image when it cannot write
    pacs = [item for item in inputs if dicomweb.is_dicomweb(str(item))]
    if pacs:  # they need the run's rules and watermarks: flows/pacs.py queries them
        raise InputError(f"{pacs[0]}: a DICOMweb source is queried by the collection run, not discovered")
    exclude = _local_root(out_root)
    found: set[str] = set()
    for item in inputs:
        skipped: Counter[str] = Counter()
        for location, _root in _expand(str(item), exclude, skipped):
            found.add(location)
        if skipped:  # by count and reason: a file name may be a patient's (invariant 8)
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
            log.warning("%s: skipped %d entries that look like images: %s", item, skipped.total(), reasons)
    if not found:
        raise InputError(f"{', '.join(map(str, inputs)) or '(nothing)'}: no images found")
    return _named(_one_per_slide(found), output_key(out_root))


def is_url(text: str) -> bool:
    return "://" in text


def _expand(item: str, exclude: Path | None, skipped: Counter[str]) -> Iterator[tuple[str, str | None]]:
    if is_url(item) and not item.startswith("file://"):
        yield from _expand_url(item)
        return
    path = Path(item.removeprefix("file://")).expanduser()
    if _GLOB_CHARS & set(item):
        root = _glob_root(path)
        for match in sorted(glob.glob(str(path), recursive=True)):
            if Path(match).is_dir():
                yield from _walk(Path(match), exclude, root, skipped)
            elif _is_image_file(Path(match), skipped):
                yield _resolved(match), root
    elif path.is_dir() and not _is_zarr(path):
        yield from _walk(path, exclude, str(path.resolve()), skipped)
    elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        yield from _read_list(path, exclude, skipped)
    elif path.exists():
        if not (path.is_file() or path.is_dir()):  # reading a FIFO would block the run
            raise InputError(f"{item}: not a regular file (a FIFO, socket or device)")
        yield _resolved(path), None
    else:
        raise InputError(f"{item}: no such file, folder or glob match")


def _walk(folder: Path, exclude: Path | None, root: str | None,
          skipped: Counter[str]) -> Iterator[tuple[str, str | None]]:  # fmt: skip
    """Images under `folder`: zarr stores are images (not descended into), hidden entries
    and the output root are left out; files left out that look like images are counted
    in `skipped` by reason."""
    for current, dirs, files in os.walk(folder):
        here = Path(current)
        kept = []
        for name in sorted(dirs):
            sub = here / name
            if name.startswith(".") or (exclude is not None and sub.resolve() == exclude):
                continue
            if _is_zarr(sub):
                if not _is_output_store(sub):
                    yield _resolved(sub), root
                continue
            kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith("."):
                if _named_like_image(name):  # `..png`, macOS's `._x.png`
                    skipped["hidden (name starts with '.')"] += 1
            elif _is_image_file(here / name, skipped):
                yield _resolved(here / name), root


def _read_list(path: Path, exclude: Path | None, skipped: Counter[str]) -> Iterator[tuple[str, str | None]]:
    for line in path.read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if not is_url(entry) and not Path(entry).expanduser().is_absolute():
            entry = str(path.parent / entry)
        yield from _expand(entry, exclude, skipped)


def _expand_url(url: str) -> Iterator[tuple[str, str | None]]:
    """Files behind an fsspec URL: one object (taken whatever its name), or the image
    files under a prefix or matching a glob (by extension: sniffing would fetch each)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.invalidate_cache()  # a served flow lists again each run: objects come and go
        if _GLOB_CHARS & set(path):
            names: list[str] | None = [n for n in fs.glob(path) if not fs.isdir(n)]
        elif fs.isdir(path):
            names = fs.find(path)
        elif fs.exists(path):
            names = None  # one object
        else:
            raise InputError(f"{url}: no such object or prefix")
    except InputError:
        raise
    except Exception as exc:  # botocore and other backends raise their own types
        raise storage_error(url, exc) from exc
    if names is None:
        yield fs.unstrip_protocol(path), None
        return
    for name in sorted(names):
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            yield fs.unstrip_protocol(name), None


def _one_per_slide(found: set[str]) -> set[str]:
    """One location per DICOM whole-slide image: its instance files (levels, label,
    overview) share a folder and a Series Instance UID, and the first by name stands for
    them (the reader opens the others beside it). X-ray DICOMs and every other file pass
    as they are. Limit: a remote series is not grouped (each object is fetched alone)."""
    kept: set[str] = set()
    slides: set[tuple[str, str]] = set()
    for location in sorted(found):
        key = None if is_url(location) else series_key(Path(location))
        if key is None:
            kept.add(location)
        elif key not in slides:
            slides.add(key)
            kept.add(location)
    return kept


def _is_image_file(path: Path, skipped: Counter[str]) -> bool:
    """An image by extension, or (any other name) by its first bytes. A link to nothing
    and what is not a regular file (a FIFO, a socket, a device) are counted in `skipped`
    when named like an image: reading a FIFO would block the run."""
    if path.name in _SKIP_NAMES:
        return False
    if not path.is_file():
        if _named_like_image(path.name):
            broken = path.is_symlink() and not path.exists()
            skipped["links to nothing" if broken else "not regular files (FIFO, socket, device)"] += 1
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix.lower() in LIST_SUFFIXES:
        return False
    try:
        return sniff(path) != "zarr"
    except InputError:
        return False


def _named_like_image(name: str) -> bool:
    return name.lower().endswith(tuple(IMAGE_SUFFIXES))  # Path("..png").suffix is ""


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _ZARR_MARKERS)


def _is_output_store(path: Path) -> bool:
    """A segpipe output store (its group attributes carry 'segpipe')."""
    meta = path / "zarr.json"
    return meta.is_file() and '"segpipe"' in meta.read_text(errors="replace")


def _glob_root(pattern: Path) -> str:
    """The fixed folder a glob starts from: output names are relative to it."""
    fixed = []
    for part in pattern.parts:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return str(Path(*fixed).resolve()) if fixed else str(Path.cwd())


def _resolved(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _local_root(out_root: str | None) -> Path | None:
    if out_root is None or (is_url(out_root) and not out_root.startswith("file://")):
        return None
    return Path(out_root.removeprefix("file://")).expanduser().resolve()


def _named(found: Iterable[str], key: bytes) -> list[Source]:
    """Each location's output name (its keyed hash), in the order of the locations."""
    sources = [Source(loc, safe_image_id(loc, key)) for loc in sorted(found)]
    log.info("discovered %d images", len(sources))
    return sources


def localize(source: Source, cache_dir: str | Path) -> str:
    """A local path for the source (the readers decode local files): a local one as it
    is; a DICOMweb instance fetched once (WADO-RS) into `cache_dir` as `<image_id>.dcm`
    (a DICOMweb slide series is its URI: its reader fetches only the frames it reads);
    a remote object fetched once into `cache_dir` as `<image_id>.<version><suffix>`,
    its version a digest of its size and modification marker (`fingerprint`), so a changed
    object is fetched again, never read stale; the copy of an older version is removed.

    The copy is read by this process only (ingest copies a fetched input's working level
    into the output store): `cache_dir` need not be shared with the tile workers.
    """
    if not source.is_remote:
        return source.uri.removeprefix("file://")
    if dicomweb.is_slide_series(source.uri):  # read frame by frame through DICOMweb: not fetched
        return source.uri
    if dicomweb.is_dicomweb(source.uri):  # an instance's content never changes under its UID
        local = Path(cache_dir) / f"{source.image_id}.dcm"
        if not local.is_file():
            size = dicomweb.retrieve(source.uri, local)
            log.info("%s: fetched %d bytes (WADO-RS)", source.image_id, size)
        return str(local)
    suffix = Path(source.name).suffix.lower()
    try:
        key = fingerprint(source)
    except Exception as exc:
        raise _fetch_error(source.uri, exc) from exc
    version = hashlib.sha256("|".join(map(str, key)).encode()).hexdigest()
    local = Path(cache_dir) / f"{source.image_id}.{version[:_VERSION_CHARS]}{suffix}"
    if not local.is_file():
        _fetch(source.uri, local)
        _drop_older_copies(local, source.image_id, suffix)
    return str(local)


def _fetch(uri: str, local: Path) -> None:
    """Copy the object at `uri` to `local` (through `<local>.part`: a copy is whole or absent)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(local.name + ".part")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.get_file(path, str(partial))
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise _fetch_error(uri, exc) from exc
    partial.rename(local)


def _fetch_error(uri: str, exc: Exception) -> Exception:
    """One line naming the object: an InputError when a retry would fail the same way,
    else an OSError, which the ingest task retries (botocore's errors are not OSErrors)."""
    message = f"{uri}: cannot fetch ({type(exc).__name__}: {' '.join(str(exc).split())})"
    return InputError(message) if isinstance(exc, _DETERMINISTIC) else OSError(message)


def _drop_older_copies(current: Path, image_id: str, suffix: str) -> None:
    """Remove the cached copies of other versions of the same image."""
    name = re.compile(rf"{re.escape(image_id)}\.[0-9a-f]{{{_VERSION_CHARS}}}{re.escape(suffix)}")
    for old in current.parent.glob(f"{image_id}.*{suffix}"):
        if old != current and name.fullmatch(old.name):
            old.unlink(missing_ok=True)


def fingerprint(source: Source) -> tuple[int, str]:
    """(size, modification marker) of a source: unchanged while its content is unchanged
    (the key under which its content hash is cached)."""
    if not source.is_remote:
        local = Path(source.uri.removeprefix("file://"))
        stats = [f.stat() for f in members(local) or [local]]  # a DICOM WSI: all its files
        return sum(s.st_size for s in stats), ",".join(str(s.st_mtime_ns) for s in stats)
    fs, path = fsspec.core.url_to_fs(source.uri)
    info = fs.info(path)
    marker = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "created") if k in info), "")
    return int(info.get("size") or 0), marker
