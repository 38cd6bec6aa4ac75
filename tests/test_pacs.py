"""A PACS as source and destination, against a real Orthanc with its DICOMweb plugin
(tests/orthanc.py: loopback only, a temporary storage folder, HTTP basic auth).

QIDO-RS by date window and modality, the selection rules on headers from WADO-RS metadata
(the leg is never fetched), WADO-RS retrieve of the chest, its DICOM SEG sent back with
STOW-RS and found in the PACS, watermarks that make the next night incremental, idempotent
re-runs, a PACS that is down, refused credentials, a failed send that the next run makes up.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows import pacs
from flows.cli import app
from pipeline import cards, watermark
from pipeline.config import RunConfig
from pipeline.store import output_key
from tests import radiographs
from tests.io_fixtures import PATIENT
from tests.orthanc import Orthanc, free_port
from tests.radiographs import CHEST, CT_LOCALIZER, LEG

runner = CliRunner()
LUNG_RULES = tuple(cards.read_card(cards.resolve("lung-xray")).selection)


def sop(source: Any) -> str:
    return source.uri.rsplit("/", 1)[-1]


def run(*args: str) -> Any:
    return runner.invoke(app, ["run", *args, "--tile", "32", "--export", "none"])


# -- queries (no flow) ------------------------------------------------------------------------------


def test_query_by_date_window_and_modality(orthanc: Orthanc, tmp_path: Path) -> None:
    chest = radiographs.radiograph(CHEST, "20240102")
    leg = radiographs.radiograph(LEG, "20240103", seed=1)
    localizer = radiographs.radiograph(CT_LOCALIZER, "20240104", seed=2)
    later = radiographs.radiograph(CHEST, "20240110", seed=3)
    orthanc.upload(chest, leg, localizer, later)
    out = str(tmp_path / "out")

    found = pacs.query(f"{orthanc.source}?StudyDate=20240102-20240105", out, LUNG_RULES, RunConfig())

    assert found.dates == "20240102-20240105"
    # the CT is left out by the PACS (the rules want CR or DX), the later chest by its date
    assert {sop(s): s.header["BodyPartExamined"] for s in found.sources} == {
        chest.SOPInstanceUID: ("CHEST",), leg.SOPInstanceUID: ("EXTREMITY",)}  # fmt: skip
    ids = {s.image_id for s in found.sources}
    assert not any(uid in i for i in ids for uid in (chest.SOPInstanceUID, chest.StudyInstanceUID))
    assert ids == {s.image_id for s in pacs.query(orthanc.source, out, LUNG_RULES, RunConfig(), date(2024, 1, 3)).sources
                   if sop(s) in (chest.SOPInstanceUID, leg.SOPInstanceUID)}  # stable: a keyed hash of the UIDs  # fmt: skip

    # the watermark: from its day (minus the lookback) on
    assert watermark.read(out) == {}  # a query alone moves nothing: the run that ends well does
    whole = pacs.query(orthanc.source, out, LUNG_RULES, RunConfig())
    assert whole.key != found.key  # a watermark per source as written
    watermark.advance(out, {whole.key: date(2024, 1, 4)})
    since = pacs.query(orthanc.source, out, LUNG_RULES, RunConfig(lookback_days=1))
    assert since.dates == "20240103-"
    assert {sop(s) for s in since.sources} == {leg.SOPInstanceUID, later.SOPInstanceUID}
    assert pacs.query(orthanc.source, out, LUNG_RULES, RunConfig(watermark=False)).dates is None
    assert pacs.query(orthanc.source, out, ("all",), RunConfig(watermark=False)).sources.__len__() == 4


def test_study_window() -> None:
    day = date(2024, 3, 10)
    assert watermark.study_window(None, None, 1) is None
    assert watermark.study_window(None, day, 1) == "20240309-"
    assert watermark.study_window(None, day, 0) == "20240310-"
    assert watermark.study_window("20240101-20240131", None, 1) == "20240101-20240131"
    assert watermark.study_window("20240301-", day, 7) == "20240303-"  # the later start wins
    assert watermark.study_window("20240101-20240131", day, 1) == "20240131-20240131"  # all covered: its last day
    assert watermark.study_window("20240105", None, 1) == "20240105-20240105"
    with pytest.raises(ValueError, match="not a DICOM date"):
        watermark.study_window("2024-01-05", None, 1)


def test_refused_credentials_are_one_line_naming_the_endpoint(orthanc: Orthanc, chest_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    wrong = "not-the-password-4711"
    monkeypatch.setenv("SEGPIPE_DICOMWEB_PASSWORD", wrong)
    result = run(orthanc.source, "-m", str(chest_model), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert orthanc.url in line and "HTTP 401" in line and "SEGPIPE_DICOMWEB_USER/SEGPIPE_DICOMWEB_PASSWORD" in line
    assert wrong not in result.output and len(result.output.strip().splitlines()) == 1

    for name in ("SEGPIPE_DICOMWEB_USER", "SEGPIPE_DICOMWEB_PASSWORD"):
        monkeypatch.delenv(name)
    result = run(orthanc.source, "-m", str(chest_model), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "no credentials given: set SEGPIPE_DICOMWEB_USER" in " ".join(result.output.split())

    result = run(orthanc.source.replace("http://", f"http://segpipe:{wrong}@"), "-m", str(chest_model), "-o",
                 str(tmp_path / "out"))  # fmt: skip
    assert result.exit_code == 2 and "credentials in the URL are refused" in result.output and wrong not in result.output


def test_a_pacs_that_is_down_is_one_line_and_exit_2(orthanc: Orthanc, chest_model: Path, tmp_path: Path) -> None:
    orthanc.stop()
    result = run(orthanc.source, "-m", str(chest_model), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: {orthanc.url}: QIDO-RS search for studies: cannot reach the PACS (Connection refused)"]


# -- nights (flows) ---------------------------------------------------------------------------------


@pytest.mark.slow  # three runs against the PACS
def test_nightly_runs_segment_the_chest_store_its_seg_and_are_incremental(
    flows_env: None, orthanc: Orthanc, chest_model: Path, tmp_path: Path
) -> None:
    import highdicom as hd

    from tests.test_flows import _prefect_records

    chest = radiographs.radiograph(CHEST, "20240102")
    leg = radiographs.radiograph(LEG, "20240103", seed=1)
    localizer = radiographs.radiograph(CT_LOCALIZER, "20240104", seed=2)
    orthanc.upload(chest, leg, localizer)
    out = tmp_path / "out"
    args = (orthanc.source, "-m", str(chest_model), "-o", str(out), "--store", "dicomweb", "--json")

    first = run(*args)
    assert first.exit_code == 0, first.output
    results = {r["reason"] or r["state"]: r for r in json.loads(first.stdout)}
    assert set(results) == {"complete", "not selected: BodyPartExamined=EXTREMITY"}  # the CT: not asked for
    assert results["complete"]["stored"] == "sent"
    assert [p.name for p in (out / ".inputs").iterdir()] == [f"{results['complete']['image_id']}.dcm"]  # the leg: never fetched
    [seg_series] = orthanc.series(chest.StudyInstanceUID, Modality="SEG")
    description = seg_series["0008103E"]["Value"][0]
    assert description.startswith("chest ") and cards.ModelId.from_provenance(
        {"card": {"name": "chest", "weights_sha256": cards.read_card(chest_model).weights_sha256}}).version in description  # fmt: skip
    [seg] = orthanc.client().retrieve_series(chest.StudyInstanceUID, seg_series["0020000E"]["Value"][0])
    segmentation = hd.seg.Segmentation.from_dataset(seg)  # a real reader opens what the PACS holds
    assert segmentation.SeriesInstanceUID == seg.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == chest.SOPInstanceUID
    prefect = "\n".join(_prefect_records().values())  # UIDs can be linked to the patient: none in Prefect
    for uid in (chest.StudyInstanceUID, chest.SeriesInstanceUID, chest.SOPInstanceUID, leg.SOPInstanceUID, *PATIENT.values()):
        assert uid not in prefect

    # the same window again: nothing fetched, nothing sent twice
    for copy in (out / ".inputs").iterdir():
        copy.unlink()
    again = run(*args, "--no-watermark")
    assert again.exit_code == 0, again.output
    states = sorted((r["state"], r["reused"], r["stored"]) for r in json.loads(again.stdout))
    assert states == [("complete", True, "stored before"), ("skipped", False, None)]
    assert not list((out / ".inputs").iterdir())
    assert len(orthanc.series(chest.StudyInstanceUID, Modality="SEG")) == 1

    # the next night asks only for what is new since the watermark
    today = radiographs.radiograph(CHEST, date.today().strftime("%Y%m%d"), seed=4)
    orthanc.upload(today)
    night = run(*args)
    assert night.exit_code == 0, night.output
    [new] = json.loads(night.stdout)
    assert (new["state"], new["reused"], new["stored"]) == ("complete", False, "sent")
    assert len(orthanc.series(today.StudyInstanceUID, Modality="SEG")) == 1


@pytest.mark.slow  # a failed night, then the night that makes it up
def test_a_failed_night_is_made_up_by_the_next(flows_env: None, orthanc: Orthanc, chest_model: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    from flows.segment import results as run_results
    from flows.segment import segment_collection

    chest = radiographs.radiograph(CHEST, "20240102")
    orthanc.upload(chest)
    out = tmp_path / "out"
    config = RunConfig(tile=32, exports=())

    # a served run (no preflight): the PACS down fails the run in one line, the watermark stays
    orthanc.stop()
    state = segment_collection([orthanc.source], str(chest_model), str(out), config, return_state=True)
    assert state.is_failed()
    with pytest.raises(OSError, match=rf"^{orthanc.url}: QIDO-RS search for series: cannot reach the PACS"):
        run_results(state)
    assert watermark.read(str(out)) == {}
    orthanc.start()

    # the SEG's destination down: the image is complete, its send failed and reported
    dead = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"
    [result] = run_results(segment_collection([orthanc.source], str(chest_model), str(out),
                                              config.with_(store=dead), return_state=True))  # fmt: skip
    assert result.state == "failed" and "DICOM SEG not stored" in result.error and "cannot reach the PACS" in result.error
    assert result.exports["dicom-seg"] and watermark.read(str(out)) == {}  # the night is not done
    assert orthanc.series(chest.StudyInstanceUID, Modality="SEG") == []

    # the next night sends it, without segmenting it again
    [result] = segment_collection([orthanc.source], str(chest_model), str(out), config.with_(store="dicomweb"))
    assert (result.state, result.reused, result.stored) == ("complete", True, "sent")
    assert len(orthanc.series(chest.StudyInstanceUID, Modality="SEG")) == 1
    key = watermark.source_key(output_key(str(out)), pacs.dicomweb.Endpoint.parse(orthanc.source).text)
    assert watermark.read(str(out)) == {key: date.today()}


def test_serve_takes_a_dicomweb_source(chest_model: Path) -> None:
    from flows.schedule import build_deployment

    source = "dicomweb+https://pacs.example/dicom-web?StudyDescription=THORAX"
    deployment = build_deployment([source], str(chest_model), "/results", "0 2 * * *",
                                  RunConfig(store="dicomweb"))  # fmt: skip
    assert deployment.parameters["inputs"] == [source]
    assert deployment.parameters["config"]["store"] == "dicomweb"
    assert "dicom-seg" in deployment.parameters["config"]["exports"]


# -- the client's rules (no server) -----------------------------------------------------------------


def test_a_source_url_parses_and_never_carries_credentials() -> None:
    from pipeline.io.dicomweb import Endpoint, PacsError, split_instance

    endpoint = Endpoint.parse("dicomweb+https://pacs.example:8443/dicom-web/?StudyDescription=THORAX&Modality=CR")
    assert endpoint.root == "https://pacs.example:8443/dicom-web"
    assert endpoint.filters == (("StudyDescription", "THORAX"), ("Modality", "CR"))
    assert Endpoint.parse(endpoint.text) == endpoint
    uri = endpoint.instance_uri(pacs.dicomweb.Instance("1.2", "1.2.3", "1.2.3.4"))
    assert uri == "dicomweb+https://pacs.example:8443/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4"
    assert split_instance(uri) == (Endpoint(endpoint.root), pacs.dicomweb.Instance("1.2", "1.2.3", "1.2.3.4"))
    with pytest.raises(PacsError, match="credentials in the URL are refused") as caught:
        Endpoint.parse("dicomweb+https://alice:hunter2@pacs.example/dicom-web")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(PacsError, match="not a DICOMweb source"):
        Endpoint.parse("dicomweb+ftp://pacs.example/dicom-web")
    with pytest.raises(ValueError, match="store must be dicomweb or a dicomweb"):
        RunConfig(store="https://pacs.example/dicom-web")


def test_credentials_come_from_the_environment_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    import base64

    from pipeline.io import dicomweb

    for name in (dicomweb.TOKEN_ENV, dicomweb.USER_ENV, dicomweb.PASSWORD_ENV, dicomweb.AUTH_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert dicomweb._authorization() is None
    monkeypatch.setenv(dicomweb.USER_ENV, "alice")
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, "s3cret")
    assert dicomweb._authorization() == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    monkeypatch.setenv(dicomweb.TOKEN_ENV, "tok")
    assert dicomweb._authorization() == "Bearer tok"  # a token wins
    for name in (dicomweb.TOKEN_ENV, dicomweb.USER_ENV, dicomweb.PASSWORD_ENV):
        monkeypatch.delenv(name)
    secret = tmp_path / "pacs"
    secret.write_text("Bearer from-a-file\n")
    secret.chmod(0o600)
    monkeypatch.setenv(dicomweb.AUTH_FILE_ENV, str(secret))
    assert dicomweb._authorization() == "Bearer from-a-file" and not caplog.records
    secret.write_text("bob:pw:with:colons\n")
    secret.chmod(0o644)
    assert dicomweb._authorization() == "Basic " + base64.b64encode(b"bob:pw:with:colons").decode()
    assert "readable by others" in caplog.text and "pw:with" not in caplog.text


@pytest.mark.parametrize(
    ("status", "kind", "text"),
    [
        (401, "PacsError", "HTTP 401 Unauthorized; no credentials given"),
        (404, "PacsGone", "HTTP 404 Not Found"),
        (503, "OSError", "HTTP 503 Service Unavailable"),
    ],
)
def test_http_errors_are_one_line_without_the_request_url(status: int, kind: str, text: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import requests

    from pipeline.io import dicomweb

    for name in (dicomweb.TOKEN_ENV, dicomweb.USER_ENV, dicomweb.AUTH_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    response = requests.Response()
    response.status_code, response.reason = status, requests.status_codes._codes[status][0].replace("_", " ").title()
    response.url = "https://pacs.example/dicom-web/studies/1.2.840.99/series"
    error = requests.HTTPError(f"{status} for url: {response.url}", response=response)
    found = dicomweb.failure(dicomweb.Endpoint("https://pacs.example/dicom-web"), "QIDO-RS search", error)
    assert type(found).__name__ == kind and text in str(found)
    assert str(found).startswith("https://pacs.example/dicom-web: QIDO-RS search: ") and "1.2.840.99" not in str(found)


def test_serve_refuses_a_store_with_nowhere_to_send_and_credentials_in_a_url(chest_model: Path, tmp_path: Path) -> None:
    folder = runner.invoke(app, ["serve", str(tmp_path), "-m", str(chest_model), "-o", str(tmp_path / "out"),
                                 "--store", "dicomweb"])  # fmt: skip
    assert folder.exit_code == 2 and "no input is one" in " ".join(folder.output.split())
    url = runner.invoke(app, ["serve", "dicomweb+https://u:pw-4711@pacs.example/dicom-web", "-m", str(chest_model),
                              "-o", str(tmp_path / "out")])  # fmt: skip
    assert url.exit_code == 2 and "credentials in the URL are refused" in url.output and "pw-4711" not in url.output
