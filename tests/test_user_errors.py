"""User errors print one short message (issue 14, case 6): the YAML file, the key, close
matches; no usage dump, no traceback. Run through the real console entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from jepa_lightning.main import main
from tests.ct_fixtures import nifti_archive
from tests.helpers import QUIET, ROOT

MSN = str(ROOT / "experiments" / "methods" / "msn.yaml")


def _console(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jepa_lightning", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip


def test_yaml_typo_names_the_file_and_close_matches(tmp_path):
    typo = tmp_path / "mine.yaml"
    typo.write_text("model:\n  init_args:\n    me_max_weigth: 3\n")
    proc = _console("fit", "--config", MSN, "--config", str(typo), "--print_config")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith(f"error: {typo}: unknown option 'me_max_weigth' of MSN; did you mean")
    assert "'me_max_weight'" in err and len(err.splitlines()) == 1 and "usage" not in err


def test_misspelled_class_name_lists_the_valid_names(tmp_path):
    typo = tmp_path / "mine.yaml"
    typo.write_text("model:\n  class_path: MSNN\n")
    proc = _console("fit", "--config", MSN, "--config", str(typo), "--print_config")
    assert proc.returncode == 2
    assert "class_path 'MSNN' is not a known task or data module; did you mean 'MSN'?" in (
        proc.stderr
    )
    assert "Valid names: CTEHRDataModule, DiagnosisTask" in proc.stderr


def test_missing_ckpt_path_is_one_line(tmp_path):
    proc = _console("test", "--config", MSN, "--ckpt_path", str(tmp_path / "nope.ckpt"))
    assert proc.returncode != 0
    assert proc.stderr.strip() == (
        f"error: --ckpt_path {tmp_path / 'nope.ckpt'} does not exist: give the path of a .ckpt "
        "file (e.g. <default_root_dir>/checkpoints/last.ckpt) or --ckpt_path last"
    )


def test_ckpt_path_best_in_a_separate_test_run_names_the_kept_files(tmp_path):
    """Lightning's 'best' exists only inside the fitting process; say so and list the files."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    proc = _console("test", "--config", MSN, "--ckpt_path", "best",
                    f"--trainer.default_root_dir={tmp_path}")  # fmt: skip
    assert proc.returncode != 0
    assert "--ckpt_path best names the best checkpoint of a fit in the same process" in proc.stderr
    assert str(tmp_path / "checkpoints" / "last.ckpt") in proc.stderr
    assert "Traceback" not in proc.stderr


def _archive_yaml(tmp_path: Path) -> Path:
    archive = tmp_path / "archive"
    df = pd.read_parquet(nifti_archive(archive))
    df["image"] = [str(archive / p) for p in df["image"]]
    df.to_parquet(archive / "manifest.parquet")
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"data": {"class_path": "CTEHRDataModule", "init_args": {
        "manifest": str(archive / "manifest.parquet"), "image_size": 16, "batch_size": 4,
        "drop_last": False, "require_labels": True}}}))  # fmt: skip
    return path


def test_init_from_mismatch_is_one_message_without_traceback(tmp_path):
    data = _archive_yaml(tmp_path)
    run = tmp_path / "pre"
    main(["fit", "--config", MSN, "--config", str(data), f"--trainer.default_root_dir={run}",
          f"--trainer.logger.init_args.save_dir={run}", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
          "--model.init_args.backbone.embed_dim=32", "--model.init_args.backbone.depth=1", *QUIET])  # fmt: skip
    proc = _console(
        "fit", "--config", str(ROOT / "experiments" / "methods" / "linear_probe.yaml"),
        "--config", str(data), f"--trainer.default_root_dir={tmp_path / 'probe'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'probe'}", "--trainer.max_epochs=1",
        f"--model.init_args.init_from={run / 'checkpoints' / 'last.ckpt'}", *QUIET,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and "different backbone" in last
    assert "--model.init_args.backbone.embed_dim=32" in last


def test_rerun_into_the_same_folder_with_another_logger_keeps_both_configs(tmp_path):
    data = _archive_yaml(tmp_path)
    run = tmp_path / "run"
    common = ["fit", "--config", MSN, "--config", str(data), f"--trainer.default_root_dir={run}",
              "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
              "--trainer.limit_val_batches=1", "--model.init_args.backbone.embed_dim=32",
              "--model.init_args.backbone.depth=1", *QUIET]  # fmt: skip
    main([*common, "--trainer.logger=false"])
    main([*common, "--trainer.logger=false", "--trainer.max_epochs=2"])
    assert (run / "config.yaml").exists() and (run / "config_1.yaml").exists()
    assert yaml.safe_load((run / "config_1.yaml").read_text())["trainer"]["max_epochs"] == 2


def test_a_bad_value_nested_in_an_optional_class_names_its_dotted_key():
    """jsonargparse >= 4.53 hides the complaint under a Union of the class and NoneType."""
    from jepa_lightning.user_errors import config_error_message

    raw = """Parser key "data":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'data_modules.ct_ehr.CTEHRDataModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'data_modules.ct_ehr.CTEHRDataModule':
        Parser key "ehr_join":
          Expected a typing.Literal['scan_id', 'nearest_before']. Got value: closest
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='ehr_join', val='closest')"""
    message = config_error_message(raw, ["fit", "--data.init_args.ehr_join=closest"])
    assert message == (
        "error: the command line: data.init_args.ehr_join: Expected a "
        "typing.Literal['scan_id', 'nearest_before']. Got value: closest"
    )
