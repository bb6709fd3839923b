"""What ``import mlsml`` gives: every documented name, and no heavy optional dependency.

Both checks run in a fresh interpreter, since this test session has long since
imported everything.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: ``mlsml.name`` or ``mlsml.name.attr...`` as written in the docs (not ``mlsml`` inside a longer word or path).
DOC_REFERENCE = re.compile(r"(?<![\w./-])mlsml((?:\.[A-Za-z_]\w*)+)")

#: Imported only when a function that needs them runs (``import mlsml`` must stay fast).
HEAVY = ("scipy.stats", "statsmodels", "patsy", "formulaic", "matplotlib")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def documented_references() -> dict[str, str]:
    """Each dotted ``mlsml.X...`` reference of the README and docs pages, with the first file naming it."""
    refs: dict[str, str] = {}
    for path in DOC_FILES:
        for m in DOC_REFERENCE.finditer(path.read_text()):
            refs.setdefault(m.group(1)[1:], path.name)
    return refs


def test_the_docs_name_submodules():
    refs = documented_references()
    assert "mixwild.to_mixregls" in refs and "profile" in refs  # the ones the issue reported
    assert len({r.split(".")[0] for r in refs}) >= 10


def test_every_documented_reference_resolves_after_a_plain_import():
    refs = documented_references()
    code = (
        "import json, sys, mlsml\n"
        f"refs = {json.dumps(sorted(refs))}\n"
        "bad = []\n"
        "for ref in refs:\n"
        "    obj = mlsml\n"
        "    try:\n"
        "        for part in ref.split('.'):\n"
        "            obj = getattr(obj, part)\n"
        "    except AttributeError as exc:\n"
        "        bad.append(f'mlsml.{ref}: {exc}')\n"
        "print(json.dumps(bad))\n"
    )
    p = _run(code)
    assert p.returncode == 0, p.stderr
    bad = json.loads(p.stdout)
    assert bad == [], "\n".join(f"{b} (in {refs[b.split(':')[0][6:]]})" for b in bad)


def test_submodules_are_attributes_and_listed():
    p = _run(
        "import mlsml, json\n"
        "print(json.dumps([mlsml.mixwild.__name__, mlsml.profile.__name__, 'mixwild' in dir(mlsml), 'plots' in dir(mlsml)]))"
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == ["mlsml.mixwild", "mlsml.profile", True, True]


def test_unknown_attribute_is_an_attribute_error():
    p = _run(
        "import mlsml\n"
        "for name in ('no_such_thing', '_private'):\n"
        "    try:\n"
        "        getattr(mlsml, name)\n"
        "    except AttributeError as exc:\n"
        "        print(exc)\n"
        "print(hasattr(mlsml, 'no_such_thing'))\n"
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "module 'mlsml' has no attribute 'no_such_thing'"
    assert lines[1] == "module 'mlsml' has no attribute '_private'"
    assert lines[2] == "False"


def test_import_does_not_load_heavy_dependencies():
    """``import mlsml`` (and the CLI's parser) leave scipy.stats, statsmodels, patsy and matplotlib unimported.

    A structural check of the import-time work (bench/bench_import.py measures the time): these
    modules are imported where they are first used.
    """
    p = _run(
        "import sys, json, mlsml, mlsml.cli\n"
        "mlsml.cli.build_parser()\n"
        f"heavy = {list(HEAVY)!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))))"
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == []


def test_heavy_dependencies_load_when_first_used():
    p = _run(
        "import sys, mlsml\n"
        "df = mlsml.simulate.demo_data(n_groups=20, seed=1)\n"
        "res = mlsml.fit('y ~ x', df, groups='school', random_scale=False)\n"
        "print('patsy' in sys.modules)\n"
        "p = res.pvalues\n"
        "print(bool((p >= 0).all()), 'scipy.stats' in sys.modules)\n"
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "True"]
