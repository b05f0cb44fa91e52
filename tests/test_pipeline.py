"""Pipeline files: reading, checking (one error line naming the key), --set/--data/--weights, the grid and its names."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from featx.errors import UsageError
from featx.pipeline import FEWSHOT_DEFAULTS, PipelineError, apply_set, load, parse_value

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


def test_fewshot_tables_are_curves_per_feature_set_and_layer(tmp_path):
    p = load(write(tmp_path, BASE + """
        [fewshot.logreg]
        shots = [4, 1, 2]
        draws = 3
        C = [0.1, 1.0]

        [fewshot.lin]
        kind = "svm"
        layers = ["fc7"]
        scale = "l2"

        [finetune.all]
        epochs = 1
    """), sets=["features.backbone=['alexnet', 'vgg16']"])
    curves = [c for c in p.cases if c.stage == "fewshot"]
    assert [c.name for c in curves] == [
        "alexnet-pool5-fewshot-logreg-C=0.1", "alexnet-pool5-fewshot-logreg-C=1", "alexnet-fc7-fewshot-logreg-C=0.1",
        "alexnet-fc7-fewshot-logreg-C=1", "vgg16-pool5-fewshot-logreg-C=0.1", "vgg16-pool5-fewshot-logreg-C=1",
        "vgg16-fc7-fewshot-logreg-C=0.1", "vgg16-fc7-fewshot-logreg-C=1", "alexnet-fc7-fewshot-lin",
        "vgg16-fc7-fewshot-lin"]
    c = p.case("vgg16-fc7-fewshot-logreg-C=1")
    assert (c.kind, c.layer, c.scale, c.variant.backbone) == ("logreg", "fc7", "standard", "vgg16")
    assert c.params == {"shots": (1, 2, 4), "draws": 3, "C": 1.0}  # shots sorted, a list that does not expand
    assert c.describe()["shots"] == "1,2,4"
    lin = p.case("alexnet-fc7-fewshot-lin")
    assert (lin.kind, lin.scale, lin.params) == ("svm", "l2", {**FEWSHOT_DEFAULTS, "shots": (1, 2, 4, 8, 16)})
    # a fine-tune starts from a head or a search, never from a curve
    for ft in (c for c in p.cases if c.stage == "finetune"):
        assert all(p.case(n).stage == "fit" for n in ft.candidates)
    # a pipeline of curves alone is a pipeline
    only = load(write(tmp_path, '[data]\npath = "x"\n[fewshot.logreg]\n', "curves.toml"))
    assert [(c.name, c.params) for c in only.cases] == [("pool5-fewshot-logreg", {"shots": (1, 2, 4, 8, 16),
                                                                                   "draws": 10})]


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
    ("[fewshot.logreg]\nshots = [0, 2]\n", "fewshot.logreg.shots"),
    ("[fewshot.logreg]\nshots = 1.5\n", "fewshot.logreg.shots"),
    ("[fewshot.logreg]\ndraws = 0\n", "fewshot.logreg.draws"),
    ("[fewshot.logreg]\nCc = 1\n", "fewshot.logreg.Cc"),
    ("[fewshot.knn]\ndraws = 2\n", "fewshot.knn"),
    ("[fewshot.logreg]\nscale = \"minmax\"\n", "fewshot.logreg.scale"),
    ("[fewshot.logreg]\nlayers = \"fc6\"\n", "fewshot.logreg.layers"),
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


# ============================================================================================== the few-shot stage

CURVES = """
    name = "curves"

    [data]
    path = "{data}"
    split = "test=0.3"

    [features]
    layers = ["pool5"]
    batch_size = 32

    [heads.logreg]

    [fewshot.logreg]
    shots = [2, 1]
    draws = 2
"""
CURVE = "pool5-fewshot-logreg"


@pytest.fixture(scope="module")
def curves_run(tmp_path_factory, digits_dir):
    """The logistic head and its few-shot curve on 60 digits (AlexNet, seeded random weights), run once."""
    from featx.run import run_pipeline

    root = tmp_path_factory.mktemp("curves")
    file = write(root, CURVES.format(data=digits_dir), "curves.toml")
    cache = root / "cache"
    before = run_pipeline(file, weights="random", cache=cache, dry_run=True, device="cpu")
    res = run_pipeline(file, weights="random", cache=cache, device="cpu", progress=False)
    return file, cache, before, res


def test_run_draws_the_curve_of_featx_fewshot(curves_run):
    import csv
    import json

    from featx.fewshot import fewshot, read_csv

    file, cache, before, res = curves_run
    assert before.cases[CURVE] == {"extract": "to compute", "fewshot": "to compute"}
    assert res.computed == {"extract": 1, "fit": 1, "fewshot": 1} and not res.failed
    with open(res.path / "results.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    row = rows[CURVE]
    assert row["status"] == "ok" and row["head"] == "logreg" and row["layer"] == "pool5" and row["fewshot_k"] == "2"
    assert row["test_accuracy"] == row["accuracy_k2"]  # a curve's test accuracy: the mean at its largest k
    assert rows["pool5-logreg"]["accuracy_k1"] == ""  # a head's row has no curve
    # what `featx fewshot FEATURES --shots 1,2 --draws 2 --head logreg --seed 0` gives on the same feature set
    same = fewshot(row["features"], shots="1,2", draws=2, head="logreg", seed=0, cache=cache)
    assert not same.computed and str(same.path) == row["fewshot_dir"]
    for s in same.summary["per_k"]:
        assert float(row[f"accuracy_k{s['k']}"]) == pytest.approx(s["accuracy_mean"], abs=1e-6)
        assert float(row[f"accuracy_std_k{s['k']}"]) == pytest.approx(s["accuracy_std"], abs=1e-6)
    assert float(row["full_accuracy"]) == pytest.approx(same.summary["full"]["accuracy"], abs=1e-6)
    # the curve's CSV and plot under the run, every curve in one plot, and the report's section
    assert read_csv(res.path / "fewshot" / f"{CURVE}.csv") == read_csv(same.path / "fewshot.csv")
    assert (res.path / "fewshot" / f"{CURVE}.png").stat().st_size > 1000
    assert (res.path / "fewshot.png").stat().st_size > 1000
    report = (res.path / "report.md").read_text()
    assert "## Few-shot curves" in report and "| case | k=1 | k=2 | all train rows |" in report
    assert f"| {CURVE} | " in report and "![fewshot.png](fewshot.png)" in report
    stored = json.loads((res.path / "results.json").read_text())["rows"]
    assert [r["case"] for r in stored] == ["pool5-logreg", CURVE]


def test_a_curve_is_cached_resumed_and_reads_no_image(curves_run, monkeypatch):
    import json
    import shutil

    import PIL.Image

    from featx.run import run_pipeline

    file, cache, _, res = curves_run
    plan = run_pipeline(file, weights="random", cache=cache, dry_run=True, device="cpu")
    assert plan.cases[CURVE] == {"extract": "cached", "fewshot": "cached"}
    again = run_pipeline(file, weights="random", cache=cache, device="cpu", progress=False)
    assert again.computed == {"extract": 0, "fit": 0, "fewshot": 0} and again.rows == res.rows
    # a curve stopped after some of its draws: the next run fits only the others, and ends with the same numbers
    curve = res.path.parent.parent / "fewshot"
    (d,) = list(curve.iterdir())
    (d / "summary.json").unlink()
    for f in sorted((d / "draws").glob("k0002-*.json")):
        f.unlink()
    shutil.rmtree(res.path / "fewshot")

    def refuse(*a, **k):
        raise AssertionError("the few-shot stage opened an image")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    resumed = run_pipeline(file, weights="random", cache=cache, device="cpu", progress=False, only=CURVE)
    assert resumed.computed["fewshot"] == 1 and resumed.computed["extract"] == 0
    summary = json.loads((d / "summary.json").read_text())
    assert summary["timings"]["fits_now"] == 2  # the two 2-shot draws; the rest were kept
    numbers = [k for k in res.rows[1] if "accuracy" in k]
    assert len(numbers) == 8 and all(resumed.rows[0][k] == res.rows[1][k] for k in numbers)
    assert (resumed.path / "fewshot" / f"{CURVE}.csv").is_file()


def test_a_curve_with_more_shots_than_a_class_has_fails_alone(curves_run):
    from featx.run import run_pipeline

    file, cache, _, _ = curves_run
    plan = run_pipeline(file, weights="random", cache=cache, dry_run=True, sets=["fewshot.logreg.shots=[1,50]"])
    status = plan.cases[CURVE]["fewshot"]
    assert status.startswith("error: --shots 50 is more than the ") and "smallest class" in status
    res = run_pipeline(file, weights="random", cache=cache, device="cpu", progress=False,
                       sets=["fewshot.logreg.shots=[1,50]"])
    assert res.failed == [CURVE]
    row = next(r for r in res.rows if r["case"] == CURVE)
    assert row["error"].startswith("fewshot: --shots 50 is more than the") and "\n" not in row["error"]
    assert "## Cases that did not finish" in (res.path / "report.md").read_text()


@pytest.mark.slow
def test_a_run_stopped_inside_a_curve_continues_it_to_the_same_numbers(curves_run, tmp_path):
    """SIGINT at the curve's third draw (FEATX_STOP_AT): the case is recorded interrupted, its two finished draws
    are kept, and the same command continues the curve to the numbers of an uninterrupted run."""
    import json

    from conftest import run_cli

    file, _, _, res = curves_run
    args = ("run", str(file), "--weights", "random", "--device", "cpu", "--cache", str(tmp_path))
    stopped = run_cli(*args, env={"FEATX_STOP_AT": "fewshot.draw:3"})
    assert stopped.returncode == 130 and "interrupted (SIGINT)" in stopped.stderr, stopped.stderr[-2000:]
    rows = json.loads((tmp_path / "runs" / res.path.name / "results.json").read_text())["rows"]
    assert [(r["case"], r["status"]) for r in rows] == [("pool5-logreg", "ok"), (CURVE, "interrupted")]
    (curve,) = list((tmp_path / "fewshot").iterdir())
    assert len(list((curve / "draws").glob("*.json"))) == 2
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1] == str(tmp_path / "runs" / res.path.name)
    summary = json.loads((curve / "summary.json").read_text())
    assert summary["timings"]["fits_now"] == 3  # the two 2-shot draws and the head on every train row
    rows = {r["case"]: r for r in json.loads((tmp_path / "runs" / res.path.name / "results.json").read_text())["rows"]}
    first = next(r for r in res.rows if r["case"] == CURVE)
    assert all(rows[CURVE][k] == first[k] for k in first if "accuracy" in k)
