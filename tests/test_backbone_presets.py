"""The backbone as one config block: presets, overrides, checkpoints of either layout, and
the errors a typo in it gets."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from jepa_lightning.backbones import PRESETS, Backbone, MultimodalEncoder, as_backbone
from jepa_lightning.checkpoints import CheckpointMismatchError
from jepa_lightning.pretrained import architecture, checkpoint_architecture
from jepa_lightning.tasks import MAE, MSN, DiagnosisTask, ImageEHRContrastive, MultimodalJEPA
from tests.helpers import ROOT

MSN_YAML = str(ROOT / "experiments" / "methods" / "msn.yaml")


def test_a_preset_name_and_its_block_resolve_alike():
    small = as_backbone("small")
    assert small == as_backbone({"preset": "small"}) == Backbone("small").resolved()
    assert (small.patch_size, small.embed_dim, small.depth, small.num_heads) == (16, 384, 12, 6)
    assert as_backbone(None) == as_backbone("micro")


def test_a_field_overrides_its_preset_and_the_rest_stays():
    b = as_backbone({"preset": "base", "depth": 6})
    assert (b.embed_dim, b.depth, b.num_heads) == (768, 6, 12)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_an_encoder_of_its_width(name):
    b = as_backbone(name)
    if b.embed_dim > 384:  # base/large: check the numbers, not the (large) weights
        assert b.embed_dim % b.num_heads == 0
        return
    enc = MultimodalEncoder(image_size=b.patch_size * 2, n_ehr_features=3, backbone=b)
    assert enc.embed_dim == b.embed_dim and len(enc.vit.blocks) == b.depth


def test_bad_backbones_are_named():
    with pytest.raises(ValueError, match="preset 'huge' is not one of"):
        as_backbone("huge")
    with pytest.raises(ValueError, match="unknown keys \\['deph'\\]"):
        as_backbone({"deph": 3})
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        as_backbone({"num_heads": 5})


def test_every_task_builds_its_encoder_from_the_block_and_records_it_plainly():
    block = {"embed_dim": 24, "depth": 1, "num_heads": 2}
    for cls in (MultimodalJEPA, MSN, MAE, ImageEHRContrastive, DiagnosisTask):
        task = cls(image_size=16, n_ehr_features=4, backbone=block)
        assert task.encoder.embed_dim == 24 and len(task.encoder.vit.blocks) == 1
        recorded = task.hparams["backbone"]
        assert type(recorded) is dict and recorded["depth"] == 1 and recorded["preset"] == "micro"
        assert {"lr", "weight_decay", "image_size"} <= set(task.hparams)  # collected from BaseTask


def test_checkpoints_of_both_layouts_give_the_same_architecture(tmp_path):
    flat = {"image_size": 32, "n_ehr_features": 8, "patch_size": [8, 8, 8], "embed_dim": 96,
            "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}  # fmt: skip
    nested = {"image_size": [32, 32, 32], "n_ehr_features": 8, "backbone": "micro"}
    assert checkpoint_architecture(flat, "a") == checkpoint_architecture(nested, "b")
    assert checkpoint_architecture(nested, "b") == architecture(32, 8, Backbone())
    with pytest.raises(CheckpointMismatchError, match="does not record.*depth"):
        checkpoint_architecture({k: v for k, v in flat.items() if k != "depth"}, "c")


def test_a_checkpoint_is_refused_for_a_different_backbone_with_the_key_to_set(tmp_path):
    pre = MultimodalJEPA(image_size=16, n_ehr_features=4, backbone={"embed_dim": 24, "depth": 1,
                         "num_heads": 2})  # fmt: skip
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": pre.state_dict(), "hyper_parameters": dict(pre.hparams)}, path)
    task = DiagnosisTask(image_size=16, n_ehr_features=4, init_from=str(path),
                         backbone={"embed_dim": 24, "depth": 2, "num_heads": 2})  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="--model.init_args.backbone.depth=1"):
        task.initialise_from_checkpoint(str(path))
    same = DiagnosisTask(image_size=16, n_ehr_features=4, init_from=str(path),
                         backbone={"embed_dim": 24, "depth": 1, "num_heads": 2})  # fmt: skip
    same.initialise_from_checkpoint(str(path))
    torch.testing.assert_close(same.encoder.state_dict(), pre.target_encoder.state_dict())


def _print_config(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jepa_lightning", "fit", "--config", MSN_YAML, *args]
    return subprocess.run([*cmd, "--print_config"], cwd=ROOT, capture_output=True, text=True)


def test_the_cli_takes_a_preset_or_a_field():
    proc = _print_config("--model.init_args.backbone=small")
    assert proc.returncode == 0 and "backbone: small" in proc.stdout
    proc = _print_config("--model.init_args.backbone.depth=2")
    assert proc.returncode == 0, proc.stderr
    assert "depth: 2" in proc.stdout and "preset: micro" in proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.backbone=smal"], "backbone 'smal' is not a preset (did you mean 'small'?)"),
        (["--model.init_args.backbone.deph=3"], "unknown backbone field 'deph'; did you mean 'depth'?"),
    ],
)  # fmt: skip
def test_a_backbone_typo_is_one_line_naming_it(args, expected):
    proc = _print_config(*args)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: the command line: ")
    assert expected in err
