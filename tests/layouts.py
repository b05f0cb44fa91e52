"""Small copies of the public datasets featx reads as their publishers ship them, odd parts included.

One builder per layout, each ``make_<name>(root) -> Path``: it writes a miniature of the published folder
below ``root`` and returns the folder a user would give ``featx extract`` (the one the archive unpacks to).
The files are the publishers' own names and formats, down to what a reader must cope with:

* Oxford-IIIT Pet: ``annotations/list.txt`` with its ``#`` header lines, ``trainval.txt``/``test.txt``,
  trimaps and xmls beside them, an image in ``images/`` that no list names, and a ``.mat`` file among the images;
* Caltech-101: ``101_ObjectCategories/`` with ``BACKGROUND_Google`` and both ``Faces`` and ``Faces_easy``;
* Caltech-256: ``256_ObjectCategories/NNN.name/NNN_MMMM.jpg`` with the ``257.clutter`` class;
* Tiny ImageNet: ``wnids.txt`` (not in sorted order), ``words.txt`` (more wnids than used, tab-separated),
  ``train/<wnid>/images`` + ``<wnid>_boxes.txt``, ``val/images`` + ``val/val_annotations.txt``, the unlabelled
  ``test/images``;
* Stanford Dogs: ``Images/<wnid>-<breed>/``, ``Annotation/``, and the MATLAB lists ``file_list.mat``,
  ``train_list.mat``, ``test_list.mat`` (cell arrays of paths, 1-based labels) written with scipy.io.savemat;
* Kaggle dogs-vs-cats: ``train/cat.0.jpg``..., the unlabelled ``test1/1.jpg``... and ``sampleSubmission.csv``;
* Oxford Flowers-102: ``jpg/image_00001.jpg``..., ``imagelabels.mat`` and ``setid.mat`` (trnid/valid/tstid).

:data:`EXPECTED` says what a correct reader makes of each copy (classes, rows per split, what is left unused),
so tests (and other helpers' tests) can check readers against it. Function names are kept stable: other test
modules import them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_oxford_pets", "make_caltech101", "make_caltech256", "make_tiny_imagenet", "make_stanford_dogs",
           "make_dogs_vs_cats", "make_flowers102", "BUILDERS", "EXPECTED", "write_image"]


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    """A small real image (a colour ramp plus seeded noise), format from the extension; parents created."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1),
                     np.full_like(xx, (seed * 37) % 256)], axis=-1)
    arr = np.clip(base + rng.integers(-30, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else \
        Image.fromarray(arr).save(path)
    return path


def _savemat(path: Path, mdict: dict) -> None:
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), mdict)


def _cell(strings: list[str]) -> np.ndarray:
    """A MATLAB cell array (n x 1) of strings, as the publishers' list files hold them."""
    out = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        out[i, 0] = s
    return out


# --------------------------------------------------------------------------------------------- Oxford-IIIT Pet

# (breed, CLASS-ID, SPECIES 1 cat / 2 dog, BREED ID within species): the publisher's own ids for these breeds
PETS_BREEDS = (("Abyssinian", 1, 1, 1), ("american_bulldog", 2, 2, 1), ("beagle", 5, 2, 3), ("Bengal", 6, 1, 2))


def make_oxford_pets(root: Path) -> Path:
    """``oxford-iiit-pet/`` with ``images/`` and ``annotations/``: 4 breeds, 3 trainval + 2 test images each.

    Odd parts: list.txt's six ``#`` header lines, an image no list names (``images/Abyssinian_99.jpg``), a
    ``.mat`` file among the images, ``trimaps/`` and ``xmls/`` under annotations."""
    top = Path(root) / "oxford-iiit-pet"
    ann = top / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    rows_tv: list[str] = []
    rows_te: list[str] = []
    seed = 0
    for breed, cid, species, bid in PETS_BREEDS:
        for i in range(1, 6):
            name = f"{breed}_{i}"
            write_image(top / "images" / f"{name}.jpg", seed := seed + 1)
            (rows_tv if i <= 3 else rows_te).append(f"{name} {cid} {species} {bid}")
            (ann / "trimaps").mkdir(exist_ok=True)
            write_image(ann / "trimaps" / f"{name}.png", seed, size=(8, 8))
    (ann / "xmls").mkdir(exist_ok=True)
    (ann / "xmls" / "Abyssinian_1.xml").write_text("<annotation><filename>Abyssinian_1.jpg</filename></annotation>\n")
    header = ("#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
              "#BREED ID: 1-25:Cat 1:12:Dog\n#All images with 1st letter as captial are cat images\n"
              "#images with small first letter are dog images\n")
    (ann / "list.txt").write_text(header + "".join(r + "\n" for r in sorted(rows_tv + rows_te)))
    (ann / "trainval.txt").write_text("".join(r + "\n" for r in rows_tv))
    (ann / "test.txt").write_text("".join(r + "\n" for r in rows_te))
    write_image(top / "images" / "Abyssinian_99.jpg", 99)  # on disk, in no list
    (top / "images" / "Abyssinian_100.mat").write_bytes(b"MATLAB 5.0 MAT-file, not an image")
    return top


# -------------------------------------------------------------------------------------------------- Caltech

CALTECH101_CLASSES = ("Faces", "Faces_easy", "accordion", "airplanes")


def make_caltech101(root: Path) -> Path:
    """``caltech101/101_ObjectCategories/`` (as torchvision unpacks it): 4 object classes of 4-6 images, and the
    ``BACKGROUND_Google`` clutter folder (3 images) that is not a class; ``Annotations/`` beside it."""
    top = Path(root) / "caltech101"
    cats = top / "101_ObjectCategories"
    seed = 100
    for k, c in enumerate(CALTECH101_CLASSES + ("BACKGROUND_Google",)):
        n = 3 if c == "BACKGROUND_Google" else 4 + k % 3
        for i in range(1, n + 1):
            write_image(cats / c / f"image_{i:04d}.jpg", seed := seed + 1)
    (top / "Annotations" / "Faces_2").mkdir(parents=True, exist_ok=True)
    _savemat(top / "Annotations" / "Faces_2" / "annotation_0001.mat", {"box_coord": np.array([[1, 2, 3, 4]])})
    return top


CALTECH256_CLASSES = ("001.ak47", "002.american-flag", "003.backpack")


def make_caltech256(root: Path) -> Path:
    """``caltech256/256_ObjectCategories/`` (as torchvision unpacks it): 3 object classes of 4-5 images named
    ``NNN_MMMM.jpg``, the ``257.clutter`` class (3 images), and a stray non-image file in a class folder."""
    top = Path(root) / "caltech256"
    cats = top / "256_ObjectCategories"
    seed = 200
    for k, c in enumerate(CALTECH256_CLASSES + ("257.clutter",)):
        n = 3 if c == "257.clutter" else 4 + k % 2
        for i in range(1, n + 1):
            write_image(cats / c / f"{c[:3]}_{i:04d}.jpg", seed := seed + 1)
    (cats / "002.american-flag" / "Thumbs.db").write_bytes(b"\0" * 16)
    return top


# -------------------------------------------------------------------------------------------- Tiny ImageNet

TINY_WNIDS = ("n02124075", "n01443537", "n04067472")  # wnids.txt order (the publisher's is not sorted either)
TINY_WORDS = {"n02124075": "Egyptian cat", "n01443537": "goldfish, Carassius auratus",
              "n04067472": "reel"}


def make_tiny_imagenet(root: Path) -> Path:
    """``tiny-imagenet-200/``: 3 wnids, 4 train images each (64x64 JPEG, ``<wnid>_<i>.JPEG`` under
    ``train/<wnid>/images`` beside ``<wnid>_boxes.txt``), 2 labelled val images per class listed in
    ``val/val_annotations.txt``, and 3 unlabelled ``test/images``."""
    top = Path(root) / "tiny-imagenet-200"
    top.mkdir(parents=True, exist_ok=True)
    (top / "wnids.txt").write_text("".join(w + "\n" for w in TINY_WNIDS))
    words = {**TINY_WORDS, "n00001740": "entity", "n09999999": "something not in this copy"}
    (top / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in sorted(words.items())))
    seed = 300
    for w in TINY_WNIDS:
        boxes = []
        for i in range(4):
            write_image(top / "train" / w / "images" / f"{w}_{i}.JPEG", seed := seed + 1, size=(64, 64))
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
        (top / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    ann, k = [], 0
    for w in TINY_WNIDS:
        for _ in range(2):
            write_image(top / "val" / "images" / f"val_{k}.JPEG", seed := seed + 1, size=(64, 64))
            ann.append(f"val_{k}.JPEG\t{w}\t1\t2\t60\t61\n")
            k += 1
    (top / "val" / "val_annotations.txt").write_text("".join(ann))
    for i in range(3):
        write_image(top / "test" / "images" / f"test_{i}.JPEG", seed := seed + 1, size=(64, 64))
    return top


# -------------------------------------------------------------------------------------------- Stanford Dogs

DOGS_CLASSES = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu")


def make_stanford_dogs(root: Path) -> Path:
    """``stanford-dogs/`` with ``Images/``, ``Annotation/`` and lists.tar's ``file_list.mat``, ``train_list.mat``,
    ``test_list.mat`` at the top: 3 breeds of 5 images, 3 train + 2 test each (file_list names all 15)."""
    top = Path(root) / "stanford-dogs"
    seed = 400
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": [], "file": []}
    for lab, c in enumerate(DOGS_CLASSES, start=1):
        wnid = c.split("-")[0]
        for i in range(5):
            rel = f"{c}/{wnid}_{1000 + i}.jpg"
            write_image(top / "Images" / rel, seed := seed + 1)
            (top / "Annotation" / c).mkdir(parents=True, exist_ok=True)
            (top / "Annotation" / c / f"{wnid}_{1000 + i}").write_text("<annotation/>\n")
            lists["train" if i < 3 else "test"].append((rel, lab))
            lists["file"].append((rel, lab))
    for name, rows in lists.items():
        _savemat(top / f"{name}_list.mat", {
            "file_list": _cell([r for r, _ in rows]),
            "annotation_list": _cell([r.rsplit(".", 1)[0] for r, _ in rows]),
            "labels": np.array([[float(lab)] for _, lab in rows])})
    return top


# -------------------------------------------------------------------------------------------- dogs vs. cats

def make_dogs_vs_cats(root: Path) -> Path:
    """``dogs-vs-cats/`` as Kaggle's competition unpacks: ``train/cat.N.jpg`` and ``train/dog.N.jpg`` (6 each),
    the unlabelled ``test1/N.jpg`` (4) and ``sampleSubmission.csv``."""
    top = Path(root) / "dogs-vs-cats"
    seed = 500
    for animal in ("cat", "dog"):
        for i in range(6):
            write_image(top / "train" / f"{animal}.{i}.jpg", seed := seed + 1)
    for i in range(1, 5):
        write_image(top / "test1" / f"{i}.jpg", seed := seed + 1)
    (top / "sampleSubmission.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in range(1, 5)))
    return top


# ------------------------------------------------------------------------------------------------- Flowers

def make_flowers102(root: Path) -> Path:
    """``flowers-102/`` (as torchvision unpacks it): ``jpg/image_00001.jpg``.. ``image_00018.jpg`` in 3 classes
    (labels 1..3 in ``imagelabels.mat``), ``setid.mat`` giving 1 train, 1 val and the rest test per class, as the
    publisher's split gives test the most images; one image (``image_00018``) is in no split."""
    top = Path(root) / "flowers-102"
    labels = [1, 2, 3] * 6  # image i has label labels[i - 1]
    for i in range(1, len(labels) + 1):
        write_image(top / "jpg" / f"image_{i:05d}.jpg", 600 + i)
    trn, val, tst = [1, 2, 3], [4, 5, 6], list(range(7, 18))
    _savemat(top / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    _savemat(top / "setid.mat", {"trnid": np.array([trn], dtype=np.uint16), "valid": np.array([val], dtype=np.uint16),
                                 "tstid": np.array([tst], dtype=np.uint16)})
    return top


BUILDERS = {
    "oxford-pets": make_oxford_pets,
    "caltech101": make_caltech101,
    "caltech256": make_caltech256,
    "tiny-imagenet": make_tiny_imagenet,
    "stanford-dogs": make_stanford_dogs,
    "dogs-vs-cats": make_dogs_vs_cats,
    "flowers102": make_flowers102,
}

# What a correct reader makes of each copy: classes in label order, rows per split (None: no official split,
# featx's stratified --split applies), and the paths of what it must report as not used.
EXPECTED = {
    "oxford-pets": {"classes": [b for b, *_ in PETS_BREEDS], "counts": {"train": 12, "test": 8},
                    "unused": ["images/Abyssinian_99.jpg", "images/Abyssinian_100.mat"]},
    "caltech101": {"classes": list(CALTECH101_CLASSES), "counts": None, "n": 4 + 5 + 6 + 4,
                   "unused": ["101_ObjectCategories/BACKGROUND_Google"]},
    "caltech256": {"classes": list(CALTECH256_CLASSES), "counts": None, "n": 4 + 5 + 4,
                   "unused": ["256_ObjectCategories/257.clutter", "256_ObjectCategories/002.american-flag/Thumbs.db"]},
    "tiny-imagenet": {"classes": list(TINY_WNIDS), "class_names": [TINY_WORDS[w] for w in TINY_WNIDS],
                      "counts": {"train": 12, "test": 6}, "unused": ["test"]},
    "stanford-dogs": {"classes": list(DOGS_CLASSES), "counts": {"train": 9, "test": 6}, "unused": []},
    "dogs-vs-cats": {"classes": ["cat", "dog"], "counts": None, "n": 12, "unused": ["test1"]},
    "flowers102": {"classes": ["1", "2", "3"], "counts": {"train": 3, "val": 3, "test": 11},
                   "unused": ["jpg/image_00018.jpg"]},
}
