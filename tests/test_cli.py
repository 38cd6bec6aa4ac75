"""The `segpipe` command line: exit codes, status, export, models, serve, demo pieces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import tifffile
from typer.testing import CliRunner

from flows import demo
from flows.cli import app
from flows.discover import Source
from flows.report import read_record
from pipeline.config import FaultInjection, RunConfig
from pipeline.io import open_image

runner = CliRunner()
TILE = "32"


def write_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("command", ["run", "status", "export", "serve", "models", "demo"])
def test_every_command_has_help_with_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and f"segpipe {command}" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tile", "100"], "multiple of 16"),
        (["--export", "jpeg"], "unknown export"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--blend", "median"], "blend"),
        # found before Prefect or Ray start, in the user's words
        (["--tile", "0"], "tile must be >= 1 (got 0)"),
        (["--mode", "foo"], "mode"),
        (["--mode", "fast"], "for UNet++ models"),  # the tiny model is a U-Net
        (["--model", "lung-xray", "--prune-level", "9"], "prune_level must be in 1..4"),
        (["--workers", "0"], "workers must be >= 1 (got 0)"),
        (["--concurrency", "0"], "concurrency"),
        (["--tissue-threshold", "-1"], "tissue_threshold must be in [0, 1] (got -1.0)"),
        (["--threshold", "2"], "threshold must be in [0, 1] (got 2.0)"),
        (["--tissue-mask", "/nonexistent/mask.png"], "/nonexistent/mask.png"),
    ],
)
def test_run_usage_errors_exit_2(args: list[str], message: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = write_png(tmp_path / "x.png")
    base = {"--model": str(tiny_checkpoint), "--out": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = runner.invoke(app, ["run", str(image), *[a for kv in base.items() for a in kv]])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_run_without_images_exits_2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path / "nothing"), "-m", str(tiny_checkpoint), "-o", str(tmp_path)])
    assert result.exit_code == 2 and "no such file" in result.output


@pytest.mark.slow  # five images through the whole CLI run
def test_run_five_images_one_corrupt(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    for i in range(4):
        write_png(tmp_path / "in" / f"x{i}.png", seed=i)
    (tmp_path / "in" / "x4.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # truncated
    out = tmp_path / "out"

    result = runner.invoke(app, ["run", str(tmp_path / "in"), "-m", str(tiny_checkpoint), "-o", str(out),
                                 "--tile", TILE, "--json"])  # fmt: skip

    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    assert sorted(r["state"] for r in rows) == ["complete"] * 4 + ["failed"]
    [failed] = [r for r in rows if r["state"] == "failed"]
    bad_id = Source.of(str(tmp_path / "in" / "x4.png"), str(out)).image_id
    # named by its id, never its path (invariant 8: file names may name the patient)
    assert failed["error"].startswith(bad_id) and "\n" not in failed["error"] and "x4.png" not in failed["error"]
    assert failed["input"] is None and "x4.png" not in result.output
    assert len(list(out.glob("*.zarr"))) == 4

    status = runner.invoke(app, ["status", str(out)])
    assert status.exit_code == 1
    assert bad_id in status.output  # failed before any output existed: from the run record


def test_status_reports_a_partial_image_failed_tiles(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from flows.segment import segment_collection

    write_png(tmp_path / "in" / "x.png")
    out = tmp_path / "out"
    config = RunConfig(tile=int(TILE), retries=0, faults=FaultInjection(fail_tiles=((1, 0),)))
    assert segment_collection([str(tmp_path / "in")], str(tiny_checkpoint), str(out), config,
                              return_state=True).is_failed()

    as_json = runner.invoke(app, ["status", str(out), "--json"])
    assert as_json.exit_code == 1
    [image] = json.loads(as_json.stdout)["images"]
    assert image["state"] == "partial"
    assert image["counts"] == {"pending": 0, "done": 3, "skipped": 0, "failed": 1, "total": 4}
    assert image["failed"][0]["tile"] == [1, 0] and "injected fault" in image["failed"][0]["error"]

    text = runner.invoke(app, ["status", str(out)])
    assert text.exit_code == 1 and "tile (1, 0)" in text.output and "injected fault" in text.output

    # exports wait for a complete image
    export = runner.invoke(app, ["export", str(out), "--format", "png"])
    assert export.exit_code == 1 and "not complete" in export.output


def test_export_writes_files_of_complete_images(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    write_png(tmp_path / "in" / "x.png")
    out = tmp_path / "out"
    run = runner.invoke(app, ["run", str(tmp_path / "in"), "-m", str(tiny_checkpoint), "-o", str(out),
                              "--tile", TILE, "--export", "none", "--keep-paths"])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert not list(out.glob("*.png"))

    result = runner.invoke(app, ["export", str(out), "-f", "png,ome-tiff"])

    assert result.exit_code == 0, result.output
    [png] = out.glob("*.mask.png")
    assert np.asarray(PIL.Image.open(png)).shape == (64, 64)
    assert tifffile.imread(next(out.glob("*.mask.ome.tif"))).shape == (64, 64)
    assert runner.invoke(app, ["export", str(out), "-f", "png", "--image", "nope"]).exit_code == 2

    [result] = read_record(out)  # the demo's full-resolution view of one tile (it kept paths)
    assert result.input == str(tmp_path / "in" / "x.png")
    zoom = demo.zoom_overlay(result)
    assert zoom is not None and PIL.Image.open(zoom).size == (32, 32)


@pytest.mark.slow  # a slide through the whole CLI run
def test_run_a_dicom_wsi_series_end_to_end(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A DICOM WSI series (sparse JPEG frames, three levels, patient identifiers) is one
    image: glass tiles skipped, the mask at level 0's full resolution, exports beside it."""
    from pipeline.store import OutputStore
    from tests.io_fixtures import PATIENT
    from tests.slide_fixtures import tissue_rgb, write_dicom_wsi

    def keep(row: int, col: int) -> bool:  # the scanner left the corner frames out
        return (row, col) not in {(0, 0), (0, 11), (7, 0), (7, 11)}

    write_dicom_wsi(tmp_path / "in" / "Doe_Jane", tissue_rgb(512, 768), tile=64, sparse=True, keep=keep,
                    compression="jpeg")  # fmt: skip
    out = tmp_path / "out"

    result = runner.invoke(app, ["run", str(tmp_path / "in"), "-m", str(tiny_checkpoint), "-o", str(out),
                                 "--tile", "128", "--export", "overlay,png,ome-tiff", "--json"])  # fmt: skip

    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["state"] == "complete" and row["size"] == [512, 768]
    assert row["counts"]["skipped"] > 0 and row["counts"]["done"] > 0  # glass around the tissue
    store = OutputStore.open(row["output"])
    assert store.mask.shape == (512, 768) and store.provenance["input"]["image"]["format"] == "dicom-wsi"
    assert tifffile.imread(next(out.glob("*.mask.ome.tif"))).shape == (512, 768)
    assert np.asarray(PIL.Image.open(next(out.glob("*.mask.png")))).shape == (512, 768)
    assert len(list(out.glob("*.overlay.png"))) == 1
    names = " ".join(p.name for p in out.rglob("*")) + result.output
    assert "Doe_Jane" not in names and PATIENT["PatientID"] not in names


def test_run_exports_a_slide_for_openslide_and_qupath(flows_env: None, tiny_checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One run of a small tiled slide with `--export geojson,tiff`. A tissue mask keeps a
    ring of eight tiles around a skipped one, and one tile apart; threshold 0 makes every
    computed pixel foreground, whatever the untrained model says. OpenSlide shows the
    stored mask in class colours; the GeoJSON has the ring as one polygon with its hole,
    though the export reads tiles that cut it, and the single tile as a nucleus-sized
    detection."""
    import openslide
    from shapely.geometry import shape

    from pipeline.display import class_colour
    from pipeline.io import geojson
    from pipeline.store import OutputStore

    monkeypatch.setattr(geojson, "READ_SIDE", 64)  # the export's reads cut the ring
    tile = int(TILE)
    tissue = np.zeros((200, 264), np.uint8)
    tissue[tile : 4 * tile, 2 * tile : 5 * tile] = 255  # tiles (1..3, 2..4) ...
    tissue[2 * tile : 3 * tile, 3 * tile : 4 * tile] = 0  # ... but (2, 3)
    tissue[5 * tile : 6 * tile, 7 * tile : 8 * tile] = 255  # and (5, 7)
    (tmp_path / "in").mkdir()
    PIL.Image.fromarray(tissue).save(tmp_path / "tissue.png")
    pixels = np.random.default_rng(5).integers(0, 255, (200, 264, 3), dtype=np.uint8)
    slide = tmp_path / "in" / "slide.tif"
    tifffile.imwrite(slide, pixels, tile=(64, 64), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")  # fmt: skip  # tiled: a slide, 0.5 µm/px
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(slide), "-m", str(tiny_checkpoint), "-o", str(out), "--tile", TILE,
                                 "--tissue-mask", str(tmp_path / "tissue.png"), "--threshold", "0",
                                 "--export", "geojson,tiff"])  # fmt: skip
    assert result.exit_code == 0, result.output

    [store_path] = out.glob("*.zarr")
    store = OutputStore.open(str(store_path))
    mask, [name] = store.mask[...], store.layout.classes
    np.testing.assert_array_equal(mask, tissue > 0)
    with openslide.OpenSlide(next(out.glob("*.mask.tif"))) as shown:
        rgb = np.asarray(shown.read_region((0, 0), 0, shown.dimensions))[..., :3]
        assert json.loads(shown.properties["openslide.comment"])["labels"][1]["name"] == name
    np.testing.assert_array_equal(rgb, np.where(mask[..., None] > 0, class_colour(1), 0))

    features = json.loads(next(out.glob("*.geojson")).read_text())["features"]
    ring, single = sorted(features, key=lambda f: -shape(f["geometry"]).area)
    outline, hole = (shape({"type": "Polygon", "coordinates": [r]}) for r in ring["geometry"]["coordinates"])
    assert outline.bounds == (2 * tile, tile, 5 * tile, 4 * tile)  # (x0, y0, x1, y1)
    assert hole.bounds == (3 * tile, 2 * tile, 4 * tile, 3 * tile)
    assert ring["properties"]["objectType"] == "annotation"  # 2048 µm²
    assert shape(single["geometry"]).bounds == (7 * tile, 5 * tile, 8 * tile, 6 * tile)
    assert single["properties"]["objectType"] == "detection"  # 256 µm²: nucleus-sized
    assert {f["properties"]["classification"]["name"] for f in features} == {name}


def test_models_lists_shipped_cards(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import cards

    shutil.copy(tiny_checkpoint, tmp_path / "tiny-demo.safetensors")
    monkeypatch.setattr(cards, "SHIPPED_DIR", tmp_path)

    listed = runner.invoke(app, ["models", "--json"])
    table = runner.invoke(app, ["models"])

    assert listed.exit_code == 0 and set(json.loads(listed.stdout)) == {"tiny-demo"}
    assert table.exit_code == 0 and "tiny-demo" in table.output


def test_serve_builds_the_deployment_with_the_cron(tiny_checkpoint: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect

    served: list[Any] = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **kw: served.extend(deployments))

    result = runner.invoke(app, ["serve", str(tmp_path), "-m", str(tiny_checkpoint), "-o", "results",
                                 "--cron", "30 1 * * *", "--tile", "512"])  # fmt: skip

    assert result.exit_code == 0, result.output
    [deployment] = served
    assert deployment.schedules[0].schedule.cron == "30 1 * * *"
    assert deployment.parameters["inputs"] == [str(tmp_path)]
    assert deployment.parameters["out"] == str(Path("results").resolve())
    assert deployment.parameters["config"] == {"tile": 512}


def _other_value(field: Any, hint: Any) -> tuple[list[str], Any]:
    """Command-line arguments setting `field` to a valid non-default value, and that value."""
    import typing

    from flows.options import flag, unoptional

    base, default = unoptional(hint), field.default
    name = flag(field.name)
    if base is bool:
        value = not default
        return [name if value else f"--no-{name[2:]}"], value
    if typing.get_origin(base) is typing.Literal:
        value = next(c for c in typing.get_args(base) if c != default)
        return [name, value], value
    if typing.get_origin(base) is tuple:
        return [name, "png,ome-tiff"], ["png", "ome-tiff"]
    if base is int:
        value = default * 2 if default else 32
        return [name, str(value)], value
    if base is float:
        value = default / 2 if default else 0.5
        return [name, str(value)], value
    return [name, "somewhere"], "somewhere"


@pytest.mark.parametrize("command", ["run", "serve"])
def test_every_run_setting_is_an_option(command: str, tiny_checkpoint: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each RunConfig field (but test-only fault injection) is an option of `run` and
    `serve`, and the value given reaches the run's config."""
    import dataclasses
    import typing

    import prefect

    from flows import cli

    hints = typing.get_type_hints(RunConfig)
    fields = [f for f in dataclasses.fields(RunConfig) if f.name != "faults"]
    args, expected = [], {}
    # values the settings checks accept: lung-xray is a UNet++ of depth 4 with deep
    # supervision, and a tissue mask must be an image
    valid = {"prune_level": (["--prune-level", "2"], 2),
             "tissue_mask": (["--tissue-mask", str(write_png(tmp_path / "mask.png"))], str(tmp_path / "mask.png")),
             "select": (["--select", "Modality in [CR, DX]", "--select", "ViewPosition exists"],
                        ["Modality in [CR, DX]", "ViewPosition exists"]),
             "store": (["--store", "dicomweb+https://pacs.example/dicom-web"], "dicomweb+https://pacs.example/dicom-web")}
    for field in fields:
        given, value = valid.get(field.name) or _other_value(field, hints[field.name])
        args += given
        expected[field.name] = value
    expected["exports"] = [*expected["exports"], "dicom-seg"]  # what --store sends
    configs: list[Any] = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **kw: configs.append(deployments[0].parameters["config"]))
    monkeypatch.setattr(cli, "run_collection", lambda inputs, model, out, config, *a, **k: configs.append(
        {k: v for k, v in config.to_dict().items() if k in expected}) or [])

    result = runner.invoke(app, [command, str(write_png(tmp_path / "x.png")), "-m", "lung-xray",
                                 "-o", str(tmp_path / "out"), *args])  # fmt: skip

    assert result.exit_code == 0, result.output
    assert json.loads(json.dumps(configs[0])) == expected


def test_a_bad_prob_dtype_is_a_usage_error_before_any_image_is_touched(tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = write_png(tmp_path / "x.png")
    result = runner.invoke(app, ["run", str(image), "-m", str(tiny_checkpoint), "-o", str(tmp_path / "out"),
                                 "--prob-dtype", "int8"])  # fmt: skip
    assert result.exit_code == 2
    assert "prob-dtype" in result.output and "int8" in result.output
    assert not (tmp_path / "out").exists()


def test_train_maps_options_onto_train_config(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / "images" / f"case{i}.png", seed=i)
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 8 + i : 40 + i] = 255
        (tmp_path / "masks").mkdir(exist_ok=True)
        PIL.Image.fromarray(mask).save(tmp_path / "masks" / f"case{i}_mask.png")
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "images"), str(tmp_path / "masks"), "--out", str(out), "--name", "tiny",
            "--size", "64x64", "--filters", "4,8", "--class-names", "blob", "--epochs", "1",
            "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", "--no-progress",
            "--augment", '{"hflip": true}']  # fmt: skip

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    from pipeline import cards

    card = cards.read_card(out / "tiny.safetensors")
    assert card.class_names == ["blob"] and card.config["filters"] == [4, 8] and card.scale == {"size": [64, 64]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "IMAGES and MASKS"),
        (["a", "b", "--size", "64x64", "--mpp", "8"], "size or mpp"),
        (["a", "b", "--normalization", "{oops"], "not JSON"),
        (["--recipe", "lung-xray"], "No such option"),  # recipes run from a checkout: python -m recipes
    ],
)
def test_train_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2 and message in result.output


# -- the demo's pieces ------------------------------------------------------------------------------


def test_patches_never_overlap() -> None:
    places = demo.patch_places(8192, 1024, 896, 40, np.random.default_rng(0))
    cells = {(y // 1024, x // 1024) for y, x in places}
    assert len(cells) == 40  # one per cell, centred: a 64 px margin all round
    assert all(y % 1024 == 64 and x % 1024 == 64 for y, x in places)


def test_build_slide_writes_a_tiled_pyramid_of_real_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    source = tmp_path / "he.tif"
    tissue = np.full((600, 500, 3), 255, np.uint8)
    tissue[100:500, 50:450] = rng.integers(80, 200, (400, 400, 3), dtype=np.uint8)  # saturated
    tifffile.imwrite(source, tissue, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
    for name, value in {"SLIDE_SIDE": 2048, "SLIDE_MIN_SIDE": 256, "PATCH": 192, "CELL": 256, "PATCHES": 12}.items():
        monkeypatch.setattr(demo, name, value)

    path = demo.build_slide(source, tmp_path / "slide.tif", demo_console(), model_mpp=0.502)

    with open_image(path) as image:  # within 1% of the source's 0.5: the model's scale is written
        assert image.mpp == pytest.approx(0.502) and image.kind == "slide"
    with tifffile.TiffFile(path) as tif:
        levels = [lv.shape for lv in tif.series[0].levels]
        page = tif.series[0].levels[0].keyframe
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
        level0 = tif.series[0].levels[0].asarray()
    assert levels == [(2048, 2048, 3), (1024, 1024, 3), (512, 512, 3), (256, 256, 3)]
    background = (level0 > 240).all(axis=2).mean()
    assert 0.85 < background < 0.92  # 12 patches of 192^2 (>= 60% tissue) in 2048^2 on white


def test_demo_runs_the_lung_model_on_a_leg_too_which_its_selection_skips(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """pydicom-data ships RG3_UNCR (a leg) beside RG1_UNCR (a chest): the demo's lung run
    takes both, and the lung model's card rules skip the leg (tests/test_selection.py runs
    such a run); without it, the chest alone."""
    from pipeline import cards
    from pipeline.selection import not_selected, parse_rules

    data = tmp_path / "data_store" / "data"
    data.mkdir(parents=True)
    chest = data / "RG1_UNCR.dcm"
    chest.touch()
    monkeypatch.setattr(demo, "demo_files", lambda console: {demo.XRAY[0]: chest, demo.HE[0]: tmp_path / "he.svs"})
    monkeypatch.setattr(demo, "build_slide", lambda source, path, console, mpp=None: path)
    ran: dict[str, list[str]] = {}
    monkeypatch.setattr(demo, "run_collection", lambda inputs, model, *a, **k: ran.update({model: inputs}) or [])
    monkeypatch.setattr(demo, "_where_to_look", lambda *a: None)

    demo.run_demo(tmp_path / "demo", 1)
    assert ran["lung-xray"] == [str(chest)]
    (data / demo.LEG_XRAY).touch()
    demo.run_demo(tmp_path / "demo", 1)
    assert ran["lung-xray"] == [str(chest), str(data / demo.LEG_XRAY)]
    leg = {"Modality": ["CR"], "BodyPartExamined": ["EXTREMITY"]}  # what RG3 says it is
    rules = parse_rules(cards.read_card(cards.resolve("lung-xray")).selection)
    assert not_selected(rules, leg) == "not selected: BodyPartExamined=EXTREMITY"


def test_demo_skips_models_that_are_not_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import cards

    monkeypatch.setattr(demo, "demo_files", lambda console: {demo.XRAY[0]: tmp_path / "x.dcm", demo.HE[0]: tmp_path / "he.svs"})
    monkeypatch.setattr(demo, "build_slide", lambda source, path, console, mpp=None: path)
    monkeypatch.setattr(cards, "SHIPPED_DIR", tmp_path)  # nothing shipped
    ran: list[str] = []
    monkeypatch.setattr(demo, "run_collection", lambda inputs, model, *a, **k: ran.append(model) or [])

    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])

    assert result.exit_code == 1 and not ran
    assert "lung-xray" in result.output and "not shipped" in result.output


def demo_console() -> Any:
    from rich.console import Console

    return Console(quiet=True)


def test_tables_off_a_terminal_are_never_cut(capsys: pytest.CaptureFixture[str]) -> None:
    """Piped into a log (not a terminal), rich would fit a table into 80 columns and cut
    cells short ("com…"); segpipe's consoles give it the width it needs."""
    from flows.console import _console, results_table
    from flows.report import ImageResult

    rows = [ImageResult(input=None, image_id=f"{'0123456789abcdef' * 2}-{i}", state="complete", size=(20000, 20000),
                        counts={"done": 1234, "skipped": 5678, "failed": 0}, seconds=1234.5,
                        mask_fraction={"lung": 0.123456, "heart": 0.654321}) for i in range(3)]  # fmt: skip
    console = _console()
    assert not console.is_terminal
    console.print(results_table(rows))
    printed = capsys.readouterr().out
    assert "…" not in printed and "complete" in printed and all(r.image_id in printed for r in rows)


FLAG = {"verdict": "flag", "reasons": ["mean_entropy 0.41 > 0.2"], "measures": {}, "checked": 3}


@pytest.mark.parametrize(("extra", "code"), [([], 0), (["--qc-flag-exit"], 1)])
def test_qc_flag_exit_fails_a_run_with_a_flagged_image(extra: list[str], code: int, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A nightly run with --qc-flag-exit exits 1 when an image is QC-flagged, complete or
    not; without it a flagged but complete run exits 0."""
    from flows import cli
    from flows.report import ImageResult

    done = [ImageResult(input=None, image_id="a", state="complete", qc={**FLAG, "verdict": "pass", "reasons": []}),
            ImageResult(input=None, image_id="b", state="complete", qc=FLAG)]  # fmt: skip
    monkeypatch.setattr(cli, "run_collection", lambda *a, **k: done)
    result = runner.invoke(app, ["run", str(write_png(tmp_path / "x.png")), "-m", "lung-xray",
                                 "-o", str(tmp_path / "out"), *extra])  # fmt: skip
    assert result.exit_code == code, result.output


def test_the_run_table_status_and_record_show_the_qc_verdict(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:  # fmt: skip
    from flows.console import _console, results_table, status_table
    from flows.report import ImageResult, qc_flagged, totals, write_record

    rows = [ImageResult(input=None, image_id="a", state="complete", qc={**FLAG, "verdict": "pass", "reasons": []}),
            ImageResult(input=None, image_id="b", state="complete", qc=FLAG)]  # fmt: skip
    console = _console()
    console.print(results_table(rows))
    summary = {"image_id": "b", "state": "complete", "full_hw": [8, 8], "counts": dict.fromkeys(
        ("total", "done", "skipped", "failed", "pending"), 0), "qc": FLAG}  # fmt: skip
    console.print(status_table([summary]))
    printed = capsys.readouterr().out
    assert printed.count("flag: mean_entropy 0.41 > 0.2") == 2 and "pass" in printed
    assert "1 qc flagged" in printed  # the caption's totals
    assert totals(rows)["qc flagged"] == 1
    assert qc_flagged(rows) == ["b: QC flag: mean_entropy 0.41 > 0.2"]
    assert rows[1].row()["qc"] == "flag: mean_entropy 0.41 > 0.2"
    write_record(str(tmp_path), rows)
    assert [r.qc for r in read_record(tmp_path)] == [r.qc for r in rows]
