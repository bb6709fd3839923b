"""How many threads the BLAS library (OpenBLAS, MKL, ...) may use while mlsml fits a model.

A fit multiplies and factorises many small matrices (a few dozen columns, or the
d x d blocks of hundreds of schools) and a few N x p ones: too little work per call
for a BLAS thread pool to pay for waking its threads. numpy's wheels ship a
multi-threaded OpenBLAS that uses every core by default; on a 2-core machine that
made the London fits up to 5 times slower than with one thread as soon as anything
else ran on the machine, because OpenBLAS threads spin while they wait for a core
(``bench/README.md``). A user who never heard of ``OPENBLAS_NUM_THREADS`` should
not pay for that, so :meth:`mlsml.MELSM.fit` and :func:`mlsml.fit` run under
:func:`limit_blas_threads` (through the decorator :func:`blas_limited`), which sets
the limit for the duration of the fit with threadpoolctl and puts the caller's
setting back afterwards.

Set :data:`FIT_BLAS_THREADS` to another number, or to ``None`` to leave the BLAS
library alone, e.g. ``mlsml.threads.FIT_BLAS_THREADS = None``.

Threads of the caller: the BLAS thread pool is shared by the whole process, so
only one limit can be in force. The first fit to start (in any Python thread)
sets it and restores the previous setting when it ends; fits started while it
runs (nested, or in other Python threads) leave the setting alone.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import threadpoolctl

#: BLAS threads during a fit (``None``: leave the BLAS library's setting alone). One
#: thread: on the London benchmarks (``bench/bench_engine.py``) no fit was slower with
#: one thread than with the default pool on an idle 2-core machine, and all were much
#: faster with one thread when the machine had other work.
FIT_BLAS_THREADS: int | None = 1

_F = TypeVar("_F", bound=Callable)

_LOCK = threading.Lock()
#: The Python thread whose fit set the current limit (``None``: no limit set by mlsml).
_owner: threading.Thread | None = None


@contextmanager
def limit_blas_threads(limit: int | None = None) -> Iterator[None]:
    """Limit the BLAS thread pool for the duration of a ``with`` block (or a decorated call).

    Parameters
    ----------
    limit : int, optional
        Threads for the BLAS libraries loaded in the process; default
        :data:`FIT_BLAS_THREADS` (read at call time). ``None`` there means no limit.

    Notes
    -----
    The limit is set with ``threadpoolctl.threadpool_limits(limit, user_api="blas")``
    and the previous number of threads of every BLAS library is restored on exit,
    also when the block raises. While a limit set here is in force, further calls
    (nested, or from other Python threads) change nothing: the thread pool is
    process-wide, and the call that set the limit is the one that restores it.

    Examples
    --------
    >>> import numpy as np
    >>> from threadpoolctl import threadpool_info
    >>> before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    >>> with limit_blas_threads(1):
    ...     inside = {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    >>> inside <= {1}
    True
    >>> [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before
    True
    """
    global _owner
    if limit is None:
        limit = FIT_BLAS_THREADS
    with _LOCK:
        mine = limit is not None and _owner is None
        if mine:
            _owner = threading.current_thread()
    if not mine:
        yield
        return
    try:
        with threadpoolctl.threadpool_limits(limits=limit, user_api="blas"):
            yield
    finally:
        with _LOCK:
            _owner = None


def blas_limited(fn: _F) -> _F:
    """Decorator: run ``fn`` under :func:`limit_blas_threads` (with :data:`FIT_BLAS_THREADS`).

    A plain wrapper rather than the context manager used as a decorator, so that the
    frame between the user's call and ``fn`` belongs to mlsml and warnings are still
    attributed to the user's line (:func:`mlsml.errors.find_stack_level`).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with limit_blas_threads():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
