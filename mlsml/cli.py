"""Command line: ``mlsml demo``, ``mlsml fit`` and ``mlsml mixregls``.

Errors are printed as one line (``mlsml: error: ...``, no traceback) with exit
status 2 (1 for an unexpected internal error); a fit that did not converge
exits with status 3 after printing its summary. ``--verbose`` prints the
optimiser's progress (one line per pass) and ``--quiet`` only errors and
warnings; progress of multi-model work goes to standard error.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .compare import compare_models
from .errors import ConvergenceWarning, MLSMLError
from .mixregls import MixwildSummary, fit_stages, summarize_mixwild
from .mixregls.job import run_job
from .model import fit as fit_model
from .simulate import DEMO_TRUTH, demo_data

EPILOG_FIT = """examples:
  mlsml fit data.csv --formula "y ~ x" --groups school --scale "~ x"
  mlsml fit data.csv --formula "y ~ x" --groups school --no-random-scale
  mlsml fit data.csv --formula "y ~ x + C(eth)" --groups school --scale "~ x" --json out.json
  mlsml fit data.csv --formula "y ~ x" --groups school --scale "~ x" --schools schools.csv
  mlsml fit data.csv --formula "y ~ x" --groups school --scale "~ x" --style mixwild --stages
  mlsml fit data.csv --formula "y ~ x" --groups school --format latex > table.tex
  mlsml fit data.csv --sep ";" --na-values -999 --formula "y ~ x" --groups school
  mlsml fit pisa.csv --formula "math ~ escs" --groups school --weights w_stu --group-weights w_sch
  mlsml fit data.csv --missing-code -999 --drop-constant-groups --standardize --formula "y ~ x" --groups school

The group column is read as text, so school ids "01" and "1" stay two schools
(ids that are all plain integers are sorted as numbers).
"""

EPILOG_MIXREGLS = """examples:
  mlsml mixregls job.def                  # fit the job's model sequence, print the MIXREGLS-style report
  mlsml mixregls job.def --no-stages      # only the final model
  mlsml mixregls job.def --out job.OUT --json job.json
  mlsml mixregls job.def --nagq 21 -v     # more quadrature points, optimiser progress

The .def file and its space-delimited data file are read as MIXREGLS reads them
(layouts of mixregls_var, MixWILD 2017 and MixWILD 2.0); the data file name in the
.def is relative to the folder of the .def and must name a regular file. Every
setting is checked (whole numbers, 0/1 switches, counts 0..NVAR, NQ 1..100).
Options mlsml cannot fit (BS-variance covariates, NCOV other than 1, second-stage
models) are reported as errors.
"""

EPILOG_DEMO = """examples:
  mlsml demo
  mlsml demo --quiet      # only the model comparison table
"""


def _fit_json(res) -> dict:
    """The JSON written by ``--json`` (:meth:`mlsml.MELSMResults.to_dict`)."""
    return res.to_dict()


def cmd_demo(args: argparse.Namespace) -> int:
    """Fit the paper's Models 1-3 to the bundled London-style simulated data."""
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
    progress = _progress_printer(args)
    for i, (title, kw) in enumerate(specs, start=1):
        if progress is not None:
            progress(i, len(specs), title.split(":")[0])
        res = fit_model("y ~ x", df, groups="school", callback=_pass_printer(args), **kw)
        if progress is not None:
            progress.finish()
        fits.append(res)
        if not args.quiet:
            print(f"\n{title}", file=out)
            print(res.summary().as_text(), file=out)
    table = compare_models(fits, names=["Model 1", "Model 2", "Model 3"])
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print(
            "\nModel comparison (LR tests against the previous model; boundary-corrected where a variance is 0 under the null)",
            file=out,
        )
        print(table.round(4).to_string(), file=out)
    return 0 if all(r.converged for r in fits) else 3


#: Separators ``--sep`` accepts by name (a literal tab is awkward to type in a shell).
SEP_NAMES = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "space": " ", "whitespace": r"\s+"}

#: Characters that, found in a column name, suggest the file uses another separator.
SEP_SUSPECTS = (";", "\t", ",", "|")

#: At most this many column names are listed in an error message.
MAX_LISTED_COLUMNS = 25


def _separator(sep: str | None) -> str:
    """The field separator ``--sep`` names (``","`` when not given)."""
    if sep is None:
        return ","
    sep = SEP_NAMES.get(sep, sep)
    if sep == "":
        raise MLSMLError("--sep must not be empty")
    return sep


def _na_values(values: Sequence[str] | None) -> list[str]:
    """The missing-value codes of ``--na-values`` (given several times and/or comma-separated)."""
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def _columns(names: Sequence[object]) -> str:
    """``found N columns: 'a', 'b', ...`` for an error message (at most MAX_LISTED_COLUMNS names)."""
    shown = ", ".join(repr(str(c)) for c in list(names)[:MAX_LISTED_COLUMNS])
    more = f", ... ({len(names) - MAX_LISTED_COLUMNS} more)" if len(names) > MAX_LISTED_COLUMNS else ""
    return f"found {len(names)} column{'s' if len(names) != 1 else ''}: {shown}{more}"


def _separator_hint(header: Sequence[str], sep: str | None) -> str:
    """A hint to use ``--sep`` when the header looks split at the wrong character ('' when it does not)."""
    used = _separator(sep)
    text = "".join(header)
    counts = {c: text.count(c) for c in SEP_SUSPECTS if c != used}
    best = max(counts, key=lambda c: counts[c])
    if counts[best] == 0:
        if len(header) == 1 and any(c.isspace() for c in text.strip()):
            return "; only one column was found: is the file separated by blanks? Then add --sep whitespace"
        return "; only one column was found: is the file separated by another character? (--sep)" if len(header) == 1 else ""
    shown = "'\\t'" if best == "\t" else repr(best)
    return f"; the header holds {shown}: is the file separated by {shown}? Then add --sep {shown}"


def _group_labels(col: pd.Series) -> pd.Series:
    """The group column, read as text, as integers when every label is an integer written canonically.

    Read as numbers, ``"01"`` and ``"1"`` (or ``"1"`` and ``"1.0"``) would be one school. Labels
    that are all canonical integers (no sign other than ``-``, no leading zeros, no decimals) map
    one-to-one to integers, which then sort as numbers in the school table; any other labels stay
    text exactly as written.
    """
    text = col.dropna().astype(str)
    canonical = text.str.fullmatch(r"0|-?[1-9][0-9]{0,17}")
    if len(text) == 0 or not canonical.all() or col.isna().any():
        return col
    return col.astype(np.int64)


def read_table(path: str, groups: str, sep: str | None = None, na_values: Sequence[str] | None = None):
    """Read the CSV file of ``mlsml fit``: the group column as text, nothing renamed, merged or shifted.

    Parameters
    ----------
    path : str
        The file.
    groups : str
        The group column: read as text (see :func:`_group_labels`).
    sep : str, optional
        Field separator (``","``; ``"tab"`` or ``"\\t"`` for tabs, ``"whitespace"`` for runs of blanks).
    na_values : sequence of str, optional
        Extra missing-value codes (each item may hold several, comma-separated), e.g. ``-999``.

    Returns
    -------
    (pandas.DataFrame, list of str)
        The data and the column names as written in the header.

    Raises
    ------
    MLSMLError
        The file cannot be read or is empty, its header repeats a column name, or its rows
        hold more fields than the header (pandas would silently shift the columns).
    """
    field_sep = _separator(sep)
    if os.path.isdir(path):
        raise MLSMLError(f"cannot read {path!r}: it is a directory, not a CSV file")
    try:
        with open(path, "rb") as fh:  # once, so that a pipe (``<(zcat data.csv.gz)``) can be read twice below
            raw = fh.read()
    except FileNotFoundError as exc:
        raise MLSMLError(f"cannot read {path!r}: no such file") from exc
    except OSError as exc:
        raise MLSMLError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    if not raw.strip():
        raise MLSMLError(f"cannot read {path!r}: the file is empty")
    # index_col=False: a row with one field more than the header must not become the index
    options: dict = dict(sep=field_sep, engine="python" if len(field_sep) > 1 else "c", index_col=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            first = pd.read_csv(io.BytesIO(raw), header=None, nrows=1, dtype=str, keep_default_na=False, **options)
            header = [str(c) for c in first.iloc[0]]
            df = pd.read_csv(io.BytesIO(raw), dtype={groups: str}, na_values=_na_values(na_values), **options)
    except UnicodeDecodeError as exc:
        raise MLSMLError(f"cannot read {path!r} as CSV: it is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except pd.errors.ParserWarning as exc:
        raise MLSMLError(f"cannot read {path!r} as CSV: rows hold more fields than the header ({_columns(header)})") from exc
    except Exception as exc:  # pandas' parser errors
        raise MLSMLError(f"cannot read {path!r} as CSV: {_one_line(exc)}") from exc
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise MLSMLError(f"{path!r}: the header names the column(s) {', '.join(map(repr, dup))} more than once; rename them")
    if df.shape[0] == 0:
        raise MLSMLError(f"{path!r} holds no data rows ({_columns(header)})")
    if groups in df.columns:
        df[groups] = _group_labels(df[groups])
    return df, header


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit a model to a CSV file and print its summary."""
    df, header = read_table(args.data, args.groups, sep=args.sep, na_values=args.na_values)
    hint = _separator_hint(header, args.sep)
    if args.groups not in df.columns:
        raise MLSMLError(f"groups={args.groups!r} is not a column of {args.data!r} ({_columns(df.columns)}){hint}")
    try:
        res = fit_model(
            args.formula,
            df,
            groups=args.groups,
            scale_formula=args.scale,
            re_formula=args.re,
            scale_re_formula=args.scale_re,
            bs_formula=args.bs,
            random_scale=not args.no_random_scale,
            missing=args.missing,
            weights=args.weights,
            group_weights=args.group_weights,
            weights_kind=args.weights_kind,
            weights_scale=args.weights_scale,
            offset=args.offset,
            scale_offset=args.scale_offset,
            cov_type=args.cov_type,
            association=args.association,
            cov_constraints=[c.strip() for c in args.cov_zero.split(";") if c.strip()] if args.cov_zero else None,
            missing_code=args.missing_code,
            drop_constant_groups=args.drop_constant_groups,
            nagq=args.nagq,
            callback=_pass_printer(args),
        )
    except MLSMLError as exc:
        if hint:  # a mis-read header explains any complaint about the columns
            raise MLSMLError(f"{_one_line(exc)}{hint}") from exc
        raise
    stages = None
    if args.stages:
        if args.style != "mixwild":
            raise MLSMLError("--stages needs --style mixwild")
        stages = fit_stages(res, progress=_progress_printer(args), callback=_pass_printer(args), cov_type=res.cov_type)
    if not args.quiet:
        if args.style == "mixwild":
            smry = MixwildSummary(summarize_mixwild(res, stages=stages, source=args.data))
        else:
            smry = res.summary()
        print(_render(smry, args.format))
        if args.standardize:
            print("\nEstimates for standardised covariates (mean 0, SD 1; MixWILD's NCENT = 1):")
            print(res.standardized_params().round(5).to_string())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_fit_json(res), fh, indent=2)
    if args.schools:
        res.school_effects().to_csv(args.schools)
    return 0 if res.converged else 3


def _render(smry, fmt: str) -> str:
    """A summary object as text, HTML or LaTeX."""
    return {"text": smry.as_text, "html": smry.as_html, "latex": smry.as_latex}[fmt]()


def _pass_printer(args: argparse.Namespace):
    """With --verbose: a fit callback printing one line per optimiser pass (to stderr)."""
    if not getattr(args, "verbose", False):
        return None
    t0 = time.perf_counter()

    def callback(n_pass, theta, llf):
        print(f"mlsml:   pass {n_pass}: logL = {llf:.6f}  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    return callback


def _progress_printer(args: argparse.Namespace):
    """Unless --quiet: a progress display for a sequence of fits (to stderr)."""
    if getattr(args, "quiet", False):
        return None
    state = {"t": None}

    def progress(i, n, title):
        now = time.perf_counter()
        if state["t"] is not None:
            print(f"done ({now - state['t']:.1f} s)", file=sys.stderr)
        state["t"] = now
        end = "\n" if getattr(args, "verbose", False) else " "
        print(f"mlsml: [{i}/{n}] {title} ...", end=end, file=sys.stderr, flush=True)

    def finish():
        if state["t"] is not None:
            print(f"done ({time.perf_counter() - state['t']:.1f} s)", file=sys.stderr)
            state["t"] = None

    progress.finish = finish  # type: ignore[attr-defined]
    return progress


def cmd_mixregls(args: argparse.Namespace) -> int:
    """Run a MIXREGLS job (.def + .dat) and print the MIXREGLS-style report."""
    progress = _progress_printer(args)
    try:
        run = run_job(args.deffile, stages=not args.no_stages, nagq=args.nagq, progress=progress, callback=_pass_printer(args))
    finally:
        if progress is not None:
            progress.finish()
    smry = MixwildSummary(run.report)
    text = _render(smry, args.format)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    if not args.quiet:
        print(text)
    if args.json:
        run.results.to_json(args.json)
    return 0 if all(r.converged for _, r in run.stages) and run.results.converged else 3


def _positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (``--nagq 0`` must not mean "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mlsml`` command."""
    p = argparse.ArgumentParser(
        prog="mlsml",
        description="Maximum-likelihood mixed-effects location scale models (adaptive Gauss-Hermite quadrature).",
        epilog='examples:\n  mlsml demo\n  mlsml fit data.csv --formula "y ~ x" --groups school --scale "~ x"\n'
        "  mlsml mixregls job.def\n\n'mlsml COMMAND --help' describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="fit Models 1-3 to bundled simulated London-style data",
        description="Fit the paper's Models 1-3 to simulated London-style data and compare them.",
        epilog=EPILOG_DEMO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("-q", "--quiet", action="store_true", help="print only the comparison table")
    d.add_argument("-v", "--verbose", action="store_true", help="print the optimiser's progress (one line per pass)")
    d.set_defaults(func=cmd_demo)
    f = sub.add_parser(
        "fit",
        help="fit a model to a CSV file",
        description="Fit a mixed-effects location scale model to a CSV file and print the summary.",
        epilog=EPILOG_FIT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("data", help="CSV file, one row per observation")
    f.add_argument(
        "--sep",
        default=None,
        metavar="SEP",
        help="field separator of the file (default ','; e.g. ';', tab or '\\t', whitespace for runs of blanks)",
    )
    f.add_argument(
        "--na-values",
        action="append",
        default=None,
        metavar="CODES",
        help="extra missing-value codes, e.g. -999 (repeat the option or separate codes by commas); "
        "rows holding one are dropped with a warning (or an error with --missing raise)",
    )
    f.add_argument("--formula", required=True, help='mean function, e.g. "y ~ x + C(group)"')
    f.add_argument("--groups", required=True, help="grouping (school) column, read as text ('01' and '1' are two schools)")
    f.add_argument("--scale", default="~ 1", help='residual log-variance function (default "~ 1")')
    f.add_argument("--re", default="~ 1", help='random effects in the mean (default "~ 1")')
    f.add_argument(
        "--scale-re",
        default=None,
        metavar="FORMULA",
        help='random effects in the log variance, e.g. "~ x" (random scale intercept and slope)',
    )
    f.add_argument(
        "--bs",
        default=None,
        metavar="FORMULA",
        help='between-school log variance of the random intercept, e.g. "~ type" (school-level or level-1 columns)',
    )
    f.add_argument("--no-random-scale", action="store_true", help="no school effect on the residual variance")
    f.add_argument("--weights", metavar="COLUMN", help="level-1 (student) weights, conditional on the school")
    f.add_argument("--group-weights", metavar="COLUMN", help="level-2 (school) weights, constant within each school")
    f.add_argument(
        "--weights-kind", choices=["sampling", "frequency"], default="sampling", help="sampling (pseudo-ML) or frequency weights"
    )
    f.add_argument("--weights-scale", choices=["size", "effective", "none"], default=None, help="level-1 scaling (default size)")
    f.add_argument("--offset", metavar="COLUMN", help="offset of the mean (a known term)")
    f.add_argument("--scale-offset", metavar="COLUMN", help="offset of the log residual variance")
    f.add_argument(
        "--cov-type",
        choices=["nonrobust", "robust"],
        default=None,
        help="standard errors: observed information or cluster-robust sandwich (default robust with sampling weights)",
    )
    f.add_argument(
        "--association",
        choices=["linear", "none", "quadratic"],
        default="linear",
        help="how the random location enters the log variance (MIXREGLS NCOV 1, 0, 2; default linear)",
    )
    f.add_argument(
        "--cov-zero",
        default=None,
        metavar="NAMES",
        help='covariances fixed at zero, separated by ";", e.g. "cov(u0,u1)" (independent random slope)',
    )
    f.add_argument("--nagq", type=_positive_int, default=None, help="quadrature points per dimension")
    f.add_argument("--missing", choices=["drop", "raise"], default="drop", help="listwise deletion or error")
    f.add_argument(
        "--missing-code",
        type=float,
        default=None,
        metavar="VALUE",
        help="a value that stands for missing in the columns the formulas use (MixWILD's YMISS, e.g. -999); counted per column",
    )
    f.add_argument(
        "--drop-constant-groups",
        action="store_true",
        help="drop the groups whose response is constant, naming them (MixWILD's DISCARD0 = 1)",
    )
    f.add_argument(
        "--standardize",
        action="store_true",
        help="also print the estimates for standardised covariates, as MixWILD reports them with NCENT = 1",
    )
    f.add_argument("--json", metavar="PATH", help="write llf, params, bse, converged as JSON")
    f.add_argument(
        "--style",
        choices=["statsmodels", "mixwild"],
        default="statsmodels",
        help="summary layout: statsmodels tables or the MIXREGLS/MIXWILD report",
    )
    f.add_argument(
        "--stages", action="store_true", help="with --style mixwild: also fit and print MIXREGLS's model sequence with LR tests"
    )
    f.add_argument("--format", choices=["text", "html", "latex"], default="text", help="output format of the summary")
    f.add_argument("--schools", metavar="PATH", help="write the school table (means, variances, 95%% intervals, ranks, flags) as CSV")
    f.add_argument("-q", "--quiet", action="store_true", help="do not print the summary")
    f.add_argument("-v", "--verbose", action="store_true", help="print the optimiser's progress (one line per pass)")
    f.set_defaults(func=cmd_fit)
    m = sub.add_parser(
        "mixregls",
        help="run a MIXREGLS job (.def + data file) and print a MIXREGLS-style report",
        description="Read a MIXREGLS definition file and its data file, fit the same model by maximum likelihood "
        "and print the MIXREGLS/MIXWILD-style report.",
        epilog=EPILOG_MIXREGLS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("deffile", help="MIXREGLS definition file (.def)")
    m.add_argument("--no-stages", action="store_true", help="fit only the final model, not MIXREGLS's model sequence")
    m.add_argument("--nagq", type=_positive_int, default=None, help="quadrature points per dimension (default: NQ of the .def)")
    m.add_argument("--format", choices=["text", "html", "latex"], default="text", help="output format of the report")
    m.add_argument("--out", metavar="PATH", help="also write the report to PATH")
    m.add_argument("--json", metavar="PATH", help="write the final fit as JSON (MELSMResults.to_json)")
    m.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors and warnings")
    m.add_argument("-v", "--verbose", action="store_true", help="print the optimiser's progress (one line per pass)")
    m.set_defaults(func=cmd_mixregls)
    return p


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (patsy's messages span several lines)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.filename}: {exc.strerror}"
    return text or type(exc).__name__


def _error(pending: list[str], message: str, code: int) -> int:
    """Queue ``mlsml: error: message`` (printed after any warnings, as the last line) and return ``code``."""
    pending.append(f"mlsml: error: {message}")
    return code


#: Options whose values often start with "-" (``--na-values -999,-99``), which argparse would take for an option.
DASH_VALUE_OPTIONS = ("--na-values", "--sep")


def _attach_option_values(argv: Sequence[str]) -> list[str]:
    """Write ``--na-values -999,-99`` as ``--na-values=-999,-99`` so that argparse reads the value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in DASH_VALUE_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlsml`` command."""
    parser = build_parser()
    args = parser.parse_args(_attach_option_values(sys.argv[1:] if argv is None else argv))
    pending: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = args.func(args)
        except MLSMLError as exc:
            code = _error(pending, _one_line(exc), 2)
        except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            code = 0
        except (OSError, ValueError, LookupError) as exc:
            code = _error(pending, _one_line(exc), 2)
        except KeyboardInterrupt:
            code = _error(pending, "interrupted", 130)
        except Exception as exc:  # any other failure: still one line, no traceback
            name = type(exc).__name__
            if name == "PatsyError":
                code = _error(pending, f"formula: {_one_line(exc)}", 2)
            else:
                code = _error(pending, f"unexpected {name}: {_one_line(exc)} (please report this)", 1)
    seen = set()
    for w in caught:
        msg = f"mlsml: {'WARNING' if issubclass(w.category, ConvergenceWarning) else 'warning'}: {w.message}"
        if msg not in seen and issubclass(w.category, UserWarning):
            seen.add(msg)
            print(msg, file=sys.stderr)
    for msg in pending:
        print(msg, file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
