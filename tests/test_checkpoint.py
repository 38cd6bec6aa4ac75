"""Checkpoints: round trip with a card, refusal of code-carrying pickles, reference imports."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from pipeline.cards import ModelCard
from pipeline.errors import CheckpointError
from pipeline.models import build_model, checkpoint
from tests.reference_nets import RefNestedUNet, RefUNet, randomise_bn

TINY = [4, 8, 16, 32, 64]


@pytest.mark.parametrize(
    ("arch", "config"),
    [("unet", {"bilinear": True}), ("unetpp", {"deep_supervision": True})],
)
def test_round_trip_gives_identical_outputs_and_card(tmp_path, arch, config):
    torch.manual_seed(0)
    model = randomise_bn(build_model(arch, in_channels=1, classes=1, filters=TINY, **config))
    card = ModelCard(arch=arch, config={}, name="t", normalization={"kind": "percentile", "low": 1, "high": 99},
                     scale={"size": [256, 256]}, halo=32, data="synthetic")
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, card, path)
    loaded, loaded_card = checkpoint.load(path)
    x = torch.randn(1, 1, 50, 61)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded_card.scale == {"size": [256, 256]}
    assert loaded_card.normalization["kind"] == "percentile"
    assert len(loaded_card.weights_sha256) == 64
    assert not loaded.training


def test_load_overrides_mode(tmp_path):
    model = build_model("unetpp", in_channels=1, classes=1, filters=TINY, deep_supervision=True)
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, ModelCard(arch="", config={}), path)
    loaded, card = checkpoint.load(path, mode="fast", prune_level=2)
    assert (loaded.mode, loaded.prune_level) == ("fast", 2)
    assert card.config["prune_level"] == 2


def test_tampered_weights_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = build_model("unet", in_channels=1, classes=1, filters=TINY)
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, ModelCard(arch="", config={}), path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["outc.conv.bias"] += 1
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_malicious_pickle_is_refused_without_running(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"conv.weight": torch.zeros(1), "x": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=str(path.name)) as info:
        checkpoint.load(path, arch="unet")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_garbage_files_give_one_clear_error(tmp_path):
    for name, content in [("a.safetensors", b"not safetensors"), ("b.pt", b""), ("c.pth", pickle.dumps([1, 2]))]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            checkpoint.load(path, arch="unet")
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("bilinear", [False, True])
def test_reference_unet_state_dict_imports_identically(tmp_path, bilinear):
    torch.manual_seed(1)
    ref = randomise_bn(RefUNet(3, 2, f=TINY, bilinear=bilinear), seed=1)
    path = tmp_path / "unet.pth"
    torch.save(ref.state_dict(), path)
    model, card = checkpoint.load(path, arch="unet", in_channels=3, classes=2, filters=TINY, bilinear=bilinear)
    assert card.config["align_corners"] is True
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_reference_nested_unet_state_dict_imports_identically(tmp_path, deep_supervision):
    torch.manual_seed(2)
    ref = randomise_bn(RefNestedUNet(1, 3, f=TINY, deep_supervision=deep_supervision), seed=2)
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    model, _ = checkpoint.load(path, arch="unetpp", in_channels=3, classes=1, filters=TINY)
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        expected = ref(x)
        if deep_supervision:
            for ours, theirs in zip(model.head_logits(x), expected):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
