"""Deferred imports of heavy dependencies, so that ``import mlsml`` stays fast.

``scipy.stats`` alone takes about as long to import as pandas (it builds the
docstrings of ~130 distributions), and statsmodels' formula machinery pulls in
patsy, formulaic and much of statsmodels. A module that needs one of them only
inside its functions binds a :class:`LazyModule` instead of the module::

    stats = LazyModule("scipy.stats")  # imported on the first stats.<name>

and writes ``stats.norm.sf(...)`` as before. The import happens once, on the
first attribute access; nothing is put into ``sys.modules`` before that.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """A module that is imported on its first attribute access.

    Parameters
    ----------
    name : str
        The absolute module name, e.g. ``"scipy.stats"``.

    Examples
    --------
    >>> math = LazyModule("math")
    >>> math.sqrt(4.0)
    2.0
    >>> math
    <LazyModule 'math' (imported)>
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        if attr in ("_name", "_module") or (attr.startswith("__") and attr.endswith("__")):
            raise AttributeError(attr)  # introspection (copy, pickle, doctest) must not import
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not yet imported"
        return f"<LazyModule {self._name!r} ({state})>"
