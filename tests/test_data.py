"""featx.datasets: finding images in the three layouts, --split, the stratified split, CSV errors, fingerprints,
and decoding every awkward or broken file of the image zoo (tests/imagezoo.py)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections import Counter
from pathlib import Path

import imagezoo
import numpy as np
import pytest
from imagezoo import make_zoo
from PIL import Image

from featx.datasets import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SPLITS,
    BadImage,
    discover,
    fingerprint_file,
    fingerprints,
    open_rgb,
    parse_split,
)
from featx.errors import DataError, UsageError

# ---------------------------------------------------------------------------------------------- helpers

def _touch(path: Path, content: bytes = b"x") -> Path:
    """A file discovery will list; discovery never decodes, so its content does not matter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (12, 10)) -> Path:
    """A small real RGB image (smooth colour ramps plus seeded noise), format taken from the extension."""
    rng = np.random.default_rng(seed)
    w, h = size
    gx, gy = np.meshgrid(np.linspace(0, 200, w), np.linspace(0, 200, h))
    base = np.stack([gx, gy, np.full((h, w), 90.0)], -1)
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _class_tree(root: Path, sizes: dict[str, int]) -> Path:
    for c, n in sizes.items():
        for i in range(n):
            _touch(root / c / f"img{i:03d}.png")
    return root


def _within(seconds: float, fn, *args, fifo: Path | None = None):
    """``fn(*args)`` on a daemon thread: its result, or a test failure (not a hung test run) if it has not
    returned after ``seconds``.  A thread blocked opening ``fifo`` is released by opening the other end."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{getattr(fn, '__name__', fn)}{tuple(str(a) for a in args)} did not return in {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    return msg


def _per_class_split(ds) -> dict[str, Counter]:
    out: dict[str, Counter] = {c: Counter() for c in ds.classes}
    for it in ds.items:
        out[ds.classes[it.label]][it.split] += 1
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> imagezoo.Zoo:
    return make_zoo(tmp_path_factory.mktemp("zoo") / "zoo", seed=0)


# ---------------------------------------------------------------------------------------------- discover

def test_class_folders_nested_relative_sorted(tmp_path):
    root = tmp_path / "data"
    for rel in ["cat/b.png", "cat/a.png", "cat/deep/er/c.png", "dog/z.jpg", "dog/sub/a.jpg", "bird/x.gif"]:
        _touch(root / rel)
    ds = discover(root, seed=0)
    assert ds.layout == "class-folders"
    assert ds.classes == ("bird", "cat", "dog")
    assert ds.root == root.absolute()
    paths = [it.path for it in ds.items]
    assert paths == ["bird/x.gif", "cat/a.png", "cat/b.png", "cat/deep/er/c.png", "dog/sub/a.jpg", "dog/z.jpg"]
    assert all("\\" not in p and not Path(p).is_absolute() for p in paths)
    assert [ds.classes[it.label] for it in ds.items] == [p.split("/")[0] for p in paths]
    assert all(it.split in SPLITS for it in ds.items)
    assert all(ds.abspath(it).is_file() for it in ds.items)


@pytest.mark.parametrize("ext", sorted(IMAGE_EXTENSIONS))
def test_every_extension_in_any_case_is_an_image(tmp_path, ext):
    root = tmp_path / "data"
    names = [f"lower{ext}", f"upper{ext.upper()}", f"mixed{ext[:2].upper()}{ext[2:]}"]
    for n in names:
        _touch(root / "a" / n)
    _touch(root / "b" / "other.png")
    ds = discover(root)
    assert sorted(it.path for it in ds.items if it.path.startswith("a/")) == sorted(f"a/{n}" for n in names)


def test_non_images_hidden_and_loose_files_are_ignored(tmp_path):
    root = tmp_path / "data"
    wanted = {"a/one.png", "a/two.JPG", "b/three.webp", "b/x/four.tif"}
    for rel in wanted:
        _touch(root / rel)
    for rel in ["a/notes.txt", "a/photo.jpg.bak", "a/README", "a/vector.svg", "a/raw.heic", "a/.hidden.png",
                "b/.thumbs/small.png", "b/Thumbs.db", ".git/objects/x.png", "loose.png"]:
        _touch(root / rel)
    (root / "empty-class").mkdir()
    _touch(root / "text-only" / "labels.txt")
    ds = discover(root)
    assert {it.path for it in ds.items} == wanted
    assert ds.classes == ("a", "b")  # folders without images are not classes
    assert {"loose.png", "empty-class", "text-only"} <= set(ds.ignored)


def test_order_does_not_depend_on_creation_order(tmp_path):
    rels = [f"{c}/{i:02d}.png" for c in ("x", "y", "z") for i in range(15)]
    one, two = tmp_path / "one", tmp_path / "two"
    for rel in rels:
        _touch(one / rel)
    for rel in np.random.default_rng(3).permutation(rels):
        _touch(two / rel)
    a, b = discover(one, split="test=0.2,val=0.2", seed=5), discover(two, split="test=0.2,val=0.2", seed=5)
    assert [it.path for it in a.items] == sorted(rels)
    assert a.items == b.items and a.classes == b.classes


def test_split_folders(tmp_path):
    root = tmp_path / "data"
    layout = {"train/cat/1.png", "train/cat/2.png", "train/dog/1.png", "train/dog/deep/2.png",
              "val/cat/3.png", "val/dog/3.png", "test/cat/4.png", "test/dog/4.png", "test/dog/5.JPG"}
    for rel in layout:
        _touch(root / rel)
    _touch(root / "extras" / "cat" / "9.png")  # neither a split nor used
    ds = discover(root, split="test=0.5", seed=3)
    assert ds.layout == "split-folders"
    assert ds.split is None  # the folders' split is used, --split is not applied
    assert ds.classes == ("cat", "dog")
    assert {it.path for it in ds.items} == layout
    for it in ds.items:
        s, c = it.path.split("/")[:2]
        assert (it.split, ds.classes[it.label]) == (s, c)
    assert ds.counts() == {"train": 4, "val": 2, "test": 3}
    assert "extras" in ds.ignored


def test_split_folders_without_val(tmp_path):
    root = tmp_path / "data"
    for rel in ["train/a/1.png", "train/b/1.png", "test/a/2.png", "test/b/2.png"]:
        _touch(root / rel)
    assert discover(root).counts() == {"train": 2, "test": 2}


def test_split_folders_with_empty_test_is_an_error(tmp_path):
    root = tmp_path / "data"
    for rel in ["train/a/1.png", "train/b/1.png", "test/a/notes.txt"]:
        _touch(root / rel)
    with pytest.raises(DataError) as e:
        discover(root)
    assert "test" in _one_line_error(e)


def test_train_and_val_without_test_is_not_two_classes(tmp_path):
    # ImageNet's train/ + val/ layout used to be read as a two-class problem, "train" versus "val"
    root = tmp_path / "data"
    for rel in ["train/a/1.png", "train/b/1.png", "val/a/2.png", "val/b/2.png"]:
        _touch(root / rel)
    with pytest.raises(DataError) as e:
        discover(root)
    assert "test/" in _one_line_error(e)


def test_csv_layout(tmp_path):
    _image(tmp_path / "imgs" / "a 1.png")
    _image(tmp_path / "imgs" / "b.jpg")
    _image(tmp_path / "imgs" / "sub" / "c.png")
    _image(tmp_path / "d.png")
    csv = tmp_path / "list.csv"
    csv.write_text("\ufeffPath , Label,SPLIT\nimgs/b.jpg,dog,test\n./imgs/a 1.png, cat ,TRAIN\n"
                   "imgs/sub/c.png,cat,val\n" + f"{tmp_path / 'd.png'},dog,train\n", encoding="utf-8")
    ds = discover(csv, split="test=0.5")
    assert ds.layout == "csv" and ds.root == tmp_path.absolute() and ds.split is None
    assert ds.classes == ("cat", "dog")
    got = {it.path: (ds.classes[it.label], it.split) for it in ds.items}
    # an absolute path inside the CSV's folder becomes relative too; "./" disappears
    assert got == {"imgs/a 1.png": ("cat", "train"), "imgs/b.jpg": ("dog", "test"),
                   "imgs/sub/c.png": ("cat", "val"), "d.png": ("dog", "train")}
    assert all(ds.abspath(it).is_file() for it in ds.items)


def test_csv_without_split_column_gets_a_stratified_split(tmp_path):
    lines = ["path,label"] + [f"{c}{i}.png,{c}" for c in ("a", "b") for i in range(20)]
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    ds = discover(tmp_path / "l.csv", split="test=0.2,val=0.1", seed=1)
    assert ds.split == {"test": 0.2, "val": 0.1}
    assert _per_class_split(ds) == {c: Counter(train=14, test=4, val=2) for c in ("a", "b")}


@pytest.mark.parametrize("text, words", [
    ("file,class\na.png,x\nb.png,y\n", ["path,label", "file"]),
    ("path\na.png\n", ["path,label"]),
    ("", ["path,label"]),
    ("path,label,split\na.png,x,train\nb.png,y,training\n", ["line 3", "training"]),
    ("path,label,split\na.png,x,train\nb.png,y,\nc.png,y,test\n", ["line 3", "empty split"]),
    ("path,label\na.png,x\nb.png,y\n./a.png,y\n", ["line 4", "a.png", "twice"]),
    # line numbers are the file's, blank lines included
    ("path,label\na.png,x\n\n\nb.png,\n", ["line 5", "empty label"]),
    ("path,label\na.png,x\n\n,y\n", ["line 4", "empty path"]),
    ("path,label\n", ["no images"]),
    ("path,label\na.png,x\nb.png,x\n", ["one class", "'x'"]),
])
def test_csv_errors(tmp_path, text, words):
    (tmp_path / "l.csv").write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        discover(tmp_path / "l.csv")
    msg = _one_line_error(e)
    for w in words:
        assert w in msg, (w, msg)


def test_csv_not_utf8_is_a_data_error(tmp_path):
    (tmp_path / "l.csv").write_bytes(b"path,label\n\xff\xfe.png,x\nb.png,y\n")
    with pytest.raises(DataError) as e:
        discover(tmp_path / "l.csv")
    assert "cannot read CSV" in _one_line_error(e)


def test_csv_padding_rows_are_skipped(tmp_path):
    (tmp_path / "l.csv").write_text("path,label,split\na.png,x,\n,,\nb.png,y,\n")
    ds = discover(tmp_path / "l.csv")
    assert [it.path for it in ds.items] == ["a.png", "b.png"]
    assert ds.split == {"test": 0.15}  # an all-empty split column means: make one


@pytest.mark.parametrize("setup, words", [
    (lambda p: None, ["does not exist"]),
    (lambda p: p.mkdir(), ["no images"]),
    (lambda p: _touch(p / "a" / "notes.txt"), ["no images"]),
    (lambda p: [_touch(p / "only" / f"{i}.png") for i in range(3)], ["one class", "'only'"]),
    (lambda p: _touch(p / "loose.png") and _touch(p / "a" / "1.png"), ["one class"]),
])
def test_unusable_data_folders(tmp_path, setup, words):
    data = tmp_path / "data"
    setup(data)
    with pytest.raises(DataError) as e:
        discover(data)
    msg = _one_line_error(e)
    for w in words:
        assert w in msg, (w, msg)


def test_data_that_is_a_file_but_not_a_csv(tmp_path):
    with pytest.raises(DataError) as e:
        discover(_image(tmp_path / "a.png"))
    assert ".csv" in _one_line_error(e)


# ---------------------------------------------------------------------------------------------- --split

@pytest.mark.parametrize("spec, want", [
    (None, {"test": 0.15}),
    ("", {"test": 0.15}),
    ("test=0.15", {"test": 0.15}),
    (" test = 0.2 , val=0.1 ", {"test": 0.2, "val": 0.1}),
    ("val=0.05,test=0.3", {"test": 0.3, "val": 0.05}),
    ("test=1e-1", {"test": 0.1}),
    ("val=0.2", {"val": 0.2}),
])
def test_parse_split_good(spec, want):
    assert parse_split(spec) == want


@pytest.mark.parametrize("spec", [
    "test", "test=", "=0.1", "train=0.1", "TEST=0.1", "test=abc", "test=0", "test=1", "test=-0.1", "test=1.5",
    "test=nan", "test=inf", "test=0.6,val=0.4", "test=0.1,test=0.2", "test=0.1;val=0.1", "test=0.1,",
])
def test_parse_split_bad(tmp_path, spec):
    with pytest.raises(UsageError) as e:
        parse_split(spec)
    assert spec.strip() in _one_line_error(e) or "--split" in str(e.value)
    # discover refuses it too, before looking at the data
    with pytest.raises(UsageError):
        discover(_class_tree(tmp_path / "d", {"a": 2, "b": 2}), split=spec)


# ---------------------------------------------------------------------------------------------- stratified split

def test_split_is_reproducible_and_seeded(tmp_path):
    root = _class_tree(tmp_path / "d", {"a": 30, "b": 30, "c": 30})
    one = discover(root, split="test=0.2,val=0.1", seed=7)
    assert one.items == discover(root, split="test=0.2,val=0.1", seed=7).items
    tests = {s: {it.path for it in discover(root, split="test=0.2,val=0.1", seed=s).items if it.split == "test"}
             for s in (7, 8, -1)}
    assert tests[7] != tests[8] and tests[7] != tests[-1]  # a negative seed is a seed, not a crash
    assert one.seed == 7 and one.split == {"test": 0.2, "val": 0.1}


def test_split_proportions_per_class(tmp_path):
    root = _class_tree(tmp_path / "d", {"few": 20, "some": 40, "many": 60})
    ds = discover(root, split="test=0.15,val=0.1", seed=0)
    assert _per_class_split(ds) == {
        "few": Counter(train=15, test=3, val=2),
        "some": Counter(train=30, test=6, val=4),
        "many": Counter(train=45, test=9, val=6),
    }
    assert ds.counts() == {"train": 90, "val": 12, "test": 18}


def test_no_val_unless_asked(tmp_path):
    root = _class_tree(tmp_path / "d", {"a": 20, "b": 20})
    assert _per_class_split(discover(root, split="test=0.25")) == {c: Counter(train=15, test=5) for c in "ab"}
    assert _per_class_split(discover(root)) == {c: Counter(train=17, test=3) for c in "ab"}  # default test=0.15


def test_small_classes_keep_train_rows_and_requested_splits(tmp_path):
    root = _class_tree(tmp_path / "d", {"one": 1, "two": 2, "three": 3, "five": 5})
    per = _per_class_split(discover(root, split="test=0.5,val=0.4", seed=2))
    assert all(c["train"] >= 1 for c in per.values())
    assert per["one"] == Counter(train=1)
    assert per["two"] == Counter(train=1, test=1)
    # 5 images at test=0.15,val=0.1 round to 1 and 0: a requested split still gets a row from every class
    # that can spare one, else val would be empty although asked for
    per = _per_class_split(discover(root, split="test=0.15,val=0.1", seed=2))
    assert per["five"] == Counter(train=3, test=1, val=1)
    assert per["three"] == Counter(train=1, test=1, val=1)
    per = _per_class_split(discover(root, split="test=0.1", seed=2))
    assert per["five"] == Counter(train=4, test=1)


# ---------------------------------------------------------------------------------------------- fingerprints

def test_fingerprints_follow_the_bytes(tmp_path):
    root = tmp_path / "d"
    for i, rel in enumerate(["a/1.png", "a/2.png", "b/1.png", "b/2.png"]):
        _image(root / rel, seed=i)
    ds = discover(root)
    before = fingerprints(ds, threads=3)
    assert [p for p, _, _ in before] == [it.path for it in ds.items]
    for (rel, size, digest) in before:
        data = (root / rel).read_bytes()
        assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert fingerprints(ds, threads=1) == before
    # flip one byte in the middle of one file: its fingerprint changes (same size), the others don't
    target = root / "b" / "1.png"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    after = fingerprints(ds)
    changed = [a[0] for a, b in zip(after, before) if a != b]
    assert changed == ["b/1.png"]
    assert after[2][1] == before[2][1] and after[2][2] != before[2][2]


def test_fingerprint_of_files_that_cannot_be_read(tmp_path):
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert fingerprint_file(tmp_path / "gone.png") == (None, "error:FileNotFoundError")
    # a FIFO named like an image: reading it would block forever (and a link to /dev/zero never end)
    os.mkfifo(tmp_path / "pipe.png")
    assert _within(5, fingerprint_file, tmp_path / "pipe.png", fifo=tmp_path / "pipe.png")[0] is None
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    assert _within(5, fingerprint_file, tmp_path / "zero.png")[0] is None


# ---------------------------------------------------------------------------------------------- the zoo

CONTRACT_VALID_KINDS = {
    "cmyk-jpeg", "png-16bit", "png-palette-trns", "png-rgba", "png-1x1", "png-2000x20", "exif-rotated",
    "gif-animated", "webp", "tiff", "pgm", "ppm", "bmp-grey", "png-upper", "jpeg-upper",
}
CONTRACT_BAD_REASONS = {imagezoo.EMPTY, imagezoo.NOT_IMAGE, imagezoo.CORRUPT, imagezoo.BOMB, imagezoo.DANGLING}


def test_zoo_covers_the_contract(zoo):
    kinds = {spec.kind for spec in zoo.valid.values()}
    assert CONTRACT_VALID_KINDS <= kinds
    assert {"truncated-jpeg", "truncated-png", "text-as-jpeg", "random-bytes", "decompression-bomb",
            "dangling-symlink", "empty"} <= {spec.kind for spec in zoo.bad.values()}
    assert CONTRACT_BAD_REASONS <= {spec.reason for spec in zoo.bad.values()}
    names = " ".join(zoo.valid)
    assert " " in names and any(ord(ch) > 127 for ch in names)  # spaces and non-ASCII names
    for rel in [*zoo.valid, *zoo.bad]:
        assert (zoo.root / rel).is_symlink() or (zoo.root / rel).is_file()


def test_discover_lists_exactly_the_zoo(zoo):
    ds = discover(zoo.root)
    assert ds.classes == zoo.classes
    assert [it.path for it in ds.items] == zoo.rows
    assert all(ds.classes[it.label] == zoo.label_of(it.path) for it in ds.items)
    assert "loose.png" in ds.ignored
    fps = {p: (s, d) for p, s, d in fingerprints(ds)}
    assert fps[zoo.of_kind("dangling-symlink")][0] is None
    assert all(fps[rel][0] is not None for rel in zoo.valid)


def test_every_valid_zoo_image_decodes_to_its_pixels(zoo):
    problems = []
    for rel, spec in sorted(zoo.valid.items()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                im = open_rgb(zoo.root / rel)
            except BadImage as e:
                problems.append(f"{rel}: skipped: {e}")
                continue
        if caught:
            problems.append(f"{rel}: warned {[str(w.message) for w in caught]}")
        if im.mode != "RGB" or im.size != spec.size:
            problems.append(f"{rel}: {im.mode} {im.size}, expected RGB {spec.size}")
            continue
        err = float(np.abs(np.asarray(im, dtype=np.float64) - spec.expected).mean())
        if err > spec.tolerance + 1e-9:
            problems.append(f"{rel} ({spec.kind}): mean abs error {err:.2f} > {spec.tolerance}")
    assert not problems, "\n".join(problems)


def test_every_bad_zoo_file_is_skipped_with_its_reason(zoo):
    problems = []
    for rel, spec in sorted(zoo.bad.items()):
        try:
            open_rgb(zoo.root / rel)
            problems.append(f"{rel}: decoded")
        except BadImage as e:
            if not str(e).startswith(spec.reason):
                problems.append(f"{rel}: {e!s} (expected {spec.reason})")
    assert not problems, "\n".join(problems)


def test_16bit_images_are_scaled_not_clipped(zoo, tmp_path):
    for kind in ("png-16bit", "tiff-16bit", "pgm-16bit"):
        arr = np.asarray(open_rgb(zoo.root / zoo.of_kind(kind)))
        assert arr.min() == 0 and arr.max() == 255, kind
        assert 120 < arr.mean() < 135, kind  # a full-range ramp; clipping to 8 bits would make it ~255
        assert (np.diff(arr[..., 0].astype(int).reshape(-1)) >= 0).all(), kind
    # a dark 16-bit image (every value <= 255 of 65535) is near black, whatever mode Pillow opens it in
    dark = (np.arange(200, dtype=np.uint16).reshape(10, 20)) + 50
    for name in ("dark.png", "dark.pgm", "dark.tif"):
        Image.fromarray(dark).save(tmp_path / name)
        assert np.asarray(open_rgb(tmp_path / name)).max() <= 1, name


def test_exif_orientation_is_applied(zoo):
    rel = zoo.of_kind("exif-rotated")
    with Image.open(zoo.root / rel) as raw:
        assert raw.size == (64, 32)  # stored landscape
    arr = np.asarray(open_rgb(zoo.root / rel)).astype(int)
    assert arr.shape == (64, 32, 3)  # shown portrait
    # inside the painted 8x8 corners, away from JPEG's colour bleeding at their edges
    assert np.abs(arr[1:6, -6:-1] - (255, 0, 0)).mean() < 25  # stored top-left, now top-right
    assert np.abs(arr[1:6, 1:6] - (0, 0, 255)).mean() < 25  # stored bottom-left, now top-left


def test_palette_transparency_without_warning(zoo):
    for kind in ("png-palette-trns", "gif-transparent"):
        rel = zoo.of_kind(kind)
        with Image.open(zoo.root / rel) as raw:
            assert raw.mode == "P" and "transparency" in raw.info
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            arr = np.asarray(open_rgb(zoo.root / rel))
        assert np.array_equal(arr, zoo.valid[rel].expected)
        assert (arr[0] == (255, 0, 255)).all()  # the transparent entry keeps its colour: no black, no crash


def test_animated_gif_gives_its_first_frame(zoo):
    rel = zoo.of_kind("gif-animated")
    with Image.open(zoo.root / rel) as raw:
        assert getattr(raw, "n_frames", 1) == 3
        raw.seek(2)
        last = np.asarray(raw.convert("RGB"))
    arr = np.asarray(open_rgb(zoo.root / rel))
    assert np.array_equal(arr, zoo.valid[rel].expected)
    assert not np.array_equal(arr, last)


def test_cmyk_jpeg_is_not_a_negative(zoo):
    rel = zoo.of_kind("cmyk-jpeg")
    with Image.open(zoo.root / rel) as raw:
        assert raw.mode == "CMYK"
    arr = np.asarray(open_rgb(zoo.root / rel)).astype(float)
    expected = zoo.valid[rel].expected.astype(float)
    assert np.abs(arr - expected).mean() < 6 < np.abs(arr - (255 - expected)).mean()


def test_decoded_image_is_independent_of_the_file(tmp_path):
    path = _image(tmp_path / "a.png", size=(9, 7))
    want = np.asarray(Image.open(path).convert("RGB"))
    im = open_rgb(path)
    path.unlink()  # open_rgb closed the file: the pixels must already be in memory
    assert np.array_equal(np.asarray(im), want)


# ---------------------------------------------------------------------------------------------- limits

def test_max_pixels_is_the_limit(tmp_path):
    path = _image(tmp_path / "a.png", size=(64, 48))  # 3072 pixels
    assert open_rgb(path, max_pixels=3072).size == (64, 48)
    with pytest.raises(BadImage, match="^decompression bomb"):
        open_rgb(path, max_pixels=3071)


def test_max_pixels_above_pillows_limit(tmp_path, monkeypatch):
    path = _image(tmp_path / "a.png", size=(64, 48))  # 3072 pixels
    small = _image(tmp_path / "b.png", size=(40, 40))  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow errors above 2000 pixels, warns above 1000
    # at Pillow's limit, both of Pillow's own signals (its error and its warning) become a skip
    for p in (path, small):
        with pytest.raises(BadImage, match="^decompression bomb"):
            open_rgb(p, max_pixels=1000)
    # a higher limit, or none, is honoured although Pillow's is lower; Pillow's is left as it was
    assert open_rgb(path, max_pixels=5000).size == (64, 48)
    assert open_rgb(path, max_pixels=None).size == (64, 48)
    assert open_rgb(path).size == (64, 48)  # the default, 89 M pixels
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(BadImage, match="^decompression bomb"):
        open_rgb(path, max_pixels=2500)


def test_zoo_bomb_is_over_the_default_limit(zoo):
    assert imagezoo.BOMB_PIXELS > DEFAULT_MAX_PIXELS
    assert (zoo.root / zoo.of_kind("decompression-bomb")).stat().st_size < 100_000


# ---------------------------------------------------------------------------------------------- odd files

def test_missing_directory_pipe_and_looping_link(tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "missing.png"
    cases["dir"] = tmp_path / "dir.png"
    cases["dir"].mkdir()
    cases["fifo"] = tmp_path / "pipe.png"
    os.mkfifo(cases["fifo"])
    cases["device"] = tmp_path / "zero.png"
    cases["device"].symlink_to("/dev/zero")
    cases["loop"] = tmp_path / "loop.png"
    cases["loop"].symlink_to(cases["loop"])
    cases["under-a-file"] = _image(tmp_path / "file.png") / "x.png"
    want = {"missing": "missing file", "dir": "is a directory", "fifo": "not a regular file",
            "device": "not a regular file", "loop": imagezoo.DANGLING, "under-a-file": "missing file"}
    got = {}
    for name, path in cases.items():
        with pytest.raises(BadImage) as e:
            _within(5, open_rgb, path, fifo=path if name == "fifo" else None)
        got[name] = str(e.value)
    assert {k: v[: len(want[k])] for k, v in got.items()} == want


def _decode_as_nobody(paths: list[Path]) -> dict:
    """open_rgb and fingerprint_file on ``paths`` in a forked child running as user nobody (65534).

    Root reads any file, so an unreadable file only exists for another user.  Everything the child needs is
    imported before the fork: after setuid it may not be able to read root's Python installation.
    """
    Image.init()  # load every Pillow plugin now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        out: dict = {}
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            for p in paths:
                try:
                    open_rgb(p)
                    out[str(p)] = ["decoded", list(fingerprint_file(p))]
                except BadImage as e:
                    out[str(p)] = [f"BadImage: {e}", list(fingerprint_file(p))]
                except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
                    out[str(p)] = [f"escaped {type(e).__name__}: {e}", None]
        except BaseException as e:  # noqa: BLE001
            out = {"setup": f"{type(e).__name__}: {e}"}
        finally:
            os.write(write, json.dumps(out).encode())
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def test_unreadable_files_are_skipped():
    # under /tmp, not pytest's tmp_path: that sits in a mode-700 folder that user nobody could not enter at all
    base = Path(tempfile.mkdtemp(prefix="featx-unreadable-"))
    try:
        base.chmod(0o755)
        readable = _image(base / "ok.png")
        unreadable = _image(base / "secret.png")
        unreadable.chmod(0)
        (base / "locked").mkdir()
        in_locked = _image(base / "locked" / "a.png")
        (base / "locked").chmod(0o700 if os.geteuid() == 0 else 0)  # other users may not even look inside
        paths = [readable, unreadable, in_locked]
        if os.geteuid() == 0:
            res = _decode_as_nobody(paths)
            if "setup" in res:
                pytest.skip(f"cannot become user nobody here: {res['setup']}")
        else:
            res = {}
            for p in paths:
                try:
                    open_rgb(p)
                    res[str(p)] = ["decoded", list(fingerprint_file(p))]
                except BadImage as e:
                    res[str(p)] = [f"BadImage: {e}", list(fingerprint_file(p))]
        assert res[str(readable)][0] == "decoded"
        for p in (unreadable, in_locked):
            verdict, fp = res[str(p)]
            assert verdict.startswith(f"BadImage: {imagezoo.UNREADABLE}"), (p, verdict)
            assert fp == [None, "error:PermissionError"]
    finally:
        for p in (base / "locked", base):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_zoo_is_reproducible(tmp_path, zoo):
    def digests(z: imagezoo.Zoo) -> dict[str, str]:
        return {rel: hashlib.sha256((z.root / rel).read_bytes()).hexdigest()
                for rel in [*z.valid, *z.bad, *z.ignored] if (z.root / rel).exists()}

    again = make_zoo(tmp_path / "again", seed=0)
    assert digests(again) == digests(zoo)  # same seed, same bytes: feature-set cache keys can rely on it
    other = make_zoo(tmp_path / "other", seed=1)
    assert sorted(other.valid) == sorted(zoo.valid)
    assert digests(other) != digests(zoo)
