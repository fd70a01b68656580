"""Backbones: output contract, InsightFace-compatible layout, embedding-BN scale frozen as in arcface_torch (IResNet,
tiny) or trained (MobileFaceNet), FLOPs, gradient flow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from faceforge.backbones import build_backbone, count_flops
from faceforge.errors import ConfigError
from faceforge.registry import BACKBONES

# Parameter counts at the default embedding_size 512 (tiny: 128); the IResNet ones match arcface_torch's models.
PARAMS = {
    "r18": 24_025_600,
    "r34": 34_139_328,
    "r50": 43_590_848,
    "r100": 65_156_160,
    "r200": 118_833_920,
    "mbf": 2_059_520,
    "mbf_large": 6_314_880,
    "tiny": 1_078_864,
}


def meta_model(name: str, **kwargs: object) -> nn.Module:
    """Build on the meta device: shapes and FLOPs of the big models without allocating or computing anything."""
    with torch.device("meta"):
        return build_backbone(name, **kwargs).eval()


def last_bn1d(model: nn.Module) -> nn.BatchNorm1d:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)][-1]


def trains_bn_scale(name: str) -> bool:
    """arcface_torch freezes the embedding BN's scale at 1 in IResNet (`features`) but trains it in MobileFaceNet."""
    return name.startswith("mbf")


def test_every_name_is_registered() -> None:
    assert set(BACKBONES.names()) >= set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_contract_on_meta(name: str) -> None:
    size = 128 if name == "tiny" else 512
    model = meta_model(name, embedding_size=size)
    assert model.embedding_size == size
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert model(torch.empty(3, 3, 112, 112, device="meta")).shape == (3, size)
    bn = last_bn1d(model)
    assert bn.num_features == size and bn.weight.requires_grad == trains_bn_scale(name) and bn.bias.requires_grad


@pytest.mark.parametrize("name", ["r50", "mbf", "tiny"])
def test_custom_embedding_size(name: str) -> None:
    model = meta_model(name, embedding_size=64, dropout=0.2)
    assert model.embedding_size == 64
    assert model(torch.empty(2, 3, 112, 112, device="meta")).shape == (2, 64)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.2 for m in model.modules())


@pytest.mark.parametrize("name", ["tiny", "r18", "mbf"])
def test_train_step_gradients_flow(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=32).train()
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    out = model(images)
    assert out.shape == (2, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    bn = last_bn1d(model)
    if not trains_bn_scale(name):
        assert bn.weight.grad is None and torch.equal(bn.weight, torch.ones_like(bn.weight))
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


def test_eval_is_deterministic_and_batch_independent() -> None:
    model = build_backbone("tiny", embedding_size=16).eval()
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(images)[1:2], model(images[1:2]), rtol=1e-4, atol=1e-5)


def test_embedding_layers_stay_float32_under_autocast() -> None:
    model = build_backbone("tiny", embedding_size=16).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.zeros(2, 3, 112, 112)).dtype == torch.float32


@pytest.mark.parametrize("name", ["tiny", "mbf"])
def test_channels_last_is_only_a_speed_switch(name: str) -> None:
    torch.manual_seed(0)
    fast = build_backbone(name, embedding_size=16).eval()
    plain = build_backbone(name, embedding_size=16, channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    assert all(t.is_contiguous() for t in fast.state_dict().values())
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fast(images), plain(images), rtol=1e-4, atol=1e-4)


def test_state_dict_keys_follow_arcface_torch() -> None:
    r50 = meta_model("r50").state_dict()
    for key in ("conv1.weight", "prelu.weight", "layer1.0.downsample.0.weight", "layer3.13.bn3.running_var",
                "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.running_mean"):
        assert key in r50, key
    assert "layer1.1.downsample.0.weight" not in r50
    mbf = meta_model("mbf").state_dict()
    for key in ("layers.0.layers.0.weight", "layers.1.layers.2.weight", "layers.3.layers.3.layers.2.layers.1.bias",
                "conv_sep.layers.0.weight", "features.layers.0.layers.0.weight", "features.layers.2.weight",
                "features.layers.3.running_var"):
        assert key in mbf, key
    assert mbf["layers.1.layers.0.weight"].shape == (128, 2, 3, 3)


@pytest.mark.parametrize(("name", "reference"), [("r50", 12.62e9), ("r100", 24.18e9), ("mbf", 0.9e9)])
def test_count_flops_matches_reference(name: str, reference: float) -> None:
    tolerance = 0.05 if name == "mbf" else 0.01
    assert count_flops(meta_model(name)) == pytest.approx(reference, rel=tolerance)


def test_count_flops_restores_training_mode() -> None:
    model = build_backbone("tiny", embedding_size=16).train()
    assert count_flops(model) > 0
    assert model.training


def test_unknown_name_or_keyword_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="r50"):
        build_backbone("r51")
    with pytest.raises(ConfigError, match="num_features"):
        build_backbone("r18", num_features=512)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_shipped_backbone_keeps_the_declared_contract(name: str) -> None:
    from faceforge.backbones.base import Backbone, check_backbone

    model = meta_model(name)
    assert isinstance(model, Backbone) and check_backbone(model, name) is model
    assert isinstance(model.features, nn.Module)  # arcface_torch's name for the final embedding block


def test_a_module_without_embedding_size_is_refused() -> None:
    from faceforge.backbones.base import check_backbone

    with pytest.raises(ConfigError, match="backbone 'plain': a backbone must expose `embedding_size`"):
        check_backbone(nn.Linear(2, 2), "plain")
    odd = nn.Linear(2, 2)
    odd.embedding_size = 0
    with pytest.raises(ConfigError, match="embedding_size must be a positive int, got 0"):
        check_backbone(odd, "odd")
