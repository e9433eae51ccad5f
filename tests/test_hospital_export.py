"""Issue 24 end to end: a small realistic hospital export through validate, fit and embed.

Half the scans NIfTI (int16 with scl_slope/inter, LPS-stored, a trailing 4th dimension),
half DICOM folders as PACS writes them (thin + thick series, DICOMDIR, a README, files
without extension in random order, per-slice intercept); nodule centres from a DICOM tool
(LPS mm); an EHR extract joined nearest-before on ISO dates, with M/F, smoking as text,
``NA``/``unknown`` missing. Everything must pass ``validate --decode`` with no problem,
train (fast_dev_run) and embed with the training data config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from data_modules.validate import main as validate
from jepa_lightning.embed import main as embed_main
from jepa_lightning.main import main
from tests.helpers import QUIET
from tests.hospital_export import (
    chest_scan,
    ehr_extract,
    write_dicom_scan,
    write_dicomdir,
    write_nifti_scan,
)

PRETRAIN = str(Path(__file__).resolve().parents[1] / "experiments" / "quickstart" / "pretrain.yaml")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("hospital")
    n = 8
    patients = [f"{i // 2 + 1:04d}" for i in range(n)]  # leading zeros, 2 scans each
    scans = [f"{p}-{i % 2}" for i, p in enumerate(patients)]
    ehr = ehr_extract(scans, patients)
    rows = []
    for i in range(n):
        scan = chest_scan(shape=(64, 64, 24), spacing=(0.8, 0.8, 1.25), seed=i)
        if i % 2 == 0:
            rois = write_nifti_scan(root / "nifti" / f"{scans[i]}.nii.gz", scan, trailing_dim=True)
            image = f"nifti/{scans[i]}.nii.gz"
        else:
            folder = root / "dicom" / scans[i]
            rois = write_dicom_scan(folder, scan, seed=i, name_prefix="t")
            write_dicom_scan(
                folder, scan, seed=i + 50, slab=4, description="CHEST 5.0", name_prefix="k"
            )
            write_dicomdir(folder)
            image = f"dicom/{scans[i]}"
        roi = rois["lps_mm"]
        rows.append({
            "patient_id": patients[i], "scan_id": scans[i], "image": image,
            "label": [0, 1, "", 1, 0, "", 1, 0][i], "split": "val" if patients[i] == "0004" else "train",
            "scan_time": ehr["scan_time"][i], "roi_x": roi[0], "roi_y": roi[1], "roi_z": roi[2],
            "roi_space": "LPS_mm", "ehr_sex": ehr["ehr_sex"][i],
        })  # fmt: skip
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    labs = pd.DataFrame({
        "patient_id": patients, "scan_time": [f"2018-12-{i + 1:02d}" for i in range(n)],
        "smoking": ehr["ehr_smoking"], "weight_kg": [70.5, "NA", 81, 64, "unknown", 90, 77, 58],
    })  # fmt: skip
    labs.to_csv(root / "labs.csv", index=False)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "CTEHRDataModule", "init_args": {
        "manifest": str(manifest), "ehr_table": str(root / "labs.csv"),
        "ehr_join": "nearest_before", "image_size": 16, "batch_size": 2, "drop_last": False,
        "num_workers": 2,
        "preprocess": {"spacing": [1.0, 1.0, 1.0], "crop_size": [24, 24, 24]}}}}))  # fmt: skip
    return manifest, root / "labs.csv", data


def test_validate_decode_passes_and_says_how_it_read_the_export(export, capsys):
    manifest, labs, _ = export
    code = validate([str(manifest), "--ehr", str(labs), "--ehr-join", "nearest_before",
                     "--decode", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rois_checked: 8" in out and "in lung parenchyma" not in out
    assert "dicom_non_image_files_ignored: 8" in out and "the thinnest axial one" in out
    assert "'ehr_sex': ['f', 'm']" in out and "'smoking': ['current', 'former', 'never']" in out
    assert "## Splits (what training will print)" in out


def test_fit_and_embed_on_the_export(export, tmp_path):
    _, _, data = export
    run = tmp_path / "run"
    cli = main(["fit", "--config", PRETRAIN, "--config", str(data),
                f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
                "--trainer.max_epochs=1", *QUIET])  # fmt: skip
    assert cli.trainer.state.finished
    stats = cli.datamodule.ehr_stats
    assert stats["columns"] == ["ehr_sex", "smoking", "weight_kg"]
    assert stats["categories"]["ehr_sex"] == ["f", "m"]
    out = tmp_path / "emb.parquet"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert embed_main([str(ckpt), "--config", str(data), "--out", str(out), "--split", "all",
                       "--modalities", "image+ehr"]) == 0  # fmt: skip
    table = pd.read_parquet(out)
    assert len(table) == 8 and np.isfinite(table.filter(like="emb_").to_numpy()).all()
