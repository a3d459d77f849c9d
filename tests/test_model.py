"""Model: backbones at small sizes, heads, config, multi-view forward, checkpoints."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from selfclassifier_core.engine.backbones import BACKBONES, build_backbone, min_input_size
from selfclassifier_core.engine.heads import ClassifierHeads, ProjectionMLP
from selfclassifier_core.engine.model import ModelConfig, ModelOutput, SelfClassifier, build_from_checkpoint

TORCHVISION_BACKBONES = ["resnet18", "resnet34", "resnet50", "convnext_tiny", "efficientnet_b0",
                         "vit_b_16"]
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "convnext_tiny": 768,
                "efficientnet_b0": 1280, "vit_b_16": 768}


def _tiny_config(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", image_size=16, proj_hidden_dim=32, out_dim=16, heads=[3, 5])
    base.update(kw)
    return ModelConfig(**base)


# building these takes seconds each (tens of millions of weights): the slow lane's
HEAVY = {"resnet50", "convnext_tiny", "vit_b_16"}


def _lanes(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


@pytest.mark.parametrize("name", _lanes(TORCHVISION_BACKBONES))
def test_every_backbone_at_its_smallest_size(name):
    torch.manual_seed(0)
    size = min_input_size(name, small_input=True)
    assert size <= 16
    model = SelfClassifier(_tiny_config(backbone=name, image_size=size)).eval()
    assert model.feature_dim == FEATURE_DIMS[name]
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert isinstance(out, ModelOutput)
    assert out.embedding.shape == (2, 16)
    assert [z.shape for z in out.logits] == [(2, 3), (2, 5)]
    assert torch.isfinite(out.embedding).all()


@pytest.mark.parametrize("small_input,size", [(True, 8), (True, 16), (True, 32), (False, 32),
                                               (False, 64)])
def test_convnet_small_shapes_and_model(small_input, size):
    torch.manual_seed(0)
    assert min_input_size("convnet_small", small_input) <= size
    net, dim = build_backbone("convnet_small", small_input, size)
    assert dim == 128
    out = net(torch.randn(3, 3, size, size))
    assert out.shape == (3, 128) and torch.isfinite(out).all()
    out.sum().backward()  # every parameter takes part
    assert all(p.grad is not None for p in net.parameters())
    assert sum(p.numel() for p in net.parameters()) < 500_000
    model = SelfClassifier(_tiny_config(backbone="convnet_small", image_size=size,
                                        small_input=small_input)).eval()
    with torch.no_grad():
        views = model.forward_views([torch.randn(2, 3, size, size), torch.randn(2, 3, 8, 8)])
    assert [o.embedding.shape for o in views] == [(2, 16), (2, 16)]


def test_convnet_small_rejects_bad_widths():
    from selfclassifier_core.engine.backbones import ConvNetSmall

    with pytest.raises(ValueError, match="widths"):
        ConvNetSmall(widths=(32, 0, 64))


@pytest.mark.parametrize("name", _lanes(["resnet18", "convnext_tiny", "efficientnet_b0"]))
def test_normal_stem_handles_32px(name):
    net, dim = build_backbone(name, small_input=False, image_size=32)
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_small_input_stem_chosen_automatically():
    small = SelfClassifier(_tiny_config(image_size=64))
    large = SelfClassifier(_tiny_config(image_size=96))
    assert small.config.use_small_input and not large.config.use_small_input
    assert small.backbone.conv1.kernel_size == (3, 3) and small.backbone.conv1.stride == (1, 1)
    assert isinstance(small.backbone.maxpool, nn.Identity)
    assert large.backbone.conv1.kernel_size == (7, 7) and large.backbone.conv1.stride == (2, 2)
    assert isinstance(large.backbone.maxpool, nn.MaxPool2d)
    # an explicit choice wins over the automatic one
    forced = SelfClassifier(_tiny_config(image_size=96, small_input=True))
    assert forced.backbone.conv1.kernel_size == (3, 3)
    # CIFAR stem: a 16-px image reaches layer4 as 2x2 (down-sampling 8), not 1x1
    feats = {}
    small.backbone.layer4.register_forward_hook(lambda m, i, o: feats.update(l4=o.shape))
    with torch.no_grad():
        small.eval()(torch.randn(1, 3, 16, 16))
    assert feats["l4"][-2:] == (2, 2)


@pytest.mark.slow  # builds a ViT-B/16
def test_vit_accepts_several_view_sizes():
    net, dim = build_backbone("vit_b_16", small_input=True, image_size=32)
    assert net.image_size == 32
    with torch.no_grad():
        a = net.eval()(torch.randn(1, 3, 32, 32))   # its own grid: 2x2 patches
        b = net(torch.randn(1, 3, 16, 16))          # interpolated position embeddings: 1x1
    assert a.shape == b.shape == (1, dim)
    with pytest.raises(ValueError, match="8x8"):
        net(torch.randn(1, 3, 8, 8))


def test_torchvision_state_dict_loads_into_backbone():
    reference = models.resnet18(weights=None)
    sd = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    net, _ = build_backbone("resnet18", small_input=False, image_size=224)
    net.load_state_dict(sd, strict=True)  # torchvision's names, once the classifier is dropped
    torch.testing.assert_close(net.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    # small stem: only conv1 changes shape
    small, _ = build_backbone("resnet18", small_input=True, image_size=32)
    own = small.state_dict()
    assert set(own) == set(sd)
    assert [k for k in own if own[k].shape != sd[k].shape] == ["conv1.weight"]
    # efficientnet's small stem only changes the stride: every tensor keeps its shape
    eff, _ = build_backbone("efficientnet_b0", small_input=True, image_size=32)
    eff_sd = {k: v for k, v in models.efficientnet_b0(weights=None).state_dict().items()
              if not k.startswith("classifier.")}
    eff.load_state_dict(eff_sd, strict=True)


def test_heads_rows_unit_norm_and_embedding_unit_norm():
    torch.manual_seed(1)
    model = SelfClassifier(_tiny_config()).train()
    with torch.no_grad():
        model.heads.heads[0].weight.mul_(7.0)   # raw scale must not matter
    out = model(torch.randn(4, 3, 16, 16))
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(4))
    for head, z in zip(model.heads.heads, out.logits):
        w = head.normalized_weight()
        torch.testing.assert_close(w.norm(dim=1), torch.ones(head.num_classes))
        torch.testing.assert_close(z, out.embedding @ w.T)
        assert head.weight.grad is None and z.abs().max() <= 1.0 + 1e-5
    assert not any("bias" in n for n, _ in model.heads.named_parameters())
    assert isinstance(model.heads.heads, nn.ModuleList)


def test_projection_mlp_layers():
    mlp = ProjectionMLP(8, 12, out_dim=4, num_layers=3, batch_norm=True)
    linears = [m for m in mlp.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 12), (12, 12), (12, 4)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in mlp.mlp) == 2
    single = ProjectionMLP(8, 12, out_dim=4, num_layers=1)
    assert len(single.mlp) == 1
    y = mlp(torch.randn(5, 8))
    torch.testing.assert_close(y.norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionMLP(8, 12, num_layers=0)


@pytest.mark.parametrize("sizes, match", [([], "empty"), ([3, 3], "distinct"), ([0], "0"),
                                          ([2.5], "2.5")])
def test_head_sizes_validated(sizes, match):
    with pytest.raises(ValueError, match=match):
        ClassifierHeads(4, sizes)


def test_forward_views_equals_per_view_forward():
    torch.manual_seed(2)
    model = SelfClassifier(_tiny_config(backbone="convnet_small")).eval()
    views = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16),
             torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    with torch.no_grad():
        joint = model.forward_views(views)
        assert calls == [(6, 3, 16, 16), (9, 3, 8, 8)]   # once per resolution
        separate = [model(v) for v in views]
    assert len(joint) == len(views)
    for a, b in zip(joint, separate):
        torch.testing.assert_close(a.embedding, b.embedding, rtol=1e-4, atol=1e-5)
        for za, zb in zip(a.logits, b.logits):
            torch.testing.assert_close(za, zb, rtol=1e-4, atol=1e-5)


def test_forward_features_matches_forward():
    torch.manual_seed(3)
    model = SelfClassifier(_tiny_config()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(x)
        b = model.forward_features(model.backbone(x))
    torch.testing.assert_close(a.embedding, b.embedding)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(4)
    model = SelfClassifier(_tiny_config(proj_layers=3, proj_bn=False)).train()
    model(torch.randn(4, 3, 16, 16))  # move batch-norm running statistics off their defaults
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    ckpt = model.checkpoint_dict()
    assert set(ckpt) == {"model_config", "model"}
    path = tmp_path / "checkpoint.pt"
    torch.save({**ckpt, "epoch": 3}, path)
    for source in (ckpt, str(path)):
        rebuilt = build_from_checkpoint(source).eval()
        assert rebuilt.config == model.config
        with torch.no_grad():
            a, b = model(x), rebuilt(x)
        torch.testing.assert_close(a.embedding, b.embedding, rtol=0, atol=0)
        for za, zb in zip(a.logits, b.logits):
            torch.testing.assert_close(za, zb, rtol=0, atol=0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="model_config"):
        build_from_checkpoint({"model": {}})
    with pytest.raises(ValueError, match="not found"):
        build_from_checkpoint(tmp_path / "missing.pt")


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError) as err:
        ModelConfig(backbone="resnet9000")
    for name in BACKBONES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="resnet9000.*resnet18"):
        build_backbone("resnet9000", small_input=False)


def test_the_torch_free_names_are_the_registry_s_own():
    from selfclassifier_core.engine.backbone_names import NAMES

    assert tuple(BACKBONES) == NAMES    # the app's form lists these without importing torch


def test_config_dict_round_trip_and_unknown_keys():
    cfg = _tiny_config(heads=[4, 8, 16], small_input=False)
    d = cfg.to_dict()
    assert d["heads"] == [4, 8, 16] and d["small_input"] is False
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**d, "bogus": 1})


@pytest.mark.parametrize("kwargs, match", [({"heads": [4, 4]}, "distinct"), ({"heads": []}, "empty"),
                                           ({"out_dim": 0}, "out_dim"), ({"small_input": "yes"}, "yes")])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tiny_config(**kwargs)


def test_efficientnet_lite0_is_imported_only_when_asked(monkeypatch):
    import sys

    # make the optional module unimportable: other backbones still build, lite0 fails clearly
    monkeypatch.setitem(sys.modules, "selfclassifier_core.engine.backbones_lite", None)
    net, dim = build_backbone("resnet18", small_input=True, image_size=8)
    assert dim == 512
    assert "efficientnet_lite0" in BACKBONES
    with pytest.raises(ValueError, match="efficientnet_lite0.*not available"):
        build_backbone("efficientnet_lite0", small_input=True, image_size=16)


def test_efficientnet_lite0_builds_through_the_registry():
    pytest.importorskip("efficientnet_lite_pytorch")
    model = SelfClassifier(_tiny_config(backbone="efficientnet_lite0", image_size=16)).eval()
    assert model.feature_dim == 1280
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16))
    assert [z.shape for z in out.logits] == [(2, 3), (2, 5)]


def test_resize_pos_embedding_keeps_class_token_and_constant_fields():
    from selfclassifier_core.engine.backbones import resize_pos_embedding

    cls = torch.randn(1, 1, 4)
    patches = torch.arange(4.0).reshape(1, 1, 4).expand(1, 9, 4)   # a 3x3 grid, constant per channel
    out = resize_pos_embedding(torch.cat([cls, patches], dim=1), 1 + 5 * 5)
    assert out.shape == (1, 26, 4)
    torch.testing.assert_close(out[:, :1], cls)
    torch.testing.assert_close(out[:, 1:], torch.arange(4.0).reshape(1, 1, 4).expand(1, 25, 4))
