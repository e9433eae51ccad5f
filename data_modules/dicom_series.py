"""Which DICOM series of a folder is the row's volume, and which files are not images.

Why: the most common export puts the thin and the thick reconstruction of a study (and
often a scout, a dose report, a ``DICOMDIR``) in one folder. "One manifest row per series"
cannot be followed when the series share a folder, so a row picks its series:

* a ``series_uid`` column (``SeriesInstanceUID``) names it exactly; or, without one,
* the **thinnest axial** policy: among the folder's series that are not localizers, are
  axial (slice normal within ~25 degrees of the body axis) and have at least
  ``MIN_SLICES`` slices, the one with the smallest ``SliceThickness`` (then the most
  slices). ``validate`` lists what it picked and what it left, so the choice is visible.

Files that are not images are ignored and counted, never taken for a second series: a
``DICOMDIR`` (Media Storage Directory), other DICOM objects without pixels (structured
reports, presentation states), and files that are not DICOM at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
AXIAL_COS = 0.9  # |normal . z| above this is axial


@dataclass
class SeriesSummary:
    """What a person needs to tell a folder's series apart."""

    uid: str
    description: str
    n_files: int
    thickness: float | None
    axial: bool
    localizer: bool

    def describe(self) -> str:
        mm = f"{self.thickness:g} mm" if self.thickness is not None else "thickness ?"
        kind = "localizer" if self.localizer else ("axial" if self.axial else "not axial")
        return f"{self.uid} ({self.description!r}, {self.n_files} files, {mm}, {kind})"


def is_image(ds: Any) -> bool:
    """A DICOM header that describes pixels (not a DICOMDIR, report or presentation state)."""
    meta = getattr(ds, "file_meta", None)
    sop = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    return sop != MEDIA_STORAGE_DIRECTORY and "Rows" in ds and "Columns" in ds


def summarise(uid: str, heads: list[Any]) -> SeriesSummary:
    first = heads[0]
    image_type = {str(v).upper() for v in (first.get("ImageType") or [])}
    axial = False
    iop = first.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        axial = abs(float(normal[2])) > AXIAL_COS * float(np.linalg.norm(normal) or 1.0)
    thick = [float(h.SliceThickness) for h in heads if h.get("SliceThickness") not in (None, "")]
    return SeriesSummary(
        uid=uid,
        description=str(first.get("SeriesDescription", "")),
        n_files=len(heads),
        thickness=float(np.median(thick)) if thick else None,
        axial=axial,
        localizer=bool({"LOCALIZER", "SCOUT"} & image_type),
    )


def choose_series(
    groups: dict[str, list[Any]], series_uid: str | None, min_slices: int
) -> tuple[str, list[SeriesSummary]]:
    """The chosen series' UID and the summaries of all; ``ValueError`` (the reason, a verb
    phrase after the folder's name) when ``series_uid`` is absent or no series qualifies."""
    summaries = [summarise(uid, heads) for uid, heads in groups.items()]
    listing = "; ".join(s.describe() for s in summaries)
    if series_uid is not None:
        if series_uid not in groups:
            raise ValueError(
                f"has no series with the manifest's series_uid {series_uid!r}; it holds "
                f"{len(groups)}: {listing}"
            )
        return series_uid, summaries
    if len(groups) == 1:
        return next(iter(groups)), summaries
    candidates = [s for s in summaries if s.axial and not s.localizer and s.n_files >= min_slices]
    if not candidates:
        raise ValueError(
            f"holds {len(groups)} DICOM series and none is an axial CT series of at least "
            f"{min_slices} slices ({listing}); add a series_uid column naming the one to use"
        )
    best = min(candidates, key=lambda s: (s.thickness if s.thickness else np.inf, -s.n_files))
    return best.uid, summaries


def split_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The folder's DICOM files, and the names of the files that are not DICOM."""
    import pydicom

    dicom: list[Path] = []
    other: list[str] = []
    for f in sorted(folder.iterdir()):
        if f.is_file():
            if pydicom.misc.is_dicom(f):
                dicom.append(f)
            else:
                other.append(f.name)
    return dicom, other


def choice_note(path: Path, chosen: str, summaries: list[SeriesSummary], ignored: list[str]) -> str:
    """What ``validate`` says about a folder where a series was picked or files ignored."""
    parts = []
    if len(summaries) > 1:
        pick = next(s for s in summaries if s.uid == chosen)
        others = "; ".join(s.describe() for s in summaries if s.uid != chosen)
        parts.append(
            f"holds {len(summaries)} series: using {pick.describe()}, the thinnest axial one "
            f"unless a series_uid column names another (left: {others})"
        )
    if ignored:
        ignored = sorted(ignored)
        head = ", ".join(ignored[:3]) + (" ..." if len(ignored) > 3 else "")
        parts.append(f"ignored {len(ignored)} non-image file(s) ({head})")
    return f"folder {path} " + "; ".join(parts) if parts else ""
