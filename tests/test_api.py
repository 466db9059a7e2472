"""The public API as the README and the package docstring name it, reachable from ``import
diskivf`` alone (run in a fresh interpreter, so no earlier import of a submodule can help)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import diskivf

README = Path(__file__).resolve().parents[1] / "README.md"
# Dotted names such as ``diskivf.build.build`` or ``diskivf.ShardedIndex.open``, as written in
# the README's API block and the package docstring.
NAME_RE = re.compile(r"\bdiskivf((?:\.[A-Za-z_]\w*)+)")


def _api_block() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## API")
    block = text[start:]
    return block[block.index("```python") : block.index("```", block.index("```python") + 3)]


def _names() -> list[str]:
    found = NAME_RE.findall(_api_block()) + NAME_RE.findall(diskivf.__doc__ or "")
    return sorted({"diskivf" + dotted for dotted in found})


def test_readme_names_found() -> None:
    names = _names()
    # The parse itself must find the API, or the next test would pass on nothing.
    for expected in (
        "diskivf.open",
        "diskivf.info",
        "diskivf.build.build",
        "diskivf.merge_indexes",
    ):
        assert expected in names


def test_every_documented_name_resolves_after_plain_import() -> None:
    # The star import runs first: it fails if __all__ names anything the package lacks.
    names = _names() + [f"diskivf.{n}" for n in diskivf.__all__]
    code = (
        "import sys, diskivf\n"
        "from diskivf import *\n"
        "missing = []\n"
        "for dotted in sys.argv[1:]:\n"
        "    obj = diskivf\n"
        "    try:\n"
        "        for part in dotted.split('.')[1:]:\n"
        "            obj = getattr(obj, part)\n"
        "    except AttributeError:\n"
        "        missing.append(dotted)\n"
        "print(' '.join(missing))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == []
