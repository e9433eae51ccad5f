"""The JEPA + contrastive hybrid: the JEPA's loss plus CLIP's InfoNCE, nothing else changed."""

from __future__ import annotations

import math

import pytest
import torch

from jepa_lightning.losses import clip_loss
from jepa_lightning.masking import JEPAMaskCollator
from jepa_lightning.tasks import JEPAContrastive, MultimodalJEPA

ARGS = dict(image_size=16, n_ehr_features=6, sigreg_weight=0.5,
            backbone={"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2},
            predictor_dim=12, predictor_depth=1, predictor_heads=2)  # fmt: skip


def _batch(b: int = 4) -> dict:
    g = torch.Generator().manual_seed(9)
    batch = {
        "image": torch.rand(b, 1, 16, 16, 16, generator=g),
        "ehr": torch.randn(b, 6, generator=g),
        "ehr_missing": torch.zeros(b, 6, dtype=torch.bool),
        "label": torch.tensor([0.0, 1.0, float("nan"), 1.0])[:b],
    }
    collator = JEPAMaskCollator(grid=(2, 2, 2), n_ehr_features=6, block_scale=(0.1, 0.15),
                                p_image_only=0.0, p_ehr_only=0.0, min_context=2, rank=0)  # fmt: skip
    return collator(batch)


def test_hybrid_loss_is_the_jepa_loss_plus_weighted_infonce():
    torch.manual_seed(0)
    hybrid = JEPAContrastive(contrastive_weight=0.7, **ARGS).eval()
    torch.manual_seed(0)
    jepa = MultimodalJEPA(**ARGS).eval()  # same init: the hybrid only adds projections
    batch = _batch()
    out, ref = hybrid.ssl_losses(dict(batch)), jepa.ssl_losses(dict(batch))
    image = hybrid.pool(hybrid.encoder(batch["image"], None, batch["ehr_missing"]))
    ehr = hybrid.encoder(None, batch["ehr"], batch["ehr_missing"]).mean(1)
    infonce = clip_loss(hybrid.image_proj(image), hybrid.ehr_proj(ehr), hybrid.logit_scale.exp())
    assert torch.allclose(out["loss_contrastive"], infonce)
    assert torch.allclose(out["loss"], ref["loss"] + 0.7 * infonce)


def test_hybrid_without_sigreg_computes_its_own_embeddings():
    hybrid = JEPAContrastive(**{**ARGS, "sigreg_weight": 0.0}).eval()
    out = hybrid.ssl_losses(_batch())
    assert torch.isfinite(out["loss_contrastive"]) and out["loss_contrastive"] > 0


def test_hybrid_needs_the_ehr_and_clamps_its_temperature_after_the_step():
    with pytest.raises(ValueError, match="use_ehr"):
        JEPAContrastive(**{**ARGS, "use_ehr": False})
    hybrid = JEPAContrastive(**ARGS)
    with torch.no_grad():
        hybrid.logit_scale.fill_(math.log(200.0))

    class _Trainer:  # what the EMA update reads
        global_step = 1
        estimated_stepping_batches = 10

    hybrid._trainer = _Trainer()  # type: ignore[assignment]
    hybrid.on_train_batch_end(None, None, 0)
    assert float(hybrid.logit_scale) == pytest.approx(math.log(100.0))
