"""featx.datasets: the published layouts read as their publishers ship them (small copies built by
tests/layouts.py), detection and --layout, what each reader reports unused or missing, incomplete layouts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import layouts
import numpy as np
import pytest
from conftest import run_cli
from layouts import BUILDERS, EXPECTED

from featx.datasets import LAYOUTS, NAMES, detect, discover
from featx.errors import DataError, UsageError


def _paths(ds) -> list[str]:
    return [it.path for it in ds.items]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_each_layout_is_detected_and_read_as_published(name, tmp_path):
    top = BUILDERS[name](tmp_path)
    want = EXPECTED[name]
    for data in (top, tmp_path):  # the unpacked folder, or the folder it was unpacked into
        ds = discover(data, split="test=0.25", seed=0)
        assert ds.layout == name and detect(data)[0] == name
        assert list(ds.classes) == want["classes"]
        if "class_names" in want:
            assert list(ds.class_names) == want["class_names"]
        if want["counts"] is not None:  # the official split, --split not applied
            assert ds.counts() == want["counts"] and ds.split is None
        else:  # no official split: featx's stratified one
            assert len(ds.items) == want["n"] and ds.split == {"test": 0.25}
            assert set(ds.counts()) == {"train", "test"}
        unused = {u["path"] for u in ds.unused}
        assert unused == set(want["unused"]), unused
        assert all((ds.root / p).is_file() for p in _paths(ds)) and _paths(ds) == sorted(_paths(ds))
        assert not unused & set(_paths(ds))
        assert ds.describe()["layout"] == name and json.dumps(ds.describe())  # goes into the manifest as JSON


def test_oxford_pets_labels_follow_class_ids_and_breed_names(tmp_path):
    ds = discover(layouts.make_oxford_pets(tmp_path))
    assert ds.class_names == ("Abyssinian", "American Bulldog", "Beagle", "Bengal")  # torchvision's display form
    assert ds.report["class_ids"] == [1, 2, 5, 6]  # the publisher's CLASS-IDs, in order
    for it in ds.items:
        assert Path(it.path).stem.rsplit("_", 1)[0] == ds.classes[it.label]
        n = int(Path(it.path).stem.rsplit("_", 1)[1])
        assert it.split == ("train" if n <= 3 else "test")  # trainval.txt -> train, test.txt -> test
    reasons = {u["path"]: u["reason"] for u in ds.unused}
    assert "no split list" in reasons["images/Abyssinian_99.jpg"]
    assert reasons["images/Abyssinian_100.mat"] == "not an image file"


def test_tiny_imagenet_keeps_wnids_and_words_and_leaves_test_out(tmp_path):
    top = layouts.make_tiny_imagenet(tmp_path)
    ds = discover(top)
    assert ds.classes == layouts.TINY_WNIDS  # wnids.txt's order, not sorted
    assert ds.report["words"]["n02124075"] == "Egyptian cat"
    test_rows = [it for it in ds.items if it.split == "test"]
    assert len(test_rows) == 6 and all(it.path.startswith("val/images/") for it in test_rows)
    ann = dict(line.split("\t")[:2] for line in (top / "val" / "val_annotations.txt").read_text().splitlines())
    assert all(ds.classes[it.label] == ann[Path(it.path).name] for it in test_rows)
    assert all(ds.classes[it.label] == Path(it.path).parts[1] for it in ds.items if it.split == "train")
    assert not any(it.path.startswith("test/") for it in ds.items)
    (entry,) = ds.unused
    assert entry["path"] == "test" and entry["files"] == 3 and "unlabelled" in entry["reason"]


def test_stanford_dogs_reads_the_mat_lists_also_from_lists_folder(tmp_path):
    top = layouts.make_stanford_dogs(tmp_path)
    (top / "lists").mkdir()
    for name in ("file_list.mat", "train_list.mat", "test_list.mat"):
        shutil.move(str(top / name), str(top / "lists" / name))
    extra = layouts.write_image(top / "Images" / layouts.DOGS_CLASSES[0] / "n02085620_9999.jpg", 7)
    ds = discover(top)
    assert ds.layout == "stanford-dogs" and ds.counts() == {"train": 9, "test": 6} and ds.report["lists"] == "lists"
    assert ds.class_names == ("Chihuahua", "Japanese spaniel", "Shih-Tzu")
    assert all(ds.classes[it.label] == it.path.split("/")[1] for it in ds.items)
    assert [u["path"] for u in ds.unused] == [extra.relative_to(top).as_posix()]


def test_caltech_leaves_clutter_out_and_makes_the_stratified_split(tmp_path):
    top = layouts.make_caltech101(tmp_path)
    a = discover(top, split="test=0.5", seed=3)
    b = discover(top / "101_ObjectCategories", split="test=0.5", seed=3)  # the categories folder itself
    assert a.layout == b.layout == "caltech101" and a.report["official_split"] is None
    assert [it.split for it in a.items] == [it.split for it in b.items]  # same seed, same split
    assert not any("BACKGROUND_Google" in p for p in _paths(a))
    for c in range(len(a.classes)):  # stratified: each class gives half its images to test
        rows = [it for it in a.items if it.label == c]
        assert sum(it.split == "test" for it in rows) == round(len(rows) / 2)
    c256 = discover(layouts.make_caltech256(tmp_path / "256"))
    assert c256.class_names == ("ak47", "american-flag", "backpack")
    assert {u["path"]: u.get("files") for u in c256.unused}["256_ObjectCategories/257.clutter"] == 3


def test_dogs_vs_cats_labels_from_names_and_train_folder_alone(tmp_path):
    top = layouts.make_dogs_vs_cats(tmp_path)
    (top / "train" / "readme.jpg").write_bytes(b"x")  # an image name without a label
    for data in (top, top / "train"):
        ds = discover(data, split="test=0.5")
        assert ds.layout == "dogs-vs-cats" and ds.classes == ("cat", "dog") and len(ds.items) == 12
        assert all(Path(it.path).name.split(".")[0] == ds.classes[it.label] for it in ds.items)
        assert any(u["path"].endswith("readme.jpg") for u in ds.unused)
    assert {u["path"] for u in discover(top).unused} == {"train/readme.jpg", "test1"}


def test_flowers_split_from_setid(tmp_path):
    ds = discover(layouts.make_flowers102(tmp_path))
    by_split = {s: sorted(int(Path(it.path).stem.split("_")[1]) for it in ds.items if it.split == s)
                for s in ("train", "val", "test")}
    assert by_split == {"train": [1, 2, 3], "val": [4, 5, 6], "test": list(range(7, 18))}
    assert all(ds.classes[it.label] == str((int(Path(it.path).stem.split("_")[1]) - 1) % 3 + 1) for it in ds.items)


def test_a_listed_file_missing_on_disk_is_reported_not_fatal(tmp_path):
    top = layouts.make_oxford_pets(tmp_path)
    (top / "images" / "beagle_5.jpg").unlink()
    ds = discover(top)
    assert ds.counts() == {"train": 12, "test": 7}
    assert ds.report["missing"] == [{"path": "images/beagle_5.jpg", "list": "annotations/test.txt", "line": 6}]
    dogs = layouts.make_stanford_dogs(tmp_path / "d")
    (dogs / "Images" / layouts.DOGS_CLASSES[1] / "n02085782_1000.jpg").unlink()
    assert [m["path"] for m in discover(dogs).report["missing"]] == [
        f"Images/{layouts.DOGS_CLASSES[1]}/n02085782_1000.jpg"]


@pytest.mark.parametrize("case", ["pets-no-trainval", "pets-bad-line", "dogs-no-test-list", "dogs-bad-mat",
                                  "flowers-no-setid", "flowers-bad-mat", "tiny-unknown-wnid", "tiny-no-train-folder",
                                  "tiny-no-val-annotations"])
def test_recognised_but_incomplete_layout_is_one_clear_error(case, tmp_path):
    if case.startswith("pets"):
        top = layouts.make_oxford_pets(tmp_path)
        if case == "pets-no-trainval":
            (top / "annotations" / "trainval.txt").unlink()
            match = "annotations/trainval.txt is missing"
        else:
            with open(top / "annotations" / "test.txt", "a") as f:
                f.write("beagle_9 five 2 3\n")
            match = r"test.txt' line 9: expected 'Image CLASS-ID"
    elif case.startswith("dogs"):
        top = layouts.make_stanford_dogs(tmp_path)
        if case == "dogs-no-test-list":
            (top / "test_list.mat").unlink()
            match = "test_list.mat is missing: unpack lists.tar"
        else:
            (top / "train_list.mat").write_bytes(b"MATLAB 5.0 MAT-file, torn off here")
            match = r"cannot read .*train_list.mat' as a MATLAB file"
    elif case.startswith("flowers"):
        top = layouts.make_flowers102(tmp_path)
        if case == "flowers-no-setid":
            (top / "setid.mat").unlink()
            match = "setid.mat is missing"
        else:
            (top / "imagelabels.mat").write_bytes(b"\x00" * 200)
            match = r"cannot read .*imagelabels.mat' as a MATLAB file"
    else:
        top = layouts.make_tiny_imagenet(tmp_path)
        if case == "tiny-unknown-wnid":
            with open(top / "val" / "val_annotations.txt", "a") as f:
                f.write("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
            match = "line 7: wnid 'n99999999' is not in wnids.txt"
        elif case == "tiny-no-train-folder":
            shutil.rmtree(top / "train" / layouts.TINY_WNIDS[1])
            match = f"have no folder in train/ \\(first: train/{layouts.TINY_WNIDS[1]}\\)"
        else:
            (top / "val" / "val_annotations.txt").unlink()
            match = "val_annotations.txt' is missing"
    with pytest.raises(DataError, match=match):
        discover(top)


def test_forced_layout(tmp_path):
    pets = layouts.make_oxford_pets(tmp_path / "p")
    forced = discover(pets, layout="class-folders")  # what the folder is if read as plain class folders
    assert forced.layout == "class-folders" and forced.classes == ("annotations", "images")
    plain = tmp_path / "plain"
    for c in ("a", "b"):
        for i in range(2):
            layouts.write_image(plain / c / f"{i}.jpg", i)
    assert discover(plain).layout == "class-folders"
    with pytest.raises(DataError, match="Oxford-IIIT Pet .*annotations/trainval.txt is missing"):
        discover(plain, layout="oxford-pets")
    with pytest.raises(DataError, match="not Caltech-101: expected 101_ObjectCategories"):
        discover(plain, layout="caltech101")
    with pytest.raises(UsageError, match="unknown --layout 'pets': valid layouts are oxford-pets, "):
        discover(plain, layout="pets")
    assert set(NAMES) == set(LAYOUTS) | {"csv"} and len(NAMES) == 10


def test_cli_says_which_layout_records_it_and_layout_forces_one(tmp_path):
    top = layouts.make_tiny_imagenet(tmp_path)
    args = ["extract", str(top), "--weights", "random", "--workers", "0", "--batch-size", "8",
            "--cache", str(tmp_path / "c")]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "detected layout tiny-imagenet (Tiny ImageNet)" in r.stderr
    assert "test: the test images are unlabelled" in r.stderr
    m = json.loads((Path(r.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())
    assert m["config"]["layout"] == "tiny-imagenet" and m["classes"] == list(layouts.TINY_WNIDS)
    assert m["counts"] == {"train": 12, "test": 6}
    d = m["dataset"]
    assert d["class_names"][0] == "Egyptian cat" and d["unused"] == [
        {"path": "test", "reason": "the test images are unlabelled (labels never published)", "files": 3}]
    assert d["report"]["words"]["n04067472"] == "reel"
    bad = run_cli(*args, "--layout", "flowers102")
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "layout flowers102 (forced)" in bad.stderr
    assert last.startswith("featx: error: ") and "imagelabels.mat is missing" in last


def test_stratified_split_is_seeded_and_per_class():
    from featx.datasets import parse_split, stratified

    labels = [0] * 10 + [1] * 10
    assign = stratified(labels, {"test": 0.2}, 0)
    assert assign == stratified(labels, {"test": 0.2}, 0)  # the same seed, the same split
    assert [a for a, y in zip(assign, labels) if y == 0].count("test") == 2
    assert [a for a, y in zip(assign, labels) if y == 1].count("test") == 2
    assert set(assign) == {"train", "test"}
    assert np.array_equal(parse_split("test=0.1")["test"], 0.1)
