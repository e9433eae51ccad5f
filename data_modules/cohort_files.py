"""What the generated cohorts (synthetic, LIDC) share about writing and reusing their folder.

* :func:`written_atomically` — the folder appears whole or not at all;
* :func:`existing_cohort` — a folder is reused only when its ``cohort.json`` says it was
  built with the settings asked for, and never written over otherwise;
* :func:`map_records` — one record per job, in job order, from a few processes;
* :func:`save_ct` — a volume as an int16 NIfTI in HU with its true affine;
* :func:`reject_fixed` — the data-module arguments such a cohort makes meaningless.
"""

from __future__ import annotations

import inspect
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

Job = TypeVar("Job")
Record = TypeVar("Record")


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


def existing_cohort(
    root: str | Path, spec: dict, defaults: dict, format_version: int, kind: str
) -> Path | None:
    """The manifest of the ``kind`` cohort at ``root`` when its ``cohort.json`` matches
    ``spec`` and ``format_version``; ``None`` when ``root`` is absent or empty (build it).

    Settings added after a cohort was written take their ``defaults`` (the behaviour it was
    written with), so older cohorts stay valid. Any other folder is an error: nothing is
    written over.
    """
    root = Path(root)
    info = root / "cohort.json"
    if info.exists():
        saved = json.loads(info.read_text())
        saved_spec = {**defaults, **saved.get("spec", {})}
        if saved_spec != spec or saved.get("format_version") != format_version:
            asked = {"format_version": format_version, **spec}
            have = {"format_version": saved.get("format_version"), **saved_spec}
            diff = {k: (have.get(k), v) for k, v in asked.items() if have.get(k) != v}
            raise FileExistsError(
                f"{root} holds a {kind} cohort generated with other settings "
                f"(saved vs requested: {diff}); point root at a new folder or delete it"
            )
        return root / "manifest.parquet"
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and holds no cohort.json: it is not a {kind} cohort; "
            "choose an empty or new folder"
        )
    return None


def default_workers() -> int:
    """Generation processes when none are asked for: two, or fewer on a smaller machine."""
    return min(2, os.cpu_count() or 1)


_TASK: tuple[Callable, tuple] | None = None  # (record, context) in a worker process


def _init_worker(record: Callable, context: tuple) -> None:
    global _TASK
    _TASK = (record, context)


def _run(job: Any) -> Any:
    assert _TASK is not None, "_init_worker was not run in this process"
    record, context = _TASK
    return record(job, *context)


def map_records(
    record: Callable[..., Record],
    jobs: Sequence[Job],
    context: tuple,
    workers: int | None,
    jobs_per_worker: int,
    chunksize: int,
    desc: str,
    progress: bool = True,
) -> list[Record]:
    """``[record(job, *context) for job in jobs]``, from up to ``workers`` processes
    (default :func:`default_workers`).

    The context goes to each worker once, not with every job. Small cohorts stay
    in-process (a process per ``jobs_per_worker`` jobs at most): a pool costs more than it
    saves there, and a daemonic process (e.g. a loader worker) may not start children.
    Workers fork where the platform can (they inherit the imported modules and start in
    milliseconds; spawned ones would re-import torch and Lightning). The records do not
    depend on the number of processes as long as ``record`` is a pure function of its
    arguments.
    """
    n = default_workers() if workers is None else workers
    n = max(1, min(n, math.ceil(len(jobs) / jobs_per_worker)))
    if multiprocessing.current_process().daemon:
        n = 1
    bar = dict(total=len(jobs), desc=desc, disable=not progress)
    if n == 1:
        return [record(job, *context) for job in tqdm(jobs, **bar)]
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(
        n, mp_context=ctx, initializer=_init_worker, initargs=(record, context)
    ) as pool:
        return list(tqdm(pool.map(_run, jobs, chunksize=chunksize), **bar))


def save_ct(vol: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """``vol`` (int16 HU, (x, y, z)) as NIfTI with ``affine`` as both qform and sform, in mm,
    so every reader (nibabel, MONAI, ITK) places the voxels the same way."""
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


# CTEHRDataModule arguments a generated cohort fixes itself: its EHR features and its split
# column come from its own settings.
FIXED_BY_COHORT = (
    "ehr_columns",
    "ehr_table",
    "ehr_join",
    "val_fraction",
    "test_fraction",
    "split_seed",
)


def reject_fixed(kwargs: dict[str, Any], parent: type, kind: str) -> None:
    """Stop on a :data:`FIXED_BY_COHORT` argument set to anything but ``parent``'s default.

    Why: a cohort data module forwards ``parent``'s arguments through ``**kwargs`` (so the
    CLI and YAML accept and list all of them); these would otherwise be accepted and have
    no effect, and bad input must never pass silently.
    """
    params = inspect.signature(parent.__init__).parameters
    for name in FIXED_BY_COHORT:
        if name in kwargs and kwargs[name] != params[name].default:
            raise ValueError(
                f"{name}={kwargs[name]!r} does not apply to the {kind} cohort: its EHR "
                "features and its splits are fixed by the cohort's own settings; remove it"
            )
