"""Run the examples of the docstrings and of the documentation pages as tests.

Docstrings: equivalent to ``pytest --doctest-modules mlsml``, but part of the
normal suite so that CI runs it; each module is one test. The examples use small
simulated data (``mlsml.simulate.demo_data(n_groups=40, seed=1)``) and run in
seconds.

Pages: every fenced ```` ```python ```` block of ``docs/*.md`` and ``README.md``
is run, in page order, in one namespace per page (so a page fits its models
once and later blocks reuse them), in an empty temporary folder. A block that
cannot run on a user's machine is preceded by an HTML comment (invisible in the
rendered page) that says so and why:

- ``<!-- docs-test: skip -- reason -->``: not run (e.g. it needs ``../shared``);
- ``<!-- docs-test: raises ExceptionName -->``: must raise that exception (a
  block that shows an error message);
- ``<!-- docs-test: warns WarningName -->``: must issue that warning.

A marker without a reason, or any other marker, fails the test.
"""

from __future__ import annotations

import builtins
import doctest
import importlib
import pkgutil
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import mlsml

#: Every module, those of subpackages (``mlsml.mixregls.convert``, ...) included: the examples of a
#: function are found only in the module that defines it, not in a package that re-exports it.
MODULES = sorted(["mlsml"] + [m.name for m in pkgutil.walk_packages(mlsml.__path__, "mlsml.") if m.name != "mlsml.__main__"])
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"


def test_public_api_has_examples():
    """Every public function and class of the top-level API carries a runnable example."""
    missing = []
    for name in mlsml.__all__:
        obj = getattr(mlsml, name)
        if isinstance(obj, type) and issubclass(obj, (Exception, Warning)):
            continue
        if name.startswith("__") or type(obj).__name__ == "module":
            continue
        if ">>>" not in (obj.__doc__ or ""):
            missing.append(name)
    assert not missing, f"no Examples section in: {missing}"


# ---------------------------------------------------------------- documentation pages

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*docs-test:(?P<text>(?:(?!-->).)*)-->\s*\Z", re.S)  # right before the fence
PYTHON_INFO = {"python", "python3", "py"}

#: Pages whose examples take more than a few seconds (a bootstrap with real refits).
SLOW_PAGES = {"bootstrap.md"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    code: str
    action: str  # "run", "skip", "raises" or "warns"
    arg: str  # the reason of a skip, or the exception or warning class name


def page_blocks(path: Path) -> list[Block]:
    """The fenced python blocks of a Markdown page, with their docs-test markers."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        info = m.group("info").strip()
        if info not in PYTHON_INFO:
            continue
        line = text.count("\n", 0, m.start()) + 1
        code = textwrap.dedent(m.group("body"))
        action, arg = "run", ""
        marker = MARKER.search(text[: m.start()].rstrip() + "\n")
        if marker:
            words = marker.group("text").strip()
            if words.startswith("skip"):
                action, arg = "skip", words[4:].strip(" -:")
                assert arg, f"{path.name}:{line}: a docs-test skip marker must say why"
            elif words.startswith(("raises", "warns")):
                action, arg = words.split(None, 1)[0], words.split(None, 1)[1:]
                arg = arg[0].strip() if arg else ""
                assert re.fullmatch(r"[A-Za-z_]\w*", arg), f"{path.name}:{line}: '{action}' needs one exception or warning name"
            else:
                raise AssertionError(f"{path.name}:{line}: unknown docs-test marker {words!r}")
        blocks.append(Block(path.name, line, code, action, arg))
    return blocks


PAGES_WITH_CODE = [p for p in PAGES if page_blocks(p)]


def _page_param(path: Path):
    marks = [pytest.mark.slow] if path.name in SLOW_PAGES else []
    return pytest.param(path, id=path.name, marks=marks)


@pytest.mark.parametrize("path", [_page_param(p) for p in PAGES_WITH_CODE])
def test_documentation_page_runs(path, tmp_path, monkeypatch):
    """Every python block of the page runs (or raises what it says it raises)."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__docs__"}
    try:
        for block in page_blocks(path):
            if block.action == "skip":
                continue
            code = compile(block.code, f"{block.page}, block at line {block.line}", "exec")
            if block.action in ("raises", "warns"):
                cls = getattr(mlsml, block.arg, None) or getattr(builtins, block.arg)
                with pytest.raises(cls) if block.action == "raises" else pytest.warns(cls):
                    exec(code, ns)
            else:
                exec(code, ns)
    finally:
        plt.close("all")


def test_every_python_example_of_the_docs_is_collected():
    """No python example hides in a fence the runner does not read (```py3, ```{code-block} python, >>>)."""
    hidden = []
    for path in PAGES:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            info = m.group("info").strip()
            if info in PYTHON_INFO or info in {"bash", "text", "console", "none", ""} or info.startswith("{"):
                if info.startswith("{") and "python" in info:
                    hidden.append(f"{path.name}: {info}")
                continue
            hidden.append(f"{path.name}: ```{info}")
        if re.search(r"^>>> ", text, re.M):
            hidden.append(f"{path.name}: a >>> prompt outside a python block")
    assert not hidden, hidden


def test_skip_markers_are_few_and_justified():
    skipped = [b for p in PAGES for b in page_blocks(p) if b.action == "skip"]
    for b in skipped:
        assert len(b.arg.split()) >= 3, f"{b.page}:{b.line}: say why the block cannot run ({b.arg!r})"
    n_blocks = sum(len(page_blocks(p)) for p in PAGES)
    assert len(skipped) <= n_blocks // 5, [f"{b.page}:{b.line}" for b in skipped]


def test_extras_named_in_the_docs_exist():
    """`pip install "mlsml[plot]"` etc.: every extra a page names is one that setup.cfg defines."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = set(cfg["options.extras_require"])
    named = {}
    for path in PAGES:
        for m in re.finditer(r"(?:mlsml|\.)\[([A-Za-z0-9_,\- ]+)\]", path.read_text(encoding="utf-8")):
            for extra in m.group(1).split(","):
                named.setdefault(extra.strip(), set()).add(path.name)
    assert named, "no page names an extra (the pattern is wrong)"
    unknown = {e: sorted(p) for e, p in named.items() if e not in extras}
    assert not unknown, f"extras named in the docs but not defined in setup.cfg: {unknown}"
