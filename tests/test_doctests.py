"""Run the Examples sections of the docstrings of every mlsml module as tests.

Equivalent to ``pytest --doctest-modules mlsml``, but part of the normal suite so
that CI runs it; each module is one test. The examples use small simulated data
(``mlsml.simulate.demo_data(n_groups=40, seed=1)``) and run in seconds.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mlsml

MODULES = sorted(["mlsml"] + [f"mlsml.{m.name}" for m in pkgutil.iter_modules(mlsml.__path__) if m.name != "__main__"])
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
