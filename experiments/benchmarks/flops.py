"""Analytic FLOPs of a MultimodalJEPA training step, from the model's sizes and a batch's
mask shapes. Used for model FLOPs utilisation (MFU); ``tests/test_benchmarks.py`` checks it
against ``torch.utils.flop_counter.FlopCounterMode`` on CPU.

Conventions (those of MFU in the literature, e.g. PaLM):

* only matrix products count (linears, attention's ``QK^T`` and ``AV``), 2 FLOPs per
  multiply-add; norms, GELU, softmax, losses, the optimizer and the EMA are not counted;
* backward = 2x forward for every product whose input and weight both need a gradient;
  the patch embedding (its input, the volume, needs none) and the online probe (its input
  is detached) cost 1x forward in backward (weight gradient only);
* the EMA target encoder runs forward only, on every image token (and every EHR token):
  in one pass (``target_mode: joint``) or one pass per modality (``per_modality``);
* the two online probes (image-only, and image + EHR pooled features) are linear heads;
* activation checkpointing's recomputation and flash attention's backward recomputation
  of the scores are *not* model FLOPs: they lower MFU, as they should.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from jepa_lightning.tasks import MultimodalJEPA


def linear_flops(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def block_forward_flops(batch: int, tokens: int, block: nn.Module) -> int:
    """One pre-norm transformer block (fused QKV, output projection, 2-layer MLP, attention)."""
    dim = block.attn.qkv.in_features
    hidden = block.mlp[0].out_features
    rows = batch * tokens
    dense = (
        linear_flops(rows, dim, 3 * dim)
        + linear_flops(rows, dim, dim)
        + linear_flops(rows, dim, hidden)
        + linear_flops(rows, hidden, dim)
    )
    attention = 2 * (2 * batch * tokens * tokens * dim)  # QK^T and AV, all heads together
    return dense + attention


def blocks_forward_flops(batch: int, tokens: int, blocks: nn.ModuleList) -> int:
    return sum(block_forward_flops(batch, tokens, b) for b in blocks) if tokens else 0


@dataclass
class StepFlops:
    """Forward FLOPs per part and the model FLOPs of the whole training step."""

    patch_embed_forward: int  # one pass over all patches (each encoder that sees the image)
    target_forward: int
    context_forward: int
    predictor_forward: int
    probe_forward: int
    sigreg_forward: int  # SIGReg's own encoder pass (sigreg_input: full) and projections
    model_flops: int  # forward + backward, as defined in the module docstring

    def as_dict(self) -> dict:
        return asdict(self)


def jepa_step_flops(task: MultimodalJEPA, batch: dict) -> StepFlops:
    """FLOPs of ``task``'s training step on ``batch`` (only shapes of its tensors are read)."""
    enc, pred = task.encoder, task.predictor
    vit = enc.vit
    b = batch["image"].shape[0]
    n_img, n_ehr = vit.num_patches, enc.n_ehr_features if task.hparams.use_ehr else 0
    k_img, k_ehr = batch["ctx_image_idx"].shape[1], batch["ctx_ehr_idx"].shape[1]
    t_img, t_ehr = batch["tgt_image_idx"].shape[1], batch["tgt_ehr_idx"].shape[1]
    dim, pdim = vit.embed_dim, pred.input_proj.out_features
    patch_voxels = vit.patch_embed.proj.weight[0].numel()

    patch = linear_flops(b * n_img, patch_voxels, dim)
    if task.hparams.target_mode == "joint" or not n_ehr:
        target = patch + blocks_forward_flops(b, n_img + n_ehr, vit.blocks)
    else:
        target = (
            patch
            + blocks_forward_flops(b, n_img, vit.blocks)
            + blocks_forward_flops(b, n_ehr, vit.blocks)
        )
    context_patch = patch if k_img else 0
    context = context_patch + blocks_forward_flops(b, k_img + k_ehr, vit.blocks)
    k, t = k_img + k_ehr, t_img + t_ehr
    predictor = (
        linear_flops(b * k, dim, pdim)
        + blocks_forward_flops(b, k + t, pred.blocks)
        + linear_flops(b * t, pdim, dim)
    )
    probe = linear_flops(b, dim, task.probe.linear.out_features) + linear_flops(
        b, task.probe_joint.linear.in_features, task.probe_joint.linear.out_features
    )
    sigreg_blocks, sigreg_patch, sigreg_proj = 0, 0, 0
    h = task.hparams
    if h.sigreg_weight > 0:
        if h.sigreg_input == "full":
            sigreg_patch = patch
            sigreg_blocks = blocks_forward_flops(b, n_img, vit.blocks)
            sigreg_blocks += blocks_forward_flops(b, n_ehr, vit.blocks)
            rows = b * (1 + bool(n_ehr))
        else:
            rows = b * (bool(k_img) + bool(k_ehr))
        sigreg_proj = linear_flops(rows, dim, h.sigreg_directions)  # z @ directions
    sigreg_fwd = sigreg_patch + sigreg_blocks + sigreg_proj
    trained_fwd = (context - context_patch) + predictor + sigreg_blocks
    # input-side linears (patch embedding, the fixed SIGReg directions): no input gradient
    fixed_input = context_patch + sigreg_patch + sigreg_proj
    model = target + 3 * trained_fwd + 2 * fixed_input + 2 * probe
    return StepFlops(patch, target, context, predictor, probe, sigreg_fwd, model)
