"""Selection rules (pipeline/selection.py): parsed, evaluated on header attributes, the model
cards' defaults, and a run that skips what the model is not for, with the reason, in the
table, the run record and Prefect, without reading its pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from typer.testing import CliRunner

from flows.discover import Source
from pipeline import cards
from pipeline.config import RunConfig
from pipeline.errors import CheckpointError, ConfigError
from pipeline.selection import (
    Rule,
    expand_files,
    not_selected,
    parse_rule,
    parse_rules,
    required_values,
    rules_for,
)
from tests import radiographs
from tests.radiographs import CHEST, CT_LOCALIZER, LEG

CHEST_RULES = ("Modality in [CR, DX]", "BodyPartExamined == CHEST", "ViewPosition in [PA, AP] if present")
runner = CliRunner()

# -- the rules, pure -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("Modality in [CR, DX]", Rule("Modality", "in", ("CR", "DX"))),
        ("Modality not in [CT,MR]", Rule("Modality", "not in", ("CT", "MR"))),
        ("BodyPartExamined == CHEST", Rule("BodyPartExamined", "==", ("CHEST",))),
        ("BodyPartExamined==CHEST", Rule("BodyPartExamined", "==", ("CHEST",))),
        ("ViewPosition != 'LL'", Rule("ViewPosition", "!=", ("LL",))),
        ("ViewPosition exists", Rule("ViewPosition", "exists")),
        ("ViewPosition in [PA, AP] if present", Rule("ViewPosition", "in", ("PA", "AP"), if_present=True)),
    ],
)
def test_rules_parse(text: str, rule: Rule) -> None:
    assert parse_rule(text) == rule
    assert parse_rule(str(rule)) == rule  # a rule prints as it is written


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Modaliti in [CR]", "'Modaliti' is not a DICOM attribute keyword"),
        ("Modality in CR", "'in' takes a list in brackets"),
        ("Modality ~ CR", "expected 'Keyword == VALUE'"),
        ("Modality == ", "bad value"),
        ("Modality in [CR,]", "bad value ''"),
        ("Modality exists CR", "nothing may follow 'exists'"),
        # a rule is recorded with the run (provenance, Prefect): never on an identifier
        ("PatientID == 4711", "identifies the patient"),
        ("StudyDate == 20240101", "identifies the patient"),
    ],
)
def test_bad_rules_are_one_line_naming_the_rule(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_rule(text)
    assert "\n" not in str(caught.value)


def test_every_rule_must_hold_and_the_reason_names_each_failing_attribute() -> None:
    rules = parse_rules(CHEST_RULES)
    assert not_selected(rules, {"Modality": ["CR"], "BodyPartExamined": ["CHEST"], "ViewPosition": ["PA"]}) is None
    assert not_selected(rules, {"Modality": ["CR"], "BodyPartExamined": ["chest "]}) is None  # codes are upper case
    assert not_selected(rules, {"Modality": ["CR"], "BodyPartExamined": ["EXTREMITY"]}) == \
        "not selected: BodyPartExamined=EXTREMITY"  # fmt: skip
    assert not_selected(rules, {"Modality": ["CT"], "BodyPartExamined": ["CHEST"], "ViewPosition": ["LL"]}) == \
        "not selected: Modality=CT, ViewPosition=LL"  # fmt: skip


def test_an_absent_attribute_is_not_selected_unless_the_rule_says_if_present() -> None:
    rules = parse_rules(CHEST_RULES)
    assert not_selected(rules, {"Modality": ["DX"]}) == "not selected: BodyPartExamined absent"
    assert not_selected(rules, {"Modality": ["DX"], "BodyPartExamined": [""]}) == \
        "not selected: BodyPartExamined absent"  # an empty type 2 attribute says nothing either  # fmt: skip
    assert not_selected(rules, {"Modality": ["DX"], "BodyPartExamined": ["CHEST"]}) is None  # no ViewPosition: fine


def test_no_dicom_header_means_the_rules_do_not_apply() -> None:
    assert not_selected(parse_rules(CHEST_RULES), None) is None  # a PNG, a slide


def test_multi_valued_attributes_match_on_any_value() -> None:
    localizer = {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
    assert not_selected(parse_rules(["ImageType not in [LOCALIZER]"]), localizer) == \
        "not selected: ImageType=ORIGINAL\\PRIMARY\\LOCALIZER"  # fmt: skip
    assert not_selected(parse_rules(["ImageType == PRIMARY"]), localizer) is None


def test_a_reason_quotes_codes_never_free_text() -> None:
    reason = not_selected(parse_rules(["ProtocolName == chest"]), {"ProtocolName": ["Dr Smith's knee protocol"]})
    assert reason == "not selected: ProtocolName did not match"


def test_rules_default_to_the_card_and_all_means_none() -> None:
    card_default = ["Modality in [CR, DX]"]
    assert rules_for(None, card_default) == (Rule("Modality", "in", ("CR", "DX")),)
    assert rules_for(("BodyPartExamined == CHEST",), card_default) == (Rule("BodyPartExamined", "==", ("CHEST",)),)
    assert rules_for(("all",), card_default) == () == rules_for((), card_default)


def test_values_a_server_query_can_filter_on() -> None:
    rules = parse_rules(CHEST_RULES)
    assert required_values(rules, "Modality") == ("CR", "DX")
    assert required_values(rules, "ViewPosition") is None  # an absent one is selected too
    assert required_values(parse_rules(["Modality != CT"]), "Modality") is None


def test_a_rules_file(tmp_path: Path) -> None:
    rules = tmp_path / "chest.rules"
    rules.write_text("# chest radiographs\nModality in [CR, DX]\n\nBodyPartExamined == CHEST\n")
    assert expand_files([f"@{rules}", "ViewPosition exists"]) == (
        "Modality in [CR, DX]", "BodyPartExamined == CHEST", "ViewPosition exists")  # fmt: skip
    with pytest.raises(ConfigError, match="cannot read the selection rules"):
        expand_files([f"@{tmp_path / 'missing.rules'}"])


# -- settings and cards --------------------------------------------------------------------------


def test_select_setting_is_checked_and_the_option_keeps_lists_whole() -> None:
    from flows import options
    from flows.cli import run_config

    with pytest.raises(ConfigError, match="selection rule 'Modality ~ CR'"):
        RunConfig(select=("Modality ~ CR",))
    assert options.parse(["Modality in [CR, DX],BodyPartExamined == CHEST"], tuple[str, ...] | None, "select") == \
        ("Modality in [CR, DX]", "BodyPartExamined == CHEST")  # fmt: skip
    assert run_config(select=["Modality in [CR, DX]"]).select == ("Modality in [CR, DX]",)


def test_cards_carry_a_default_selection() -> None:
    lung = cards.read_card(cards.resolve("lung-xray"))
    assert parse_rules(lung.selection) == parse_rules(CHEST_RULES[:1] + ("BodyPartExamined in [CHEST]",) + CHEST_RULES[2:])
    for slide_model in ("tissue-he", "nuclei-he"):
        assert cards.read_card(cards.resolve(slide_model)).selection == ["Modality in [SM]"]
    with pytest.raises(CheckpointError, match="selection"):
        cards.ModelCard(arch="unet", config={"filters": [4, 8]}, selection=["PatientName == x"]).validate()


# -- headers of real files -----------------------------------------------------------------------


def test_headers_are_read_without_pixels(tmp_path: Path) -> None:
    from flows.select import header_of

    chest = radiographs.write(tmp_path, "chest.dcm", radiographs.radiograph(CHEST, "20240102"))
    png = tmp_path / "x.png"
    PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    out = str(tmp_path / "out")
    header = header_of(Source.of(str(chest), out), ("Modality", "BodyPartExamined", "ViewPosition", "ImageType"))
    assert header == {"Modality": ("CR",), "BodyPartExamined": ("CHEST",), "ViewPosition": ("PA",),
                      "ImageType": ("ORIGINAL", "PRIMARY")}  # fmt: skip
    assert header_of(Source.of(str(png), out), ("Modality",)) is None
    import fsspec  # an object on object storage: a ranged read of its header

    with fsspec.open("memory://selection/chest.dcm", "wb") as f:
        f.write(chest.read_bytes())
    assert header_of(Source("memory://selection/chest.dcm", "c"), ("BodyPartExamined",)) == {"BodyPartExamined": ("CHEST",)}


def test_pydicom_data_radiographs_when_installed() -> None:
    """pydicom-data's real radiographs, when installed (the demo installs it): RG1 a chest
    CR, RG3 a leg (BodyPartExamined EXTREMITY)."""
    from importlib import metadata

    from flows.select import header_of

    try:
        files = {str(f).rsplit("/", 1)[-1]: Path(metadata.distribution("pydicom-data").locate_file(f))
                 for f in metadata.distribution("pydicom-data").files or ()}  # fmt: skip
    except metadata.PackageNotFoundError:
        pytest.skip("pydicom-data is not installed")
    rules = parse_rules(cards.read_card(cards.resolve("lung-xray")).selection)
    wanted = ("Modality", "BodyPartExamined", "ViewPosition")
    assert not_selected(rules, header_of(Source(str(files["RG1_UNCR.dcm"]), "rg1"), wanted)) is None
    if "RG3_UNCR.dcm" in files:
        assert not_selected(rules, header_of(Source(str(files["RG3_UNCR.dcm"]), "rg3"), wanted)) == \
            "not selected: BodyPartExamined=EXTREMITY"  # fmt: skip


# -- a run ---------------------------------------------------------------------------------------


def test_a_run_skips_what_the_model_is_not_for_with_the_reason(flows_env: None, chest_model: Path,
                                                                tmp_path: Path) -> None:  # fmt: skip
    from prefect.client.orchestration import get_client

    from flows.cli import app
    from flows.report import read_record

    archive = tmp_path / "archive"
    files = {
        "chest": radiographs.write(archive / "s1", "IM1", radiographs.radiograph(CHEST, "20240102")),
        "leg": radiographs.write(archive / "s2", "IM1", radiographs.radiograph(LEG, "20240103", seed=1)),
        "localizer": radiographs.write(archive / "s3", "IM1", radiographs.radiograph(CT_LOCALIZER, "20240104", seed=2)),
    }
    out = tmp_path / "out"
    ids = {name: Source.of(str(path), str(out)).image_id for name, path in files.items()}

    result = runner.invoke(app, ["run", str(archive), "-m", str(chest_model), "-o", str(out), "--tile", "32",
                                 "--export", "none"])  # fmt: skip

    assert result.exit_code == 0, result.output  # skipped images are not failures
    text = " ".join(result.output.split())
    assert "skipped (not selected: BodyPartExamined=EXTREMITY)" in text
    assert "skipped (not selected: Modality=CT)" in text
    record = {r.image_id: r for r in read_record(out)}
    assert record[ids["chest"]].state == "complete"
    assert (record[ids["leg"]].state, record[ids["leg"]].reason) == ("skipped", "not selected: BodyPartExamined=EXTREMITY")
    assert (record[ids["localizer"]].state, record[ids["localizer"]].reason) == ("skipped", "not selected: Modality=CT")
    stores = sorted(p.name for p in out.glob("*.zarr"))
    assert stores == [f"{ids['chest']}.zarr"]  # nothing written of the skipped images
    with get_client(sync_client=True) as client:  # Prefect's table of the run
        tables = [a for a in client.read_artifacts() if a.key == "segpipe-run" and ids["leg"] in str(a.data)]
    rows = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    states = {row["image"]: row["state"] for row in rows}
    assert states[ids["leg"]] == "skipped (not selected: BodyPartExamined=EXTREMITY)"
    assert "2 skipped" in tables[0].description

    # the rules are the card's default: `--select` replaces them, `all` takes every image
    again = runner.invoke(app, ["run", str(archive), "-m", str(chest_model), "-o", str(out), "--tile", "32",
                                "--export", "none", "--select", "all", "--allow-modality", "--json"])  # fmt: skip
    assert again.exit_code == 0, again.output
    states = {r["image_id"]: (r["state"], r["reused"]) for r in json.loads(again.stdout)}
    assert states == {ids["chest"]: ("complete", True), ids["leg"]: ("complete", False),
                      ids["localizer"]: ("complete", False)}  # fmt: skip
