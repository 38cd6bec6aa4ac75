"""A PACS over DICOMweb (dicomweb-client on requests): QIDO-RS to find instances, WADO-RS to
fetch their headers and files, STOW-RS to send a DICOM SEG back.

A DICOMweb source is written `dicomweb+https://pacs.example/dicom-web[?Key=VALUE&...]`: the
service root, and query keys the operator fixes (e.g. `StudyDescription=THORAX*`). One
instance of it is `dicomweb+<root>/studies/<study>/series/<series>/instances/<sop>`; a
whole-slide image (VL Whole Slide Microscopy series: one instance per pyramid level, plus
label and overview) is one image, its series: `dicomweb+<root>/studies/<study>/series/<series>`,
never fetched whole but read frame by frame (pipeline/io/dicom_wsi_web.py).

Credentials never travel on the command line, in a URL or in a log: they come from
SEGPIPE_DICOMWEB_TOKEN (a bearer token), SEGPIPE_DICOMWEB_USER and SEGPIPE_DICOMWEB_PASSWORD
(HTTP basic), or a file named by SEGPIPE_DICOMWEB_AUTH_FILE ("user:password", or "Bearer
TOKEN"). TLS certificates are verified (requests' bundle, or REQUESTS_CA_BUNDLE for a
hospital's own CA); a URL with credentials in it is refused.

Errors are one line naming the service root, never a request URL (its path holds the UIDs,
which can be linked to the patient) nor a secret: `PacsError` when the answer would be the
same on a retry (refused credentials, not found, untrusted certificate), an `OSError`
when it may pass (unreachable, timed out, a 5xx), which the flows' I/O tasks retry.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import parse_qsl, urlsplit

from pipeline.errors import SegpipeError

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

log = logging.getLogger(__name__)

PREFIX = "dicomweb+"
TOKEN_ENV, USER_ENV, PASSWORD_ENV = "SEGPIPE_DICOMWEB_TOKEN", "SEGPIPE_DICOMWEB_USER", "SEGPIPE_DICOMWEB_PASSWORD"
AUTH_FILE_ENV = "SEGPIPE_DICOMWEB_AUTH_FILE"
TIMEOUT_S = (10.0, 300.0)  # connect, read: a large instance streams for a while
SERVER_RETRIES = 3  # dicomweb-client's own attempts on 429/503/504, before the task's retries
# Series that hold no image segpipe reads (our own SEGs sent back among them): left out of
# every query's answer, so a nightly run does not meet them as failures.
NOT_IMAGES = frozenset({"SEG", "SR", "PR", "KO", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RWV", "FID", "PLAN"})
_INSTANCE = re.compile(r"^(?P<root>.+)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)"
                       r"(?:/instances/(?P<sop>[0-9.]+))?$")  # fmt: skip
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
PIXEL_DATA = "7FE00010"  # Pixel Data's key in DICOM JSON (metadata gives it as a bulk data URI)
_REASONS = ("Connection refused", "Name or service not known", "No route to host", "timed out",
            "Temporary failure in name resolution", "Connection reset", "Network is unreachable")  # fmt: skip

# Their debug lines quote request URLs, whose paths hold study, series and instance UIDs
# (invariant 8): kept at WARNING whatever the root logger's level.
for _name in ("dicomweb_client", "urllib3.connectionpool"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class PacsError(SegpipeError):
    """The PACS answered, and a retry would get the same answer (refused credentials, not
    found, an untrusted certificate, a refused store)."""


class PacsGone(PacsError):
    """What was asked for is not (or no longer) in the PACS: HTTP 404 or 410."""


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb service root and the query keys its source fixes."""

    root: str  # http(s)://host[:port]/path, no query: what errors name
    filters: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """From `dicomweb+http(s)://host/path[?Key=VALUE&...]`; PacsError naming the problem."""
        url = text.removeprefix(PREFIX)
        parts = urlsplit(url)
        if not is_dicomweb(text) or parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(f"{text}: not a DICOMweb source (write dicomweb+https://host/dicom-web)")
        if parts.username or parts.password:
            raise PacsError(f"{parts.scheme}://{parts.hostname}: credentials in the URL are refused (they would "
                            f"be stored and logged): set {USER_ENV} and {PASSWORD_ENV}, {TOKEN_ENV}, "
                            f"or {AUTH_FILE_ENV}")  # fmt: skip
        root = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
        return cls(root, tuple(parse_qsl(parts.query)))

    @property
    def text(self) -> str:
        """The source as written (the key of its watermark)."""
        query = "&".join(f"{k}={v}" for k, v in self.filters)
        return f"{PREFIX}{self.root}{'?' + query if query else ''}"

    def instance_uri(self, instance: Instance) -> str:
        series = f"{PREFIX}{self.root}/studies/{instance.study}/series/{instance.series}"
        return series if instance.is_series else f"{series}/instances/{instance.sop}"


@dataclass(frozen=True)
class Instance:
    """One instance a query found: its UIDs and the header attributes asked for."""

    study: str
    series: str
    sop: str  # "": the whole series is the image (a whole-slide image)
    header: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    @property
    def is_series(self) -> bool:
        return not self.sop

    @property
    def identity(self) -> str:
        """What its output id is a keyed hash of: its UIDs, not the PACS's address (the same
        instance from a moved or mirrored PACS is the same image)."""
        return f"dicomweb://{self.study}/{self.series}" + ("" if self.is_series else f"/{self.sop}")


def is_dicomweb(text: str) -> bool:
    return str(text).startswith((f"{PREFIX}http://", f"{PREFIX}https://"))


def split_inputs(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(folders, globs, files and fsspec URLs; DICOMweb sources) of a run's inputs."""
    return [i for i in items if not is_dicomweb(i)], [i for i in items if is_dicomweb(i)]


def split_instance(uri: str) -> tuple[Endpoint, Instance]:
    """The endpoint and instance (or slide series) of an image's URI (`Endpoint.instance_uri`)."""
    match = _INSTANCE.match(uri.removeprefix(PREFIX))
    if not match:
        raise PacsError("not a DICOMweb instance URI")
    return Endpoint(match["root"]), Instance(match["study"], match["series"], match["sop"] or "")


def is_slide_series(uri: str) -> bool:
    """Whether `uri` names a whole-slide series (read frame by frame, never fetched whole)."""
    match = _INSTANCE.match(str(uri).removeprefix(PREFIX)) if is_dicomweb(str(uri)) else None
    return match is not None and not match["sop"]


def series_hash(uri: str) -> str:
    """What provenance records as a slide series' content: the sha256 of its study and
    series UIDs (read, not fetched: like a SOP Instance UID, they name one slide)."""
    import hashlib

    _, series = split_instance(uri)
    return hashlib.sha256(f"{series.study}/{series.series}".encode()).hexdigest()


# -- QIDO-RS and WADO-RS metadata -----------------------------------------------------------------


def search(endpoint: Endpoint, study_dates: str | None, modalities: Sequence[str] | None,
           keywords: Sequence[str]) -> Iterator[Instance]:  # fmt: skip
    """Every instance of the series whose study falls in `study_dates` (a DICOM date range,
    "20240101-", or None: any) and whose Modality is one of `modalities` (None: any), with
    the endpoint's own query keys; each with the header attributes `keywords` read from its
    WADO-RS metadata (no pixel data). One QIDO-RS query per modality (a list of values in
    one key is not matched alike by every server), one metadata request per series. A VL
    Whole Slide Microscopy series is one image (`Instance.is_series`), its header its
    pyramid's first instance's (limit: a sparse slide's metadata, per-frame positions
    included, is read whole once here, and again per instance by the reader)."""
    filters = dict(endpoint.filters)
    if study_dates:
        filters["StudyDate"] = study_dates
    queries = [{**filters, "Modality": m} for m in modalities] if modalities and "Modality" not in filters else [filters]
    series: dict[tuple[str, str], None] = {}
    for query in queries:
        for item in _call(endpoint, "QIDO-RS search for series",
                          lambda c, q=query: c.search_for_series(search_filters=q, get_remaining=True)):  # fmt: skip
            modality = attribute_values(item, "Modality")
            if not set(modality) & NOT_IMAGES:
                series[(attribute_values(item, "StudyInstanceUID")[0], attribute_values(item, "SeriesInstanceUID")[0])] = None
    wanted = tuple(dict.fromkeys(("Modality", *keywords)))
    for study, serie in series:
        try:
            metadata = _call(endpoint, "WADO-RS series metadata", lambda c, s=study, e=serie: c.retrieve_series_metadata(s, e))
        except PacsGone:  # deleted between the query and now: nothing to segment
            log.warning("%s: a series found by the query is gone from the PACS; left out", endpoint.root)
            continue
        slide = [item for item in metadata if attribute_values(item, "SOPClassUID") == (WSI_SOP_CLASS,)]
        if slide:  # its levels, label and overview: one image, read frame by frame
            volume = [item for item in slide if "VOLUME" in attribute_values(item, "ImageType")] or slide
            yield Instance(study, serie, "", {k: v for k in wanted if (v := attribute_values(volume[0], k))})
            continue
        for item in metadata:
            header = {k: v for k in wanted if (v := attribute_values(item, k))}
            yield Instance(study, serie, attribute_values(item, "SOPInstanceUID")[0], header)


def probe(endpoint: Endpoint) -> None:
    """One small QIDO-RS query: the PACS answers and takes the credentials (else the error)."""
    _call(endpoint, "QIDO-RS search for studies", lambda c: c.search_for_studies(limit=1))


def attribute_values(item: Mapping[str, Any], keyword: str) -> tuple[str, ...]:
    """An attribute's values in a DICOM JSON object (PS3.18 F.2) as strings; () if absent."""
    from pydicom import datadict

    element = item.get(f"{datadict.tag_for_keyword(keyword):08X}") or {}
    return tuple(str(v.get("Alphabetic", "") if isinstance(v, dict) else v).strip() for v in element.get("Value", ()))


# -- WADO-RS retrieve ------------------------------------------------------------------------------


def retrieve(uri: str, local: Path) -> int:
    """Fetch the instance at `uri` into the file `local` (through `<local>.part`: a copy is
    whole or absent), in the transfer syntax the PACS holds it in (no transcoding);
    returns the bytes written. One instance is held in memory while it is written (an
    X-ray: tens of MB); a study or series is never fetched whole."""
    endpoint, instance = split_instance(uri)
    dataset = _call(endpoint, "WADO-RS retrieve", lambda c: c.retrieve_instance(
        instance.study, instance.series, instance.sop, media_types=(("application/dicom", "*"),)))  # fmt: skip
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(local.name + ".part")
    try:
        dataset.save_as(partial, enforce_file_format=True)
        partial.rename(local)
    finally:
        partial.unlink(missing_ok=True)
    return local.stat().st_size


# -- STOW-RS ---------------------------------------------------------------------------------------


def store(endpoint: Endpoint, file: Path | BinaryIO) -> None:
    """Send the DICOM file `file` (a path or a binary file) with STOW-RS; PacsError unless
    the PACS acknowledges its SOP Instance UID (in the answer's ReferencedSOPSequence,
    without failure)."""
    import pydicom

    dataset = pydicom.dcmread(file)
    answer = _call(endpoint, "STOW-RS store", lambda c: c.store_instances([dataset]))
    failed = answer.get("FailedSOPSequence") or []
    stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence") or []}
    if failed or dataset.SOPInstanceUID not in stored:
        reasons = sorted({f"{int(item.get('FailureReason', 0)):04X}H" for item in failed})
        raise PacsError(f"{endpoint.root}: STOW-RS store not acknowledged"
                        f"{' (failure reason ' + ', '.join(reasons) + ')' if reasons else ''}")  # fmt: skip


def store_once(endpoint: Endpoint, seg: str, record: str) -> bool:
    """Send the SEG at `seg` (a local path or fsspec URL) unless `record` (a small JSON file
    beside it) says this endpoint acknowledged these very bytes; record the acknowledgement.
    True when it was sent now. A re-run sends what was not acknowledged, and a SEG exported
    again (new bytes, a new SOP Instance UID) is sent again."""
    import json

    import fsspec

    from pipeline.io.location import sha256

    digest = sha256(seg)
    done = _acknowledgements(record)
    if done.get(endpoint.root) == digest:
        return False
    with fsspec.open(seg, "rb") as f:
        store(endpoint, f)
    with fsspec.open(record, "w") as f:
        json.dump({"acknowledged": {**done, endpoint.root: digest}}, f)
    return True


def acknowledged(endpoint: Endpoint, seg: str, record: str) -> bool:
    """Whether `record` says `endpoint` acknowledged the SEG at `seg` as it is now (a
    re-run asks this before it sends anything)."""
    from pipeline.io.location import sha256

    done = _acknowledgements(record)
    return endpoint.root in done and done[endpoint.root] == sha256(seg)


def _acknowledgements(record: str) -> dict[str, str]:
    """service root -> sha256 of the SEG it acknowledged, from `record` (none: empty)."""
    import json

    import fsspec

    try:
        with fsspec.open(record, "r") as f:
            return {str(k): str(v) for k, v in json.load(f).get("acknowledged", {}).items()}
    except (FileNotFoundError, ValueError, AttributeError):  # none yet, or unreadable: send
        return {}


# -- the client, credentials and errors ------------------------------------------------------------


def client(endpoint: Endpoint) -> DICOMwebClient:
    """The process's client of `endpoint`, with the run's credentials (for wsidicom)."""
    return _client(endpoint.root, _authorization())


def _call(endpoint: Endpoint, what: str, request: Any) -> Any:
    """`request(client)`, its errors made one line naming the service root (`_failure`)."""
    try:
        return request(_client(endpoint.root, _authorization()))
    except PacsError:
        raise
    except Exception as exc:
        raise failure(endpoint, what, exc) from None


@cache
def _client(root: str, header: str | None) -> DICOMwebClient:
    """One client (and HTTP session) per service root and credentials in this process."""
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.verify = True  # requests' CA bundle, or REQUESTS_CA_BUNDLE
    if header:
        session.headers["Authorization"] = header
    client = DICOMwebClient(root, session=session, timeout=TIMEOUT_S)
    client.set_http_retry_params(retry=True, max_attempts=SERVER_RETRIES, wait_exponential_multiplier=500)
    return client


def _authorization() -> str | None:
    """The Authorization header from the environment or the auth file (never logged)."""
    import base64

    token, user, password = (os.environ.get(k) for k in (TOKEN_ENV, USER_ENV, PASSWORD_ENV))
    auth_file = os.environ.get(AUTH_FILE_ENV)
    if not (token or user) and auth_file:
        text = _read_auth_file(Path(auth_file))
        if text.lower().startswith("bearer "):
            token = text[7:].strip()
        else:
            user, _, password = text.partition(":")
    if token:
        return f"Bearer {token}"
    if user:
        return "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    return None


def _read_auth_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip().splitlines()
    except OSError as exc:
        raise PacsError(f"{path}: cannot read the DICOMweb credentials ({exc.strerror or exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: DICOMweb credentials readable by others (chmod 600 it)", path)
    return text[0].strip() if text else ""


def credentials_source() -> str:
    """Where the credentials come from, by name (for messages; never the values)."""
    if os.environ.get(TOKEN_ENV):
        return TOKEN_ENV
    if os.environ.get(USER_ENV):
        return f"{USER_ENV}/{PASSWORD_ENV}"
    if os.environ.get(AUTH_FILE_ENV):
        return f"the file in {AUTH_FILE_ENV}"
    return ""


def failure(endpoint: Endpoint, what: str, exc: Exception) -> Exception:
    """One line naming the service root and what failed, never the request's URL nor a secret."""
    import requests

    where = f"{endpoint.root}: {what}"
    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        status = f"HTTP {response.status_code} {response.reason or ''}".strip()
        if response.status_code in (401, 403):
            given = credentials_source()
            hint = (f"the credentials from {given} were refused" if given else
                    f"no credentials given: set {USER_ENV} and {PASSWORD_ENV}, {TOKEN_ENV}, or {AUTH_FILE_ENV}")  # fmt: skip
            return PacsError(f"{where}: {status}; {hint}")
        if response.status_code in (408, 429) or response.status_code >= 500:
            return OSError(f"{where}: {status}")
        return (PacsGone if response.status_code in (404, 410) else PacsError)(f"{where}: {status}")
    if isinstance(exc, requests.exceptions.SSLError):
        return PacsError(f"{where}: TLS certificate not trusted (give your CA's bundle in REQUESTS_CA_BUNDLE)")
    if isinstance(exc, requests.RequestException | OSError):
        text = " ".join(str(exc).split())
        reason = next((r for r in _REASONS if r.lower() in text.lower()), type(exc).__name__)
        return OSError(f"{where}: cannot reach the PACS ({reason})")
    return PacsError(f"{where}: {type(exc).__name__}")  # a malformed answer: its text may quote UIDs
