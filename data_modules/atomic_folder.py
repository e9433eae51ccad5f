"""A cohort folder that appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_atomically(root: str | Path, what: str = "cohort") -> Iterator[Path]:
    """Yield a temporary sibling of ``root`` to fill; on success it is renamed to ``root``,
    on any error (or interruption) it is removed.

    Why: a generator killed halfway must never leave a folder that looks like a complete
    cohort and is reused on the next run. ``root`` must be absent or empty (nothing is
    written over).
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; choose an empty or new folder for the {what}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        yield tmp
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
