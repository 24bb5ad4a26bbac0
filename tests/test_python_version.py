"""The Python version the README promises is the one the code needs.

CI runs a newer Python, so the tests alone would never notice a standard-library API newer than the claim
(hashlib.file_digest, 3.11, once crashed --site-thresholds on 3.10). vermin reads the code and names the
minimum version of every construct it uses.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_no_code_needs_a_newer_python_than_the_readme_says():
    claim = re.search(r"Python (3\.\d+)\+", (ROOT / "README.md").read_text())
    assert claim, "the README's Quick start names no 'Python 3.N+'"
    sources = ["tbcxr", *map(str, ROOT.glob("*.py")), "benchmarks", "tests"]
    # --exclude long: vermin takes torch.long for Python 2's long.
    command = [
        str(Path(sys.executable).with_name("vermin")),
        "-q",
        f"-t={claim[1]}-",
        "--violations",
        "--eval-annotations",
    ]
    result = subprocess.run([*command, "--exclude", "long", *sources], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"code that needs more than Python {claim[1]}:\n{result.stdout}{result.stderr}"
