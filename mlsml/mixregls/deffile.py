"""MIXREGLS job files: the definition file (.def) and the data file (.dat), read and checked.

A MIXREGLS job is a definition file and a space-delimited data file sorted by
cluster. The definition file holds two title lines, the file names, one line
of numeric settings, the column numbers (1-based) of the cluster id, the
dependent variable and the covariates of the mean, BS-variance and
WS-variance models, and then their labels. Three layouts are read, told
apart by the number of file-name lines and of settings:

``mixregls_var`` (MIXREGLS 2013/2017, 5 header lines: titles, data, output, echo .def)
    ``NVAR P R S PNINT RNINT SNINT [PV RV SV] CONV NQ AQUAD MAXIT YMISS NCENT NCOV RIDGEIN DISCARD0``
``mixwild_2017`` (MixWILD 2017 ``mixregls_random_mixreg``; 4 header lines: titles, data, output prefix)
    ``... RIDGEIN NREPS CUTOFF NORS NO2ND DISCARD0`` (20 or 23 values), then second-stage lines
``mixwild_2`` (MixWILD 2.0 ``lsboth_random_mixblank``; 4 header lines)
    ``NVAR P R S PNINT RNINT SNINT PV RV SV CONV NQ AQUAD MAXIT YMISS NCENT NCOV RIDGEIN
    DISCARD0 MLS CHOL NREPS CUTOFF NORS MYSEED STAGE2 MULTI2ND SEPFILE``

As in MIXREGLS, the settings line has the short form (no ``PV RV SV``) when
its 8th value is a convergence criterion (``0 < CONV <= 0.9``) and the long
form otherwise. The meaning of the fields follows the program's READ
statements: ``P``, ``R``, ``S`` are the numbers of covariates of the mean,
BS-variance and WS-variance models; ``PNINT``/``RNINT``/``SNINT`` = 1 drops
that model's intercept; ``PV``/``RV``/``SV`` covariates are split into a
cluster mean and the deviation from it; ``YMISS`` is the missing-value code
(0 = none); ``NCENT = 1`` standardises all covariates; ``NCOV`` is the
association of the random scale with the random location (0 none, 1 linear, 2 quadratic);
``NORS = 1`` drops the random scale; ``DISCARD0 = 1`` drops clusters whose
responses are all equal. How the job becomes an mlsml model is in
:mod:`mlsml.mixregls.job`: ``NCOV`` 0, 1, 2 is ``association="none"``,
``"linear"``, ``"quadratic"``; the ``R`` BS-variance covariates are ``bs_formula``
(they must be constant within clusters), or random slopes in MixWILD 2.0's MLS
mode. MixWILD 2.0's second stage (``STAGE2 > 0``) is read by
:mod:`mlsml.mixregls.secondstage`. Options mlsml cannot fit (decomposed BS-variance
covariates ``RV`` outside the MLS mode, no BS intercept, MixWILD 2017's second stage) raise
:class:`~mlsml.errors.ModelSpecError` naming the option.

Weights and the type of standard errors, which MIXREGLS has not, are mlsml's own
``NAME = value`` lines at the end of the file (:mod:`mlsml.mixregls.keywords`).

Every setting is checked as the Fortran READs need it before anything else is
read: INTEGER fields must be whole numbers, switches 0 or 1, the counts
``P R S PV RV SV`` from 0 to ``NVAR``, ``NQ`` from ``MIN_NQ`` to ``MAX_NQ``, real
fields finite (a negative count would otherwise shift every later record and
fit another model). The data file name is relative to the folder of the .def;
it must name a regular file (not a directory, device or FIFO) of at most
``MAX_DATA_BYTES``, and a bad token of a file is quoted in an error only when
it is short (``MAX_ECHO_CHARS``).
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, MLSMLError, ModelSpecError
from .keywords import read_keywords
from .secondstage import Stage2Job, read_stage2

_SHORT = ["NVAR", "P", "R", "S", "PNINT", "RNINT", "SNINT", "CONV", "NQ", "AQUAD", "MAXIT", "YMISS", "NCENT", "NCOV", "RIDGEIN"]
_LONG = [
    "NVAR",
    "P",
    "R",
    "S",
    "PNINT",
    "RNINT",
    "SNINT",
    "PV",
    "RV",
    "SV",
    "CONV",
    "NQ",
    "AQUAD",
    "MAXIT",
    "YMISS",
    "NCENT",
    "NCOV",
    "RIDGEIN",
]
_LAYOUTS = {
    ("mixregls_var", False): _SHORT + ["DISCARD0"],
    ("mixregls_var", True): _LONG + ["DISCARD0"],
    ("mixwild_2017", False): _SHORT + ["NREPS", "CUTOFF", "NORS", "NO2ND", "DISCARD0"],
    ("mixwild_2017", True): _LONG + ["NREPS", "CUTOFF", "NORS", "NO2ND", "DISCARD0"],
    ("mixwild_2", True): _LONG + ["DISCARD0", "MLS", "CHOL", "NREPS", "CUTOFF", "NORS", "MYSEED", "STAGE2", "MULTI2ND", "SEPFILE"],
}

#: Settings the Fortran programs READ into INTEGER variables: list-directed input accepts
#: only a whole number there (no decimal point, no exponent, no NaN or Infinity).
_INTEGER_FIELDS = frozenset(
    "NVAR P R S PNINT RNINT SNINT PV RV SV NQ AQUAD MAXIT NCENT NCOV DISCARD0 "
    "NREPS NORS NO2ND MLS CHOL MYSEED STAGE2 MULTI2ND SEPFILE".split()
)
#: Settings that are 0/1 switches (``P = P + 1 - PNINT`` etc.: any other value corrupts the model).
_SWITCHES = ("PNINT", "RNINT", "SNINT", "AQUAD", "NCENT", "DISCARD0", "NORS", "NO2ND", "MLS")
#: Counts of columns (records of that many column numbers and labels follow).
_COUNTS = {
    "P": "mean-model covariates",
    "R": "BS-variance covariates",
    "S": "WS-variance covariates",
    "PV": "decomposed mean-model covariates",
    "RV": "decomposed BS-variance covariates",
    "SV": "decomposed WS-variance covariates",
}
#: NVAR: at least the cluster id and the dependent variable; at most this many values per record.
MIN_NVAR, MAX_NVAR = 2, 10_000
#: NQ, quadrature points per dimension (MIXREGLS documents 2-20; MixWILD jobs use up to 31).
MIN_NQ, MAX_NQ = 1, 100
#: NCOV: association of the random scale with the random location (0 none, 1 linear, 2 quadratic).
NCOV_VALUES = (0, 1, 2)

#: mlsml's ``association`` for each NCOV (:func:`mlsml.fit`).
NCOV_ASSOCIATION = {0: "none", 1: "linear", 2: "quadratic"}
#: A definition file is a few lines; a longer file is not one.
MAX_DEF_BYTES = 1 << 20
#: The largest data file read (1 GiB, about 40 million values).
MAX_DATA_BYTES = 1 << 30
#: A bad token of a file is quoted in an error message only when it has at most this many characters.
MAX_ECHO_CHARS = 16


def _num(tok: str) -> float:
    return float(tok.replace("D", "E").replace("d", "e"))


def _is_num(tok: str) -> bool:
    try:
        _num(tok)
    except ValueError:
        return False
    return True


def _tokens(line: str) -> list[str]:
    """List-directed tokens of one record: blanks or commas separate; quotes group; '/' ends the record."""
    line = line.split("/", 1)[0] if "/" in line and not re.search(r"['\"]", line) else line
    try:
        toks = shlex.split(line.replace(",", " "), posix=True)
    except ValueError:
        toks = line.replace(",", " ").split()
    return toks


def _shown(tok: str) -> str:
    """A token of a file for an error message: quoted if short, else only its length.

    A bad value in a job or data file is short ("NA", ".", "1,5"); a long token means the
    file is not a MIXREGLS file at all, and its contents are not echoed.
    """
    if len(tok) <= MAX_ECHO_CHARS and tok.isprintable():
        return repr(tok)
    return f"<{len(tok)} characters of text>"


def _whole(tok: str) -> int | None:
    """The value of an integer token as Fortran's list-directed READ takes it (``None`` if it is not one)."""
    return int(tok) if re.fullmatch(r"[+-]?\d{1,18}", tok) else None


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def read_regular_file(path: str | Path, what: str, limit: int, error: type[MLSMLError]) -> str:
    """The text of ``path``, which must be a regular file of at most ``limit`` bytes.

    A job file names its data file, so the name may point anywhere: a device
    (``/dev/zero`` never ends), a FIFO (blocks until someone writes), a huge file.
    The path is checked with :func:`os.stat` before it is opened; it is then opened
    without blocking and checked again (it may have been replaced in between), and
    at most ``limit + 1`` bytes are read.

    Raises
    ------
    MLSMLError
        ``error`` (a subclass), naming the file and why it is refused.
    """
    name = str(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(f"cannot read the {what} {name!r}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise error(f"cannot read the {what} {name!r}: it is {_file_kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise error(f"cannot read the {what} {name!r}: it has {st.st_size} bytes, more than the {limit} accepted")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"cannot read the {what} {name!r}: {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"cannot read the {what} {name!r}: it is {_file_kind(mode)}, not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise error(f"cannot read the {what} {name!r}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if size > limit:
        raise error(f"cannot read the {what} {name!r}: it has more than the {limit} bytes accepted")
    raw = b"".join(chunks)
    if b"\0" in raw:
        raise error(f"cannot read the {what} {name!r}: it is a binary file (it holds NUL bytes), not text")
    return raw.decode("utf-8", errors="replace")


def _check_settings(settings: dict[str, float], toks: dict[str, str], where: str) -> None:
    """Check every setting as the Fortran READs and the model need: types, switches, counts and bounds.

    Raises
    ------
    ModelSpecError
        Naming the record (``where``), the field and its value.
    """

    def bad(name: str, why: str) -> ModelSpecError:
        return ModelSpecError(f"{where}: field {name} = {_shown(toks[name])} {why}")

    for name in toks:
        if name in _INTEGER_FIELDS and _whole(toks[name]) is None:
            raise bad(name, "is not a whole number (MIXREGLS reads it as an INTEGER)")
        if name not in _INTEGER_FIELDS and not np.isfinite(settings[name]):
            raise bad(name, "is not a finite number")
    nvar = int(settings["NVAR"])
    if not MIN_NVAR <= nvar <= MAX_NVAR:
        raise bad(
            "NVAR", f"must be from {MIN_NVAR} to {MAX_NVAR} (values per record: at least the cluster id and the dependent variable)"
        )
    for name, what in _COUNTS.items():
        if name in settings and not 0 <= int(settings[name]) <= nvar:
            raise bad(name, f"must be from 0 to NVAR = {nvar} (the number of {what})")
    for name in _SWITCHES:
        if name in settings and int(settings[name]) not in (0, 1):
            raise bad(name, "must be 0 or 1")
    if int(settings["NCOV"]) not in NCOV_VALUES:
        raise bad("NCOV", f"must be one of {', '.join(map(str, NCOV_VALUES))}")
    if not MIN_NQ <= int(settings["NQ"]) <= MAX_NQ:
        raise bad("NQ", f"must be from {MIN_NQ} to {MAX_NQ} (quadrature points per dimension)")
    if int(settings["MAXIT"]) < 0:
        raise bad("MAXIT", "must not be negative")
    if not settings["CONV"] > 0:
        raise bad("CONV", "must be positive (the convergence criterion)")
    if settings["RIDGEIN"] < 0:
        raise bad("RIDGEIN", "must not be negative")


@dataclass(frozen=True)
class MixreglsJob:
    """A parsed MIXREGLS definition file (see the module docstring for the fields)."""

    title: tuple[str, ...]
    data_file: str
    output_file: str
    layout: str
    settings: dict[str, float]
    id_col: int
    y_col: int
    x_cols: tuple[int, ...]
    u_cols: tuple[int, ...]
    w_cols: tuple[int, ...]
    pv_cols: tuple[int, ...]
    sv_cols: tuple[int, ...]
    y_label: str
    x_labels: tuple[str, ...]
    w_labels: tuple[str, ...]
    pv_labels: tuple[str, ...]
    sv_labels: tuple[str, ...]
    path: Path | None = None
    notes: tuple[str, ...] = field(default=())
    u_labels: tuple[str, ...] = field(default=())
    stage2: Stage2Job | None = None
    #: mlsml's own keywords after the last record (weights, COVTYPE: :mod:`mlsml.mixregls.keywords`).
    keywords: dict = field(default_factory=dict)

    def setting(self, name: str, default: float = 0.0) -> float:
        """A numeric setting (``NQ``, ``YMISS``, ...); ``default`` when the layout lacks it."""
        return float(self.settings.get(name, default))

    @property
    def nq(self) -> int:
        """Quadrature points per dimension (``NQ``)."""
        return int(self.setting("NQ", 11))

    @property
    def random_scale(self) -> bool:
        """Whether the model has the random scale (``NORS != 1``)."""
        return int(self.setting("NORS", 0)) != 1

    @property
    def random_slopes(self) -> bool:
        """MixWILD 2.0's MIXREGMLS mode (``MLS = 1``): the BS-variance columns are random slopes."""
        return int(self.setting("MLS", 0)) == 1

    @property
    def data_path(self) -> Path:
        """The data file, relative to the folder of the .def file."""
        p = Path(self.data_file)
        if not p.is_absolute() and self.path is not None:
            p = self.path.parent / p
        return p


def _check_supported(s: dict[str, float], layout: str) -> list[str]:
    notes = []

    def bad(name, why):
        raise ModelSpecError(f"MIXREGLS option {name} = {s[name]:g} is not supported by mlsml: {why}")

    mls = int(s.get("MLS", 0)) == 1
    if mls:  # MIXREGMLS (MixWILD 2.0): the R columns carry random slopes; NCOV is forced to 1
        s["NCOV"] = 1.0
        if int(s.get("RV", 0)) != 0:
            bad("RV", "decomposed random-slope covariates of MIXREGMLS are not read; add the deviation column to the data")
        if int(s["R"]) == 0 and int(s["RNINT"]) == 1:
            bad("RNINT", "a model without random location effects is not a location scale model")
    else:
        if int(s["R"]) != 0 and layout == "mixwild_2017":
            bad(
                "R",
                "in the MixWILD 2017 layout the R columns are BS-variance covariates for mixregls_random_* but random "
                "slopes for mixregmls_random_*, and the file does not say which program it is for: write the job in "
                "the MIXREGLS (mixregls_var) layout, or MixWILD 2.0's with MLS = 0 (BS variance) or MLS = 1 (random slopes)",
            )
        if int(s["R"]) != 0:
            notes.append(
                f"R = {int(s['R'])}: the BS variance model ln var(u0) = ALPHA'u is fitted as bs_formula; mlsml needs its "
                "covariates constant within each cluster (MIXREGLS also evaluates them per observation)"
            )
        if int(s.get("RV", 0)) != 0:
            bad(
                "RV",
                "BS/WS-decomposed covariates of the BS variance model are not available: the within-cluster part varies "
                "within clusters, and mlsml's BS variance covariates must be cluster-level (give the cluster means as R columns)",
            )
        if int(s["RNINT"]) == 1:
            bad("RNINT", "a model without the random location (BS variance intercept) is not a MIXREGLS model mlsml fits")
    if layout == "mixwild_2017" and int(s.get("NO2ND", 1)) != 1:
        bad("NO2ND", "second-stage models are not fitted; set NO2ND = 1 to run stage 1")
    rs = int(s.get("NORS", 0)) != 1
    if rs and int(s["NCOV"]) != 1:
        notes.append(
            f"NCOV = {int(s['NCOV'])}: fitted with association={NCOV_ASSOCIATION[int(s['NCOV'])]!r} "
            + ("(cov(u0,v) = 0)" if int(s["NCOV"]) == 0 else "(Loc Eff and Quad Loc, quad(u0,v))")
        )
    if int(s["AQUAD"]) == 0:
        notes.append(
            "AQUAD = 0 (non-adaptive quadrature) asked for; mlsml always uses adaptive quadrature, "
            "which approximates the same likelihood more accurately"
        )
    notes.append(
        f"CONV = {s['CONV']:g}, MAXIT = {int(s['MAXIT'])}, RIDGEIN = {s['RIDGEIN']:g} are MIXREGLS's Newton-Raphson "
        "settings; mlsml uses its own optimiser and convergence checks"
    )
    return notes


def parse_def(path: str | Path | None = None, text: str | None = None) -> MixreglsJob:
    """Read a MIXREGLS/MixWILD definition file.

    Parameters
    ----------
    path : str or Path, optional
        The .def file (data file names in it are relative to its folder).
    text : str, optional
        The file's contents instead of ``path``.

    Returns
    -------
    MixreglsJob

    Raises
    ------
    ModelSpecError
        A malformed file (naming the line and field) or an option mlsml cannot fit.
    """
    where = str(path) if path is not None else "<text>"
    if text is None:
        if path is None:
            raise ModelSpecError("parse_def needs a path or text")
        text = read_regular_file(path, "definition file", MAX_DEF_BYTES, ModelSpecError)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")

    def first_n_numeric(i: int, n: int = 8) -> bool:
        if i >= len(lines):
            return False
        t = _tokens(lines[i])
        return len(t) >= n and all(_is_num(x) for x in t[:n])

    if first_n_numeric(5) and not first_n_numeric(4):
        header, family = 5, "mixregls_var"
    elif first_n_numeric(4):
        header, family = 4, "mixwild"
    else:
        raise ModelSpecError(
            f"{where}: no settings line (NVAR P R S ...) found on line 5 or 6; this does not look like a MIXREGLS .def file"
        )
    title = tuple(lines[i].rstrip()[:72].strip() for i in range(2))
    data_file = lines[2].strip().strip("'\"").strip()  # a path: may hold '/' (not a list-directed record end here)
    output_file = lines[3].strip().strip("'\"").strip()
    if not data_file:
        raise ModelSpecError(f"{where}, line 3: no data file name")
    toks = _tokens(lines[header])
    if family == "mixwild":
        family = "mixwild_2" if len(toks) >= len(_LAYOUTS[("mixwild_2", True)]) else "mixwild_2017"
    eighth = _num(toks[7])  # as MIXREGLS: CONV in the short form (0 < CONV <= 0.9), PV in the long one (0 or > 0.9)
    if family == "mixwild_2":
        long = True
    elif eighth > 0.9 or eighth == 0.0:
        long = True
    elif eighth > 0.0:
        long = False
    else:
        raise ModelSpecError(
            f"{where}, line {header + 1} (settings): the 8th value {_shown(toks[7])} is neither CONV "
            "(0 < CONV <= 0.9, short form) nor PV (a count >= 0, long form)"
        )
    names = _LAYOUTS[(family, long)]
    if len(toks) < len(names):
        raise ModelSpecError(
            f"{where}, line {header + 1}: the settings line has {len(toks)} values; the {family} layout "
            f"({'long' if long else 'short'} form) needs {len(names)}: {' '.join(names)}"
        )
    settings: dict[str, float] = {}
    for name, tok in zip(names, toks):
        if not _is_num(tok):
            raise ModelSpecError(f"{where}, line {header + 1}: field {name} has the value {_shown(tok)}, not a number")
        settings[name] = _num(tok)
    _check_settings(settings, dict(zip(names, toks)), f"{where}, line {header + 1} (settings)")
    s = settings
    notes = _check_supported(s, family)
    if int(s["S"]) == 0 and int(s["SNINT"]) == 1:
        s["SNINT"] = 0.0  # as MIXREGLS: never a model without an error variance

    pos = header + 1

    def read_record(n: int, what: str, conv=int) -> list:
        nonlocal pos
        vals: list[str] = []
        while len(vals) < n:
            if pos >= len(lines):
                raise ModelSpecError(f"{where}: the file ends while reading {what} ({n} value(s) expected)")
            vals += _tokens(lines[pos])
            pos += 1
        vals = vals[:n]
        if conv is int:
            out = []
            for v in vals:
                col = _whole(v)
                if col is None:
                    raise ModelSpecError(f"{where}, line {pos}: {what}: {_shown(v)} is not a column number (a whole number)")
                out.append(col)
            return out
        return [str(v) for v in vals]

    P, R, S = int(s["P"]), int(s["R"]), int(s["S"])
    PV, SV = int(s.get("PV", 0)), int(s.get("SV", 0))
    id_col, y_col = read_record(2, "the columns of the cluster id and the dependent variable")
    x_cols = read_record(P, "the mean-model columns") if P else []
    u_cols = read_record(R, "the BS-variance columns") if R else []
    w_cols = read_record(S, "the WS-variance columns") if S else []
    pv_cols = read_record(PV, "the BS/WS-decomposed mean-model columns") if PV else []
    sv_cols = read_record(SV, "the BS/WS-decomposed WS-variance columns") if SV else []
    y_label = read_record(1, "the label of the dependent variable", str)[0]
    x_labels = read_record(P, "the mean-model labels", str) if P else []
    u_labels = read_record(R, "the BS-variance (random-slope) labels", str) if R else []
    w_labels = read_record(S, "the WS-variance labels", str) if S else []
    pv_labels = read_record(PV, "the decomposed mean-model labels", str) if PV else []
    sv_labels = read_record(SV, "the decomposed WS-variance labels", str) if SV else []
    stage2 = read_stage2(read_record, s, where) if int(s.get("STAGE2", 0)) != 0 else None  # MixWILD 2.0's second stage
    nvar = int(s["NVAR"])
    for name, cols in (
        ("id", [id_col]),
        ("y", [y_col]),
        ("mean", x_cols),
        ("BS variance", u_cols),
        ("WS variance", w_cols),
        ("decomposed", pv_cols + sv_cols),
    ):
        for c in cols:
            if not 1 <= c <= nvar:
                raise ModelSpecError(f"{where}: {name} column number {c} is outside 1..NVAR = {nvar}")
    keywords = read_keywords(lines, pos, where, nvar)
    return MixreglsJob(
        title=title,
        data_file=data_file,
        output_file=output_file,
        layout=family,
        settings=settings,
        id_col=id_col,
        y_col=y_col,
        x_cols=tuple(x_cols),
        u_cols=tuple(u_cols),
        w_cols=tuple(w_cols),
        pv_cols=tuple(pv_cols),
        sv_cols=tuple(sv_cols),
        y_label=y_label,
        x_labels=tuple(x_labels),
        w_labels=tuple(w_labels),
        pv_labels=tuple(pv_labels),
        sv_labels=tuple(sv_labels),
        u_labels=tuple(u_labels),
        path=Path(path) if path is not None else None,
        notes=tuple(notes),
        stage2=stage2,
        keywords=keywords,
    )


def read_dat(path: str | Path, nvar: int) -> np.ndarray:
    """Read a MIXREGLS data file: ``nvar`` numbers per record (list-directed, as Fortran's ``READ(1,*)``).

    A record may continue on the next line when a line has fewer than ``nvar``
    values; values beyond ``nvar`` on a line are ignored.
    """
    if isinstance(nvar, bool) or not isinstance(nvar, (int, np.integer)) or not MIN_NVAR <= nvar <= MAX_NVAR:
        raise ModelSpecError(f"nvar must be a whole number from {MIN_NVAR} to {MAX_NVAR}, not {nvar!r}")
    text = read_regular_file(path, "data file", MAX_DATA_BYTES, DataError)
    rows, cur, start = [], [], 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        toks = line.replace(",", " ").split()
        if not toks:
            continue
        if not cur:
            start = lineno
        for t in toks:
            if len(cur) == nvar:
                break
            try:
                cur.append(_num(t))
            except ValueError as exc:
                raise DataError(
                    f"{path}, line {lineno}: {_shown(t)} is not a number (a MIXREGLS data file holds only numbers, "
                    "separated by blanks or commas)"
                ) from exc
        if len(cur) == nvar:
            rows.append(cur)
            cur = []
    if cur:
        raise DataError(f"{path}: the last record (from line {start}) has {len(cur)} of NVAR = {nvar} values")
    if not rows:
        raise DataError(f"{path}: no data records")
    return np.asarray(rows, dtype=float)
