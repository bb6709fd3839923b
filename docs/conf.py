"""Sphinx configuration of the mlsml documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` (warnings are
errors). Pages are Markdown (myst-parser); the API reference is autodoc +
numpydoc from the docstrings.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the checkout, not an installed copy

import mlsml  # noqa: E402

project = "mlsml"
author = "the mlsml developers"
copyright = "the mlsml developers"
release = mlsml.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # numpydoc sections carry the types
autodoc_default_options = {"members": True, "show-inheritance": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"mlsml {release}"

# Pages written in parallel by other work (predictions, failures) are listed in
# index.md's toctree; drop an entry whose page is absent so that the build stays
# warning-free either way.
OPTIONAL_PAGES = ("predictions", "failures")


def _drop_absent_optional_pages(app, docname, source):
    if docname != "index":
        return
    text = source[0]
    for page in OPTIONAL_PAGES:
        if not (DOCS / f"{page}.md").exists() and not (DOCS / f"{page}.rst").exists():
            text = re.sub(rf"(?m)^{page}\n", "", text)
    source[0] = text


def setup(app):
    app.connect("source-read", _drop_absent_optional_pages)
