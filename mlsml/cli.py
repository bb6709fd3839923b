"""Command line: ``mlsml demo`` and ``mlsml fit``.

Errors are printed as one line (``mlsml: error: ...``) with exit status 2;
a fit that did not converge exits with status 3 after printing its summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .errors import ConvergenceWarning, MLSMLError

EPILOG_FIT = """examples:
  mlsml fit data.csv --formula "y ~ x" --groups school --scale "~ x"
  mlsml fit data.csv --formula "y ~ x" --groups school --no-random-scale
  mlsml fit data.csv --formula "y ~ x + C(eth)" --groups school --scale "~ x" --json out.json
  mlsml fit data.csv --formula "y ~ x" --groups school --scale "~ x" --schools schools.csv
"""


def _fit_json(res) -> dict:
    return {
        "llf": res.llf,
        "converged": res.converged,
        "nobs": res.nobs,
        "ngroups": res.ngroups,
        "nagq": res.nagq,
        "aic": res.aic,
        "bic": res.bic,
        "params": {k: float(v) for k, v in res.params.items()},
        "bse": {k: (float(v) if np.isfinite(v) else None) for k, v in res.bse.items()},
        "singular": res.singular,
        "message": res.message,
    }


def cmd_demo(args: argparse.Namespace) -> int:
    """Fit the paper's Models 1-3 to the bundled London-style simulated data."""
    from . import fit as fit_model
    from .compare import compare_models
    from .simulate import DEMO_TRUTH, demo_data

    df = demo_data()
    out = sys.stdout
    print(
        f"mlsml demo: simulated London-style data, {len(df)} students in "
        f"{df['school'].nunique()} schools (mlsml.simulate.demo_data, seed 2019)\n"
        f"true values: beta = {DEMO_TRUTH['beta']}, alpha = {DEMO_TRUTH['alpha']}, "
        f"Sigma(u0, v) = {DEMO_TRUTH['cov']}\n",
        file=out,
    )
    specs = [
        ("Model 1: random intercept, constant residual variance", dict(scale_formula="~ 1", random_scale=False)),
        ("Model 2: + random school effect on the residual variance", dict(scale_formula="~ 1", random_scale=True)),
        ("Model 3: + prior achievement in the residual variance", dict(scale_formula="~ x", random_scale=True)),
    ]
    fits = []
    for title, kw in specs:
        res = fit_model("y ~ x", df, groups="school", **kw)
        fits.append(res)
        if not args.quiet:
            print(f"\n{title}", file=out)
            print(res.summary().as_text(), file=out)
    table = compare_models(fits, names=["Model 1", "Model 2", "Model 3"])
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print("\nModel comparison (LR tests against the previous model; boundary-corrected where a variance is 0 "
              "under the null)", file=out)
        print(table.round(4).to_string(), file=out)
    return 0 if all(r.converged for r in fits) else 3


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit a model to a CSV file and print its summary."""
    from . import fit as fit_model

    try:
        df = pd.read_csv(args.data)
    except FileNotFoundError as exc:
        raise MLSMLError(f"cannot read {args.data!r}: no such file") from exc
    except Exception as exc:
        raise MLSMLError(f"cannot read {args.data!r} as CSV: {exc}") from exc
    res = fit_model(
        args.formula,
        df,
        groups=args.groups,
        scale_formula=args.scale,
        re_formula=args.re,
        random_scale=not args.no_random_scale,
        missing=args.missing,
        nagq=args.nagq,
    )
    if not args.quiet:
        print(res.summary().as_text())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_fit_json(res), fh, indent=2)
    if args.schools:
        res.school_effects().to_csv(args.schools)
    return 0 if res.converged else 3


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mlsml`` command."""
    p = argparse.ArgumentParser(
        prog="mlsml",
        description="Maximum-likelihood mixed-effects location scale models (adaptive Gauss-Hermite quadrature).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="fit Models 1-3 to bundled simulated London-style data",
        description="Fit the paper's Models 1-3 to simulated London-style data and compare them.",
        epilog="example:\n  mlsml demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("-q", "--quiet", action="store_true", help="print only the comparison table")
    d.set_defaults(func=cmd_demo)
    f = sub.add_parser(
        "fit",
        help="fit a model to a CSV file",
        description="Fit a mixed-effects location scale model to a CSV file and print the summary.",
        epilog=EPILOG_FIT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("data", help="CSV file, one row per observation")
    f.add_argument("--formula", required=True, help='mean function, e.g. "y ~ x + C(group)"')
    f.add_argument("--groups", required=True, help="grouping (school) column")
    f.add_argument("--scale", default="~ 1", help='residual log-variance function (default "~ 1")')
    f.add_argument("--re", default="~ 1", help='random effects in the mean (default "~ 1")')
    f.add_argument("--no-random-scale", action="store_true", help="no school effect on the residual variance")
    f.add_argument("--nagq", type=int, default=None, help="quadrature points per dimension")
    f.add_argument("--missing", choices=["drop", "raise"], default="drop", help="listwise deletion or error")
    f.add_argument("--json", metavar="PATH", help="write llf, params, bse, converged as JSON")
    f.add_argument("--schools", metavar="PATH",
                   help="write the school table (means, variances, 95%% intervals, ranks, flags) as CSV")
    f.add_argument("-q", "--quiet", action="store_true", help="do not print the summary")
    f.set_defaults(func=cmd_fit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlsml`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = args.func(args)
        except MLSMLError as exc:
            print(f"mlsml: error: {exc}", file=sys.stderr)
            return 2
        except (OSError, ValueError) as exc:
            print(f"mlsml: error: {exc}", file=sys.stderr)
            return 2
    seen = set()
    for w in caught:
        msg = f"mlsml: {'WARNING' if issubclass(w.category, ConvergenceWarning) else 'warning'}: {w.message}"
        if msg not in seen and issubclass(w.category, UserWarning):
            seen.add(msg)
            print(msg, file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
