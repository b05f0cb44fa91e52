"""The layout of the featx package: no module over 700 lines, no function over 100 lines, and no module reaching
into the private (underscore) names of another package (a module's own package's siblings are fine)."""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

FEATX = Path(__file__).resolve().parent.parent / "featx"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 100


def modules() -> list[Path]:
    return sorted(FEATX.rglob("*.py"))


def dotted(path: Path) -> str:
    """``featx/run/stages.py`` -> ``featx.run.stages``; ``featx/run/__init__.py`` -> ``featx.run``."""
    parts = list(path.relative_to(FEATX.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to the package itself)."""
    name = dotted(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def is_package(name: str) -> bool:
    return (FEATX.parent / Path(*name.split(".")) / "__init__.py").is_file()


def private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def reaches(path: Path) -> Iterator[str]:
    """Every private name of another package that the module imports or reads: ``from featx.X import _name``,
    ``import featx.X._mod``, ``featx.X._name``."""
    mine = package_of(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolved against the module's own package
                up = mine.split(".")[: len(mine.split(".")) - (node.level - 1)]
                base = ".".join([*up, node.module])
            targets = [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
            chain = []
            cur: ast.expr = node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "featx":
                targets = [".".join(["featx", *reversed(chain)])]
        for t in targets:
            parts = t.split(".")
            if parts[0] != "featx":
                continue
            for i, part in enumerate(parts[1:], start=1):
                if not private(part):
                    continue
                owner = ".".join(parts[:i])  # the module or package the private name belongs to
                owner_pkg = owner if is_package(owner) else owner.rpartition(".")[0]
                if owner_pkg != mine:
                    yield f"{dotted(path)} -> {t}"
                break


def long_functions(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                yield f"{path.relative_to(FEATX.parent)}:{node.lineno} {node.name}: {n} lines"


def test_no_module_over_700_lines():
    long = [f"{p.relative_to(FEATX.parent)}: {n} lines" for p in modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, long


def test_no_function_over_100_lines():
    long = [f for p in modules() for f in long_functions(p)]
    assert not long, long


def test_no_reach_into_another_packages_private_names():
    found = [r for p in modules() for r in reaches(p)]
    assert not found, found


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    """The checks themselves, on a small package tree: a reach across packages is found, a sibling's is not."""
    root = tmp_path / "featx"
    for d in ("", "a", "b"):
        (root / d).mkdir(exist_ok=True)
        (root / d / "__init__.py").write_text("")
    (root / "a" / "_impl.py").write_text("def _helper():\n    pass\n")
    (root / "a" / "sibling.py").write_text("from featx.a._impl import _helper\nfrom featx.a import _impl\n")
    (root / "b" / "far.py").write_text("import featx.a._impl\nfrom featx.a._impl import x\n"
                                       "from featx.a.sibling import _y\nv = featx.a._impl\n")
    (root / "top.py").write_text("from featx.b.far import _z\nfrom featx.b import far\n\n\ndef f():\n"
                                 + "    x = 1\n" * (MAX_FUNCTION_LINES) + "    return x\n")
    monkeypatch.setattr(sys.modules[__name__], "FEATX", root)
    assert list(reaches(root / "a" / "sibling.py")) == []
    assert list(reaches(root / "b" / "far.py")) == ["featx.b.far -> featx.a._impl", "featx.b.far -> featx.a._impl.x",
                                                    "featx.b.far -> featx.a.sibling._y", "featx.b.far -> featx.a._impl"]
    assert list(reaches(root / "top.py")) == ["featx.top -> featx.b.far._z"]
    assert [f.split(" ", 1)[1] for f in long_functions(root / "top.py")] == [f"f: {MAX_FUNCTION_LINES + 2} lines"]
