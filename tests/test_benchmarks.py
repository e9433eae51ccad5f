"""The performance options and what the benchmarks rely on (never their timings).

* the GEMM patch embedding computes what the Conv3d it replaces computes;
* ``compile`` and ``grad_checkpointing`` reach the model from the YAML/CLI;
* the plain-PyTorch loop of the Lightning-overhead benchmark does the same computation as
  Lightning (same weights after training);
* the analytic FLOP count used for GPU MFU equals ``FlopCounterMode``'s on CPU;
* the MFU script runs end to end (on CPU, tiny model).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from experiments.benchmarks import gpu_mfu
from experiments.benchmarks.flops import jepa_step_flops
from experiments.benchmarks.jepa_step import (
    PlainJEPALoop,
    build_task,
    fresh,
    lightning_step_times,
    synthetic_batches,
)
from jepa_lightning.backbones.vit3d import Block, PatchEmbed3D, compile_blocks
from jepa_lightning.main import main
from jepa_lightning.tasks import DiagnosisTask, MultimodalJEPA
from tests.conftest import tiny_data_args

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "quickstart"
PRETRAIN, FINETUNE = str(CONFIGS / "pretrain.yaml"), str(CONFIGS / "finetune.yaml")
TINY = dict(patch_size=4, embed_dim=24, depth=2, num_heads=2, predictor_dim=12,
            predictor_depth=1, predictor_heads=2)  # fmt: skip


def test_patch_embed_gemm_equals_conv3d_values_and_gradients():
    torch.manual_seed(0)
    embed = PatchEmbed3D((4, 8, 2), in_chans=2, embed_dim=16)
    conv = nn.Conv3d(2, 16, (4, 8, 2), stride=(4, 8, 2))
    conv.load_state_dict(embed.proj.state_dict())
    x = torch.randn(3, 2, 8, 16, 6)
    ours = embed(x)
    ref = conv(x).flatten(2).transpose(1, 2)
    assert ours.shape == (3, 2 * 2 * 3, 16)
    assert torch.allclose(ours, ref, atol=1e-5)
    g = torch.randn_like(ref)
    (ours * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.allclose(embed.proj.weight.grad, conv.weight.grad, atol=1e-4)
    assert torch.allclose(embed.proj.bias.grad, conv.bias.grad, atol=1e-4)


def test_compile_blocks_keeps_state_dict_and_marks_every_block():
    task = build_task(16, 6, **TINY)
    keys = list(task.state_dict())
    n = compile_blocks(task)
    blocks = [m for m in task.modules() if isinstance(m, Block)]
    # encoder + EMA target + predictor blocks
    assert n == len(blocks) == 2 * TINY["depth"] + TINY["predictor_depth"]
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert list(task.state_dict()) == keys  # checkpoints are unchanged by compiling


@pytest.mark.parametrize("cls", [MultimodalJEPA, DiagnosisTask])
def test_compile_flag_compiles_in_configure_model_once(cls, monkeypatch):
    calls = []
    monkeypatch.setattr(Block, "compile", lambda self, **kw: calls.append(kw))
    task = cls(image_size=16, n_ehr_features=6, compile=True, backbone={k: TINY[k] for k in
               ("patch_size", "embed_dim", "depth", "num_heads")})  # fmt: skip
    task.configure_model()
    task.configure_model()  # Lightning may call it again (e.g. fit then test)
    assert len(calls) == len([m for m in task.modules() if isinstance(m, Block)]) > 0
    off = cls(
        image_size=16,
        n_ehr_features=6,
        backbone={"patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2},
    )
    calls.clear()
    off.configure_model()
    assert calls == []


@pytest.mark.parametrize("config", [PRETRAIN, FINETUNE])
def test_compile_and_checkpointing_are_yaml_options(config, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--model.init_args.compile=true",
              "--model.init_args.grad_checkpointing=true", "--print_config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert printed["compile"] is True and printed["grad_checkpointing"] is True


@pytest.mark.parametrize("config", [PRETRAIN, FINETUNE])
def test_grad_checkpointing_from_the_cli_is_used_in_training(
    config, tiny_cohort, tmp_path, monkeypatch
):
    used = {"n": 0}
    real = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        used["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    cli = main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}", *tiny_data_args(tiny_cohort),
                "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
                "--model.init_args.grad_checkpointing=true"])  # fmt: skip
    assert cli.model.encoder.vit.grad_checkpointing
    assert used["n"] >= cli.model.backbone.depth  # every encoder block, at least once


def test_plain_loop_does_what_lightning_does():
    """Same initial weights and batches: Lightning's fit and the plain loop end equal."""
    template = build_task(16, 6, **TINY)
    batches = synthetic_batches(template, 3, 4)
    a, b = fresh(template), fresh(template)
    lightning_step_times(a, batches)
    loop = PlainJEPALoop(b.train(), len(batches))
    for batch in batches:
        loop.step(batch)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    moved = 0
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6, rtol=1e-5), k
        moved += not torch.equal(sa[k], template.state_dict()[k])
    assert moved > 0  # training happened (the target encoder moved by EMA too)
    assert not torch.equal(sa["target_encoder.vit.blocks.0.attn.qkv.weight"],
                           template.state_dict()["target_encoder.vit.blocks.0.attn.qkv.weight"])  # fmt: skip


@pytest.mark.parametrize(
    "p_image_only, p_ehr_only, use_ehr, sigreg",
    [(0.0, 0.0, True, {}), (1.0, 0.0, True, {}), (0.0, 1.0, True, {}), (0.0, 0.0, False, {}),
     (0.0, 0.0, True, {"sigreg_weight": 0.5}), (1.0, 0.0, True, {"sigreg_weight": 0.5}),
     (0.0, 1.0, True, {"sigreg_weight": 0.5, "sigreg_input": "context"})],
    ids=["joint", "image_to_ehr", "ehr_to_image", "image_only_jepa", "sigreg_full",
         "sigreg_full_image_to_ehr", "sigreg_context_ehr_to_image"],
)  # fmt: skip
def test_analytic_flops_equal_flop_counter(p_image_only, p_ehr_only, use_ehr, sigreg):
    task = build_task(16, 6, p_image_only=p_image_only, p_ehr_only=p_ehr_only,
                      use_ehr=use_ehr, **sigreg, **TINY)  # fmt: skip
    loop = PlainJEPALoop(task.train(), 10)
    for batch in synthetic_batches(task, 2, 3):
        # The math SDPA path is made of bmm's that FlopCounterMode counts; the CPU flash
        # kernel has no FLOP formula registered.
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            loop.step(batch)
        assert counter.get_total_flops() == jepa_step_flops(task, batch).model_flops


def test_flops_fall_with_the_context():
    task = build_task(16, 6, **TINY)
    (batch,) = synthetic_batches(task, 1, 2)
    small = dict(batch, ctx_image_idx=batch["ctx_image_idx"][:, :4])
    full, less = jepa_step_flops(task, batch), jepa_step_flops(task, small)
    assert less.context_forward < full.context_forward
    assert less.target_forward == full.target_forward  # the target always sees every token


def test_peak_table_lookup():
    assert gpu_mfu.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_mfu.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_mfu.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu_mfu.peak_tflops("NVIDIA L40S", None) == 362.0
    assert gpu_mfu.peak_tflops("Some GPU", 100.0) == 100.0
    with pytest.raises(SystemExit, match="peak-tflops"):
        gpu_mfu.peak_tflops("Some GPU", None)


def test_mfu_script_runs_end_to_end_on_cpu():
    r = gpu_mfu.run(batch=2, steps=2, warmup=1, size=16, device="cpu", peak=1.0, model=TINY)
    assert r["samples_per_s"] > 0 and r["mfu_pct"] >= 0
    assert r["model_gflop_per_step"] > 0 and r["counted_gflop_first_step"] > 0


@pytest.mark.slow
def test_compiled_pretraining_runs_from_the_cli(tiny_cohort, tmp_path):
    """The real torch.compile path (minutes of compilation on CPU, hence slow)."""
    cli = main(["fit", "--config", PRETRAIN, f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}", *tiny_data_args(tiny_cohort),
                "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false", "--model.init_args.compile=true"])  # fmt: skip
    assert cli.trainer.global_step == 2
    blocks = [m for m in cli.model.modules() if isinstance(m, Block)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_paired_overhead_is_the_median_per_round_ratio_with_a_ci():
    from experiments.benchmarks.lightning_overhead import paired_overhead

    # rounds drift from 100 to 200 ms, Lightning always 4 % slower within its round
    plain = [100.0, 150.0, 200.0, 120.0, 180.0]
    med, (low, high) = paired_overhead([1.04 * p for p in plain], plain)
    assert med == pytest.approx(4.0) and low == pytest.approx(4.0) and high == pytest.approx(4.0)
    med, (low, high) = paired_overhead([110.0, 140.0, 210.0, 118.0, 190.0], plain)
    assert med == pytest.approx(5.0) and low <= med <= high and high - low > 1.0


def test_interleaved_rotates_the_order_so_no_variant_always_runs_first():
    from experiments.benchmarks.common import interleaved

    calls: list[str] = []
    variants = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    wall, cpu = interleaved(variants, rounds=3, warmup=1)
    assert {k: len(v) for k, v in wall.items()} == {"a": 3, "b": 3, "c": 3}
    firsts = calls[::3]  # first call of each round (warm-up round included)
    assert firsts == ["a", "b", "c", "a"]


def test_gpu_feed_benchmark_runs_end_to_end_on_tiny_volumes(tmp_path):
    """Every row of (g) is measured (both caches, both augmentation places) and the ratio is
    workers x one worker's rate over the demand."""
    from experiments.benchmarks import gpu_feed

    r = gpu_feed.run(sizes=(32,), n_scans=10, batch=2, n_batches=2, workers=16, root=str(tmp_path))
    rows = r["rows"]
    assert {(x["cache"], x["augment_on"]) for x in rows} == {
        ("ram", "loader"), ("ram", "device"), ("disk", "loader"), ("disk", "device")}  # fmt: skip
    for x in rows:
        assert x["loader_samples_per_s_per_worker"] > 0 and x["demand_samples_per_s"] > 0
        expected = 16 * x["loader_samples_per_s_per_worker"] / x["demand_samples_per_s"]
        assert x["16_workers_over_demand"] == pytest.approx(expected, rel=0.05, abs=0.01)
    assert "feeding a GPU" in gpu_feed.table(r)


def test_the_gpu_loader_check_runs_on_cpu_with_a_tiny_model(tmp_path):
    """The device check's script end to end (real loader, masks in the workers, device
    augmentation, Lightning step): stall and MFU come out as shares."""
    from experiments.benchmarks import gpu_loader_check

    r = gpu_loader_check.run(size=32, batch=2, steps=2, warmup=1, workers=1, n_scans=8,
                             device="cpu", model=TINY, peak=1e-6, root=str(tmp_path))  # fmt: skip
    assert 0 <= r["data_stall_pct"] <= 100 and r["mfu_pct"] > 0 and r["samples_per_s"] > 0
