"""Print pip constraints that pin every dependency of setup.cfg to its floor: ``name>=X`` becomes ``name==X``.

    python .ci/floors.py > constraints.txt
    pip install -c constraints.txt -e '.[dev]'

Read: ``install_requires`` and the extras users install (``postgres``, ``tensorboard``); the ``dev`` extra's test
tools (pytest, ruff, mypy) are not featx's dependencies and are left to pip.  Environment markers are kept, and a
name's extras are dropped (pip's constraints cannot carry them; ``psycopg[binary]`` pins ``psycopg-binary`` itself).
"""
from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

EXTRAS = ("postgres", "tensorboard")
REQ = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*(?P<floor>[^,;\s]+)\s*(?P<marker>;.*)?$")


def floors(setup_cfg: Path) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in EXTRAS:
        lines += cfg["options.extras_require"][extra].splitlines()
    out: dict[str, str] = {}
    for line in (s.split("#")[0].strip() for s in lines):
        m = REQ.match(line)
        if m is None:
            if line:
                raise SystemExit(f"floors.py: {line!r} in {setup_cfg} has no `>=` floor")
            continue
        out.setdefault(m["name"].lower(), f"{m['name']}=={m['floor']}{m['marker'] or ''}")
    return list(out.values())


if __name__ == "__main__":
    print("\n".join(floors(Path(sys.argv[1] if len(sys.argv) > 1 else "setup.cfg"))))
