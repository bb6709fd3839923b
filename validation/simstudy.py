"""Simulation study: bias, RMSE and 95% interval coverage of the ML estimates.

Designs
-------
``seed``
    The seed paper's simulated design (Section S3): 100 schools x 25 students,
    ``x`` standard normal with intraclass correlation 0.2, and Model 3 with
    ``beta = (0, 0.7)``, ``alpha = (-0.8, 0.05)``, ``var(u0) = var(v) = 0.05``,
    ``cov(u0,v) = 0.025`` (``../shared/data/seed_sim.truth.json``). Data by
    :func:`mlsml.simulate.simulate_data` with ``x_between_sd = sqrt(0.2)``.
``london``
    London size: the 465 schools and 71,321 values of ``x`` of ``london_sim.csv``
    are kept and ``y`` is drawn from Model 3 with the parameters
    :data:`mlsml.simulate.DEMO_TRUTH` (close to the paper's Model 3 estimates:
    ``beta = (0, 0.67)``, ``alpha = (-0.86, 0.03)``, ``var(u0) = 0.058``,
    ``var(v) = 0.030``, ``cov(u0,v) = -0.015``).

Replication ``r`` of a design uses the seed ``BASE_SEED[design] + r``, so any
replication can be re-run alone. Each fit is Model 3 (``y ~ x``, ``scale ~ x``,
correlated random intercept and random scale) with the default 11 adaptive
points per dimension. Per replication the estimates, SEs, log-likelihood,
convergence flag, warnings and fit time are stored in
``validation/results/sim_<design>.csv``; profile-likelihood intervals for
``var(u0)`` and ``var(v)`` (:func:`mlsml.profile.profile_ci`) on the first
``--profile`` replications of the seed design go to
``validation/results/sim_seed_profile.csv``.

Run ``python -m validation.simstudy --design seed --reps 1000 --profile 200``
(2 processes by default); the report reads the CSVs and does not refit.
"""

from __future__ import annotations

import argparse
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from .common import RESULTS, SHARED, log

BASE_SEED = {"seed": 5_000_000, "london": 7_000_000}
TRUTH = {
    "seed": {
        "mean:Intercept": 0.0,
        "mean:x": 0.7,
        "scale:Intercept": -0.8,
        "scale:x": 0.05,
        "var(u0)": 0.05,
        "var(v)": 0.05,
        "cov(u0,v)": 0.025,
    },
    "london": {
        "mean:Intercept": 0.0,
        "mean:x": 0.67,
        "scale:Intercept": -0.86,
        "scale:x": 0.03,
        "var(u0)": 0.058,
        "var(v)": 0.030,
        "cov(u0,v)": -0.015,
    },
}
PARAMS = list(TRUTH["seed"])

_LONDON_X: pd.DataFrame | None = None


def _london_design() -> pd.DataFrame:
    global _LONDON_X
    if _LONDON_X is None:
        _LONDON_X = pd.read_csv(SHARED / "data" / "london_sim.csv", usecols=["school", "x"])
    return _LONDON_X


def make_data(design: str, rep: int) -> pd.DataFrame:
    """The data of replication ``rep`` of ``design`` (deterministic)."""
    from mlsml.simulate import simulate_data

    seed = BASE_SEED[design] + rep
    t = TRUTH[design]
    beta = (t["mean:Intercept"], t["mean:x"])
    alpha = (t["scale:Intercept"], t["scale:x"])
    cov = np.array([[t["var(u0)"], t["cov(u0,v)"]], [t["cov(u0,v)"], t["var(v)"]]])
    if design == "seed":
        return simulate_data([25] * 100, beta=beta, alpha=alpha, cov=cov, x_between_sd=np.sqrt(0.2), seed=seed)
    base = _london_design()
    rng = np.random.default_rng(seed)
    codes, schools = pd.factorize(base["school"])
    b = rng.multivariate_normal(np.zeros(2), cov, size=len(schools))
    x = base["x"].to_numpy()
    sd = np.exp(0.5 * (alpha[0] + alpha[1] * x + b[codes, 1]))
    y = beta[0] + beta[1] * x + b[codes, 0] + sd * rng.standard_normal(len(x))
    return pd.DataFrame({"school": base["school"].to_numpy(), "x": x, "y": y})


def run_one(args: tuple[str, int, bool]) -> dict:
    """Fit one replication; never raises (a failure is a row with converged=False)."""
    import mlsml

    design, rep, do_profile = args
    row: dict = {"design": design, "rep": rep, "seed": BASE_SEED[design] + rep}
    df = make_data(design, rep)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = mlsml.fit("y ~ x", df, groups="school", scale_formula="~ x")
        row["time_s"] = time.perf_counter() - t0
        row["converged"] = bool(res.converged)
        row["singular"] = bool(res.singular)
        row["llf"] = res.llf
        row["n_iter"] = res.n_iter
        row["warnings"] = "; ".join(sorted({w.category.__name__ for w in caught}))
        for name in PARAMS:
            row[f"est:{name}"] = float(res.params[name])
            row[f"se:{name}"] = float(res.bse[name])
        if do_profile:
            from mlsml.profile import profile_ci

            t1 = time.perf_counter()
            for name in ("var(u0)", "var(v)"):
                try:
                    ci = profile_ci(res, name)
                    row[f"plo:{name}"], row[f"phi:{name}"] = ci.lower, ci.upper
                except Exception as exc:  # noqa: BLE001 - recorded, counted in the report
                    row[f"plo:{name}"] = row[f"phi:{name}"] = np.nan
                    row["profile_error"] = f"{type(exc).__name__}: {exc}"
            row["profile_time_s"] = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - a failed fit is a result of the study
        row["time_s"] = time.perf_counter() - t0
        row["converged"] = False
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def run(design: str, reps: int, profile: int = 0, workers: int = 2, out=None, profile_only: bool = False) -> pd.DataFrame:
    """Run ``reps`` replications in ``workers`` processes with a progress bar.

    With ``profile_only`` only the first ``profile`` replications are refitted, with
    profile intervals, and only ``sim_<design>_profile.csv`` is written (the main
    results file is left alone; the fits are deterministic, so they are the same).
    """
    from tqdm import tqdm

    if profile_only:
        reps = profile
    tasks = [(design, r, r < profile) for r in range(reps)]
    rows = []
    log(f"simulation: {design} design, {reps} replications ({profile} with profile intervals), {workers} processes")
    with ProcessPoolExecutor(max_workers=workers) as ex:
        for row in tqdm(ex.map(run_one, tasks, chunksize=1), total=len(tasks), desc=f"sim {design}"):
            rows.append(row)
    df = pd.DataFrame(rows).sort_values("rep")
    out = out or RESULTS / f"sim_{design}.csv"
    RESULTS.mkdir(parents=True, exist_ok=True)
    main_cols = [c for c in df.columns if not c.startswith(("plo:", "phi:", "profile_"))]
    if not profile_only:
        df[main_cols].to_csv(out, index=False, float_format="%.8g")
    if profile:
        pcols = ["design", "rep", "seed"] + [c for c in df.columns if c.startswith(("plo:", "phi:", "profile_"))]
        df.loc[df["rep"] < profile, pcols].to_csv(RESULTS / f"sim_{design}_profile.csv", index=False, float_format="%.8g")
    log(f"simulation: wrote {out if not profile_only else RESULTS / f'sim_{design}_profile.csv'}")
    return df


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--design", choices=list(BASE_SEED), required=True)
    ap.add_argument("--reps", type=int, required=True)
    ap.add_argument("--profile", type=int, default=0, help="profile intervals on the first N replications")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--profile-only", action="store_true", help="refit only the profiled replications")
    a = ap.parse_args(argv)
    run(a.design, a.reps, a.profile, a.workers, profile_only=a.profile_only)


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- report
def summarise(df: pd.DataFrame, truth: dict, level: float = 0.95) -> pd.DataFrame:
    """Bias, RMSE, mean SE, empirical SD and Wald coverage per parameter (converged fits only).

    Coverage is the share of converged replications whose interval
    ``estimate +- z SE`` contains the true value; its Monte-Carlo SE is
    ``sqrt(c (1 - c) / R)``.
    """
    from scipy import stats

    z = stats.norm.ppf(0.5 + level / 2)
    ok = df[df["converged"].astype(bool)]
    rows = {}
    for name, true in truth.items():
        est, se = ok[f"est:{name}"].to_numpy(float), ok[f"se:{name}"].to_numpy(float)
        good = np.isfinite(est) & np.isfinite(se)
        e, s = est[good], se[good]
        cover = np.abs(e - true) <= z * s
        c = float(cover.mean()) if len(cover) else np.nan
        rows[name] = {
            "true": true,
            "mean est": e.mean(),
            "bias": e.mean() - true,
            "rel bias %": 100 * (e.mean() - true) / true if true else np.nan,
            "RMSE": float(np.sqrt(np.mean((e - true) ** 2))),
            "emp SD": e.std(ddof=1),
            "mean SE": s.mean(),
            "Wald coverage %": 100 * c,
            "MC SE %": 100 * np.sqrt(c * (1 - c) / len(cover)),
            "n": int(good.sum()),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def profile_coverage(prof: pd.DataFrame, main: pd.DataFrame, truth: dict, level: float = 0.95) -> pd.DataFrame:
    """Coverage of the profile-likelihood intervals beside the Wald coverage on the same replications."""
    from scipy import stats

    z = stats.norm.ppf(0.5 + level / 2)
    m = prof.merge(main, on=["design", "rep", "seed"])
    m = m[m["converged"].astype(bool)]
    rows = {}
    for name in ("var(u0)", "var(v)"):
        if f"plo:{name}" not in m:
            continue
        t = truth[name]
        lo, hi = m[f"plo:{name}"].to_numpy(float), m[f"phi:{name}"].to_numpy(float)
        good = np.isfinite(lo) & np.isfinite(hi)
        pc = np.mean((lo[good] <= t) & (t <= hi[good]))
        e, s = m[f"est:{name}"].to_numpy(float)[good], m[f"se:{name}"].to_numpy(float)[good]
        wc = np.mean(np.abs(e - t) <= z * s)
        rows[name] = {
            "reps": int(good.sum()),
            "Wald coverage %": 100 * wc,
            "profile coverage %": 100 * pc,
            "MC SE %": 100 * np.sqrt(pc * (1 - pc) / max(good.sum(), 1)),
            "profile misses below %": 100 * np.mean(hi[good] < t),
            "profile misses above %": 100 * np.mean(lo[good] > t),
            "Wald misses below %": 100 * np.mean(e + z * s < t),
            "Wald misses above %": 100 * np.mean(e - z * s > t),
            "lower end = 0": int(np.sum(lo[good] == 0)),
            "mean time s": float(m["profile_time_s"].mean()) if "profile_time_s" in m else np.nan,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def section() -> str:
    from .common import md_table

    log("simulation study (from validation/results/*.csv)")
    out = ["## 5. Simulation study: bias, RMSE and coverage", ""]
    out.append(
        "Model 3 refitted to data simulated from it (`validation/simstudy.py`; per-replication estimates in "
        "`validation/results/sim_*.csv`, regenerated by `python -m validation.simstudy --design seed --reps 1000`, "
        "`--design seed --reps 0 --profile 500 --profile-only` and `--design london --reps 2000`; seeds "
        "`5000000 + r` and `7000000 + r`). "
        "**seed**: the paper's Section S3 design, 100 schools × 25 students, x ~ N(0,1) with ICC 0.2, "
        "β = (0, 0.7), α = (−0.8, 0.05), σ²u = σ²v = 0.05, σuv = 0.025. **london**: the 465 schools and 71,321 "
        "values of x of `london_sim.csv`, y drawn from Model 3 with β = (0, 0.67), α = (−0.86, 0.03), σ²u = 0.058, "
        "σ²v = 0.030, σuv = −0.015 (close to the paper's Model 3). Coverage is of the 95% Wald interval "
        "estimate ± 1.96 SE (SE from the observed information, delta method for variances); target 93–97% for the "
        "fixed effects. Monte-Carlo SE of a coverage near 95% is 0.7 points at R = 1000, 1.0 at R = 500."
    )
    out.append("")
    for design in ("seed", "london"):
        path = RESULTS / f"sim_{design}.csv"
        if not path.exists():
            out.append(f"**{design}**: results file `{path.name}` missing (run the command above).")
            continue
        df = pd.read_csv(path)
        R = len(df)
        conv = df["converged"].astype(bool)
        summ = summarise(df, TRUTH[design])
        fixed = [n for n in summ.index if n.startswith(("mean:", "scale:"))]
        cov_ok = summ.loc[fixed, "Wald coverage %"].between(93, 97)
        out.append(f"### Design `{design}`: {R} replications")
        out.append("")
        sing = int(df["singular"].fillna(False).astype(bool).sum()) if "singular" in df else 0
        out.append(
            f"Design `{design}` converged: **{conv.sum()} of {R} ({100 * conv.mean():.1f}%)**; singular (boundary) fits: {sing}. "
            f"Fit time per replication: median {df['time_s'].median():.2f} s, 95th percentile "
            f"{df['time_s'].quantile(0.95):.2f} s, max {df['time_s'].max():.2f} s (wall, 2 worker processes on a "
            "shared 2-core machine)."
        )
        se_cols = [f"se:{n}" for n in TRUTH[design]]
        no_se = int((conv & ~np.isfinite(df[se_cols].astype(float)).all(axis=1)).sum())
        if no_se:
            out.append(
                f"{no_se} converged fits have an undefined SE for some parameter (the Hessian is singular at a "
                "boundary estimate, e.g. var(v) → 0 or |corr(u0,v)| → 1): they count as converged but are left out of "
                "the coverage of *all* parameters (column n), which slightly flatters the coverage of var(v)."
            )
        if "error" in df and df["error"].notna().any():
            out.append(f"Errors: {df['error'].dropna().value_counts().to_dict()}")
        out.append("")
        out.append(md_table(summ, digits=4))
        out.append("")
        verdict = "PASS" if cov_ok.all() else "DIFFERS"
        cov_txt = ", ".join(f"{n} {summ.loc[n, 'Wald coverage %']:.1f}%" for n in fixed)
        out.append(f"Design `{design}`, fixed-effect Wald coverage within 93–97%: **{verdict}** ({cov_txt}).")
        for n in summ.index:
            c, mc = summ.loc[n, "Wald coverage %"], summ.loc[n, "MC SE %"]
            ratio = summ.loc[n, "mean SE"] / summ.loc[n, "emp SD"]
            if not 93 <= c <= 97:
                side = "over-covers (the SE is too large: conservative)" if c > 97 else "under-covers"
                out.append(
                    f"- `{n}` {side}: coverage {c:.1f}% ± {mc:.1f} (Monte-Carlo SE), mean SE / empirical SD = "
                    f"{ratio:.3f}, bias {summ.loc[n, 'bias']:.2g}."
                    + (
                        " For a variance the Wald interval is symmetric while the sampling distribution is "
                        "right-skewed: it misses mostly *below* the truth (see the profile table)."
                        if n.startswith("var(") and c < 93
                        else ""
                    )
                    + (
                        f" That is {abs(c - 95) / mc:.1f} Monte-Carlo SEs from 95%. The estimate is unbiased, and the "
                        "SE is computed correctly: on london_sim it equals MIXREGLS's observed-information SE to 1e-6 "
                        "(Section 1), and on replication 3 of this design the autograd Hessian equals a finite-"
                        "difference Hessian of the re-adapted likelihood to 1e-7 in every SE. So this is a property of "
                        "the observed-information Wald interval in this design (or Monte-Carlo chance), not of its "
                        "computation; the cause is not established."
                        if not n.startswith("var(")
                        else ""
                    )
                )
        out.append("")
        ppath = RESULTS / f"sim_{design}_profile.csv"
        if ppath.exists():
            pc = profile_coverage(pd.read_csv(ppath), df, TRUTH[design])
            out.append(
                f"Profile-likelihood intervals (`mlsml.profile.profile_ci`) on the first {len(pd.read_csv(ppath))} "
                "replications, beside the Wald intervals on the same replications:"
            )
            out.append("")
            out.append(md_table(pc, digits=1))
            out.append("")
            out.append(
                "Here a replication whose Wald SE is undefined (singular Hessian) counts as a Wald miss, so the Wald "
                "column can be below the main table's. Reading: the profile interval is asymmetric and respects "
                "var ≥ 0 ('lower end = 0' counts intervals reaching the boundary). "
                + "; ".join(
                    f"for {n} it moves coverage from {pc.loc[n, 'Wald coverage %']:.1f}% to "
                    f"{pc.loc[n, 'profile coverage %']:.1f}% (± {pc.loc[n, 'MC SE %']:.1f})"
                    for n in pc.index
                )
                + ". Remaining misses are mostly *below* the truth (upper end too low): with 100 schools the ML "
                "estimate of var(v) is biased down (about −3% above) and its likelihood is flat, which a first-order "
                "profile interval does not fully correct."
            )
            out.append("")
        fig = _figure(df, design, TRUTH[design])
        out.append(f"![sampling distributions, {design}](figures/{fig.name})")
        out.append("")
    return "\n".join(out)


def _figure(df: pd.DataFrame, design: str, truth: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import FIGURES

    ok = df[df["converged"].astype(bool)]
    fig, axes = plt.subplots(1, len(truth), figsize=(2.4 * len(truth), 2.4))
    for ax, (name, t) in zip(axes, truth.items()):
        z = (ok[f"est:{name}"] - t) / ok[f"se:{name}"]
        z = z[np.isfinite(z)]
        ax.hist(np.clip(z, -4, 4), bins=np.linspace(-4, 4, 33), density=True, color="0.7")
        g = np.linspace(-4, 4, 200)
        ax.plot(g, np.exp(-(g**2) / 2) / np.sqrt(2 * np.pi), "k-", lw=1)
        ax.set_title(name, fontsize=8)
        ax.set_xlim(-4, 4)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"(estimate - truth) / SE, design {design} (clipped to +-4): N(0,1) curve for reference", fontsize=9)
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"sim_{design}_zscores.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
