"""Pipeline files: reading, checking (one error line naming the key), --set/--data/--weights, the grid and its names."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from featx.errors import UsageError
from featx.pipeline import PipelineError, apply_set, load, parse_value

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


BASE = """
    [data]
    path = "some/folder"
    split = "test=0.2,val=0.1"

    [features]
    layers = ["pool5", "fc7"]

    [heads.svm]
    C = [0.01, 0.1]

    [heads.mlp]
    hidden = 256
"""


def test_grid_expands_lists_into_named_cases(tmp_path):
    p = load(write(tmp_path, BASE))
    assert [c.name for c in p.cases] == ["pool5-svm-C=0.01", "pool5-svm-C=0.1", "fc7-svm-C=0.01", "fc7-svm-C=0.1",
                                         "pool5-mlp", "fc7-mlp"]
    c = p.case("fc7-svm-C=0.1")
    assert (c.stage, c.kind, c.layer, c.params) == ("fit", "svm", "fc7", {"C": 0.1})
    assert len(p.variants) == 1 and p.variants[0].weights == "imagenet"


def test_feature_grid_names_only_what_varies_and_finetune_per_network(tmp_path):
    p = load(write(tmp_path, BASE + """
        [finetune.fc]
        from = "*-mlp"
        unfreeze = ["last:1", "all"]
    """), sets=["features.views=[1, 10]", "features.backbone=['alexnet', 'vgg16']"])
    names = [c.name for c in p.cases]
    assert "vgg16-views=10-fc7-svm-C=0.1" in names and "alexnet-views=1-pool5-mlp" in names
    fts = [c for c in p.cases if c.stage == "finetune"]
    assert [c.name for c in fts] == ["alexnet-finetune-fc-unfreeze=last:1", "alexnet-finetune-fc-unfreeze=all",
                                     "vgg16-finetune-fc-unfreeze=last:1", "vgg16-finetune-fc-unfreeze=all"]
    # each fine-tune chooses among the MLP heads of its own network only
    assert all(n.startswith("alexnet-") and n.endswith("-mlp") for n in fts[0].candidates)
    assert len(fts[0].candidates) == 4  # 2 views x 2 layers


def test_names_are_stable_when_an_override_collapses_a_compared_value(tmp_path):
    f = write(tmp_path, BASE.replace('layers = ["pool5", "fc7"]',
                                     'layers = ["pool5"]\nweights = ["imagenet", "random"]'))
    assert "random-pool5-mlp" in [c.name for c in load(f).cases]
    # --weights replaces every backbone's weights: the cases keep their names (what `from` patterns rely on)
    assert [c.name for c in load(f, weights="random").cases if c.kind == "mlp"] == ["random-pool5-mlp"]


def test_data_weights_and_set_replace_values(tmp_path):
    p = load(write(tmp_path, BASE), data="/elsewhere", weights="random",
             sets=["heads.mlp.epochs=3", "data.split=test=0.3", "heads.logreg.C=1"])
    assert p.data["path"] == "/elsewhere" and p.data["split"] == "test=0.3"
    assert {v.weights for v in p.variants} == {"random"}
    assert p.case("pool5-mlp").params == {"hidden": 256, "epochs": 3}
    assert p.case("pool5-logreg").params == {"C": 1}


def test_parse_value_reads_toml_else_text():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 10]") == [1, 10] and parse_value('"x"') == "x"
    assert parse_value("test=0.2,val=0.1") == "test=0.2,val=0.1"


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_set_needs_key_equals_value(bad):
    with pytest.raises(UsageError, match="KEY=VALUE"):
        apply_set({}, bad)


@pytest.mark.parametrize("edit, key", [
    ("[features]\nviews = 3\n", "features.views"),
    ("[features]\nnormalize = \"imagenet\"\n", "features.normalize"),
    ("[heads.svm]\nlayers = \"fc6\"\n", "heads.svm.layers"),
    ("[features]\nbackbone = \"lenet\"\n", "features.backbone"),
    ("[heads.svm]\nCc = 1\n", "heads.svm.Cc"),
    ("[heads.forest]\nn = 1\n", "heads.forest"),
    ("[search.logreg]\ntrials = 0\n", "search.logreg.trials"),
    ("[search.logreg]\nbudget = 3\n", "search.logreg.budget"),
    ("[finetune.x]\nfrom = \"nothing-*\"\n", "finetune.x.from"),
    ("[finetune.x]\nepochz = 1\n", "finetune.x.epochz"),
    ("[[reference]]\naccuracy = 61\nsource = \"x\"\n", "reference[0].accuracy"),
    ("[[reference]]\naccuracy = 0.61\n", "reference[0].source"),
    ("colour = \"red\"\n", "colour"),
])
def test_invalid_file_is_one_error_naming_the_key(tmp_path, edit, key):
    text = textwrap.dedent(BASE)
    if edit.startswith("colour"):
        text = edit + text
    elif edit.split("]")[0] + "]" in text:  # a table the base already has: add to it
        head = edit.split("\n", 1)[0]
        text = text.replace(head, edit.rstrip("\n"), 1)
    else:
        text += "\n" + edit
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(PipelineError) as e:
        load(f)
    msg = str(e.value)
    assert "\n" not in msg and f"key {key}:" in msg and "bad.toml" in msg, msg


def test_missing_data_path_and_bad_toml(tmp_path):
    with pytest.raises(PipelineError, match="key data.path: missing"):
        load(write(tmp_path, "[heads.svm]\nC = 1\n"))
    with pytest.raises(PipelineError, match="not valid TOML.*line 1"):
        load(write(tmp_path, "[data\npath = 'x'\n"))
    with pytest.raises(PipelineError, match="does not exist"):
        load(tmp_path / "nope.toml")
    with pytest.raises(PipelineError, match="key features.layers: 'pool9' is not a layer of alexnet"):
        load(write(tmp_path, BASE), sets=["features.layers=['pool9']"])


def test_only_selects_cases_and_says_which_exist(tmp_path):
    p = load(write(tmp_path, BASE))
    assert [c.name for c in p.select("fc7-*")] == ["fc7-svm-C=0.01", "fc7-svm-C=0.1", "fc7-mlp"]
    assert [c.name for c in p.select("pool5-mlp,fc7-mlp")] == ["pool5-mlp", "fc7-mlp"]
    with pytest.raises(UsageError, match="matches no case.*pool5-mlp"):
        p.select("resnet-*")


def test_references_apply_by_glob(tmp_path):
    p = load(write(tmp_path, BASE + """
        [[reference]]
        cases = "*-mlp"
        accuracy = 0.83
        source = "a paper"
    """))
    assert p.reference_for("fc7-mlp").accuracy == 0.83 and p.reference_for("fc7-svm-C=0.1") is None


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_pipelines_load(path):
    p = load(path, data="/data", weights="random")
    assert p.cases and path.read_text().startswith("#")  # a header comment says what it reproduces
