"""The documentation builds without a single warning (``sphinx-build -W``).

Needs the ``docs`` extra (``pip install -e ".[docs]"``; CI installs it); skipped
without Sphinx, numpydoc or myst-parser.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
    for mod in ("sphinx", "numpydoc", "myst_parser"):
        pytest.importorskip(mod)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (tmp_path / "html" / "index.html").exists()
    api = (tmp_path / "html" / "api.html").read_text()
    for name in ("mlsml.fit", "MELSMResults", "lrtest", "compare_models", "bootstrap", "DataError"):
        assert name in api, f"{name} missing from the API reference"
