"""The MONAI preprocessing chain: orientation, spacing, ROI crop through the affine, padding,
foreground fallback, augmentation on the training split only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_modules.ct_ehr import CTEHRDataModule
from data_modules.transforms import (
    BadSampleError,
    CTAugment,
    CTPreprocess,
    ct_pipeline,
    load_volume,
    pipeline_key,
    volume_item,
)
from tests.ct_fixtures import blob_volume, world_of, write_manifest, write_nifti

# A non-trivial affine: spacing (0.8, 0.9, 2.0) mm, x flipped (an LAS file), shifted origin.
AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, 0.9, 0, -15.0], [0, 0, 2.0, 100.0], [0, 0, 0, 1.0]])
WINDOW = (-1000.0, 400.0)


def _bright_centre(img: torch.Tensor) -> np.ndarray:
    """Centre of mass of the bright voxels of a [1, D, H, W] tensor, as (z, y, x)."""
    w = (img[0] > 0.8).numpy().astype(float)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in w.shape], indexing="ij"), -1)
    return (idx * w[..., None]).sum((0, 1, 2)) / w.sum()


def test_default_chain_is_ras_zyx_and_windowed(tmp_path):
    vol = blob_volume(shape=(20, 24, 16), centre_vox=(3, 9, 5))
    path = write_nifti(tmp_path / "a.nii.gz", vol, AFFINE)
    out = load_volume(volume_item(path), ct_pipeline((16, 24, 20), WINDOW))
    assert out.shape == (1, 16, 24, 20) and out.dtype == torch.float32
    assert type(out) is torch.Tensor and out.min() >= 0.0 and out.max() <= 1.0
    # x was stored flipped (L->R axis reversed): RAS puts voxel x=3 at x=20-1-3=16.
    np.testing.assert_allclose(_bright_centre(out), [5, 9, 16], atol=0.01)


def test_spacing_resamples_to_target_mm(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", blob_volume(shape=(20, 24, 16)), AFFINE)
    pre = CTPreprocess(spacing=(1.6, 1.8, 1.0))
    out = load_volume(volume_item(path), ct_pipeline((32, 12, 10), WINDOW, pre))
    assert out.shape == (1, 32, 12, 10)
    from monai.transforms import Compose

    # Without the final resize, the grid spans the voxel centres: (n - 1) * old / new + 1.
    chain = ct_pipeline((32, 12, 10), WINDOW, pre)
    partial = Compose(chain.transforms[:2])({"image": str(path), "roi": None, "source": str(path)})
    assert tuple(partial["image"].shape[1:]) == (11, 12, 31)


@pytest.mark.parametrize("centre_vox", [(12, 9, 5), (2, 20, 13)])
def test_roi_crop_is_centred_on_world_mm(tmp_path, centre_vox):
    vol = blob_volume(shape=(20, 24, 16), centre_vox=centre_vox)
    path = write_nifti(tmp_path / "a.nii.gz", vol, AFFINE)
    roi = world_of(AFFINE, centre_vox)
    pre = CTPreprocess(crop_size=(9, 9, 7))
    out = load_volume(volume_item(path, roi), ct_pipeline((7, 9, 9), WINDOW, pre))
    assert out.shape == (1, 7, 9, 9)
    np.testing.assert_allclose(_bright_centre(out), [3, 4, 4], atol=0.01)


def test_crop_beyond_the_border_pads_with_air(tmp_path):
    # ROI at the corner voxel: 4 of the 9 voxels along each axis lie outside the scan.
    vol = np.full((20, 24, 16), 100, np.int16)
    path = write_nifti(tmp_path / "a.nii.gz", vol, np.diag([1.0, 1.0, 1.0, 1.0]))
    pre = CTPreprocess(crop_size=(9, 9, 9))
    window = (-1200.0, 200.0)  # so that -1024 HU is not clipped to the window's floor
    out = load_volume(volume_item(path, (0.0, 0.0, 0.0)), ct_pipeline((9, 9, 9), window, pre))[0]
    air, tissue = (-1024 + 1200) / 1400, (100 + 1200) / 1400
    assert torch.allclose(out[:4], torch.tensor(air)) and torch.allclose(
        out[:, :4], torch.tensor(air)
    )
    assert torch.allclose(out[4:, 4:, 4:], torch.tensor(tissue))


def test_missing_roi_falls_back_to_the_foreground_centre(tmp_path):
    vol = blob_volume(shape=(20, 24, 16), centre_vox=(4, 6, 11), radius=2.5, bg=-1000)
    path = write_nifti(tmp_path / "a.nii.gz", vol, np.eye(4))
    pre = CTPreprocess(crop_size=(9, 9, 9))
    out = load_volume(volume_item(path, (np.nan,) * 3), ct_pipeline((9, 9, 9), WINDOW, pre))
    np.testing.assert_allclose(_bright_centre(out), [4, 4, 4], atol=0.01)
    centred = CTPreprocess(crop_size=(9, 9, 9), roi_fallback="centre")
    out = load_volume(volume_item(path), ct_pipeline((9, 9, 9), WINDOW, centred))
    assert not (out > 0.8).any()  # the volume's centre is far from the blob


def test_roi_outside_the_scan_names_file_and_units(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", blob_volume(), AFFINE)
    pre = CTPreprocess(crop_size=(8, 8, 8))
    with pytest.raises(BadSampleError, match=r"a\.nii\.gz.*lies outside the scan.*check roi_space"):
        load_volume(volume_item(path, (5000.0, 0.0, 0.0)), ct_pipeline((8, 8, 8), WINDOW, pre))


def test_config_key_changes_with_every_setting():
    base = pipeline_key((32, 32, 32), WINDOW, CTPreprocess())
    assert base == pipeline_key([32, 32, 32], list(WINDOW), None)
    others = [
        pipeline_key((32, 32, 16), WINDOW, CTPreprocess()),
        pipeline_key((32, 32, 32), (-1000.0, 300.0), CTPreprocess()),
        pipeline_key((32, 32, 32), WINDOW, CTPreprocess(spacing=(1.0, 1.0, 1.0))),
        pipeline_key((32, 32, 32), WINDOW, CTPreprocess(crop_size=(8, 8, 8))),
        pipeline_key((32, 32, 32), WINDOW, CTPreprocess(pad_hu=-1000.0)),
    ]
    assert len({base, *others}) == 6


def test_bad_preprocess_settings_are_refused():
    with pytest.raises(ValueError, match="spacing"):
        CTPreprocess(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        CTPreprocess(crop_size=(8, 8))


def test_augmentation_on_training_split_only(tmp_path):
    rows = []
    for i, split in enumerate(["train", "train", "val", "val"]):
        vol = blob_volume(centre_vox=(4 + i, 6, 5))
        write_nifti(tmp_path / f"{i}.nii.gz", vol, np.eye(4))
        rows.append({"image": f"{i}.nii.gz", "split": split})
    manifest = write_manifest(tmp_path, rows)
    aug = CTAugment(flip_prob=0.5, rot90_prob=0.5, affine_prob=0.5, intensity_shift=0.1)
    dm = CTEHRDataModule(str(manifest), image_size=[8, 10, 10], batch_size=2, augment=aug)
    dm.setup("fit")
    train, val = dm.dataset("train"), dm.dataset("val")
    torch.manual_seed(0)
    reads = [train[0]["image"] for _ in range(12)]
    assert any(not torch.equal(reads[0], r) for r in reads[1:])
    assert all(r.shape == (1, 8, 10, 10) for r in reads)
    assert torch.equal(val[0]["image"], val[0]["image"])
    torch.manual_seed(0)  # seeded from torch's RNG: seed_everything reproduces it
    assert torch.equal(train[0]["image"], reads[0])


def test_rot90_needs_a_square_axial_plane():
    with pytest.raises(ValueError, match="needs H == W"):
        CTAugment(rot90_prob=0.5).build([8, 12, 10])
    CTAugment(rot90_prob=0.0).build([8, 12, 10])
