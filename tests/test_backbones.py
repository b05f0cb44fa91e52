"""Backbone taps against torchvision's own feature extractor, weights loading, preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from featx.backbones import BACKBONES, Preprocess, Tapped, check_layers, get_spec, load_backbone, truncated
from featx.datasets import open_rgb
from featx.errors import UsageError, WeightsError


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet18", "resnet50"])
def test_taps_equal_create_feature_extractor(name, photos_dir):
    bb = load_backbone(name, "random", seed=3)
    spec = bb.spec
    ref = create_feature_extractor(bb.model, return_nodes={spec.nodes[l]: l for l in spec.layers}).eval()
    weights_tf = spec.weights_enum().transforms()  # the published transform, applied to the same PIL image
    imgs = [open_rgb(p) for p in sorted(photos_dir.rglob("*.jpg"))[:3]]
    x_ref = torch.stack([weights_tf(im) for im in imgs])
    x_ours = bb.preprocess.normalize(torch.cat([bb.preprocess.pixels(im) for im in imgs]))
    assert torch.equal(x_ref, x_ours)  # the split preprocessing changes not one value
    tapped = Tapped(bb.stages(), spec.layers).eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = ref(x_ref)
        got = tapped(x_ours.contiguous(memory_format=torch.channels_last))
    for layer in spec.layers:
        assert got[layer].shape == (3, spec.dims[layer])
        assert _rel_err(got[layer], want[layer].flatten(1)) <= 1e-4, layer


def test_tapped_stops_at_deepest_layer():
    bb = load_backbone("alexnet", "random")
    t = Tapped(bb.stages(), ["pool5"])
    assert t.names == ["pool5"] and len(t.stages) == 1
    t2 = Tapped(bb.stages(), ["fc7", "pool5"])
    assert t2.names == ["pool5", "fc6", "fc7"]


def test_truncated_matches_tap():
    bb = load_backbone("alexnet", "random", seed=1)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        a = truncated(bb, "fc6")(x)
        b = Tapped(bb.stages(), ["fc6"])(x)["fc6"]
    assert torch.allclose(a, b)


def test_random_weights_are_seeded():
    a = load_backbone("alexnet", "random", seed=5).model.features[0].weight
    b = load_backbone("alexnet", "random", seed=5).model.features[0].weight
    c = load_backbone("alexnet", "random", seed=6).model.features[0].weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_state_dict_file_round_trip(tmp_path):
    bb = load_backbone("alexnet", "random", seed=2)
    path = tmp_path / "w.pt"
    torch.save(bb.model.state_dict(), path)
    again = load_backbone("alexnet", str(path))
    assert torch.equal(again.model.features[0].weight, bb.model.features[0].weight)
    assert again.weights_id["kind"] == "file" and len(again.weights_id["sha256"]) == 64


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(load_backbone("resnet18", "random").model.state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit alexnet"):
        load_backbone("alexnet", str(path))


class _Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"features.0.weight": _Evil()}, path, )
    with pytest.raises(WeightsError, match="refusing"):
        load_backbone("alexnet", str(path))


def test_missing_and_corrupt_weight_files(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_backbone("alexnet", str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_backbone("alexnet", str(bad))


def test_imagenet_offline_names_the_file(monkeypatch, tmp_path):
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as e:
        load_backbone("alexnet", "imagenet")
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path / "torch-home") in msg and "\n" not in msg


def test_imagenet_uses_torch_home_cache(monkeypatch, tmp_path):
    """With the checkpoint in $TORCH_HOME, it loads with no network (torchvision's own cache path)."""
    from featx.backbones import torch_hub_checkpoint

    spec = get_spec("alexnet")
    seen = {}

    def fake(url, **kw):
        seen["url"] = url
        return load_backbone("alexnet", "random", seed=9).model.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    bb = load_backbone("alexnet", "imagenet")
    assert seen["url"] == spec.weights_enum().url
    assert bb.weights_id == {"kind": "imagenet", "enum": "AlexNet_Weights.IMAGENET1K_V1",
                             "file": "alexnet-owt-7be5be79.pth", "sha256_prefix": "7be5be79"}
    assert torch_hub_checkpoint(spec.weights_enum().url).parent == tmp_path / "torch-home" / "hub" / "checkpoints"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UsageError, match="valid backbones are alexnet"):
        get_spec("lenet")
    with pytest.raises(UsageError, match="valid layers are pool5, fc6, fc7"):
        check_layers(get_spec("alexnet"), ["conv9"])
    assert check_layers(get_spec("alexnet"), ["fc7", "pool5", "fc7"]) == ["pool5", "fc7"]
    assert {"alexnet", "vgg16"} <= set(BACKBONES)


def test_views_are_five_crops_and_mirrors(photos_dir):
    img = open_rgb(sorted(photos_dir.rglob("*.jpg"))[0])
    one = Preprocess(views=1).pixels(img)
    ten = Preprocess(views=10).pixels(img)
    assert one.shape == (1, 3, 224, 224) and ten.shape == (10, 3, 224, 224)
    assert torch.equal(ten[0], one[0])  # the first view is the centre crop
    assert torch.equal(ten[5], ten[0].flip(-1))  # then the mirrors, in the same order
    assert not torch.equal(ten[1], ten[2])
    with pytest.raises(UsageError):
        Preprocess(views=3)


def test_preprocess_read_off_the_weights():
    p = Preprocess.from_weights(get_spec("alexnet").weights_enum())
    assert (p.resize, p.crop, p.interpolation) == (256, 224, "bilinear")
    assert np.allclose(p.mean, (0.485, 0.456, 0.406))


def test_tapped_runs_from_a_cached_tap_to_deeper_ones():
    from featx.backbones import start_layer

    bb = load_backbone("alexnet", "random", seed=4)
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        full = Tapped(bb.stages(), ["pool5", "fc6", "fc7"])(x)
        part = Tapped(bb.stages(), ["pool5", "fc7"], start="pool5")(full["pool5"].clone())
    assert set(part) == {"pool5", "fc7"} and torch.equal(part["fc7"], full["fc7"])
    assert torch.equal(part["pool5"], full["pool5"])
    spec = get_spec("alexnet")
    assert start_layer(spec, ["pool5"], ["fc6", "fc7"]) == "pool5"
    assert start_layer(spec, ["pool5", "fc6"], ["fc7", "logits"]) == "fc6"
    assert start_layer(spec, ["fc7"], ["fc6"]) is None  # nothing computes backwards
    assert start_layer(spec, ["pool5", "fc7"], ["pool5"]) == "pool5"
