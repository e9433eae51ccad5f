"""The ROI centre's coordinate space: declared by the user, converted where it enters.

Why a module of its own: the same three numbers ``roi_x, roi_y, roi_z`` mean different points
in different tools. A DICOM viewer, pydicom's ``ImagePositionPatient``, SimpleITK / ITK
physical points, LUNA16's ``annotations.csv``, pylidc and 3D Slicer's markup files report
world millimetres in **LPS** (x grows to the patient's left, y to the back); nibabel, MONAI
(``affine_lps_to_ras``), FSL and Slicer's on-screen coordinates use **RAS** (x to the right,
y to the front); a detector that ran on an array reports **voxel indices**. LPS read as RAS
mirrors x and y through the origin, which on a chest CT crops the *other* lung, and nothing
fails. So the manifest must declare the space — a ``roi_space`` column or the data module's
``roi_space`` argument — and there is no default guess. Internally, world coordinates are
RAS mm (DESIGN "No silent geometry"); :func:`roi_to_ras` converts what enters.

Voxel indices are those of the array as stored: for NIfTI, ``(i, j, k)`` of the file's data
array (what ``nibabel.load(f).get_fdata()[i, j, k]`` returns, mapped by the file's affine);
for a DICOM series, ``(column, row, slice)`` with slices counted from 0 in increasing
``InstanceNumber`` (what MONAI's ``PydicomReader`` stacks); for an Enhanced CT file, the
frame order of the file. Indices may be fractional (a sub-voxel centre).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from data_modules.scan_files import BadSampleError

ROISpace = Literal["ras_mm", "lps_mm", "voxel"]
ROI_SPACES: tuple[str, ...] = ("ras_mm", "lps_mm", "voxel")
ROI_SPACE_COLUMN = "roi_space"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# What to write, per tool; the error message and the README quote it.
ROI_SPACE_HINT = (
    "ras_mm = world mm as nibabel / MONAI / FSL / Slicer's screen report them; lps_mm = world "
    "mm as a DICOM viewer, pydicom ImagePositionPatient, SimpleITK/ITK, LUNA16 annotations or "
    "pylidc report them; voxel = (i, j, k) indices of the stored image array"
)


class ROISpaceError(ValueError):
    """The ROI's coordinate space is missing or unknown; the message says how to declare it."""


def normalise_space(value: object) -> str | None:
    """``'RAS_mm '`` -> ``'ras_mm'``; empty / NaN -> None; anything else is returned lowered
    (the caller checks it against :data:`ROI_SPACES`)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip().lower()
    return text or None


def check_declared(space: str | None, where: str) -> str | None:
    """``space`` normalised, or a :class:`ROISpaceError` when it is not one of the spaces."""
    norm = normalise_space(space)
    if norm is not None and norm not in ROI_SPACES:
        raise ROISpaceError(f"{where}: roi_space {space!r} is not one of {list(ROI_SPACES)}")
    return norm


def row_spaces(
    df: pd.DataFrame, has_roi: np.ndarray, declared: str | None, source: str
) -> tuple[pd.Series, list[tuple[int, str]]]:
    """The space of each row's ROI, and the faults as ``(row, message)``.

    ``declared`` (the data module's / validate's ``roi_space``) applies to every row; a
    ``roi_space`` column gives it per row. Both may be present only when they agree. A row
    with an ROI and no space is a fault: there is no default.
    """
    declared = check_declared(declared, f"manifest {source}")
    faults: list[tuple[int, str]] = []
    if ROI_SPACE_COLUMN in df.columns:
        col = df[ROI_SPACE_COLUMN].map(normalise_space)
    else:
        col = pd.Series([None] * len(df), index=df.index, dtype=object)
    spaces = []
    for i, (value, roi) in enumerate(zip(col.tolist(), has_roi, strict=True)):
        space = value if value is not None else declared
        if value is not None and value not in ROI_SPACES:
            faults.append(
                (i, f"roi_space {df[ROI_SPACE_COLUMN].iloc[i]!r} is not one of {list(ROI_SPACES)}")
            )
            space = None
        elif value is not None and declared is not None and value != declared:
            faults.append(
                (
                    i,
                    f"roi_space {value!r} contradicts the declared roi_space {declared!r}; "
                    "keep one of the two",
                )  # fmt: skip
            )
            space = None
        elif roi and space is None:
            faults.append((i, "has an ROI centre but no roi_space"))
        spaces.append(space)
    return pd.Series(spaces, index=df.index, dtype=object), faults


def undeclared_message(source: str, n_rows: int, first_row: int) -> str:
    """The one message for a manifest whose ROI has no declared space (not one per row)."""
    return (
        f"manifest {source}: {n_rows} row(s) have roi_x/roi_y/roi_z but no coordinate space "
        f"(first: row {first_row}); declare it with a 'roi_space' column or "
        "data.init_args.roi_space (validate: --roi-space), one of "
        f"{list(ROI_SPACES)}: {ROI_SPACE_HINT}. There is no default: LPS read as RAS crops "
        "the mirror-image side of the chest"
    )


def roi_to_ras(
    roi: Sequence[float], space: str, stored_affine: np.ndarray | None = None
) -> np.ndarray:
    """The ROI centre in world RAS mm. ``stored_affine`` (voxel -> RAS mm of the array as
    stored, see the module docstring) is needed for ``voxel`` only."""
    point = np.asarray(roi, dtype=np.float64)
    if space == "ras_mm":
        return point
    if space == "lps_mm":
        return LPS_TO_RAS @ point
    if space == "voxel":
        if stored_affine is None:
            raise ROISpaceError("a voxel ROI needs the stored image's affine")
        return (np.asarray(stored_affine, dtype=np.float64) @ np.r_[point, 1.0])[:3]
    raise ROISpaceError(f"roi_space {space!r} is not one of {list(ROI_SPACES)}")


def check_roi_inside(
    centre: np.ndarray, shape: np.ndarray, roi: Sequence[float], space: str, source: str
) -> None:
    """A :class:`BadSampleError` naming the file, the ROI and its declared space when the
    centre (continuous voxel index ``centre``) lies outside a volume of ``shape``."""
    if np.all(centre >= -0.5) and np.all(centre <= np.asarray(shape) - 0.5):
        return
    unit = "voxel index" if space == "voxel" else "mm"
    raise BadSampleError(
        f"image {source}: ROI centre {tuple(round(float(v), 2) for v in roi)} ({space}, {unit}) "
        f"lies outside the scan (voxel {np.round(centre, 1).tolist()} of shape "
        f"{np.asarray(shape).tolist()}); check roi_space ({ROI_SPACE_HINT})"
    )
