"""DICOM as archives hold it, on files nobody in this project wrote (issue 14, cases 3, 4, 8):
pydicom's bundled CT series (``dicomdirtests/98892001/CT5N``, 5 axial slices), its real
scout (``CT2N``: 2 LOCALIZER images), an MR series, pydicom-data's Enhanced CT file, and
variants generated from them (gantry tilt, mixed slice thickness, implausible spacing, a
compressed transfer syntax whose decoder is absent, a multi-frame copy of CT5N)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_modules.transforms import BadSampleError, LoadCTd
from data_modules.validate import main as validate
from tests.ct_fixtures import write_manifest

pydicom = pytest.importorskip("pydicom")
TESTDATA = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"
CT5N, CT2N = TESTDATA / "98892001" / "CT5N", TESTDATA / "98892001" / "CT2N"
MR2 = TESTDATA / "98892003" / "MR2"


def _pydicom_data(name: str) -> Path:
    """A file of the pydicom-data package (a dev dependency). Without the package pydicom
    would download the file; tests never download, so they skip instead."""
    import importlib.util

    if importlib.util.find_spec("data_store") is None:
        pytest.skip("pydicom-data is not installed (pip install -e '.[dev]')")
    return Path(pydicom.data.get_testdata_file(name))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(folder: Path, change) -> Path:
    """Rewrite every slice of ``folder`` with ``change(ds, k)`` (k = position order)."""
    files = sorted(folder.iterdir(), key=lambda f: -pydicom.dcmread(f).ImagePositionPatient[2])
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        change(ds, k)
        ds.save_as(f)
    return folder


def _validate(tmp_path: Path, image: Path, *flags: str, capsys) -> tuple[int, str]:
    manifest = write_manifest(tmp_path, [{"image": str(image)}], name=f"m_{image.name}.csv")
    code = validate([str(manifest), "--no-progress", *flags])
    return code, capsys.readouterr().out


def test_real_ct_series_loads_with_rescale_and_passes_validate(tmp_path, capsys):
    img = LoadCTd(axcodes=None).load(_copy(CT5N, tmp_path / "CT5N"))
    assert tuple(img.shape) == (1, 16, 16, 5)
    first = pydicom.dcmread(sorted(CT5N.iterdir())[0])
    assert float(img.min()) >= -1024 + float(first.pixel_array.min()) - 1  # intercept applied
    code, out = _validate(tmp_path, tmp_path / "CT5N", "--decode", capsys=capsys)
    assert code == 0 and "**OK**" in out, out


def test_real_scout_is_refused_with_its_reasons(tmp_path, capsys):
    scout = _copy(CT2N, tmp_path / "CT2N")
    with pytest.raises(BadSampleError) as err:
        LoadCTd().load(scout)
    message = str(err.value)
    for expected in (f"image {scout} is not one CT volume", "is a localizer",
                     "2 different ImageOrientationPatient", "holds 2 slices"):  # fmt: skip
        assert expected in message, (expected, message)
    for flags in ((), ("--decode",)):  # header-only validate already refuses it
        code, out = _validate(tmp_path, scout, *flags, capsys=capsys)
        assert code == 1 and "is a localizer" in out, out


def test_mr_series_is_refused(tmp_path):
    folder = tmp_path / "MR2"  # one of MR2's series: 3 slices
    folder.mkdir()
    for f in MR2.iterdir():
        if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID.endswith(".136"):
            shutil.copy(f, folder / f.name)
    with pytest.raises(BadSampleError, match=r"Modality is 'MR', not CT"):
        LoadCTd().load(folder)


def test_gantry_tilt_is_refused(tmp_path):
    def tilt(ds, k):  # each slice 2.5 mm down z is also shifted 0.44 mm in y: 10 degrees
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + k * 2.5 * np.tan(
            np.radians(10)
        )

    folder = _edit(_copy(CT5N, tmp_path / "tilted"), tilt)
    with pytest.raises(BadSampleError, match=r"offset 10\.0 degrees .*gantry tilt"):
        LoadCTd().load(folder)


def test_mixed_slice_thickness_and_implausible_spacing_are_refused(tmp_path):
    def thick(ds, k):
        ds.SliceThickness = 5.0 if k == 2 else 2.5

    with pytest.raises(BadSampleError, match=r"different SliceThickness values \[2\.5, 5\.0\]"):
        LoadCTd().load(_edit(_copy(CT5N, tmp_path / "mixed"), thick))

    def spread(ds, k):
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) * 20

    with pytest.raises(BadSampleError, match=r"slice spacing is 50 mm, outside"):
        LoadCTd().load(_edit(_copy(CT5N, tmp_path / "spread"), spread))


def test_compressed_series_without_decoder_fails_header_only_validate(tmp_path, capsys):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")

    def compress(ds, k):  # the header of a JPEG Lossless export; validate reads no pixels
        ds.PixelData = encapsulate([ds.PixelData])
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1

    folder = _edit(_copy(CT5N, tmp_path / "jpeg_ll"), compress)
    code, out = _validate(tmp_path, folder, capsys=capsys)
    assert code == 1, out
    assert "is compressed with JPEG Lossless" in out
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in out


def test_real_enhanced_ct_file_is_refused_for_its_two_frames(tmp_path, capsys):
    path = _pydicom_data("eCT_Supplemental.dcm")
    with pytest.raises(BadSampleError, match=r"is not one CT volume: holds 2 frames; a volume"):
        LoadCTd().load(path)
    code, out = _validate(tmp_path, path, capsys=capsys)
    assert code == 1 and "holds 2 frames" in out


def _enhanced_copy_of_ct5n(path: Path) -> Path:
    """CT5N's five slices as one Enhanced CT file, on pydicom-data's Enhanced CT template:
    positions in per-frame groups, orientation/spacing/rescale in the shared groups."""
    template = pydicom.dcmread(_pydicom_data("eCT_Supplemental.dcm"))
    slices = sorted((pydicom.dcmread(f) for f in CT5N.iterdir()), key=lambda d: d.InstanceNumber)
    first = slices[0]
    ds = copy.deepcopy(template)
    ds.NumberOfFrames = len(slices)
    ds.Rows, ds.Columns = first.Rows, first.Columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, first.BitsStored, first.HighBit
    ds.PixelRepresentation = first.PixelRepresentation
    ds.PixelData = b"".join(s.PixelData for s in slices)
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = first.SliceThickness
    shared.PixelValueTransformationSequence[0].RescaleIntercept = first.RescaleIntercept
    shared.PixelValueTransformationSequence[0].RescaleSlope = first.RescaleSlope
    item = ds.PerFrameFunctionalGroupsSequence[0]
    ds.PerFrameFunctionalGroupsSequence = []
    for s in slices[::-1]:  # frames stored in another order than the series' numbering
        frame = copy.deepcopy(item)
        frame.PlanePositionSequence[0].ImagePositionPatient = s.ImagePositionPatient
        ds.PerFrameFunctionalGroupsSequence.append(frame)
    ds.PixelData = b"".join(s.PixelData for s in slices[::-1])
    ds.save_as(path)
    return path


def test_enhanced_ct_loads_like_the_same_classic_series(tmp_path, capsys):
    enhanced = _enhanced_copy_of_ct5n(tmp_path / "ct5n_enhanced.dcm")
    # in RAS (what the chain trains on): the series reader stacks by InstanceNumber, ours by
    # position, so the stored slice order may differ but the oriented volumes may not
    a = LoadCTd().load(enhanced)
    b = LoadCTd().load(_copy(CT5N, tmp_path / "CT5N"))
    torch.testing.assert_close(a.as_tensor(), b.as_tensor())
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine), atol=1e-4)
    folder = tmp_path / "enhanced_folder"  # a folder holding only the one file works too
    folder.mkdir()
    shutil.copy(enhanced, folder / "volume.dcm")
    torch.testing.assert_close(
        LoadCTd().load(folder).as_tensor(), LoadCTd().load(enhanced).as_tensor()
    )
    code, out = _validate(tmp_path, enhanced, "--decode", capsys=capsys)
    assert code == 0, out
