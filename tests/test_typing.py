"""The shipped type hints (py.typed) accept the documented calls: mypy --strict on a user
script, ``tests/user_code/usage.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USAGE = Path(__file__).resolve().parent / "user_code" / "usage.py"


def test_documented_calls_type_check(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path), str(USAGE)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the installed package, as a user's project sees it
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
