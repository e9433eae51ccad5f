"""What a scan file is before it is read: its identity (:func:`file_stamp`), whether it is
DICOM and its checked DICOM headers, and the error a bad scan raises. Below both the readers
(:mod:`data_modules.readers`) and the stored volumes (:mod:`data_modules.stored_volume`),
which both need them, so neither imports the other's module for them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from data_modules.dicom import NotOneVolume, VolumeHeaders, check_volume, volume_headers


class BadSampleError(ValueError):
    """One scan cannot be used; the message names the file and what to do."""


def as_bad_sample(err: BaseException, source: str) -> BadSampleError:
    """MONAI wraps a transform's exception in ``RuntimeError('applying transform ...')``:
    find ours in the chain, or describe the underlying one with the file's name."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, BadSampleError):
            return e
        e = e.__cause__
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    return BadSampleError(f"image {source} failed preprocessing ({type(root).__name__}: {root})")


def file_stamp(path: str | Path) -> str:
    """What identifies a file's content cheaply: size and mtime (ns); for a DICOM folder, the
    names, sizes and mtimes of its files. A changed or replaced file changes the stamp."""
    path = Path(path)
    try:
        if path.is_dir():
            h = hashlib.sha256()
            for f in sorted(path.iterdir()):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
            return "dir-" + h.hexdigest()[:24]
        st = path.stat()
        return f"{st.st_size}-{st.st_mtime_ns}"
    except OSError:
        return "missing"


def dicom_volume(path: Path, series_uid: str | None = None) -> VolumeHeaders:
    """The checked headers of the DICOM volume at ``path`` (a series folder or an Enhanced CT
    file; in a folder of several series the one ``series_uid`` names, else the thinnest
    axial one): every reason it is not one CT volume raises a :class:`BadSampleError`
    naming ``path`` (see :mod:`data_modules.dicom`)."""
    try:
        headers = volume_headers(path, series_uid)
        check_volume(headers)
    except NotOneVolume as err:
        raise BadSampleError(f"image {path} {err}") from err
    return headers


def is_dicom_path(path: Path) -> bool:
    """A folder (DICOM series) or a file that is not NIfTI and has DICOM's preamble."""
    if path.is_dir():
        return True
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".img", ".hdr")):
        return False
    import pydicom

    return bool(pydicom.misc.is_dicom(path))
