"""Training: pairing, labels, augmentation, loss, checkpoint + card, resume, slide patches, Ray."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image as PILImage

from pipeline.errors import ConfigError, InputError
from pipeline.models import checkpoint
from pipeline.train import TrainConfig, train
from pipeline.train import loop as train_module
from pipeline.train.augment import Augment, augment
from pipeline.train.data import (
    DataSpec,
    Pair,
    TileSource,
    find_pairs,
    mask_labels,
    select_pairs,
)
from pipeline.train.loop import learning_rate
from pipeline.train.losses import deep_supervision_loss, dice_iou

TINY = (4, 8, 16)  # depth 2: samples must be multiples of 4


def disk_pair(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with a bright noisy disk, and its 0/255 mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.uniform(size * 0.3, size * 0.7, 2).tolist() + [rng.uniform(size * 0.15, size * 0.3)]
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.uint8) * 255
    image = np.clip(60 + mask * 0.6 + rng.normal(0, 12, mask.shape), 0, 255).astype(np.uint8)
    return image, mask


@pytest.fixture
def pairs_dir(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(4):
        image, mask = disk_pair(32, i)
        PILImage.fromarray(image).save(images / f"case_{i}.png")
        PILImage.fromarray(mask).save(masks / f"case_{i}_mask.png")
    (images / "README.txt").write_text("not an image")
    return images, masks


def tiny_config(pairs_dir: tuple[Path, Path], out: Path, **changes) -> TrainConfig:
    images, masks = pairs_dir
    base = TrainConfig(images=str(images), masks=str(masks), out=str(out), name="tiny",
                       filters=TINY, in_channels=1, size=(32, 32), patch=32, epochs=6,
                       steps_per_epoch=4, batch_size=4, lr=1e-2, precision="fp32",
                       augment=Augment(hflip=True, rotate_deg=5, brightness=0.05), progress=False,
                       threads=1)
    return dataclasses.replace(base, **changes)


def read_state(config: TrainConfig) -> dict:
    return torch.load(config.state_path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------ data


def test_pairs_match_by_name_with_mask_suffix_and_skip_non_images(pairs_dir):
    pairs = find_pairs(*pairs_dir)
    assert [(p.image.name, p.mask.name) for p in pairs] == [
        (f"case_{i}.png", f"case_{i}_mask.png") for i in range(4)
    ]


def test_longest_image_name_owns_a_mask(tmp_path):
    for folder in ("i", "m"):
        (tmp_path / folder).mkdir()
    for stem in ("a", "a_1"):
        PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "i" / f"{stem}.png")
        PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m" / f"{stem}_mask.png")
    pairs = find_pairs(tmp_path / "i", tmp_path / "m")
    assert {(p.image.stem, p.mask.stem) for p in pairs} == {("a", "a_mask"), ("a_1", "a_1_mask")}


def test_a_split_keeps_its_names_and_refuses_missing_ones(pairs_dir):
    pairs = find_pairs(*pairs_dir)
    assert select_pairs(pairs, ()) == pairs
    assert [p.image.name for p in select_pairs(pairs, ("case_2", "case_0"))] == ["case_0.png", "case_2.png"]
    with pytest.raises(InputError, match="case_9"):
        select_pairs(pairs, ("case_1", "case_9"))


def test_training_and_validation_follow_the_split(pairs_dir, tmp_path):
    images, masks = pairs_dir
    config = tiny_config(pairs_dir, tmp_path / "run", val_images=str(images), val_masks=str(masks),
                         train_names=("case_0", "case_1", "case_2"), val_names=("case_3",))
    assert [p.image.name for p in train_module.training_pairs(config)] == ["case_0.png", "case_1.png", "case_2.png"]
    assert [s.source for s in train_module.validation_set(config)] == ["case_3.png"]


def test_image_without_mask_is_refused(pairs_dir):
    images, masks = pairs_dir
    (masks / "case_3_mask.png").unlink()
    with pytest.raises(InputError, match="no mask for images"):
        find_pairs(images, masks)


def test_mask_labels_binary_and_multiclass():
    antialiased = np.array([[0, 100, 128, 255]], np.uint8)
    assert mask_labels(antialiased, 1, "m").tolist() == [[0, 0, 1, 1]]
    assert mask_labels(np.array([[0, 1]], np.uint8), 1, "m").tolist() == [[0, 1]]
    assert mask_labels(np.array([[0, 2]], np.uint8), 3, "m").tolist() == [[0, 2]]
    with pytest.raises(InputError, match="not labels"):
        mask_labels(np.array([[0, 3]], np.uint8), 3, "m")


def test_geometric_augmentation_moves_image_and_labels_together():
    image, mask = disk_pair(64, 0)
    labels = (mask > 0).astype(np.int64)
    aug = Augment(hflip=True, vflip=True, rot90=True, rotate_deg=20, scale=0.2, aspect=0.2, translate=0.1)
    for seed in range(5):
        moved, moved_labels = augment(labels[..., None].astype(np.float32), labels, aug,
                                      np.random.default_rng(seed))
        agree = np.mean((moved[..., 0] > 0.5) == (moved_labels == 1))
        assert agree > 0.98


def test_augmentation_is_a_function_of_its_seed_and_stays_in_range():
    rgb = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    labels = np.zeros((32, 32), np.int64)
    aug = Augment(rotate_deg=10, brightness=0.2, contrast=0.3, gamma=0.4, hsv=0.05, stain=0.1)
    a = augment(rgb, labels, aug, np.random.default_rng(7))[0]
    b = augment(rgb, labels, aug, np.random.default_rng(7))[0]
    assert np.array_equal(a, b)
    assert a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0


def test_deep_supervision_loss_is_the_mean_over_heads():
    target = torch.randint(0, 2, (2, 8, 8))
    heads = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    single = [deep_supervision_loss([h], target) for h in heads]
    assert torch.allclose(deep_supervision_loss(heads, target), torch.stack(single).mean())
    multi = deep_supervision_loss([torch.randn(2, 3, 8, 8)], torch.randint(0, 3, (2, 8, 8)))
    assert torch.isfinite(multi)


def test_dice_iou():
    truth = np.array([[1, 1, 0, 0]])
    assert dice_iou(np.array([[1, 0, 0, 0]]), truth, 1) == pytest.approx((2 / 3, 1 / 2))
    assert dice_iou(np.zeros((1, 4), int), np.zeros((1, 4), int), 1) == (1.0, 1.0)


def test_learning_rate_warms_up_then_decays_to_zero():
    config = TrainConfig(images="i", masks="m", epochs=10, steps_per_epoch=10, warmup_epochs=1, lr=1.0)
    rates = [learning_rate(config, s) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] < 0.01


def test_config_refuses_bad_settings():
    with pytest.raises(ConfigError, match="class_names"):
        TrainConfig(images="i", masks="m", classes=3)
    with pytest.raises(ConfigError, match="overlap"):
        TrainConfig(images="i", masks="m", train_names=("a", "b"), val_names=("b",))
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(images="i", masks="m", optimizer="sgd")


# --------------------------------------------------------------------- training


def test_loss_falls_and_best_checkpoint_has_a_card(pairs_dir, tmp_path):
    config = tiny_config(pairs_dir, tmp_path / "run", class_names=("disk",))
    path = train(config)
    history = read_state(config)["history"]
    assert [r["epoch"] for r in history] == list(range(1, 7))
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    model, card = checkpoint.load(path)
    assert card.name == "tiny" and card.class_names == ["disk"]
    assert card.scale == {"size": [32, 32]}
    assert card.normalization == {"kind": "percentile", "low": 1, "high": 99}
    assert card.in_channels == 1 and card.config["mode"] == "accurate"
    best = max(r["dice"] for r in history)
    assert card.metrics["val_dice"] == pytest.approx(best, abs=1e-4)
    assert "training images" in card.metrics["validated_on"]
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_card_records_the_default_inference_mode(pairs_dir, tmp_path):
    config = tiny_config(pairs_dir, tmp_path / "run", epochs=1, steps_per_epoch=1,
                         mode="fast", prune_level=1, optimizer="rmsprop")
    model, card = checkpoint.load(train(config))
    assert (card.config["mode"], card.config["prune_level"]) == ("fast", 1)
    assert model.mode == "fast"


def test_resumed_run_continues_exactly_as_an_uninterrupted_one(pairs_dir, tmp_path, monkeypatch):
    whole = tiny_config(pairs_dir, tmp_path / "whole", epochs=3, steps_per_epoch=2, ema=0.9)
    train(whole)

    crashed = dataclasses.replace(whole, out=str(tmp_path / "crashed"))
    real_step = train_module.train_step
    calls = []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) > whole.steps_per_epoch:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(crashed)
    assert read_state(crashed)["epoch"] == 1
    monkeypatch.setattr(train_module, "train_step", real_step)
    train(dataclasses.replace(crashed, resume=True))

    done, resumed = read_state(whole), read_state(crashed)
    assert resumed["epoch"] == 3
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in done["history"]]
    for key in ("model", "ema"):
        for name, tensor in done[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)


def test_a_warm_start_begins_from_the_given_weights_and_the_card_says_which(pairs_dir, tmp_path):
    first = tiny_config(pairs_dir, tmp_path / "first", epochs=2, steps_per_epoch=2)
    start, start_card = checkpoint.load(train(first))
    # lr 0: the warm-started model cannot move, so its checkpoint is the starting weights
    warm = tiny_config(pairs_dir, tmp_path / "warm", epochs=1, steps_per_epoch=1, lr=0.0,
                       init_weights=str(first.checkpoint_path))
    model, card = checkpoint.load(train(warm))
    trained = dict(model.named_parameters())  # (batch-norm statistics still move at lr 0)
    for name, tensor in start.named_parameters():
        assert torch.equal(tensor, trained[name]), name
    assert card.metrics["training"]["init_weights"] == {
        "file": "tiny.safetensors", "weights_sha256": start_card.weights_sha256}
    cold, _ = checkpoint.load(train(dataclasses.replace(warm, out=str(tmp_path / "cold"), init_weights=None)))
    assert not torch.equal(next(cold.parameters()), next(start.parameters()))  # the seed's draw
    wider = dataclasses.replace(warm, out=str(tmp_path / "wider"), filters=tuple(2 * f for f in TINY))
    with pytest.raises(ConfigError, match="tiny.safetensors: init_weights do not fit"):
        train(wider)


def test_resume_refuses_a_state_trained_otherwise(pairs_dir, tmp_path):
    config = tiny_config(pairs_dir, tmp_path / "run", epochs=1, steps_per_epoch=1)
    train(config)
    with pytest.raises(ConfigError, match=r"\['lr'\]"):
        train(dataclasses.replace(config, lr=0.5, resume=True))


# ------------------------------------------------------------- large image patches


@pytest.fixture
def slide_pair(tmp_path: Path) -> Pair:
    """A tiled 256x384 RGB TIFF, tissue on the left third, with a half-resolution mask."""
    rng = np.random.default_rng(0)
    rgb = np.full((256, 384, 3), 235, np.uint8)
    rgb[:, :128] = rng.integers(120, 200, (256, 128, 3))
    tifffile.imwrite(tmp_path / "slide.tif", rgb, tile=(64, 64), photometric="rgb")
    mask = np.zeros((128, 192), np.uint8)
    mask[:, :64] = 255
    PILImage.fromarray(mask).save(tmp_path / "slide_mask.png")
    return Pair(tmp_path / "slide.tif", tmp_path / "slide_mask.png")


def slide_spec(**changes) -> DataSpec:
    base = DataSpec(normalization={"kind": "scale", "divisor": 255}, scale={"mpp": 2.0},
                    in_channels=3, classes=1, patch=32, image_mpp=1.0)
    return dataclasses.replace(base, **changes)


def test_slide_patches_come_from_the_working_level_reading_only_their_region(slide_pair, monkeypatch):
    source = TileSource(slide_pair, slide_spec())
    assert source.work_hw == (128, 192)  # level 0 at 1 µm/px resampled to 2 µm/px
    reads = []
    real_read = type(source.image).read_region

    def spy(self, level, y, x, h, w):
        reads.append(h * w)
        return real_read(self, level, y, x, h, w)

    monkeypatch.setattr(type(source.image), "read_region", spy)
    for seed in range(10):
        image, labels = source.sample(np.random.default_rng(seed))
        assert image.shape == (32, 32, 3) and labels.shape == (32, 32)
    assert max(reads) <= 70 * 70  # a 32 px patch at 2 µm/px plus the filter's taps
    image, labels = source.read(0, 48, 32, 32)  # straddles the tissue edge at x = 64
    assert labels[:, :14].all() and not labels[:, 18:].any()
    assert image[:, :14].mean() < 0.7 and np.allclose(image[:, 20:], 235 / 255, atol=0.01)


def test_foreground_bias_centres_patches_on_foreground(slide_pair):
    source = TileSource(slide_pair, slide_spec(foreground_bias=1.0))
    fractions = [source.sample(np.random.default_rng(s))[1].mean() for s in range(20)]
    assert min(fractions) > 0


def test_slide_without_pixel_size_needs_image_mpp(slide_pair):
    with pytest.raises(ConfigError, match="image_mpp"):
        TileSource(slide_pair, slide_spec(image_mpp=None))


def test_training_on_a_large_image_with_a_mask(slide_pair, tmp_path):
    config = TrainConfig(images=str(slide_pair.image), masks=str(slide_pair.mask), out=str(tmp_path / "run"),
                         name="slide", filters=TINY, in_channels=3, mpp=2.0, image_mpp=1.0, patch=32,
                         normalization={"kind": "scale", "divisor": 255}, epochs=2, steps_per_epoch=2,
                         batch_size=2, val_tiles=4, precision="fp32", foreground_bias=0.5,
                         augment=Augment(rot90=True, vflip=True, hsv=0.02, stain=0.05), progress=False,
                         threads=1)
    _, card = checkpoint.load(train(config))
    assert card.scale == {"mpp": 2.0}
    assert 0.0 <= card.metrics["val_dice"] <= 1.0


@pytest.mark.parametrize(
    ("slide_mpp", "model_mpp", "level", "resample"),
    [
        (0.499, 0.5, 0, False),  # within 2 %: level 0 as it is, for training and inference alike
        (0.499, 1.0, 1, False),  # the half-size level at 0.998
        (0.499, 2.0, 1, True),  # the half-size level, downsampled by 2.004
        (0.48, 0.5, 0, True),  # 4 % off: resampled
        (0.2525, 0.5, 1, False),  # the half-size level a hair coarser (0.505): used as it is
    ],
)
def test_training_and_inference_read_the_same_working_level(tmp_path, slide_mpp, model_mpp, level, resample):
    from pipeline.cards import ModelCard
    from pipeline.io import open_image
    from pipeline.io.levels import working_level
    from pipeline.stages import working_geometry
    from tests.io_fixtures import write_svs_like

    rgb = np.random.default_rng(0).integers(0, 255, (256, 384, 3), dtype=np.uint8)
    slide = write_svs_like(tmp_path / "slide.svs", rgb, mpp=slide_mpp)
    PILImage.fromarray(np.full((64, 96), 255, np.uint8)).save(tmp_path / "slide_mask.png")
    card = ModelCard(arch="unetpp", config={}, scale={"mpp": model_mpp})
    with open_image(slide) as image:
        inference_level, _, inference_hw = working_geometry(image, card)
        rule = working_level(image, model_mpp)
        level_hw = image.levels[level][:2]
    source = TileSource(Pair(slide, tmp_path / "slide_mask.png"), slide_spec(scale={"mpp": model_mpp}, patch=16))
    assert (source.level, source.work_hw) == (inference_level, inference_hw) == (rule.level, rule.hw)
    assert (rule.level, rule.resample) == (level, resample)
    assert (rule.hw == level_hw) != resample


# -------------------------------------------------------------------------- Ray Train


@pytest.mark.slow
def test_ray_train_with_two_cpu_workers(ray_cluster, pairs_dir, tmp_path):
    """On the session's Ray (never shut down here: later tests join it by its address)."""
    pytest.importorskip("ray.train.torch")
    config = tiny_config(pairs_dir, tmp_path / "ray", epochs=2, steps_per_epoch=2, workers=2)
    path = train(config)
    _, card = checkpoint.load(path)
    assert card.metrics["epoch"] >= 1
    history = read_state(config)["history"]
    assert [(r["epoch"], r["workers"]) for r in history] == [(1, 2), (2, 2)]


# ------------------------------------------------------------ modes, recipes, labels


def test_prune_report_and_default_mode(pairs_dir, tmp_path):
    from pipeline.train.loop import validation_set
    from pipeline.train.modes import prune_report, set_default_mode

    config = tiny_config(pairs_dir, tmp_path / "run", epochs=2, steps_per_epoch=2, progress=True)
    path = train(config)
    table = prune_report(path, validation_set(config), repeats=1)
    assert [(r["mode"], r["prune_level"]) for r in table] == [("accurate", None), ("fast", 1), ("fast", 2)]
    assert table[1]["params"] < table[2]["params"] <= table[0]["params"]
    set_default_mode(path, "fast", 1, table)
    model, card = checkpoint.load(path)
    assert (model.mode, model.prune_level) == ("fast", 1)
    assert card.metrics["prune_levels"] == table


def test_choose_mode_takes_the_fastest_within_tolerance():
    from pipeline.train.modes import choose_mode

    rows = [{"mode": "accurate", "prune_level": None, "dice": 0.90, "ms": 10},
            {"mode": "fast", "prune_level": 1, "dice": 0.80, "ms": 1},
            {"mode": "fast", "prune_level": 2, "dice": 0.897, "ms": 5}]
    assert choose_mode(rows) == ("fast", 2)
    assert choose_mode(rows, tolerance=0.001) == ("accurate", None)


def test_recipes_build_valid_configs(tmp_path):
    from recipes import recipe

    images = tmp_path / "data" / "cxr-shenzhen-566" / "images"
    images.mkdir(parents=True)
    for n in (1, 5, 10, 14, 15, 20, 21, 35):
        (images / f"CHNCXR_{n:04d}_{n % 2}.jpg").touch()
    config = recipe("lung-xray", tmp_path / "data", tmp_path / "out")
    assert config.size == (256, 256) and config.in_channels == 1 and config.name == "lung-xray"
    # the recorded split: numbers divisible by 5 above 10 held out, never trained on
    assert config.val_names == ("CHNCXR_0015_1", "CHNCXR_0020_0", "CHNCXR_0035_1")
    assert set(config.train_names) == {"CHNCXR_0001_1", "CHNCXR_0005_1", "CHNCXR_0010_0",
                                       "CHNCXR_0014_0", "CHNCXR_0021_1"}
    assert config.postprocess and "2 X-rays" not in config.data and "3 X-rays" in config.data
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe("spleen", tmp_path, tmp_path)


def test_the_nuclei_recipe_warm_starts_from_the_base_run(tmp_path):
    from recipes import recipe

    images = tmp_path / "data" / "he-nuclei-monuseg-30" / "images"
    images.mkdir(parents=True)
    for name in ("TCGA-A7-A13E-01Z-00-DX1", "TCGA-E2-A1B5-01Z-00-DX1", "TCGA-HE-7130-01Z-00-DX1"):
        (images / f"{name}.jpg").touch()
    (images.parent / "masks").mkdir()
    base = recipe("nuclei-he-base", tmp_path / "data", tmp_path / "out" / "base")
    assert base.init_weights is None and base.val_names == ("TCGA-E2-A1B5-01Z-00-DX1", "TCGA-HE-7130-01Z-00-DX1")
    with pytest.raises(ConfigError, match="nuclei-he-base"):  # says which run to make first
        recipe("nuclei-he", tmp_path / "data", tmp_path / "out")
    base.checkpoint_path.touch()
    config = recipe("nuclei-he", tmp_path / "data", tmp_path / "out")
    assert config.init_weights == str(base.checkpoint_path) and config.name == base.name
    assert (config.train_names, config.val_names) == (base.train_names, base.val_names)


def test_recipes_command_refuses_an_unknown_recipe_and_needs_the_data_folder(tmp_path, capsys):
    from recipes.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["spleen", "--data", str(tmp_path)])
    assert exit_info.value.code == 2 and "unknown recipe 'spleen'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["lung-xray"])
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err


def test_the_installed_package_neither_holds_nor_imports_the_recipes():
    import ast
    import tomllib

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    find = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(root), include=find["include"])
    assert "pipeline" in packages and not any(p.split(".")[0] == "recipes" for p in packages)
    for package in {p.split(".")[0] for p in packages}:
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n.split(".")[0] == "recipes" for n in names), path


def test_the_train_package_gives_its_config_without_loading_torch():
    import subprocess
    import sys

    code = "import sys, pipeline.train; pipeline.train.TrainConfig; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_touching_nuclei_are_split():
    from scipy import ndimage

    from recipes.pseudolabels import split_touching

    yy, xx = np.mgrid[:40, :60]
    two = ((yy - 20) ** 2 + (xx - 20) ** 2 < 100) | ((yy - 20) ** 2 + (xx - 36) ** 2 < 100)
    assert ndimage.label(two)[1] == 1
    split = split_touching(two, min_distance=4)
    assert ndimage.label(split)[1] == 2
    assert split.sum() > 0.9 * two.sum()


def test_nuclei_labels_are_written_tile_by_tile(tmp_path):
    from pipeline.io import open_image
    from recipes.pseudolabels import nuclei_mask, write_nuclei_labels

    rgb = np.full((300, 200, 3), (230, 160, 200), np.uint8)  # pink stroma
    yy, xx = np.mgrid[:300, :200]
    centres = [(40, 40), (150, 100), (250, 170), (128, 128)]  # the last straddles tiles
    for cy, cx in centres:
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (70, 40, 140)  # haematoxylin-dark
    tifffile.imwrite(tmp_path / "he.tif", rgb, tile=(64, 64), photometric="rgb")
    out = write_nuclei_labels(tmp_path / "he.tif", tmp_path / "nuclei.tif", mpp=0.5,
                              threshold=0.05, tile=64, margin=16)
    with open_image(out) as mask:
        assert mask.levels[0][:2] == (300, 200)
        labels = mask.read_region(0, 0, 0, 300, 200)[..., 0] > 0
    assert all(labels[cy, cx] for cy, cx in centres)
    assert not labels[10, 190]
    assert np.array_equal(labels, nuclei_mask(rgb, 0.05, 0.5))
