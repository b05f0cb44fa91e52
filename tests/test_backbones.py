"""Backbone taps against torchvision's own feature extractor, weights loading, preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from featx.backbones import (
    BACKBONES,
    Preprocess,
    Tapped,
    check_layers,
    get_spec,
    graph_info,
    load_backbone,
    reduce,
    reduction_for,
    start_layer,
    taps_config,
    truncated,
)
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


# ------------------------------------------------------------------------------ every torchvision backbone

# backbone, the module of its final classifier layer (torchvision's own attribute path: where `penultimate` is
# read is checked against the input this module receives), an inner node and the reduction it must get
FAMILIES = [
    pytest.param("resnet18", "fc", "layer3.1.relu_1", "mean-hw", id="resnet18"),
    pytest.param("efficientnet_b0", "classifier.1", "features.4.2.add", "mean-hw", id="efficientnet_b0"),
    pytest.param("resnet50", "fc", "layer3.5.relu_2", "mean-hw", id="resnet50", marks=pytest.mark.slow),
    pytest.param("vit_b_16", "heads.head", "encoder.layers.encoder_layer_5.add_1", "class-token", id="vit_b_16",
                 marks=pytest.mark.slow),
    pytest.param("convnext_tiny", "classifier.2", "features.5.8.add", "mean-hw", id="convnext_tiny",
                 marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def two_photos(photos_dir, tmp_path_factory):
    """One photo of each class: the fewest rows that still make a feature set."""
    import shutil

    root = tmp_path_factory.mktemp("two") / "two"
    for cls in ("china", "flower"):
        (root / cls).mkdir(parents=True)
        shutil.copy(sorted((photos_dir / cls).glob("*.jpg"))[0], root / cls / "0.jpg")
    return root


@pytest.mark.parametrize("name, classifier, node, rule", FAMILIES)
def test_extract_rows_equal_create_feature_extractor(name, classifier, node, rule, two_photos, tmp_path):
    from featx.extract import extract
    from featx.store import FeatureSet

    res = extract(two_photos, layers=[node, "penultimate"], backbone=name, weights="random", seed=1, cache=tmp_path,
                  workers=0)
    taps = res.manifest["config"]["taps"]
    assert taps[node]["reduce"] == rule and taps[node]["node"] == node
    assert res.manifest["config"]["layers"] == [node, "penultimate"]  # forward order
    fs = FeatureSet(res.path)
    bb = load_backbone(name, "random", seed=1)
    tf = bb.spec.weights_enum().transforms()  # the published transform, on the same images
    x = torch.stack([tf(open_rgb(two_photos / p)) for p in fs.column("path")])
    seen = []
    module = dict(bb.model.named_modules())[classifier]
    hook = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ref = create_feature_extractor(bb.model, return_nodes=[node]).eval()
    with torch.inference_mode():
        want_node = reduce(ref(x)[node], rule)
        bb.model(x)
    hook.remove()
    want_pen = seen[-1]
    for layer, want in ((node, want_node), ("penultimate", want_pen)):
        got = torch.from_numpy(fs.load(layer))
        assert got.shape == want.shape == (2, res.manifest["dims"][layer]), layer
        assert _rel_err(got, want) <= 1e-4, layer
    assert want_pen.shape[1] == module.in_features


def test_named_layers_keep_their_config_and_rows(digits_dir, tmp_path):
    """AlexNet's named taps are made as before: no taps in the config (so the same key), the stages' rows."""
    from featx.extract import extract

    res = extract(digits_dir, layers=["pool5", "fc7"], weights="random", seed=0, cache=tmp_path, workers=0)
    assert set(res.manifest["config"]) == {"data", "source", "layout", "backbone", "weights", "layers", "preprocess",
                                           "normalize", "split", "seed", "amp", "max_pixels"}
    assert taps_config(get_spec("alexnet"), ["pool5", "fc7"]) is None
    mixed = extract(digits_dir, layers=["fc7", "penultimate"], weights="random", seed=0, cache=tmp_path, workers=0)
    assert mixed.path != res.path and mixed.manifest["config"]["taps"]["penultimate"]["node"] == "classifier.5"
    from featx.store import FeatureSet

    a, b = FeatureSet(res.path), FeatureSet(mixed.path)
    assert _rel_err(torch.from_numpy(b.load("fc7")), torch.from_numpy(a.load("fc7"))) <= 1e-6
    assert np.array_equal(b.load("fc7"), b.load("penultimate"))  # the input of AlexNet's classifier is fc7


def test_every_torchvision_classification_model_is_registered():
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    assert set(names) <= set(BACKBONES) and len(names) >= 80
    spec = get_spec("vit_h_14")  # built for its weights' input size
    assert spec.build_kwargs == {"image_size": 518} and spec.weights_enum().transforms().crop_size == [518]
    assert get_spec("resnet50").weights == "ResNet50_Weights.IMAGENET1K_V2"  # unchanged
    assert get_spec("convnext_tiny").dims["penultimate"] == 768
    assert "penultimate" in get_spec("swin_t").dims and "layer9" not in get_spec("resnet18").dims


def test_unknown_names_give_the_closest():
    with pytest.raises(UsageError) as e:
        get_spec("resnet05")
    assert "closest: resnet50" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError) as e:
        check_layers(get_spec("resnet18"), ["layer4.1.relu_9"])
    msg = str(e.value)
    assert "unknown layer 'layer4.1.relu_9' for resnet18" in msg and "layer4.1.relu" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="not a tensor"):
        check_layers(get_spec("vit_b_16"), ["getattr"])  # x.shape: no rows to extract
    with pytest.raises(UsageError, match="penultimate"):
        check_layers(get_spec("vit_b_16"), ["penultimat"])


def test_reduction_rules():
    assert reduction_for("resnet", (512,)) == "none"
    assert reduction_for("resnet", (256, 14, 14)) == "mean-hw"
    assert reduction_for("vision_transformer", (197, 768)) == "class-token"
    assert reduction_for("maxvit", (49, 64)) == "mean-tokens"
    assert reduction_for("swin_transformer", (14, 14, 384)) == "mean-hw-channels-last"
    assert reduction_for("swin_transformer", (768, 7, 7)) == "mean-hw"
    assert reduction_for("maxvit", (2, 3, 4, 5)) == "flatten"
    swin = taps_config(get_spec("swin_t"), ["features.5.5.add_1", "permute", "penultimate"])
    assert swin["features.5.5.add_1"] == {"node": "features.5.5.add_1", "shape": [14, 14, 384],
                                          "reduce": "mean-hw-channels-last"}
    assert swin["permute"]["reduce"] == "mean-hw" and swin["penultimate"]["node"] == "flatten"
    vit = taps_config(get_spec("vit_b_16"), ["encoder.ln"])
    assert vit["encoder.ln"] == {"node": "encoder.ln", "shape": [197, 768], "reduce": "class-token"}
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert torch.equal(reduce(x, "mean-hw"), x.mean(dim=(2, 3)))
    assert torch.equal(reduce(x, "mean-hw-channels-last"), x.mean(dim=(1, 2)))
    assert torch.equal(reduce(x[:, 0], "class-token"), x[:, 0, 0])
    assert reduce(x, "flatten").shape == (2, 60)


def test_graph_backbones_are_not_reused_from_a_tap():
    spec = get_spec("convnext_tiny")
    assert spec.layers == () and start_layer(spec, ["penultimate"], ["logits"]) is None
    assert start_layer(get_spec("alexnet"), ["pool5"], ["penultimate"]) is None  # a graph layer: from the images


@pytest.mark.parametrize("name", ["efficientnet_b3", "vit_b_16", "inception_v3"])
def test_preprocess_is_the_published_transform(name, photos_dir):
    img = open_rgb(sorted(photos_dir.rglob("*.jpg"))[1])
    w = get_spec(name).weights_enum()
    pre = Preprocess.from_weights(w)
    assert torch.equal(pre.transform(img), w.transforms()(img))


def test_graph_layer_truncated_and_state_dict_file(tmp_path):
    bb = load_backbone("mobilenet_v3_small", "random", seed=2)
    x = torch.randn(2, 3, 224, 224)
    trunk = truncated(bb, "features.6.add")
    ref = create_feature_extractor(bb.model, return_nodes=["features.6.add"]).eval()
    with torch.inference_mode():
        assert torch.allclose(trunk(x), ref(x)["features.6.add"].mean(dim=(2, 3)))
    path = tmp_path / "m.pt"
    torch.save(bb.model.state_dict(), path)
    again = load_backbone("mobilenet_v3_small", str(path))
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), bb.model.state_dict().values()))
    with pytest.raises(WeightsError, match="do not fit resnet18"):
        load_backbone("resnet18", str(path))


def test_published_checkpoints_load_as_torchvision_loads_them(monkeypatch):
    """GoogLeNet's file carries the auxiliary classifiers torchvision drops after loading; DenseNet's still names
    its layers norm.1, conv.2: both load, into the network torchvision's builder makes for those weights."""
    import re

    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(0)
        g = torchvision.models.GoogLeNet(aux_logits=True, transform_input=True, init_weights=False).state_dict()
        d = torchvision.models.densenet121().state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in d.items()
           if not k.endswith("num_batches_tracked")}  # a checkpoint older than that counter
    assert any(".norm.1." in k for k in old)
    states = {"googlenet": g, "densenet121": old}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda url, **kw: states["googlenet" if "googlenet" in url else "densenet121"])
    gb = load_backbone("googlenet", "imagenet")
    assert gb.model.transform_input and gb.model.aux1 is None
    assert torch.equal(gb.model.conv1.conv.weight, g["conv1.conv.weight"])
    db = load_backbone("densenet121", "imagenet")
    assert torch.equal(db.model.features.denseblock1.denselayer1.norm1.weight,
                       d["features.denseblock1.denselayer1.norm1.weight"])


@pytest.mark.parametrize("name", ["vit_b_16", "convnext_tiny", "regnet_y_400mf"])
def test_imagenet_offline_names_the_file_for_every_backbone(name, monkeypatch, tmp_path):
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as e:
        load_backbone(name, "imagenet")
    file = get_spec(name).weights_enum().url.rsplit("/", 1)[-1]
    assert file in str(e.value) and str(tmp_path / "torch-home") in str(e.value) and "\n" not in str(e.value)


def test_graph_shapes_come_from_the_meta_device():
    info = graph_info(get_spec("regnet_y_400mf"))  # RegNet computes its widths with torch as it is built
    assert next(info.model.parameters()).device.type == "meta"
    assert info.classifier == "fc" and info.tap("penultimate").dim == 440
    with torch.device("meta"):  # how a saved model is rebuilt before its state dict is loaded
        assert next(get_spec("regnet_y_400mf").build().parameters()).device.type == "meta"


def test_featx_backbones_lists_layers_and_widths():
    from click.testing import CliRunner

    from featx.cli import main

    r = CliRunner().invoke(main, ["backbones", "resnet18"])
    assert r.exit_code == 0, r.output
    lines = [l.split() for l in r.stdout.splitlines()]
    assert ["penultimate", "flatten", "512", "none", "512"] in lines
    assert ["pool", "flatten", "512", "none", "512"] in lines
    r = CliRunner().invoke(main, ["backbones", "alexnet", "--nodes"])
    assert ["features.3", "features.3", "192x27x27", "mean-hw", "192"] in [l.split() for l in r.stdout.splitlines()]
    r = CliRunner().invoke(main, ["backbones", "lenet"])
    assert r.exit_code == 2 and r.stderr.startswith("featx: error: unknown backbone 'lenet'")


@pytest.mark.slow
def test_a_head_on_a_graph_layer_becomes_a_network(digits_dir, tmp_path):
    """The network a head on a graph node becomes (fine-tuning, predict) gives the feature set's rows and the
    head's predictions, and a saved model of it loads back."""
    from featx.extract import extract
    from featx.finetune import finetune
    from featx.fit import fit_head, load_fitted
    from featx.model import build_from_head, load_model
    from featx.store import FeatureSet

    layer = "layer4.0.relu_1"
    feats = extract(digits_dir, layers=[layer], backbone="resnet18", weights="random", seed=0, split="test=0.3",
                    cache=tmp_path, workers=0)
    head = fit_head(feats.path, "logreg", layer=layer, cache=tmp_path)
    hm = build_from_head(head.path)
    fs = FeatureSet(feats.path)
    paths, X = fs.column("path", "test")[:4], fs.load(layer, "test")[:4]
    x = torch.stack([hm.preprocess.transform(open_rgb(digits_dir / p)) for p in paths])
    with torch.inference_mode():
        got, logits = hm.net.backbone(x), hm.net(x)
    assert _rel_err(got, torch.from_numpy(X)) <= 1e-4
    fh = load_fitted(head.path)
    expected = fh.estimator.predict(fh.scaler.transform_(X.copy()))
    assert np.array_equal(np.asarray(fh.estimator.classes_)[logits.argmax(1).numpy()], expected)
    tuned = finetune(head.path, epochs=1, unfreeze="all", batch_size=16, cache=tmp_path, device="cpu")
    net, meta = load_model(tuned.path)
    assert meta["layer"] == layer and meta["dim"] == fs.dim(layer) == 512


@pytest.mark.slow
def test_docs_table_is_the_listing():
    """docs/backbones.md's table is `featx backbones --markdown`, not numbers typed by hand."""
    from pathlib import Path

    from featx.backbones.listing import backbone_rows, format_rows

    doc = (Path(__file__).parents[1] / "docs" / "backbones.md").read_text()
    assert format_rows(backbone_rows(), markdown=True) in doc
