"""Issue 24, item 6: ``python -m jepa_lightning.embed`` reads the data as training did.

Before, embed rebuilt a ``CTEHRDataModule`` from the manifest alone: an archive whose EHR
comes from an ``ehr_table`` failed, even with ``--modalities image``. ``--config`` takes the
training data config.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from data_modules.data_config import DataConfigError, data_block
from data_modules.manifest import ManifestError
from jepa_lightning.embed import main as embed_main
from jepa_lightning.main import main
from tests.ct_fixtures import nifti_archive
from tests.helpers import QUIET

METHODS = Path(__file__).resolve().parents[1] / "experiments" / "methods"


@pytest.fixture(scope="module")
def trained_on_ehr_table(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("embed_cfg")
    full = pd.read_parquet(nifti_archive(root, n_train=8, n_val=4, n_test=4))
    manifest = root / "scans.csv"
    full.drop(columns=["ehr_age", "ehr_crp"]).to_csv(manifest, index=False)
    full[["scan_id", "ehr_age", "ehr_crp"]].rename(columns=lambda c: c.replace("ehr_", "")) \
        .to_csv(root / "labs.csv", index=False)  # fmt: skip
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "CTEHRDataModule", "init_args": {
        "manifest": str(manifest), "ehr_table": str(root / "labs.csv"), "image_size": 16,
        "batch_size": 4, "drop_last": False}}}))  # fmt: skip
    run = root / "run"
    main(["fit", "--config", str(METHODS / "msn_ehr.yaml"), "--config", str(data),
          f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
          "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
          "--model.init_args.backbone.embed_dim=32", "--model.init_args.backbone.depth=1", *QUIET])  # fmt: skip
    return run / "checkpoints" / "last.ckpt", manifest, data


def test_embed_with_the_training_data_config(trained_on_ehr_table, tmp_path):
    ckpt, manifest, data = trained_on_ehr_table
    with pytest.raises(ManifestError, match=r"EHR columns \['age', 'crp'\] are not in the "
                       r"manifest .*pass the data config training used: --config"):  # fmt: skip
        embed_main([str(ckpt), str(manifest), "--out", str(tmp_path / "no.parquet")])
    for i, modalities in enumerate(["image", "image+ehr"]):
        out = tmp_path / f"emb{i}.parquet"
        args = [str(ckpt), "--config", str(data), "--out", str(out), "--split", "test"]
        assert embed_main([*args, "--modalities", modalities]) == 0
        table = pd.read_parquet(out)
        assert len(table) == 4 and table.filter(like="emb_").shape[1] == 32
    # a later --config overrides key by key, as fit's do; MANIFEST replaces the block's own
    out = tmp_path / "emb_all.parquet"
    assert embed_main([str(ckpt), str(manifest), "--config", str(data), "--out", str(out)]) == 0
    assert len(pd.read_parquet(out)) == 16


def test_data_block_merges_in_order_and_names_a_bad_file(tmp_path):
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text(yaml.safe_dump({"model": {"x": 1}, "data": {"class_path": "SyntheticCohortDataModule",
                                 "init_args": {"batch_size": 8, "image_size": 32}}}))  # fmt: skip
    b.write_text(yaml.safe_dump({"data": {"class_path": "CTEHRDataModule",
                                          "init_args": {"manifest": "m.csv", "batch_size": 2}}}))  # fmt: skip
    block = data_block([a, b])
    assert block == {"class_path": "CTEHRDataModule",
                     "init_args": {"batch_size": 2, "image_size": 32, "manifest": "m.csv"}}  # fmt: skip
    c.write_text(yaml.safe_dump({"model": {"x": 1}}))
    with pytest.raises(DataConfigError, match=r"has a data: block with a class_path"):
        data_block([c])
