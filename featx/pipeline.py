"""Pipeline files: one TOML file names the data, the feature sets, a grid of heads, searches and fine-tunes, and
the published figures the results are compared with (the format is specified in docs/pipelines.md).

:func:`load` reads a file, applies the command line's replacements (``--data``, ``--weights``, ``--set``),
checks every key (backbones, layers and head parameters against featx's registries) and expands the lists into
a grid of named :class:`Case` objects.  Nothing here computes: :mod:`featx.run` runs the cases.

A ``[fewshot.NAME]`` table is a few-shot learning curve (:func:`featx.fewshot.fewshot`) of a head on every feature
set and layer: its ``shots`` and ``draws`` are the curve's, not lists to expand.

The grid rule: in ``[features]``, ``backbone``, ``weights``, ``views`` and ``normalize`` may be lists, and every
combination is one feature set (``layers`` are all extracted into each); in a ``[heads.NAME]``,
``[fewshot.NAME]`` or ``[finetune.NAME]`` table, every value that is a list expands (except a curve's ``shots``),
and every combination is one case.  A case's name joins the values that tell it apart from the others, in the
file's order: ``pool5-svm-C=0.01``, ``views=10-fc7-mlp``, ``finetune-last-unfreeze=all``.
"""
from __future__ import annotations

import fnmatch
import itertools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featx.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with tomli, the library tomllib came from
    import tomli as tomllib

HEAD_KINDS = ("svm", "logreg", "mlp")  # as featx.fit.HEAD_KINDS (not imported: fit pulls in numpy and h5py)
FEATURE_GRID = ("backbone", "weights", "views", "normalize")
FEATURE_DEFAULTS: dict[str, Any] = {"backbone": "alexnet", "weights": "imagenet", "views": 1, "normalize": "weights"}
VIEWS = (1, 2, 5, 10)
NORMALIZE = ("weights", "dataset")
# what a [finetune.NAME] table may set besides `from` (fields of featx.finetune.FinetuneOptions; the seed is the file's)
FINETUNE_OPTIONS = ("epochs", "unfreeze", "lr", "backbone_lr_factor", "optimizer", "momentum", "weight_decay",
                    "schedule", "augment", "batch_size", "early_stop", "gradual_every", "step_size",
                    "plateau_patience", "amp", "clip_grad", "recover", "scale_backbone_lr", "backbone_dropout")
SEARCH_KEYS = ("kind", "trials", "sampler", "cv", "layers")
FEWSHOT_KEYS = ("kind", "layers", "scale", "shots", "draws")  # and the head's parameters
FEWSHOT_DEFAULTS: dict[str, Any] = {"shots": [1, 2, 4, 8, 16], "draws": 10}  # as `featx fewshot`'s
BUILTIN_DATA = {"sklearn:digits": "scikit-learn's 1,797 handwritten digits, written once under <cache>/demo/digits"}


class PipelineError(UsageError):
    """An invalid pipeline file: the message names the file and the key."""


@dataclass(frozen=True)
class Variant:
    """One feature set of the grid: a backbone with its weights, views and normalization."""

    backbone: str
    weights: str
    views: int
    normalize: str

    def values(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "weights": self.weights, "views": self.views, "normalize": self.normalize}


@dataclass(frozen=True)
class Case:
    """One row of the results: a head fitted, a search run, or a fine-tune, with everything that defines it.

    ``stage`` is ``fit``, ``search``, ``fewshot`` or ``finetune``.  Fit, search and few-shot cases have a
    ``variant`` and a ``layer`` (a few-shot case's ``params`` hold its ``shots`` and ``draws``);
    a fine-tune case has ``candidates``, the cases it may start from (in the file's order, all on one backbone and
    weights), of which :func:`featx.run.start.choose_start` picks one.  ``labels`` are the values that name the case
    (and differ between cases).
    """

    name: str
    stage: str
    group: str
    variant: Variant | None = None
    layer: str | None = None
    kind: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    scale: str = "standard"
    candidates: tuple[str, ...] = ()
    labels: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The case's parameters as one flat mapping (for results.csv)."""
        out: dict[str, Any] = {"stage": self.stage, "group": self.group}
        if self.variant is not None:
            out.update(self.variant.values())
        if self.layer is not None:
            out["layer"] = self.layer
        if self.kind is not None:
            out["head"] = self.kind
        if self.stage in ("fit", "fewshot"):
            out["scale"] = self.scale
        out.update({k: (",".join(map(str, v)) if k == "shots" else v) for k, v in self.params.items()})
        return out


@dataclass(frozen=True)
class Reference:
    """A published figure the results are compared with: the cases it applies to (globs), the accuracy (a
    fraction), and where it was published."""

    cases: tuple[str, ...]
    accuracy: float
    source: str
    note: str = ""

    def applies_to(self, case: str) -> bool:
        return any(fnmatch.fnmatchcase(case, g) for g in self.cases)


@dataclass(frozen=True)
class Pipeline:
    """A pipeline file read, checked and expanded."""

    name: str
    file: Path | None
    data: dict[str, Any]          # path, layout, split, seed
    variants: tuple[Variant, ...]
    layers: tuple[str, ...]
    extract: dict[str, Any]       # batch_size, amp
    cases: tuple[Case, ...]
    references: tuple[Reference, ...]
    config: dict[str, Any]        # the resolved file (after --data, --weights, --set)

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(name)

    def select(self, only: str | None) -> list[Case]:
        """The cases whose name matches the glob ``only`` (all when None).

        Raises:
            UsageError: no case matches (the message lists them).
        """
        if not only:
            return list(self.cases)
        globs = [g.strip() for g in only.split(",") if g.strip()]
        chosen = [c for c in self.cases if any(fnmatch.fnmatchcase(c.name, g) for g in globs)]
        if not chosen:
            raise UsageError(f"--only {only!r} matches no case of {self.name}; its cases are: "
                             f"{', '.join(c.name for c in self.cases)}")
        return chosen

    def reference_for(self, case: str) -> Reference | None:
        """The first reference whose ``cases`` globs match ``case``."""
        return next((r for r in self.references if r.applies_to(case)), None)


# ============================================================================================== reading

def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML (``3``, ``0.1``, ``true``, ``[1, 10]``, ``"x"``), else the text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_set(config: dict, assignment: str) -> None:
    """Apply one ``--set KEY=VALUE`` (dotted key) to the raw file's mapping, creating tables on the way."""
    key, sep, value = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise UsageError(f"--set {assignment!r}: give KEY=VALUE with a dotted key, e.g. --set features.views=10 "
                         f"or --set heads.svm.C=[0.01,0.1]")
    *parents, last = key.split(".")
    node = config
    for i, p in enumerate(parents):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UsageError(f"--set {assignment!r}: {'.'.join(parents[:i + 1])} is a value, not a table")
        node = nxt
    node[last] = parse_value(value.strip())


def read(path: str | os.PathLike) -> dict:
    """The raw mapping of a pipeline file.

    Raises:
        PipelineError: missing file, or not valid TOML (with the line and column).
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"pipeline {str(path)!r} does not exist: give a .toml file such as "
                            f"pipelines/digits.toml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read pipeline {str(path)!r}: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(f"pipeline {p.name}: not valid TOML: {e}") from None


def load(path: str | os.PathLike, *, data: str | os.PathLike | None = None, weights: str | None = None,
         sets: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read, override, check and expand a pipeline file.

    Args:
        path: the TOML file.
        data: replaces ``data.path``.  weights: replaces every backbone's weights (``random``, ``imagenet`` or a
            file).  sets: ``KEY=VALUE`` assignments with dotted keys, applied last (``features.views=[1,10]``).

    Returns:
        The :class:`Pipeline` with its cases.

    Raises:
        PipelineError: one line naming the file and the key that is wrong, what it holds and what is allowed.

    Example:
        >>> p = load("pipelines/digits.toml", weights="random")  # doctest: +SKIP
        >>> [c.name for c in p.cases][:2]  # doctest: +SKIP
        ['pool5-svm', 'pool5-logreg']
    """
    raw = read(path)
    original = _copy(raw)
    if data is not None:
        raw.setdefault("data", {})
        if not isinstance(raw["data"], dict):
            raise PipelineError(f"pipeline {Path(path).name}: key data: must be a table [data]")
        raw["data"]["path"] = str(data)
    if weights is not None:
        raw.setdefault("features", {})
        if isinstance(raw["features"], dict):
            raw["features"]["weights"] = str(weights)
    for s in sets:
        apply_set(raw, s)
    return expand(raw, name=Path(path).stem, file=Path(path), original=original)


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj


# ============================================================================================== checking

class _Checker:
    """Type checks that raise one PipelineError naming the file and the key."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, msg: str) -> PipelineError:
        return PipelineError(f"pipeline {self.where}: key {key}: {msg}")

    def table(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table ([{key}]), not {_show(value)}")
        return value

    def known(self, table: dict, allowed: tuple[str, ...] | set[str], prefix: str) -> None:
        for k in table:
            if k not in allowed:
                raise self.fail(f"{prefix}{k}", f"unknown key; {prefix.rstrip('.') or 'the top level'} takes "
                                                f"{', '.join(allowed)}")

    def scalar(self, value: Any, key: str, types: tuple[type, ...], *, choices: tuple | None = None) -> Any:
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise self.fail(key, f"{_show(value)} is not {_typename(types)}")
        if choices is not None and value not in choices:
            raise self.fail(key, f"{_show(value)} is not one of {', '.join(map(str, choices))}")
        return value

    def one_or_list(self, value: Any, key: str, types: tuple[type, ...], *, choices: tuple | None = None) -> list:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise self.fail(key, "an empty list gives no case: give at least one value")
        out = []
        for v in values:
            v = self.scalar(v, key, types, choices=choices)
            if v not in out:
                out.append(v)
        return out


def _show(v: Any) -> str:
    if isinstance(v, dict):
        return "a table"
    return repr(v) if not isinstance(v, str) else f"{v!r}"


def _typename(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}
    return " or ".join(names.get(t, t.__name__) for t in types)


TOP_KEYS = ("name", "description", "data", "features", "heads", "search", "fewshot", "finetune", "reference")


def expand(raw: dict, *, name: str = "pipeline", file: Path | None = None, original: dict | None = None) -> Pipeline:
    """Check a pipeline's mapping and expand its grid into cases (see the module's docstring for the rule).

    ``original``: the mapping before command-line replacements; a value that varies in either one names cases,
    so that ``--weights random`` on a file that compares two weights keeps the names its ``from`` patterns use.

    Raises:
        PipelineError: the first key that is wrong, in the file's order of tables.
    """
    ck = _Checker(file.name if file is not None else name)
    ck.table(raw, "(top level)")
    ck.known(raw, TOP_KEYS, "")
    title = ck.scalar(raw.get("name", name), "name", (str,))
    ck.scalar(raw.get("description", ""), "description", (str,))
    data = _data(ck, raw.get("data", {}))
    grid = _features(ck, raw.get("features", {}), original)
    cases = _head_cases(ck, raw.get("heads", {}), grid) + _search_cases(ck, raw.get("search", {}), grid)
    curves = _fewshot_cases(ck, raw.get("fewshot", {}), grid)
    cases += curves + _finetune_cases(ck, raw.get("finetune", {}), grid, cases)  # fine-tunes start from heads
    _check_names(ck, cases)
    refs = _references(ck, raw.get("reference", []))
    return Pipeline(title, file, data, grid.variants, tuple(grid.layers), grid.extract, tuple(cases), refs, raw)


def _data(ck: _Checker, value: Any) -> dict[str, Any]:
    """``[data]``: path, layout, split, seed."""
    data = ck.table(value, "data")
    ck.known(data, ("path", "layout", "split", "seed"), "data.")
    if "path" not in data:
        raise ck.fail("data.path", "missing: give the data's folder or CSV file here or with --data PATH")
    d = {"path": ck.scalar(data["path"], "data.path", (str,)),
         "layout": ck.scalar(data.get("layout", "auto"), "data.layout", (str,)),
         "split": ck.scalar(data.get("split", ""), "data.split", (str,)) or None,
         "seed": ck.scalar(data.get("seed", 0), "data.seed", (int,))}
    if d["path"].startswith("sklearn:") and d["path"] not in BUILTIN_DATA:
        raise ck.fail("data.path", f"{d['path']!r}: the built-in data sets are {', '.join(BUILTIN_DATA)}")
    return d


@dataclass(frozen=True)
class _Grid:
    """``[features]`` read: the feature sets, the layers extracted into each, the extraction's options, and the
    feature values that name cases (those that vary in the file or after the command line's replacements)."""

    variants: tuple[Variant, ...]
    layers: list[str]
    extract: dict[str, Any]
    named: list[str]

    def label(self, v: Variant) -> dict[str, Any]:
        return {k: v.values()[k] for k in self.named}


def _features(ck: _Checker, value: Any, original: dict | None) -> _Grid:
    feats = ck.table(value, "features")
    ck.known(feats, (*FEATURE_GRID, "layers", "batch_size", "amp"), "features.")
    types: dict[str, tuple[type, ...]] = {"backbone": (str,), "weights": (str,), "views": (int,), "normalize": (str,)}
    choices: dict[str, tuple | None] = {"backbone": None, "weights": None, "views": VIEWS, "normalize": NORMALIZE}
    grid = {k: ck.one_or_list(feats.get(k, FEATURE_DEFAULTS[k]), f"features.{k}", types[k], choices=choices[k])
            for k in FEATURE_GRID}
    layers = ck.one_or_list(feats.get("layers", "pool5"), "features.layers", (str,))
    _check_backbones(ck, grid["backbone"], layers)
    extract_opts = {"batch_size": ck.scalar(feats.get("batch_size", 64), "features.batch_size", (int,)),
                    "amp": ck.scalar(feats.get("amp", False), "features.amp", (bool,))}
    if extract_opts["batch_size"] < 1:
        raise ck.fail("features.batch_size", f"{extract_opts['batch_size']} is not a positive number of images")
    variants = tuple(Variant(*combo) for combo in itertools.product(*(grid[k] for k in FEATURE_GRID)))
    orig = (original or {}).get("features")
    orig_feats = orig if isinstance(orig, dict) else {}
    named = [k for k in FEATURE_GRID if len(grid[k]) > 1 or _n_values(orig_feats.get(k)) > 1]
    return _Grid(variants, layers, extract_opts, named)


def _tables(ck: _Checker, value: Any, where: str) -> Iterator[tuple[str, str, dict]]:
    """The ``[WHERE.NAME]`` tables, in the file's order: NAME, the prefix of their keys, the table."""
    for group, table in ck.table(value, where).items():
        yield group, f"{where}.{group}.", ck.table(table, f"{where}.{group}")


def _head_kind(ck: _Checker, table: dict, where: str, group: str) -> str:
    """A ``[heads.NAME]``, ``[search.NAME]`` or ``[fewshot.NAME]`` table's head: its ``kind``, else its name."""
    kind = ck.scalar(table.get("kind", group), f"{where}.{group}.kind", (str,))
    if kind not in HEAD_KINDS:
        hint = "kind = \"svm\" (or logreg, mlp)" if where in ("heads", "fewshot") else "kind"
        raise ck.fail(f"{where}.{group}.kind" if "kind" in table else f"{where}.{group}",
                      f"{kind!r} is not a head: name the table after one of {', '.join(HEAD_KINDS)} or set {hint}")
    return kind


def _head_cases(ck: _Checker, value: Any, grid: _Grid) -> list[Case]:
    """``[heads.NAME]``: a case per feature set, layer and combination of the table's lists."""
    cases = []
    for group, prefix, table in _tables(ck, value, "heads"):
        kind = _head_kind(ck, table, "heads", group)
        g_layers = _sub_layers(ck, table, grid.layers, prefix)
        scales = ck.one_or_list(table.get("scale", "standard"), f"{prefix}scale", (str,),
                                choices=("standard", "l2", "none"))
        params = {k: ck.one_or_list(v, f"{prefix}{k}", (str, int, float, bool))
                  for k, v in table.items() if k not in ("kind", "layers", "scale")}
        _check_head_params(ck, kind, params, prefix)
        axes = {"scale": scales, **params}
        varying = [k for k, vs in axes.items() if len(vs) > 1]
        for v in grid.variants:
            for layer in g_layers:
                for combo in itertools.product(*axes.values()):
                    vals = dict(zip(axes, combo))
                    scale = vals.pop("scale")
                    label = {**grid.label(v), "layer": layer, "group": group,
                             **{k: (scale if k == "scale" else vals[k]) for k in varying}}
                    cases.append(Case(_name(label), "fit", group, v, layer, kind, vals, scale, labels=label))
    return cases


def _search_cases(ck: _Checker, value: Any, grid: _Grid) -> list[Case]:
    """``[search.NAME]``: a case per feature set and layer."""
    cases = []
    for group, prefix, table in _tables(ck, value, "search"):
        ck.known(table, SEARCH_KEYS, prefix)
        kind = _head_kind(ck, table, "search", group)
        opts = {"trials": ck.scalar(table.get("trials", 20), f"{prefix}trials", (int,)),
                "sampler": ck.scalar(table.get("sampler", "tpe"), f"{prefix}sampler", (str,),
                                     choices=("tpe", "random")),
                "cv": ck.scalar(table.get("cv", 3), f"{prefix}cv", (int,))}
        if opts["trials"] < 1:
            raise ck.fail(f"{prefix}trials", f"{opts['trials']}: a search needs at least 1 trial")
        if opts["cv"] < 2:
            raise ck.fail(f"{prefix}cv", f"{opts['cv']}: cross-validation needs at least 2 folds")
        for v in grid.variants:
            for layer in _sub_layers(ck, table, grid.layers, prefix):
                label = {**grid.label(v), "layer": layer, "group": f"search-{group}"}
                cases.append(Case(_name(label), "search", f"search.{group}", v, layer, kind, opts, labels=label))
    return cases


def _fewshot_cases(ck: _Checker, value: Any, grid: _Grid) -> list[Case]:
    """``[fewshot.NAME]``: a few-shot curve per feature set, layer and combination of the head's parameters' lists
    (``shots`` is the curve's list of k, not a list to expand)."""
    cases = []
    for group, prefix, table in _tables(ck, value, "fewshot"):
        kind = _head_kind(ck, table, "fewshot", group)
        scale = ck.scalar(table.get("scale", "standard"), f"{prefix}scale", (str,), choices=("standard", "l2", "none"))
        shots = sorted(ck.one_or_list(table.get("shots", FEWSHOT_DEFAULTS["shots"]), f"{prefix}shots", (int,)))
        if shots[0] < 1:
            raise ck.fail(f"{prefix}shots", f"{shots[0]}: give numbers of train images per class, each at least 1")
        draws = ck.scalar(table.get("draws", FEWSHOT_DEFAULTS["draws"]), f"{prefix}draws", (int,))
        if draws < 1:
            raise ck.fail(f"{prefix}draws", f"{draws}: a curve needs at least 1 draw per k")
        params = {k: ck.one_or_list(v, f"{prefix}{k}", (str, int, float, bool))
                  for k, v in table.items() if k not in FEWSHOT_KEYS}
        _check_head_params(ck, kind, params, prefix, extra="kind, layers, scale, shots, draws")
        varying = [k for k, vs in params.items() if len(vs) > 1]
        for v in grid.variants:
            for layer in _sub_layers(ck, table, grid.layers, prefix):
                for combo in itertools.product(*params.values()):
                    vals = dict(zip(params, combo))
                    label = {**grid.label(v), "layer": layer, "group": f"fewshot-{group}",
                             **{k: vals[k] for k in varying}}
                    cases.append(Case(_name(label), "fewshot", f"fewshot.{group}", v, layer, kind,
                                      {"shots": tuple(shots), "draws": draws, **vals}, scale, labels=label))
    return cases


def _finetune_cases(ck: _Checker, value: Any, grid: _Grid, sources: list[Case]) -> list[Case]:
    """``[finetune.NAME]``: per backbone and weights among the cases ``from`` names (its candidates), a case per
    combination of the table's lists."""
    cases = []
    for group, prefix, table in _tables(ck, value, "finetune"):
        ck.known(table, ("from", *FINETUNE_OPTIONS), prefix)
        nets = _candidates(ck, table, prefix, sources)
        opts = {k: ck.one_or_list(v, f"{prefix}{k}", (str, int, float, bool)) for k, v in table.items() if k != "from"}
        varying = [k for k, vs in opts.items() if len(vs) > 1]
        for (bb, w), cands in nets.items():
            for combo in itertools.product(*opts.values()):
                vals = dict(zip(opts, combo))
                label = {**{k: {"backbone": bb, "weights": w}[k] for k in grid.named if k in ("backbone", "weights")},
                         "group": f"finetune-{group}", **{k: vals[k] for k in varying}}
                cases.append(Case(_name(label), "finetune", f"finetune.{group}", None, None, None, vals,
                                  candidates=tuple(c.name for c in cands),
                                  labels={**label, "backbone": bb, "weights": w}))
    return cases


def _candidates(ck: _Checker, table: dict, prefix: str, sources: list[Case]) -> dict[tuple[str, str], list[Case]]:
    """The head and search cases a fine-tune's ``from`` names (globs of case names, or group names), in the file's
    order, by backbone and weights."""
    pats = ck.one_or_list(table.get("from", "*"), f"{prefix}from", (str,))
    matched = [c for c in sources if any(fnmatch.fnmatchcase(c.name, p) or c.group in (p, f"search.{p}")
                                         or p == f"heads.{c.group}" for p in pats)]
    if not matched:
        raise ck.fail(f"{prefix}from", f"{', '.join(map(repr, pats))} matches no head or search case; the cases "
                                       f"are: {', '.join(c.name for c in sources) or '(none)'}")
    nets: dict[tuple[str, str], list[Case]] = {}
    for c in matched:
        assert c.variant is not None  # head and search cases have a feature set
        nets.setdefault((c.variant.backbone, c.variant.weights), []).append(c)
    return nets


def _check_names(ck: _Checker, cases: list[Case]) -> None:
    if not cases:
        raise ck.fail("heads", "the pipeline has no case: add a [heads.svm] (or logreg, mlp) table, a [search.NAME], "
                               "a [fewshot.NAME] or a [finetune.NAME]")
    seen: set[str] = set()
    for c in cases:
        if c.name in seen:
            raise ck.fail(c.group, f"two cases are both named {c.name!r}: give the groups different names")
        seen.add(c.name)


def _references(ck: _Checker, value: Any) -> tuple[Reference, ...]:
    """``[[reference]]``: each with its case globs, accuracy (a fraction), source and note."""
    refs_raw = [value] if isinstance(value, dict) else value
    if not isinstance(refs_raw, list):
        raise ck.fail("reference", "must be [[reference]] tables, each with accuracy and source")
    refs = []
    for i, r in enumerate(refs_raw):
        key = f"reference[{i}]"
        r = ck.table(r, key)
        ck.known(r, ("cases", "accuracy", "source", "note"), f"{key}.")
        if "accuracy" not in r or "source" not in r:
            raise ck.fail(f"{key}.{'accuracy' if 'accuracy' not in r else 'source'}",
                          "missing: a reference needs the published accuracy and its source")
        acc = ck.scalar(r["accuracy"], f"{key}.accuracy", (int, float))
        if not 0 <= acc <= 1:
            raise ck.fail(f"{key}.accuracy", f"{acc} is not a fraction: write 69.75% as 0.6975")
        refs.append(Reference(tuple(ck.one_or_list(r.get("cases", "*"), f"{key}.cases", (str,))), float(acc),
                              ck.scalar(r["source"], f"{key}.source", (str,)),
                              ck.scalar(r.get("note", ""), f"{key}.note", (str,))))
    return tuple(refs)


def _n_values(v: Any) -> int:
    return len(set(map(repr, v))) if isinstance(v, list) else (0 if v is None else 1)


def _sub_layers(ck: _Checker, table: dict, layers: list[str], prefix: str) -> list[str]:
    if "layers" not in table:
        return list(layers)
    sub = ck.one_or_list(table["layers"], f"{prefix}layers", (str,))
    bad = [l for l in sub if l not in layers]
    if bad:
        raise ck.fail(f"{prefix}layers", f"{bad[0]!r} is not extracted: features.layers holds {', '.join(layers)}")
    return sub


def _check_head_params(ck: _Checker, kind: str, params: dict, prefix: str, *,
                       extra: str = "kind, layers, scale") -> None:
    """A parameter the head does not have is a mistake in the file (a bad value is a failed case, at fit time)."""
    from featx.fit import make_head

    valid = sorted(set(make_head(kind, {}).get_params()) - {"device", "epoch_callback"})
    for k in params:
        if k not in valid:
            raise ck.fail(f"{prefix}{k}", f"{kind} has no parameter {k!r}: its parameters are {', '.join(valid)} "
                                          f"(and {extra})")


def _check_backbones(ck: _Checker, backbones: list[str], layers: list[str]) -> None:
    from featx.backbones import BACKBONES  # the registry is data; importing it pulls torchvision

    for b in backbones:
        spec = BACKBONES.get(b)
        if spec is None:
            raise ck.fail("features.backbone", f"{b!r} is not a backbone: use one of {', '.join(sorted(BACKBONES))}")
        bad = [l for l in layers if l not in spec.dims]
        if bad:
            raise ck.fail("features.layers",
                          f"{bad[0]!r} is not a layer of {b}: its layers are {', '.join(spec.layers)}")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _name(label: dict[str, Any]) -> str:
    """``{views: 10, layer: fc7, group: svm, C: 0.1}`` -> ``views=10-fc7-svm-C=0.1``: layers, groups, backbones
    and weights stand alone; other values say what they are."""
    parts = []
    for k, v in label.items():
        if k in ("layer", "group", "backbone"):
            parts.append(_fmt(v))
        elif k == "weights":
            parts.append(Path(str(v)).stem if os.sep in str(v) or str(v).endswith((".pt", ".pth")) else _fmt(v))
        else:
            parts.append(f"{k}={_fmt(v)}")
    return "-".join(parts)
