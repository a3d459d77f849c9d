"""Pretrained weights: files with and without prefixes, wrong weights, the offline error."""
from __future__ import annotations

import socket
import urllib.error

import pytest
import torch
import torchvision

from selfclassifier_core.engine import pretrained
from selfclassifier_core.engine.backbones import build_backbone
from selfclassifier_core.engine.pretrained import PretrainedError, load_backbone_weights


def _source_resnet18(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def _fresh() -> torch.nn.Module:
    torch.manual_seed(99)
    module, _ = build_backbone("resnet18", small_input=False, image_size=64)
    return module


def _assert_equal_to(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k


def test_plain_state_dict(tmp_path):
    sd = _source_resnet18()
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    module = _fresh()
    assert not torch.equal(module.conv1.weight, sd["conv1.weight"])
    report = load_backbone_weights(module, "resnet18", str(path))
    _assert_equal_to(module, sd)
    assert report.loaded == report.total == len(module.state_dict())
    assert report.missing == []
    assert set(report.ignored) == {"fc.weight", "fc.bias"}
    assert report.identity.startswith("file:sha256:")


def test_module_prefix(tmp_path):
    sd = _source_resnet18()
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    module = _fresh()
    report = load_backbone_weights(module, "resnet18", path)
    _assert_equal_to(module, sd)
    assert report.stripped_prefixes == ["module."]


def test_nested_checkpoint_with_backbone_prefix(tmp_path):
    sd = _source_resnet18()
    ckpt = {"epoch": 7, "optimizer": {"lr": torch.tensor(0.1)},
            "state_dict": {**{f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")},
                           "head.weight": torch.zeros(10, 512), "projector.0.weight": torch.zeros(4, 512)}}
    path = tmp_path / "ckpt.pth.tar"
    torch.save(ckpt, path)
    module = _fresh()
    report = load_backbone_weights(module, "resnet18", path)
    _assert_equal_to(module, sd)
    assert "head.weight" in report.ignored and "projector.0.weight" in report.ignored


def test_whole_selfclassifier_checkpoint(tmp_path):
    from selfclassifier_core.engine.model import ModelConfig, SelfClassifier

    torch.manual_seed(3)
    src = SelfClassifier(ModelConfig(backbone="resnet18", image_size=64, small_input=False,
                                     proj_hidden_dim=32, heads=[4]))
    path = tmp_path / "run.pt"
    torch.save({"format_version": 1, **src.checkpoint_dict()}, path)
    module = _fresh()
    report = load_backbone_weights(module, "resnet18", path)
    _assert_equal_to(module, src.backbone.state_dict())
    assert any(k.startswith("projection.") for k in report.ignored)


def test_resnet34_weights_into_resnet18_fail_naming_keys(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    module = _fresh()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(PretrainedError) as err:
        load_backbone_weights(module, "resnet18", path)
    msg = str(err.value)
    assert "layer1.2." in msg and "resnet18" in msg and "\n" not in msg
    _assert_equal_to(module, before)  # nothing half-loaded


def test_shape_mismatch_fails_naming_key(tmp_path):
    sd = _source_resnet18()
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(PretrainedError, match=r"layer2\.0\.conv1\.weight.*\(128, 64, 5, 5\)"):
        load_backbone_weights(_fresh(), "resnet18", path)


def test_small_input_stem_mismatch_explains(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_source_resnet18(), path)
    small, _ = build_backbone("resnet18", small_input=True, image_size=32)
    with pytest.raises(PretrainedError, match=r"conv1\.weight.*small_input=False"):
        load_backbone_weights(small, "resnet18", path)


def test_mostly_missing_fails(tmp_path):
    sd = _source_resnet18()
    path = tmp_path / "stem_only.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith(("conv1.", "bn1."))}, path)
    with pytest.raises(PretrainedError, match=r"parameter tensors missing: layer1\.0\."):
        load_backbone_weights(_fresh(), "resnet18", path)


def test_few_missing_reported(tmp_path, caplog):
    sd = _source_resnet18()
    del sd["layer4.1.bn2.weight"]
    path = tmp_path / "almost.pth"
    torch.save(sd, path)
    with caplog.at_level("WARNING", logger="selfclassifier_core.engine.pretrained"):
        report = load_backbone_weights(_fresh(), "resnet18", path)
    assert report.missing == ["layer4.1.bn2.weight"]
    assert "layer4.1.bn2.weight" in caplog.text


def test_unreadable_and_foreign_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedError, match="does not exist"):
        load_backbone_weights(_fresh(), "resnet18", missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match="cannot read weights file"):
        load_backbone_weights(_fresh(), "resnet18", garbage)
    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "note": "hello"}, no_tensors)
    with pytest.raises(PretrainedError, match="holds no state dict"):
        load_backbone_weights(_fresh(), "resnet18", no_tensors)


def test_unknown_weights_name_lists_valid():
    with pytest.raises(PretrainedError, match="IMAGENET1K_V1"):
        load_backbone_weights(_fresh(), "resnet18", "IMAGENET22K_V9")


def test_offline_download_gives_one_line_error(monkeypatch):
    calls = []

    def fail(weights):
        calls.append(str(weights))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(pretrained, "_download_state_dict", fail)
    with pytest.raises(PretrainedError) as err:
        load_backbone_weights(_fresh(), "resnet18", "DEFAULT")
    msg = str(err.value)
    assert calls == ["ResNet18_Weights.IMAGENET1K_V1"]
    assert "\n" not in msg and "--pretrained" in msg and "resnet18-f37072fd.pth" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_offline_real_hub_path_without_network(tmp_path, monkeypatch):
    """The real torchvision download path, with an empty cache and every connection refused."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(PretrainedError, match=r"cannot download .*IMAGENET1K_V1.*--pretrained"):
        load_backbone_weights(_fresh(), "resnet18", "IMAGENET1K_V1")
    assert str(tmp_path / "torch-home") in torch.hub.get_dir()


def test_cached_torchvision_weights_load_offline(tmp_path, monkeypatch):
    """A weights file already in the hub cache is used without touching the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    sd = _source_resnet18(seed=5)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    ckpt_dir = tmp_path / "th" / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save(sd, ckpt_dir / url.rsplit("/", 1)[1])

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    # the cached file is not the real one, so skip torchvision's hash check
    monkeypatch.setattr(pretrained, "_download_state_dict",
                        lambda w: w.get_state_dict(progress=False, check_hash=False))
    module = _fresh()
    report = load_backbone_weights(module, "resnet18", "DEFAULT")
    _assert_equal_to(module, sd)
    assert report.identity == "torchvision:ResNet18_Weights.IMAGENET1K_V1"


def test_efficientnet_lite0_shipped_weights():
    from selfclassifier_core.engine import backbones_lite

    module, dim = build_backbone("efficientnet_lite0", small_input=False, image_size=32)
    assert dim == 1280
    report = load_backbone_weights(module, "efficientnet_lite0", "DEFAULT")
    shipped = torch.load(backbones_lite.pretrained_path(), weights_only=True)
    assert torch.equal(module.state_dict()["_blocks.3._depthwise_conv.weight"],
                       shipped["_blocks.3._depthwise_conv.weight"])
    assert report.loaded == report.total and set(report.ignored) == {"_fc.weight", "_fc.bias"}
    module.eval()
    with torch.no_grad():
        assert module(torch.randn(2, 3, 32, 32)).shape == (2, 1280)
    # the small-input stem keeps the weight shapes, so the same weights load
    small, _ = build_backbone("efficientnet_lite0", small_input=True, image_size=32)
    load_backbone_weights(small, "efficientnet_lite0", "imagenet")
    with pytest.raises(PretrainedError, match="efficientnet_lite0"):
        load_backbone_weights(small, "efficientnet_lite0", "IMAGENET21K")


def test_weights_identity_follows_file_content(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_source_resnet18(seed=1), path)
    a = pretrained.weights_identity("resnet18", path)
    torch.save(_source_resnet18(seed=2), path)
    b = pretrained.weights_identity("resnet18", path)
    assert a != b and a.startswith("file:")
    assert pretrained.weights_identity("resnet18", "default") == \
        "torchvision:ResNet18_Weights.IMAGENET1K_V1"
