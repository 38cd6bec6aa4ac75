"""Models: the published parameter counts, any input size, pruned UNet++ and its modes."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.models import build_model, fold_batchnorm
from tests.reference_nets import randomise_bn

TINY = [4, 8, 16, 32, 64]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "config", "expected"),
    [
        ("unet", {}, 31_037_633),
        ("unet", {"bilinear": True}, 17_262_977),
        ("unetpp", {}, 9_163_329),
        ("unetpp", {"deep_supervision": True}, 9_163_428),
    ],
)
def test_published_parameter_counts(arch, config, expected):
    assert n_params(build_model(arch, in_channels=3, classes=1, **config)) == expected


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
@pytest.mark.parametrize("hw", [(97, 131), (17, 300), (5, 5), (64, 64)])
@pytest.mark.parametrize(("in_ch", "classes"), [(1, 1), (3, 5)])
def test_any_size_channels_and_classes(arch, hw, in_ch, classes):
    model = build_model(arch, in_channels=in_ch, classes=classes, filters=TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_ch, *hw))
    assert out.shape == (2, classes, *hw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_bilinear_and_transposed_both_train(bilinear):
    model = build_model("unet", in_channels=1, classes=1, filters=TINY, bilinear=bilinear)
    loss = model(torch.randn(2, 1, 40, 40)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def deep_unetpp(**config):
    torch.manual_seed(0)
    model = build_model("unetpp", in_channels=3, classes=2, filters=TINY, deep_supervision=True, **config)
    return randomise_bn(model)


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_fast_mode_equals_head_of_full_model(level):
    model = deep_unetpp()
    x = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        heads = model.head_logits(x)
        model.set_mode("fast", level)
        fast = model(x)
    torch.testing.assert_close(fast, heads[level - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_pruned_forward_skips_deeper_nodes(level):
    model = deep_unetpp(mode="fast", prune_level=level)
    called: set[str] = set()
    for name, node in model.nodes.items():
        node.register_forward_hook(lambda *_, name=name: called.add(name))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    expected = {f"x_{i}_{j}" for i in range(5) for j in range(5) if i + j <= level}
    assert called == expected


def test_accurate_mode_is_mean_of_heads():
    model = deep_unetpp()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        mean = torch.stack(model.head_logits(x)).mean(0)
        torch.testing.assert_close(model(x), mean)


def test_fast_mode_without_deep_supervision_is_refused():
    with pytest.raises(ConfigError, match="deep_supervision"):
        build_model("unetpp", filters=TINY, mode="fast", prune_level=2)


def test_unknown_arch_and_config_name_the_valid_ones():
    with pytest.raises(ConfigError, match="unet"):
        build_model("segformer")
    with pytest.raises(ConfigError, match="in_channels"):
        build_model("unet", in_chans=3)


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_gradient_checkpointing_gives_same_gradients(arch):
    torch.manual_seed(0)
    plain = build_model(arch, in_channels=1, classes=1, filters=TINY)
    ckpt = build_model(arch, in_channels=1, classes=1, filters=TINY, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    for model in (plain, ckpt):
        model(x).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_translation_equivariance_of_upsampling(arch):
    """Shifting the input by the model's multiple shifts the output, away from the borders:
    the property exact tiling rests on (align_corners=True breaks it)."""
    torch.manual_seed(0)
    model = randomise_bn(build_model(arch, in_channels=1, classes=1, filters=[4, 8, 16]))
    x = torch.randn(1, 1, 96, 96)
    with torch.no_grad():
        a = model(x[..., :80, :80])
        b = model(x[..., 16:96, 16:96])
    torch.testing.assert_close(a[..., 40:56, 40:56], b[..., 24:40, 24:40], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "config"), [("unet", {}), ("unet", {"bilinear": True}),
                                              ("unetpp", {"deep_supervision": True, "mode": "accurate"})])
def test_folded_batchnorm_gives_the_same_outputs_and_leaves_the_model_alone(arch, config):
    torch.manual_seed(0)
    model = randomise_bn(build_model(arch, in_channels=3, classes=2, filters=TINY, **config)).eval()
    folded = fold_batchnorm(model)
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0
    if arch == "unetpp":  # a folded UNet++ still switches modes
        folded.set_mode("fast", prune_level=2)
        model.set_mode("fast", prune_level=2)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
