"""DICOM as real archives hold it: which folders (or files) are one CT volume, and why not.

A manifest ``image`` may be a folder holding one classic DICOM series (one file per slice)
or an Enhanced CT file (one multi-frame file, as modern scanners export; alone or alone in
its folder). Before any voxel is decoded, :func:`volume_headers` reads the headers and
:func:`check_volume` refuses, naming the folder and the reason, what is not one axial-like
CT volume:

* ``Modality`` other than CT (an MR series would be windowed as Hounsfield units);
* ``ImageType`` LOCALIZER/SCOUT (a topogram: a projection, not slices);
* slices with different ``ImageOrientationPatient`` (scouts, multi-plane series);
* fewer than ``MIN_SLICES`` slices;
* a slice step outside ``[MIN_STEP_MM, MAX_STEP_MM]`` (a 265 mm "spacing" is two scouts);
* slice positions not along the slice normal (gantry tilt: a sheared grid the affine
  cannot describe) by more than ``MAX_TILT_DEG``;
* unequal steps (missing, duplicate or renumbered slices) and mixed ``SliceThickness``;
* a compressed transfer syntax whose decoder is not installed (the message names the
  package), so header-only ``validate`` catches what would otherwise fail at training.

:func:`read_enhanced_ct` decodes an Enhanced CT file into the same ``(column, row, slice)``
array and RAS affine that MONAI's ``PydicomReader`` gives a classic series, taking each
frame's position, orientation and rescale from its functional groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_modules.dicom_series import choice_note, choose_series, is_image, split_files

MIN_SLICES = 3
BIT_TAGS = ("BitsAllocated", "BitsStored", "PixelRepresentation")
MIN_STEP_MM, MAX_STEP_MM = 0.1, 20.0
MAX_TILT_DEG = 0.5
ORIENTATION_TOL = 1e-3
CT_MODALITIES = ("CT",)
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage

# What to install for each compressed transfer syntax (README: "DICOM compression").
DECODER_PACKAGES = {
    "JPEG Lossless": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG-LS": "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)",
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg (or pillow)",
    "High-Throughput JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "JPEG Baseline": "pillow (or pylibjpeg pylibjpeg-libjpeg)",
    "JPEG Extended": "pylibjpeg pylibjpeg-libjpeg (or pillow)",
    "RLE": "nothing (numpy) or pylibjpeg-rle",
}


class NotOneVolume(ValueError):
    """The DICOM input is not one CT volume; ``str()`` is the reason as a verb phrase that
    follows the path ("is ...", "mixes ...", "holds ...")."""


@dataclass
class SliceInfo:
    """What the geometry checks need of one slice (a file or an Enhanced CT frame)."""

    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (row direction, column direction)
    number: int  # InstanceNumber (frame index for Enhanced CT)
    thickness: float | None
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    slope: float = 1.0
    intercept: float = 0.0
    matrix: tuple[int, int] | None = None  # (Rows, Columns)
    bits: tuple[int, int, int] | None = None  # (BitsAllocated, BitsStored, PixelRepresentation)


@dataclass
class VolumeHeaders:
    """The headers of one DICOM volume: a series (``files``, one per slice) or an Enhanced
    CT file (``files`` holds the one file, ``slices`` its frames)."""

    files: list[Path]
    first: Any  # the first header (pydicom Dataset)
    slices: list[SliceInfo]
    multiframe: bool
    note: str = ""  # which series was picked, which files were ignored (validate shows it)
    ignored: int = 0  # files that are not images (DICOMDIR, reports, non-DICOM)


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of ``folder`` (see :func:`~data_modules.dicom_series.split_files`)."""
    return split_files(folder)[0]


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray([float(v) for v in value], dtype=float)
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise NotOneVolume(f"has {what} {list(value)!r}, not {n} finite numbers")
    return arr


def _slice_of(ds: Any, name: str) -> SliceInfo:
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag not in ds:
            raise NotOneVolume(f"has {name} without {tag}: its slices cannot be placed in a volume")
    thickness = ds.get("SliceThickness")
    return SliceInfo(
        position=_floats(ds.ImagePositionPatient, 3, f"{name}: ImagePositionPatient"),
        orientation=_floats(ds.ImageOrientationPatient, 6, f"{name}: ImageOrientationPatient"),
        number=int(ds.get("InstanceNumber") or 0),
        thickness=float(thickness) if thickness not in (None, "") else None,
        pixel_spacing=tuple(_floats(ds.PixelSpacing, 2, f"{name}: PixelSpacing")),
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        matrix=(int(ds.Rows), int(ds.Columns)) if "Rows" in ds and "Columns" in ds else None,
        bits=tuple(int(ds.get(k, 0) or 0) for k in BIT_TAGS) if "BitsAllocated" in ds else None,
    )


def _frame_item(ds: Any, i: int, sequence: str) -> Any | None:
    """Functional group ``sequence`` of frame ``i``: per-frame first, else shared."""
    for groups, idx in (
        ("PerFrameFunctionalGroupsSequence", i),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items is not None and len(items) > idx and sequence in items[idx]:
            seq = getattr(items[idx], sequence)
            if len(seq):
                return seq[0]
    return None


def enhanced_slices(ds: Any, name: str) -> list[SliceInfo]:
    """One :class:`SliceInfo` per frame of an Enhanced (multi-frame) CT dataset."""
    slices = []
    for i in range(int(ds.NumberOfFrames)):
        pos = _frame_item(ds, i, "PlanePositionSequence")
        ori = _frame_item(ds, i, "PlaneOrientationSequence")
        meas = _frame_item(ds, i, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None:
            raise NotOneVolume(
                f"has {name} frame {i + 1} without a plane position, orientation or pixel "
                "measures functional group: its frames cannot be placed in a volume"
            )
        rescale = _frame_item(ds, i, "PixelValueTransformationSequence")
        item = {
            "ImagePositionPatient": pos.ImagePositionPatient,
            "ImageOrientationPatient": ori.ImageOrientationPatient,
            "PixelSpacing": meas.PixelSpacing,
            "SliceThickness": meas.get("SliceThickness"),
            "InstanceNumber": i + 1,
            "RescaleSlope": rescale.get("RescaleSlope", 1.0) if rescale is not None else 1.0,
            "RescaleIntercept": (
                rescale.get("RescaleIntercept", 0.0) if rescale is not None else 0.0
            ),
        }
        slices.append(_slice_of(_Mapping(item), f"{name} frame {i + 1}"))
    return slices


class _Mapping(dict):
    """A dict that answers like a pydicom Dataset for :func:`_slice_of`."""

    def __getattr__(self, key: str) -> Any:
        return self[key]


def volume_headers(path: Path, series_uid: str | None = None) -> VolumeHeaders:
    """Headers (no pixels) of the DICOM volume at ``path``: a folder with one series or one
    Enhanced CT file, or such a file itself. A folder with several series gives the one
    ``series_uid`` names or the thinnest axial one; files that are not images are ignored
    and counted (:mod:`data_modules.dicom_series`). Raises :class:`NotOneVolume` with the
    reason."""
    import pydicom

    files, not_dicom = split_files(path) if path.is_dir() else ([path], [])
    groups: dict[str, list[Any]] = {}
    paths: dict[str, list[Path]] = {}
    ignored = list(not_dicom)
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as err:
            raise NotOneVolume(
                f"holds DICOM file {f.name}, which could not be read ({err})"
            ) from err
        if not is_image(ds):
            ignored.append(f.name)
            continue
        uid = str(ds.get("SeriesInstanceUID", "?"))
        groups.setdefault(uid, []).append(ds)
        paths.setdefault(uid, []).append(f)
    if not groups:
        raise NotOneVolume(
            "is a folder without DICOM image files (an empty or non-DICOM series"
            + (f"; {len(ignored)} other file(s) ignored" if ignored else "")
            + "): point the manifest's 'image' at a NIfTI file or a folder holding a DICOM series"
        )
    try:
        chosen, summaries = choose_series(groups, series_uid, MIN_SLICES)
    except ValueError as err:
        raise NotOneVolume(str(err)) from None
    heads, files = groups[chosen], paths[chosen]
    note = choice_note(path, chosen, summaries, ignored) if path.is_dir() else ""
    first = heads[0]
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if len(files) == 1 and frames > 1:
        slices = enhanced_slices(first, files[0].name)
        return VolumeHeaders(files, first, slices, True, note, len(ignored))
    if len(files) > 1 and any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in heads):
        raise NotOneVolume(
            "holds several multi-frame DICOM files; give each Enhanced CT file its own row"
        )
    slices = []
    for f, ds in zip(files, heads, strict=True):
        if "InstanceNumber" not in ds:
            raise NotOneVolume(
                f"has DICOM file {f.name} without InstanceNumber: the slices cannot be ordered"
            )
        slices.append(_slice_of(ds, f"DICOM file {f.name}"))
    return VolumeHeaders(files, first, slices, False, note, len(ignored))


def _normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)


def _sorted_by_position(slices: list[SliceInfo]) -> tuple[list[SliceInfo], np.ndarray]:
    normal = _normal(slices[0].orientation)
    order = np.argsort([float(np.dot(normal, s.position)) for s in slices], kind="stable")
    ordered = [slices[i] for i in order]
    return ordered, np.array([float(np.dot(normal, s.position)) for s in ordered])


def check_decoder(ds: Any) -> None:
    """Refuse a compressed transfer syntax whose pixel decoder is not installed."""
    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None)
    if uid is None or not uid.is_compressed:
        return
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except (NotImplementedError, ValueError):
        raise NotOneVolume(
            f"uses transfer syntax {uid.name} ({uid}), which pydicom cannot decode; re-export "
            "the series uncompressed (e.g. dcmdjpeg / gdcmconv --raw)"
        ) from None
    if decoder.is_available:
        return
    package = next((p for k, p in DECODER_PACKAGES.items() if uid.name.startswith(k)), None)
    install = f"pip install {package}" if package else "install one of its decoders"
    raise NotOneVolume(
        f"is compressed with {uid.name} ({uid}) and no decoder for it is installed: "
        f"{install} (pydicom's options: {'; '.join(decoder.missing_dependencies)}), or "
        "re-export the series uncompressed"
    )


def check_volume(headers: VolumeHeaders) -> None:
    """Every reason ``headers`` is not one CT volume, joined; nothing when it is one."""
    first = headers.first
    reasons = []
    modality = str(first.get("Modality", "")).upper()
    if modality not in CT_MODALITIES:
        reasons.append(
            f"Modality is {modality or 'missing'!r}, not CT: the HU window and the models "
            "assume CT; remove the row (or convert the scan to CT Hounsfield units)"
        )
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    if {"LOCALIZER", "SCOUT"} & set(image_type):
        reasons.append(
            f"ImageType {list(first.ImageType)} is a localizer (scout/topogram), a projection "
            "rather than slices; point the row at the axial series"
        )
    slices = headers.slices
    what = "frames" if headers.multiframe else "slices"
    orientations = {tuple(np.round(s.orientation / ORIENTATION_TOL).astype(int)) for s in slices}
    if len(orientations) > 1:
        examples = [[round(float(v), 4) for v in s.orientation] for s in slices[:2]]
        reasons.append(
            f"its {len(slices)} {what} have {len(orientations)} different "
            f"ImageOrientationPatient values (e.g. {examples}): not one volume (a scout or a "
            "multi-plane series)"
        )
    if len(slices) < MIN_SLICES:
        reasons.append(
            f"holds {len(slices)} {what[:-1] if len(slices) == 1 else what}; a volume needs at "
            f"least {MIN_SLICES}"
        )
    if len(orientations) == 1 and len(slices) >= 2:
        reasons += _geometry_reasons(slices, what)
    reasons += _pixel_format_reasons(headers, what)
    thickness = {round(s.thickness, 3) for s in slices if s.thickness is not None}
    if len(thickness) > 1:
        reasons.append(
            f"its {what} have different SliceThickness values {sorted(thickness)} mm: the "
            "series mixes reconstructions; export each thickness as its own series"
        )
    try:
        check_decoder(first)
    except NotOneVolume as err:
        reasons.append(str(err))
    if reasons:
        raise NotOneVolume("is not one CT volume: " + "; ".join(reasons))


def _pixel_format_reasons(headers: VolumeHeaders, what: str) -> list[str]:
    """Slices that differ in matrix size, pixel spacing or bit depth cannot be stacked into
    one array (MONAI's reader would fail, or mix scales, only when the volume is loaded)."""
    reasons = []
    checks = (
        ("matrix sizes (Rows x Columns)", lambda s: s.matrix, "x"),
        ("PixelSpacing values (mm)", lambda s: tuple(round(v, 4) for v in s.pixel_spacing), "x"),
        ("bit depths (BitsAllocated/BitsStored/PixelRepresentation)", lambda s: s.bits, "/"),
    )
    for label, key, sep in checks:
        values: dict[Any, list[int]] = {}
        for i, s in enumerate(headers.slices):
            if key(s) is not None:
                values.setdefault(key(s), []).append(i)
        if len(values) > 1:  # the usual value first, then the odd ones with an example
            ranked = sorted(values.items(), key=lambda kv: -len(kv[1]))
            shown = ", ".join(
                f"{sep.join(str(v) for v in value)} ({len(idx)} {what if len(idx) > 1 else what[:-1]}"
                + (f", {_slice_name(headers, idx[0])})" if rank else ")")
                for rank, (value, idx) in enumerate(ranked)
            )
            reasons.append(
                f"its {what} have different {label}: {shown}; not one volume: re-export the "
                "series (or remove the odd slices)"
            )
    return reasons


def _slice_name(headers: VolumeHeaders, i: int) -> str:
    if headers.multiframe:
        return f"frame {i + 1}"
    return f"e.g. {headers.files[i].name}"


def _geometry_reasons(slices: list[SliceInfo], what: str) -> list[str]:
    ordered, pos = _sorted_by_position(slices)
    steps = np.diff(pos)
    reasons = []
    if np.any(steps <= 1e-3):
        reasons.append(f"two {what} share a position (duplicates): re-export the series")
        return reasons
    step = float(np.median(steps))
    if not MIN_STEP_MM <= step <= MAX_STEP_MM:
        reasons.append(
            f"its slice spacing is {step:.3g} mm, outside [{MIN_STEP_MM}, {MAX_STEP_MM}] mm "
            "for one CT volume (a scout pair or unrelated images)"
        )
    normal = _normal(ordered[0].orientation)
    offsets = np.diff(np.stack([s.position for s in ordered]), axis=0)
    cos = np.abs(offsets @ normal) / np.linalg.norm(offsets, axis=1)
    tilt = float(np.degrees(np.arccos(np.clip(cos.min(), -1.0, 1.0))))
    if tilt > MAX_TILT_DEG:
        reasons.append(
            f"its {what} are offset {tilt:.1f} degrees from the slice normal (gantry tilt): the "
            "voxel grid is sheared; resample it to an orthogonal grid first (e.g. dcm2niix "
            "corrects gantry tilt)"
        )
    if not np.allclose(steps, step, rtol=1e-3, atol=1e-3):
        reasons.append(
            f"its {what} are not equally spaced along the slice normal (steps "
            f"{sorted({round(float(s), 3) for s in steps})[:5]} mm: missing slices, duplicates "
            "or mixed reconstructions); re-export the series"
        )
    elif not what.startswith("frame"):  # MONAI's reader stacks a series by InstanceNumber
        by_number = sorted(slices, key=lambda s: s.number)
        spatial = np.diff([float(np.dot(normal, s.position)) for s in by_number])
        if not (np.all(spatial > 0) or np.all(spatial < 0)):
            reasons.append(
                "its slices ordered by InstanceNumber are not in spatial order (renumbered "
                "files): re-export the series"
            )
    return reasons


def geometry(
    headers: VolumeHeaders,
) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray]:
    """Shape ``(columns, rows, slices)``, spacing (x, y, z) mm and the RAS affine of the
    volume as :func:`read_enhanced_ct` and MONAI's ``PydicomReader`` build it."""
    ordered, pos = _sorted_by_position(headers.slices)
    ori = ordered[0].orientation
    row_mm, col_mm = ordered[0].pixel_spacing
    step = float(np.median(np.diff(pos))) if len(pos) > 1 else float(ordered[0].thickness or 1.0)
    lps = np.eye(4)
    # i runs along a row (direction ori[:3], column spacing), j down a column (ori[3:]).
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = ori[:3] * col_mm, ori[3:] * row_mm, _normal(ori) * step
    lps[:3, 3] = ordered[0].position
    shape = (int(headers.first.Columns), int(headers.first.Rows), len(ordered))
    return shape, (col_mm, row_mm, step), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_enhanced_ct(path: Path, headers: VolumeHeaders) -> tuple[np.ndarray, np.ndarray]:
    """Voxels ``(columns, rows, frames)`` in HU (each frame's rescale applied, frames in
    spatial order) and the RAS affine of an Enhanced CT file."""
    import pydicom

    ds = pydicom.dcmread(headers.files[0])
    frames = np.asarray(ds.pixel_array, dtype=np.float32).reshape(
        len(headers.slices), int(ds.Rows), int(ds.Columns)
    )
    normal = _normal(headers.slices[0].orientation)
    order = np.argsort([float(np.dot(normal, s.position)) for s in headers.slices], kind="stable")
    vol = np.stack(
        [frames[i].T * headers.slices[i].slope + headers.slices[i].intercept for i in order],
        axis=-1,
    )
    _, _, affine = geometry(headers)
    return vol.astype(np.float32), affine
