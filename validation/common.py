"""Paths, data loaders, progress printing and Markdown tables shared by the sections."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
REFERENCE = HERE / "reference"
RESULTS = HERE / "results"
FIGURES = HERE / "figures"
CACHE = HERE / "cache"

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line on stderr with the elapsed time."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def shared_available() -> bool:
    return (SHARED / "data").is_dir() and (SHARED / "validation").is_dir()


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load_data(name: str) -> pd.DataFrame:
    """A data set used by the comparisons: exam, seed_sim, london_sim, mixwild_example.

    ``mixwild_example`` is MixWILD's ``ExampleData.csv`` with the 1,653 rows where
    ``POS_AFFECT == -999`` (MixWILD's missing-value code) dropped, as in the MIXREGLS
    reference runs; the school column is renamed from ``ID``.
    """
    if name == "mixwild_example":
        df = pd.read_csv(SHARED / "data" / "mixwild_examples" / "ExampleData.csv")
        df = df[df["POS_AFFECT"] != -999].copy()
        return df.rename(columns={"ID": "school"})
    local = ROOT / "tests" / "data" / f"{name}.csv"
    if local.exists():
        return pd.read_csv(local)
    return pd.read_csv(SHARED / "data" / f"{name}.csv")


def fmt(x, digits: int = 4) -> str:
    """Number for a Markdown table ('' for missing)."""
    if x is None:
        return ""
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not np.isfinite(xf):
        return "" if np.isnan(xf) else str(xf)
    if xf != 0 and (abs(xf) < 10 ** (-digits) or abs(xf) >= 1e6):
        return f"{xf:.2e}"
    return f"{xf:.{digits}f}"


def md_table(df: pd.DataFrame, digits: int = 4, index: bool = True) -> str:
    """A DataFrame as a GitHub Markdown table."""
    frame = df.rename_axis(df.index.name or "parameter").reset_index() if index else df
    cols = [str(c).replace("|", "\\|") for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame.iterrows():
        cells = []
        for v in row.values:
            cell = fmt(v, digits) if isinstance(v, (float, np.floating)) else str(v)
            cells.append(cell.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_quiet(*args, **kwargs):
    """``mlsml.fit`` recording (not raising) mlsml warnings; returns (res, [messages])."""
    import mlsml

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = mlsml.fit(*args, **kwargs)
    msgs = [str(w.message) for w in caught if issubclass(w.category, mlsml.MLSMLWarning)]
    return res, msgs


def passfail(ok: bool) -> str:
    return "PASS" if ok else "DIFFERS"


def fit_summary(res, msgs=()) -> dict:
    """The numbers of a fit that the report uses (JSON-serialisable)."""
    return {
        "params": {k: float(v) for k, v in res.params.items()},
        "bse": {k: float(v) for k, v in res.bse.items()},
        "llf": float(res.llf),
        "converged": bool(res.converged),
        "singular": bool(res.singular),
        "nobs": int(res.nobs),
        "ngroups": int(res.ngroups),
        "k": int(res.df_model),
        "aic": float(res.aic),
        "bic": float(res.bic),
        "bic_groups": float(res.bic_groups),
        "fit_time": float(res.fit_time),
        "nagq": int(res.nagq),
        "warnings": list(msgs),
        "corr": {k: [float(v["estimate"]), float(v["std err"])] for k, v in res.re_correlations().iterrows()},
    }


def cached_fit(key: str, data_fn, *args, refresh: bool = False, **kwargs) -> dict:
    """Fit summary from ``validation/cache/<key>.json`` or by fitting (then cached).

    ``data_fn()`` returns the data frame; ``args``/``kwargs`` go to :func:`mlsml.fit`
    after it. The cache is not committed (``.gitignore``); delete it to refit.
    """
    path = CACHE / f"{key}.json"
    if path.exists() and not refresh:
        return load_json(path)
    log(f"  fitting {key} ...")
    res, msgs = fit_quiet(args[0], data_fn(), *args[1:], **kwargs)
    out = fit_summary(res, msgs)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    log(f"  {key}: logL {out['llf']:.6f} in {out['fit_time']:.1f}s")
    return out


def md_tables(tables: dict, digits: int = 6) -> list[str]:
    """``**name**`` and its Markdown table for every entry of ``tables`` (report lines)."""
    out = []
    for name, t in tables.items():
        out += ["", f"**{name}**", "", md_table(t, digits=digits)]
    return out
