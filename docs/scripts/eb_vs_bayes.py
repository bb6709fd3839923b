"""How much do empirical-Bayes school intervals understate full-Bayes ones?

Run: ``PYTHONPATH=. python3 docs/scripts/eb_vs_bayes.py`` (uses tests/data; prints the
tables quoted in docs/predictions.md; needs ../shared/validation/r for the brms columns).

Empirical-Bayes (EB) intervals condition on the ML estimates. A Bayesian fit (brms, the
paper's Stata bayesmh) also averages over the uncertainty of the parameters. We
approximate that average by drawing theta from its large-sample normal distribution
N(theta_hat, (-H)^{-1}) on the optimiser scale (log-Cholesky) and drawing every school's
effects from its exact posterior given each theta (mlsml.predict.PosteriorGrid.draws).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

import mlsml
from mlsml.predict import PosteriorGrid

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "validation" / "r"
DATA = {"exam": ("normexam", "standLRT", ROOT / "tests/data/exam.csv"), "seed_sim": ("y", "x", ROOT / "tests/data/seed_sim.csv")}


def theta_integrated(res, n_theta=400, per_theta=50, seed=1):
    design = res.model.design
    rng = np.random.default_rng(seed)
    H = np.asarray(res.hessian)
    cov = np.linalg.inv(-0.5 * (H + H.T))
    thetas = rng.multivariate_normal(np.asarray(res.theta), cov, size=n_theta)
    zbar = design.Z.mean(axis=0)
    wbar = design.W.mean(axis=0)
    k = design.layout.p
    mean_draws, var_draws = [], []
    for th in thetas:
        g = PosteriorGrid.build(th, design)
        cu, v = g.draws(zbar, per_theta, rng)
        alpha = th[k : k + design.layout.k]
        mean_draws.append(cu)
        var_draws.append(np.exp(wbar @ alpha + v))
    return np.concatenate(mean_draws), np.concatenate(var_draws)


def main():
    for name, (y, x, path) in DATA.items():
        df = pd.read_csv(path)
        res = mlsml.fit(f"{y} ~ {x}", df, groups="school", scale_formula=f"~ {x}")
        t = res.school_effects()
        md, vd = theta_integrated(res)
        lo_m, hi_m = np.quantile(md, [0.025, 0.975], axis=0)
        lo_v, hi_v = np.quantile(vd, [0.025, 0.975], axis=0)
        wm = (hi_m - lo_m) / (t["mean_hi"] - t["mean_lo"]).to_numpy()
        wv = (hi_v - lo_v) / (t["var_hi"] - t["var_lo"]).to_numpy()
        flags_m = int(((lo_m > 0) | (hi_m < 0)).sum())
        med = np.exp(res.model.design.W.mean(axis=0) @ res.fe_scale.to_numpy())
        print(f"\n== {name} Model 3: {res.ngroups} schools, {res.nobs} students")
        print(
            f"interval width ratio, theta-integrated / EB: school means median {np.median(wm):.3f} "
            f"(range {wm.min():.3f}-{wm.max():.3f}); school variances median {np.median(wv):.3f} "
            f"(range {wv.min():.3f}-{wv.max():.3f})"
        )
        print(
            f"schools separable (means): EB {(t['mean_flag'] != 0).sum()}, theta-integrated {flags_m}; "
            f"(variances vs exp(wbar'a) = {med:.4f}): EB {(t['var_flag'] != 0).sum()}"
        )
        ref = SHARED / f"{name}__brms__M3.json"
        if ref.exists():
            b = json.loads(ref.read_text())["ours"]
            P = res.params
            rows = [
                ("beta0", "mean:Intercept"),
                ("beta1", f"mean:{x}"),
                ("alpha0", "scale:Intercept"),
                ("alpha1", f"scale:{x}"),
                ("sigma2_u", "var(u0)"),
                ("sigma2_v", "var(v)"),
                ("sigma_uv", "cov(u0,v)"),
            ]
            tab = pd.DataFrame(
                [(k, P[o], res.bse[o], b[k]["mean"], b[k]["50%"], b[k]["sd"]) for k, o in rows],
                columns=["param", "ML", "ML se", "brms mean", "brms median", "brms sd"],
            )
            print(tab.round(4).to_string(index=False))
            # EB intervals with the parameters set to brms's posterior medians
            nat = P.copy()
            for k, o in rows:
                nat[o] = b[k]["50%"]
            th = res.model.theta_from_params(nat)
            g = PosteriorGrid.build(th, res.model.design)
            zbar = res.model.design.Z.mean(axis=0)
            qm = g.quantile_linear(zbar, [0.025, 0.975])
            qv = g.quantile_v([0.025, 0.975])
            rm = (qm[:, 1] - qm[:, 0]) / (t["mean_hi"] - t["mean_lo"]).to_numpy()
            rv = (qv[:, 1] - qv[:, 0]) / np.log(t["var_hi"] / t["var_lo"]).to_numpy()
            print(
                f"EB intervals at brms's posterior medians / at the ML estimates: width ratio school means "
                f"median {np.median(rm):.3f}, log school variances median {np.median(rv):.3f}"
            )
            print(
                "brms JSON has no school-level posteriors (keys: "
                + ", ".join(sorted(json.loads(ref.read_text()).keys())[:8])
                + ", ...)"
            )


if __name__ == "__main__":
    main()
