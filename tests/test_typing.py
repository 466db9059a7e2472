"""The shipped type hints (py.typed) accept the documented calls: mypy --strict on a user
script, ``tests/user_code/usage.py``; and the package and tools pass the project's own mypy
configuration (strict), as the README's development check runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USAGE = Path(__file__).resolve().parent / "user_code" / "usage.py"
REPO = Path(__file__).resolve().parent.parent


def test_documented_calls_type_check(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path), str(USAGE)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the installed package, as a user's project sees it
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_package_and_tools_type_check(tmp_path: Path) -> None:
    # pyproject.toml's [tool.mypy] names the files: diskivf/ and tools/. Left to the README's
    # development check alone, tools/ had drifted to 22 errors.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout
