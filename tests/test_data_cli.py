"""The real-archive options, set from YAML through the CLI: print_config resolves them, and a
fast_dev_run pretraining runs on a tiny archive with preprocessing, augmentation, disk cache,
streaming and an external EHR table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from jepa_lightning.main import main
from tests.ct_fixtures import blob_volume, world_of, write_manifest, write_nifti
from tests.helpers import QUIET

PRETRAIN = str(Path(__file__).resolve().parents[1] / "experiments" / "quickstart" / "pretrain.yaml")


@pytest.fixture
def archive(tmp_path) -> tuple[Path, Path]:
    rows, ehr = [], []
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    for i in range(10):
        centre = (8 + i % 5, 10, 6)
        write_nifti(
            tmp_path / "img" / f"{i}.nii.gz",
            blob_volume(shape=(24, 24, 14), centre_vox=centre),
            affine,
        )
        roi = world_of(affine, centre) if i % 3 else (np.nan,) * 3  # some rows lack an ROI
        split = "val" if i >= 8 else "train"
        rows.append(
            {
                "image": f"img/{i}.nii.gz",
                "split": split,
                "roi_x": roi[0],
                "roi_y": roi[1],
                "roi_z": roi[2],
            }
        )
        ehr.append({"scan_id": f"s{i}", "crp": float(i) if i % 4 else np.nan, "age": 50.0 + i})
    manifest = write_manifest(tmp_path, rows, n_ehr=1)
    pd.DataFrame(ehr).to_csv(tmp_path / "ehr.csv", index=False)
    return manifest, tmp_path / "ehr.csv"


def _data_yaml(tmp_path, manifest, ehr, **extra) -> str:
    data = {
        "data": {
            "class_path": "CTEHRDataModule",
            "init_args": {
                "manifest": str(manifest),
                "image_size": 16,
                "batch_size": 4,
                "num_workers": 0,
                "preprocess": {"spacing": [1.0, 1.0, 1.0], "crop_size": [16, 16, 16]},
                "augment": {"flip_prob": 0.5, "rot90_prob": 0.5, "affine_prob": 0.2},
                "cache_dir": str(tmp_path / "cache"),
                "ehr_table": str(ehr),
                "ehr_join": "scan_id",
                "roi_space": "ras_mm",
                **extra,
            },
        }
    }
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_print_config_shows_every_option(archive, tmp_path, capsys):
    manifest, ehr = archive
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", PRETRAIN, "--config", _data_yaml(tmp_path, manifest, ehr),
              "--data.init_args.preprocess.pad_hu=-1000", "--print_config"])  # fmt: skip
    assert exit_.value.code == 0
    args = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert args["preprocess"]["spacing"] == [1.0, 1.0, 1.0]
    assert args["preprocess"]["pad_hu"] == -1000.0 and args["preprocess"]["orientation"] == "RAS"
    assert args["augment"]["affine_prob"] == 0.2 and args["ehr_join"] == "scan_id"
    assert args["streaming"] is False and args["cache_dir"] == str(tmp_path / "cache")


def test_bad_option_is_named(archive, tmp_path, capsys):
    manifest, ehr = archive
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", PRETRAIN, "--config", _data_yaml(tmp_path, manifest, ehr),
              "--data.init_args.ehr_join=closest", "--print_config"])  # fmt: skip
    assert exit_.value.code != 0 and "ehr_join" in capsys.readouterr().err


@pytest.mark.parametrize("streaming", [False, True])
def test_fast_dev_run_on_a_real_archive_config(archive, tmp_path, streaming):
    manifest, ehr = archive
    cli = main(
        ["fit", "--config", PRETRAIN, "--config",
         _data_yaml(tmp_path, manifest, ehr, streaming=streaming, drop_last=False),
         f"--trainer.default_root_dir={tmp_path / 'run'}",
         f"--trainer.logger.init_args.save_dir={tmp_path / 'run'}",
         "--trainer.fast_dev_run=1", *QUIET]
    )  # fmt: skip
    assert cli.model.hparams.n_ehr_features == 3  # ehr_f0 from the manifest + crp, age
    assert cli.trainer.state.finished
    assert len(list((tmp_path / "cache").glob("*.pt"))) >= 4
