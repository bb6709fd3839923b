"""Validation suite of mlsml: ``python -m validation`` writes ``validation/REPORT.md``.

Modules, one per comparison:

- :mod:`validation.convert` -- MIXREGLS's raw parameters to ours (delta-method SEs);
- :mod:`validation.mixregls` -- against MIXREGLS / MixWILD (Fortran);
- :mod:`validation.frequentist` -- against lme4, glmmTMB (stored) and statsmodels (live);
- :mod:`validation.bayes` -- against brms and the seed paper's Stata/brms tables;
- :mod:`validation.replication` -- the paper's Models 1-6 on ``london_sim``;
- :mod:`validation.simstudy` -- bias, RMSE and coverage by simulation.
"""
