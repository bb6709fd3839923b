"""An older revision of the package, unpacked beside the current one, for old-vs-new benchmarks.

Standard library only, so that importing it costs the benchmark drivers nothing.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def merge_base() -> str:
    """The merge-base of HEAD and main (the revision this branch started from)."""
    out = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def export_tree(rev: str, dest: Path) -> Path:
    """Unpack the ``mlsml`` package of revision ``rev`` into ``dest`` (no git worktree, nothing to clean up in .git)."""
    tar = subprocess.run(["git", "archive", "--format=tar", rev, "mlsml"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse odd members
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover
            tf.extractall(dest)
    return dest
