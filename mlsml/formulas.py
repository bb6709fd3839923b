"""Checks on the text of the formula arguments, before patsy sees them.

patsy (statsmodels' formula engine) evaluates the right-hand side of a formula
as Python, so some habits from other packages parse without an error and fit the
wrong model. The one that matters most is lme4's random-effects syntax:
``y ~ x + (1 + x | school)`` is read as a covariate ``(1 + x) | school`` (a
bitwise *or*), not as school effects. :func:`check_no_lme4_terms` refuses any
such term in any formula argument and spells out the mlsml call that fits what
was meant, built from the user's own terms::

    mlsml.fit("y ~ x + (1 + x | school)", data, groups="school")          # lme4 habit: refused
    mlsml.fit("y ~ x", data, groups="school", re_formula="~ x")          # the mlsml spelling

:func:`check_formula_sides` checks that the mean formula has a response and
that the other formulas are one-sided.

Examples
--------
>>> try:
...     check_no_lme4_terms({"formula": "normexam ~ standLRT + (1 + standLRT | school)"})
... except ModelSpecError as err:
...     print(str(err).splitlines()[-2].strip())
mlsml.fit("normexam ~ standLRT", data, groups="school", re_formula="~ standLRT")
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ModelSpecError
from .validate import describe_value

#: The formula arguments of :func:`mlsml.fit`, in the order of its signature, with
#: the words used for them in messages.
FORMULA_ARGS = {
    "formula": "the mean formula",
    "scale_formula": "the scale formula",
    "re_formula": "the random-effects formula",
    "scale_re_formula": "the scale random-effects formula",
    "bs_formula": "the between-school variance formula",
}

#: Defaults of the formula arguments (a suggested call leaves these out).
_DEFAULTS = {"scale_formula": "~ 1", "re_formula": "~ 1", "scale_re_formula": None, "bs_formula": None}

#: A simple column name (Python identifier, any script: patsy accepts ``école``).
_NAME = re.compile(r"[^\W\d][\w\.]*")


@dataclass(frozen=True)
class BarTerm:
    """One lme4-style term ``(lhs | group)`` (or ``||``) found in a formula.

    Attributes
    ----------
    start, end : int
        Span of the term in the formula text (``formula[start:end]``); for a bar
        outside any parentheses (``y ~ x | school``) the span is the right-hand side.
    lhs, group : str
        The effects and the grouping expression, stripped.
    double : bool
        ``||`` (lme4's uncorrelated effects).
    bare : bool
        The bar stands outside any parentheses.
    """

    start: int
    end: int
    lhs: str
    group: str
    double: bool
    bare: bool = False

    def text(self, formula: str) -> str:
        """The term as the user wrote it."""
        return formula[self.start : self.end].strip()


def _skip_string(text: str, i: int) -> int:
    """Index just past the string literal that starts at ``text[i]``."""
    quote = text[i]
    j = i + 1
    while j < len(text) and text[j] != quote:
        j += 2 if text[j] == "\\" else 1
    return j + 1


def bar_terms(formula: str) -> list[BarTerm]:
    """The lme4-style ``(... | ...)`` and ``(... || ...)`` terms of a formula.

    A ``|`` counts when it stands directly inside a bare pair of parentheses (not
    the parentheses of a function call such as ``I(a | b)``, which is Python's
    bitwise or and left to patsy) or outside any parentheses. Quoted strings are
    skipped.

    Examples
    --------
    >>> [(t.lhs, t.group, t.double) for t in bar_terms("y ~ x + (1 + x | school) + (0 + z || school)")]
    [('1 + x', 'school', False), ('0 + z', 'school', True)]
    >>> bar_terms("y ~ I(a | b) + C(g)")
    []
    """
    terms: list[BarTerm] = []
    stack: list[tuple[int, bool, list[int]]] = []  # (position of '(', is a call, positions of '|')
    bare_bars: list[int] = []
    i = 0
    while i < len(formula):
        ch = formula[i]
        if ch in "'\"":
            i = _skip_string(formula, i)
            continue
        if ch == "(":
            before = formula[:i].rstrip()
            is_call = bool(before) and (before[-1].isalnum() or before[-1] in "_.])")
            stack.append((i, is_call, []))
        elif ch == ")" and stack:
            start, is_call, bars = stack.pop()
            if bars and not is_call:
                terms.append(_make_term(formula, start, i + 1, bars[0]))
        elif ch == "|":
            if stack:
                stack[-1][2].append(i)
            else:
                bare_bars.append(i)
            if formula[i + 1 : i + 2] == "|":
                i += 1
        i += 1
    if bare_bars:
        tilde = formula.find("~")
        rhs_start = tilde + 1 if tilde >= 0 else 0
        bar = bare_bars[0]
        double = formula[bar + 1 : bar + 2] == "|"
        group = formula[bar + (2 if double else 1) :]
        terms.append(BarTerm(rhs_start, len(formula), formula[rhs_start:bar].strip(), group.strip(), double, bare=True))
    return sorted(terms, key=lambda t: t.start)


def _make_term(formula: str, start: int, end: int, bar: int) -> BarTerm:
    double = formula[bar + 1 : bar + 2] == "|"
    lhs = formula[start + 1 : bar]
    group = formula[bar + (2 if double else 1) : end - 1]
    return BarTerm(start, end, lhs.strip(), group.strip(), double)


def _split_plus(text: str) -> list[str]:
    """Split at ``+`` signs outside parentheses and strings."""
    out, depth, cur = [], 0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "'\"":
            j = _skip_string(text, i)
            cur += text[i:j]
            i = j
            continue
        depth += ch == "("
        depth -= ch == ")"
        if ch == "+" and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
        i += 1
    out.append(cur.strip())
    return [t for t in out if t]


def _without_terms(formula: str, terms: list[BarTerm]) -> str:
    """The formula with the bar terms cut out (``y ~ x + (1|g)`` -> ``y ~ x``)."""
    if "~" in formula:
        lhs, rhs = formula.split("~", 1)
        offset = len(lhs) + 1
    else:
        lhs, rhs, offset = None, formula, 0
    for t in sorted(terms, key=lambda t: -t.start):
        a, b = max(t.start - offset, 0), t.end - offset
        rhs = rhs[:a] + " " + (t.lhs if t.bare else "") + " " + rhs[b:]  # 'y ~ x | g': x is the fixed part
    kept = _split_plus(rhs) or ["1"]
    new_rhs = " + ".join(kept)
    return f"{lhs.strip()} ~ {new_rhs}" if lhs is not None and lhs.strip() else f"~ {new_rhs}"


def _combine(lhs_list: list[str]) -> str:
    """One mlsml effects formula from the left-hand sides of lme4 bar terms.

    ``["1 + x"] -> "~ x"``, ``["1", "0 + x"] -> "~ x"``, ``["0 + x"] -> "~ 0 + x"``.
    """
    intercept = False
    others: list[str] = []
    for lhs in lhs_list:
        parts = _split_plus(lhs)
        has_zero = False
        for p in parts:
            if p in ("0", "-1") or p.startswith("-"):
                has_zero = has_zero or p in ("0", "-1")
                if p not in ("0", "-1"):
                    others.append(p)
            elif p == "1":
                continue
            else:
                p = re.sub(r"\s*-\s*1\s*$", "", p)  # "x - 1"
                if p not in others:
                    others.append(p)
        if re.search(r"-\s*1\b", lhs) or has_zero:
            continue
        intercept = True
    if intercept:
        return "~ " + (" + ".join(others) if others else "1")
    return "~ 0" + "".join(f" + {o}" for o in others)


def check_no_lme4_terms(formulas: dict, groups=None, random_scale=True) -> None:
    """Refuse lme4's ``(effects | group)`` syntax in any formula argument.

    Parameters
    ----------
    formulas : dict
        Formula arguments by name (keys of :data:`FORMULA_ARGS`); non-strings are
        ignored (their type is checked elsewhere).
    groups : optional
        The ``groups`` argument as given (used in the suggested call when the bar
        terms do not name a simple column).
    random_scale : bool
        The ``random_scale`` argument as given.

    Raises
    ------
    ModelSpecError
        When a formula holds a ``|`` term, with the equivalent mlsml call built
        from the user's terms.

    Examples
    --------
    >>> try:
    ...     check_no_lme4_terms({"formula": "y ~ x + (1|school)", "scale_formula": "~ x + (1 + x | school)"})
    ... except ModelSpecError as err:
    ...     print(str(err).splitlines()[-2].strip())
    mlsml.fit("y ~ x", data, groups="school", scale_formula="~ x", scale_re_formula="~ x")
    """
    found = {arg: bar_terms(f) for arg, f in formulas.items() if isinstance(f, str)}
    found = {arg: ts for arg, ts in found.items() if ts}
    if not found:
        return
    first_arg = next(iter(found))
    first_term = found[first_arg][0]
    notes: list[str] = []
    group_exprs = []
    for ts in found.values():
        for t in ts:
            if t.group not in group_exprs:
                group_exprs.append(t.group)
    simple = [g for g in group_exprs if _NAME.fullmatch(g)]
    if len(group_exprs) > 1:
        notes.append(
            f"the terms group by {', '.join(map(repr, group_exprs))}: mlsml fits two-level models with a single "
            "grouping column (groups=)"
        )
    elif not simple:
        notes.append(
            f"the grouping {group_exprs[0]!r} is not a single column: mlsml fits two-level models; for nested ids "
            "build one column first (e.g. data['sch_class'] = data['school'].astype(str) + '/' + data['class'].astype(str))"
        )
    if simple:
        group_arg = simple[0]
    elif isinstance(groups, str):
        group_arg = groups
    else:
        group_arg = "<grouping column>"
    if isinstance(groups, str) and simple and groups != group_arg:
        notes.append(f"you passed groups={groups!r} but the formula groups by {group_arg!r}")
    if any(t.double for ts in found.values() for t in ts):
        notes.append(
            "'||' (lme4's uncorrelated effects) has no mlsml counterpart: mlsml estimates the full covariance "
            "matrix of the school effects"
        )

    new = {arg: f for arg, f in formulas.items() if isinstance(f, str)}
    for arg, ts in found.items():
        new[arg] = _without_terms(formulas[arg], ts)
    mean_lhs = [t.lhs for arg in ("formula", "re_formula") for t in found.get(arg, []) if not t.bare]
    scale_lhs = [t.lhs for arg in ("scale_formula", "scale_re_formula") for t in found.get(arg, []) if not t.bare]
    if "re_formula" in found:  # its own fixed-looking terms are random effects too
        rest = _without_terms(formulas["re_formula"], found["re_formula"])
        if rest.strip() not in ("~ 1", "~1"):
            mean_lhs.append(rest.split("~", 1)[1])
    if mean_lhs:
        new["re_formula"] = _combine(mean_lhs)
    if "scale_re_formula" in found:
        rest = _without_terms(formulas["scale_re_formula"], found["scale_re_formula"])
        if rest.strip() not in ("~ 1", "~1"):
            scale_lhs.append(rest.split("~", 1)[1])
        new.pop("scale_re_formula")
    scale_re = _combine(scale_lhs) if scale_lhs else None
    if scale_re is not None and scale_re != "~ 1":
        new["scale_re_formula"] = scale_re
    if "bs_formula" in found:
        notes.append(
            "bs_formula holds the covariates of ln var(u0) (school-level or level-1); the grouping comes from groups= "
            "(the bar term is dropped above)"
        )
    if "formula" in found and new.get("formula", "").strip().startswith("~"):
        notes.append("the mean formula also needs a response on the left of '~'")

    args = [f"{new.get('formula', formulas.get('formula'))!r}".replace("'", '"'), "data", f'groups="{group_arg}"']
    for arg in ("scale_formula", "re_formula", "scale_re_formula", "bs_formula"):
        value = new.get(arg)
        if value is not None and value.replace(" ", "") != (_DEFAULTS.get(arg) or "").replace(" ", ""):
            args.append(f'{arg}="{value}"')
    if scale_lhs and random_scale is False:
        args.append("random_scale=True")
    elif random_scale is False:
        args.append("random_scale=False")
    what = FORMULA_ARGS.get(first_arg, first_arg)
    hint = (
        "re_formula: school effects in the mean (random intercept '~ 1' by default); random_scale / scale_re_formula: "
        "school effects in the log residual variance; groups: the grouping column"
    )
    syntax = "a '|' outside any function call" if first_term.bare else "lme4's random-effects syntax"
    lines = [
        f"{what} {formulas[first_arg]!r} uses {syntax} {first_term.text(formulas[first_arg])!r}, which "
        "mlsml does not read (patsy would take '|' for a bitwise or and fit a meaningless covariate). "
        "In mlsml the formulas hold fixed effects only and the school effects are separate arguments:",
    ]
    lines += [f"  note: {n}" for n in notes]
    lines += ["  the same model in mlsml:", "    mlsml.fit(" + ", ".join(args) + ")", f"  ({hint})"]
    raise ModelSpecError("\n".join(lines))


def check_formula_sides(formulas: dict) -> None:
    """The mean formula is two-sided (``y ~ x``); every other formula is one-sided (``~ x``).

    Also checks that each formula argument is a string (or ``None`` where that is allowed).

    Parameters
    ----------
    formulas : dict
        Formula arguments by name (keys of :data:`FORMULA_ARGS`).

    Raises
    ------
    ModelSpecError
        Naming the argument and saying how to write it.

    Examples
    --------
    >>> try:
    ...     check_formula_sides({"formula": "y ~ x", "scale_formula": "y ~ x"})
    ... except ModelSpecError as err:
    ...     print(err)
    scale_formula='y ~ x' has a left-hand side ('y'), but the scale formula is one-sided: write '~ x' ...
    """
    for arg, value in formulas.items():
        what = FORMULA_ARGS.get(arg, arg)
        if value is None and arg != "formula":
            continue
        if not isinstance(value, str):
            example = "'y ~ x'" if arg == "formula" else "'~ x'"
            raise ModelSpecError(f"{arg} must be a formula string such as {example}, not {describe_value(value)}")
        if not value.strip():
            raise ModelSpecError(f"{arg} is an empty string; {what} needs at least an intercept ('~ 1')")
        if value.count("~") > 1:
            raise ModelSpecError(f"{arg}={value!r} has more than one '~'")
        if arg == "formula":
            lhs = value.split("~", 1)[0].strip() if "~" in value else ""
            if not lhs:
                raise ModelSpecError(
                    f"the mean formula {value!r} has no response: write it as 'y ~ {value.split('~', 1)[-1].strip() or '1'}' "
                    "with the response column on the left of '~'"
                )
        elif "~" in value and value.split("~", 1)[0].strip():
            lhs, rhs = (s.strip() for s in value.split("~", 1))
            raise ModelSpecError(
                f"{arg}={value!r} has a left-hand side ({lhs!r}), but {what} is one-sided: write '~ {rhs or '1'}' "
                "(the response is given once, in the mean formula)"
            )
