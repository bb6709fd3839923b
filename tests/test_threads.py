"""BLAS thread control during fits (mlsml.threads)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import mlsml
from mlsml import threads


def blas_threads() -> list[int]:
    """The thread count of every BLAS library loaded in the process."""
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def data():
    return mlsml.simulate.demo_data(n_groups=30, seed=2)


def test_a_fit_runs_with_one_blas_thread_and_restores_the_callers_setting():
    seen = []
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        res = mlsml.fit("y ~ x", data(), groups="school", scale_formula="~ x", callback=lambda *a: seen.append(blas_threads()))
        assert blas_threads() == before
    assert res.converged
    assert seen and all(set(s) <= {threads.FIT_BLAS_THREADS} for s in seen)


def test_the_setting_is_restored_when_the_fit_raises():
    before = blas_threads()

    def stop(*args):
        raise KeyboardInterrupt

    model = mlsml.MELSM.from_formula("y ~ x", data(), groups="school")
    with pytest.raises(KeyboardInterrupt):
        model.fit(callback=stop)
    assert blas_threads() == before
    assert threads._owner is None


def test_the_limit_does_not_change_the_fit(monkeypatch):
    df = data()
    limited = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    monkeypatch.setattr(threads, "FIT_BLAS_THREADS", None)
    free = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
    assert limited.llf == pytest.approx(free.llf, abs=1e-8)
    np.testing.assert_allclose(limited.params.to_numpy(), free.params.to_numpy(), atol=1e-6)


def test_none_leaves_the_blas_library_alone(monkeypatch):
    monkeypatch.setattr(threads, "FIT_BLAS_THREADS", None)
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        with threads.limit_blas_threads():
            assert blas_threads() == before
            assert threads._owner is None


def test_nested_and_concurrent_calls_leave_the_first_limit_in_force():
    """Only the outermost call sets and restores the process-wide limit."""
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        with threads.limit_blas_threads(1):
            inner_owner = threads._owner
            with threads.limit_blas_threads(1):
                pass
            assert set(blas_threads()) <= {1}  # the nested exit restored nothing
            other = threading.Thread(target=lambda: threads.limit_blas_threads(1).__enter__())
            other.start()
            other.join()
            assert threads._owner is inner_owner is threading.current_thread()
        assert blas_threads() == before
        assert threads._owner is None


def test_warnings_of_a_limited_fit_point_at_the_callers_line():
    """The decorator adds a frame of mlsml, not of contextlib, between the user and the fit."""
    df = data()
    df.loc[3, "x"] = np.nan
    with pytest.warns(mlsml.MissingDataWarning) as caught:
        mlsml.fit("y ~ x", df, groups="school", random_scale=False)
    assert {w.filename for w in caught if issubclass(w.category, mlsml.MissingDataWarning)} == {__file__}
