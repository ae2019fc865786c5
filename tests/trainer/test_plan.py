"""The capacity plan (trainer/plan.py) against what real runs hold.

* The "auto" ZeRO limits follow their rules (an independent brute-force computation).
* The activation probe's peak tracker and its depth/batch scaling match direct measurements.
* Parameter counts equal those of the modules the real stages build (world-1 gloo group, real engines).
* Per-rank parameter, optimizer and EMA bytes, checkpoint and export sizes equal what 2 Ray Train workers
  with real DeepSpeed engines over gloo hold and write; their peak RSS is within 1.3x of the plan.
* ``trainer/run.py --plan`` prints the plan and refuses bad memory options with one line (exit 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, build_config
from trainer.memory_probe import StoragePeak, measure_peak_growth, probe_activations
from trainer.partitioning import ModelSizes, auto_limits, persistence_threshold, zero_limits
from trainer.plan import count, make_plan
from trainer.schema import DeepSpeedConfig, GeneratorTrainConfig, TokenizerTrainConfig

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20

# A legacy (proxy-code) geometry small enough for CPU tests: 32 px, patch 4 = the teacher's x4 grid.
TINY_TOKENIZER = ["data.image_size=32", "model.image_size=32", "model.patch_size=4", "model.num_latent_tokens=8",
                  "model.codebook_size=64", "model.token_size=8", "model.vit_enc_model_size=null",
                  "model.vit_dec_model_size=null", "model.vit_enc_width=64", "model.vit_enc_num_layers=2",
                  "model.vit_enc_num_heads=2", "model.vit_dec_width=64", "model.vit_dec_num_layers=2",
                  "model.vit_dec_num_heads=2", "model.pixel_decoder.hidden_channels=32",
                  "model.pixel_decoder.channel_mult=[1,1,2]", "model.pixel_decoder.num_res_blocks=1",
                  "model.pixel_decoder.z_channels=32", "model.pixel_decoder.codebook_size=128",
                  "data.loader_workers=0", "trainer.batch_size_per_worker=4", "mlflow.enabled=false"]
# ~25M trainable parameters: model states of a few hundred MB per rank, above the runtime's noise.
SMALL_TOKENIZER = [*TINY_TOKENIZER, "data.image_size=64", "model.image_size=64", "model.vit_enc_width=512",
                   "model.vit_enc_num_layers=4", "model.vit_enc_num_heads=8", "model.vit_dec_width=512",
                   "model.vit_dec_num_layers=4", "model.vit_dec_num_heads=8", "model.num_latent_tokens=16"]
TINY_GENERATOR = ["experiment=demo", "trainer.batch_size_per_worker=8", "mlflow.enabled=false"]
SMALL_GENERATOR = [*TINY_GENERATOR, "model.hidden_size=512", "model.num_hidden_layers=6", "model.num_attention_heads=8",
                   "model.intermediate_size=2048", "model.codebook_size=4096", "model.image_seq_len=32"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A random MaskGIT-VQGAN of the tiny geometry (the stage loads it like the published file)."""
    from trainer.models import PixelDecoderConfig, build_maskgit_vqgan

    torch.manual_seed(0)
    teacher = build_maskgit_vqgan(PixelDecoderConfig(hidden_channels=32, channel_mult=[1, 1, 2], num_res_blocks=1,
                                                     z_channels=32, codebook_size=128))
    path = tmp_path_factory.mktemp("teacher") / "maskgit-vqgan-random.bin"
    torch.save(teacher.state_dict(), path)
    return path


def tokenizer_cfg(*overrides: str) -> TokenizerTrainConfig:
    return build_config("tokenizer", TokenizerTrainConfig, list(overrides))


def generator_cfg(*overrides: str) -> GeneratorTrainConfig:
    return build_config("generator", GeneratorTrainConfig, list(overrides))


# ---------------------------------------------------------------------------------------------
# Limits


def test_auto_limits_follow_their_rules() -> None:
    numels = (1, 64, 64, 512, 512, 4096, 65_536, 262_144, 1_048_576, 1_048_576)
    sizes = ModelSizes(numels, trainable=sum(numels), largest_module=1_048_576 + 512)
    total = sum(numels)
    limits = auto_limits(sizes)
    # Persistence: brute force over every candidate threshold.
    best = max(t for t in (0, *numels) if t <= 100_000 and sum(n for n in numels if n <= t) <= 0.01 * total)
    assert persistence_threshold(numels) == best == 4096  # 65_536 would exceed 1% of the total
    assert limits["stage3_param_persistence_threshold"] == best
    assert limits["reduce_bucket_size"] == limits["allgather_bucket_size"]
    assert limits["reduce_bucket_size"] >= max(numels) and limits["reduce_bucket_size"] % 256 == 0
    assert limits["stage3_max_live_parameters"] == max(total // 10, 2 * sizes.largest_module)
    assert limits["stage3_max_reuse_distance"] == limits["stage3_max_live_parameters"]
    assert limits["stage3_prefetch_bucket_size"] >= sizes.largest_module
    assert limits["sub_group_size"] == max(total // 32, max(numels))
    # A large model: buckets stop at 50M elements, fractions otherwise.
    big = ModelSizes((4_000_000,) * 250, trainable=10**9, largest_module=4_000_000)
    assert auto_limits(big)["reduce_bucket_size"] == 50_000_000 // 256 * 256
    assert auto_limits(big)["stage3_max_live_parameters"] == 100_000_000


def test_explicit_limits_win_and_bad_ones_fail() -> None:
    ds = DeepSpeedConfig(zero_stage=3, reduce_bucket_size="1234", stage3_max_live_parameters="5e6")
    resolved = zero_limits(ds, ModelSizes((10, 20), 30, 20))
    assert resolved["reduce_bucket_size"] == 1234 and resolved["stage3_max_live_parameters"] == 5_000_000
    with pytest.raises(ConfigError, match="deepspeed.sub_group_size"):
        DeepSpeedConfig(sub_group_size="lots")
    with pytest.raises(ConfigError, match="deepspeed.reduce_bucket_size"):
        tokenizer_cfg("deepspeed.reduce_bucket_size=-5")


def test_deepspeed_config_carries_the_model_limits() -> None:
    from trainer.distributed import deepspeed_config

    cfg = generator_cfg(*TINY_GENERATOR, "deepspeed.zero_stage=3", "deepspeed.stage3_prefetch_bucket_size=4096")
    with torch.device("meta"):
        from trainer.models import build_generator

        sizes = ModelSizes.of(build_generator(cfg.model))
    zero = deepspeed_config(cfg, sizes=sizes)["zero_optimization"]
    expected = auto_limits(sizes)
    for key in ("reduce_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
                "stage3_param_persistence_threshold", "sub_group_size"):
        assert zero[key] == expected[key], key
    assert zero["stage3_prefetch_bucket_size"] == 4096
    assert zero["stage3_max_live_parameters"] < sizes.total  # not DeepSpeed's "everything" default


# ---------------------------------------------------------------------------------------------
# Activation probe


def test_storage_peak_counts_what_is_alive_at_once() -> None:
    with StoragePeak() as tracker:
        a = torch.empty(1000, dtype=torch.float32)      # 4000 B
        b = torch.empty(500, dtype=torch.float64)       # 4000 B
        del a
        c = torch.empty(250, dtype=torch.int16)         # 500 B
        view = b[:10]                                   # a view: no new storage
        b.add_(1.0)                                     # in place: no new storage
    assert tracker.peak == 8000
    assert tracker.current == 4500
    del b, c, view


@pytest.mark.parametrize("make_cfg", [
    lambda teacher: tokenizer_cfg(*SMALL_TOKENIZER, f"tokenizer.teacher_weights={teacher}",
                                  "model.vit_enc_width=128", "model.vit_dec_width=128", "model.vit_enc_num_layers=3",
                                  "model.vit_dec_num_layers=5"),
    lambda teacher: generator_cfg(*TINY_GENERATOR, "model.model_type=UViT", "model.num_hidden_layers=6",
                                  "model.dropout=0.0", "model.attn_drop=0.0"),
], ids=["tokenizer", "uvit-generator"])
def test_probe_scales_to_a_direct_measurement_at_full_depth(make_cfg, teacher_file) -> None:
    from trainer.memory_probe import build_probe_modules, probe_step, stack_depths

    cfg = make_cfg(teacher_file)
    cpu = torch.device("cpu")
    fit = probe_activations(cfg, cpu)
    low = tuple(s[2] for s in stack_depths(cfg))
    for batch, layers, peak, saved in fit.points:  # the fit reproduces what it was fitted to at probe depth
        assert saved <= peak
        if layers == low:
            extra = sum(a * n + batch * k * n for (a, k), n in zip(fit.per_layer, fit.extra_layers))
            assert fit.saved_at(batch) - extra == pytest.approx(saved, rel=1e-6)
    mods = build_probe_modules(cfg, tuple(s[1] for s in stack_depths(cfg)), cpu)
    step = probe_step(cfg, mods, cpu)
    step(2, lambda: None)
    for batch in (3, 6):
        direct = measure_peak_growth(lambda mark: step(batch, mark), cpu)
        # Scaled from depth 1-2 (2-4) and batch 1-2 to the full depth and batch: within a few percent;
        # never much below (the excess taken from small probes can only overstate a tiny model's).
        assert 0.97 * direct.peak <= fit.bytes_at(batch) <= 1.2 * direct.peak, (batch, fit.bytes_at(batch), direct)


# ---------------------------------------------------------------------------------------------
# Counts against the real stages




@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory) -> str:
    from trainer.losses.random_backbones import random_vgg16_state
    from trainer.losses.weights import save_state_dict

    path = str(tmp_path_factory.mktemp("backbones") / "vgg16_random.pth")
    save_state_dict(random_vgg16_state(0), path)
    return path


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", ["proxy_codes", "decoder_finetune", "generator_vit", "generator_uvit"])
def test_counts_equal_the_models_the_stages_build(kind, single_process_group, teacher_file, vgg16_file) -> None:
    from trainer.loop import build_stage

    if kind == "proxy_codes":
        cfg = tokenizer_cfg(*TINY_TOKENIZER, f"tokenizer.teacher_weights={teacher_file}")
    elif kind == "decoder_finetune":
        cfg = tokenizer_cfg(*TINY_TOKENIZER, "tokenizer.recipe=decoder_finetune", f"tokenizer.teacher_weights={teacher_file}",
                            "tokenizer.losses.perceptual.convnext_weight=0", "tokenizer.losses.perceptual.lpips_weight=1",
                            f"tokenizer.losses.perceptual.vgg16_weights={vgg16_file}",
                            "tokenizer.discriminator.hidden_channels=32", "tokenizer.discriminator.num_stages=2")
    else:
        cfg = generator_cfg(*TINY_GENERATOR, f"model.model_type={'UViT' if kind == 'generator_uvit' else 'ViT'}")
    counts = count(cfg)
    stage = build_stage(cfg, single_process_group)
    described = stage.describe()
    assert {e.name: {"params": e.params, "trainable": e.trainable} for e in counts.engines} == described
    assert counts.ema == sum(t.numel() for t in stage.ema.shadow.values())
    assert counts.export_bytes == sum(t.numel() * t.element_size() for t in stage.export_state_dict().values())
    frozen_built = {}
    if getattr(stage, "teacher", None) is not None:
        frozen_built["teacher (MaskGIT-VQGAN)"] = _numel(stage.teacher)
    perceptual = getattr(getattr(stage, "pixel_loss", None), "perceptual", None)
    if perceptual is not None and perceptual.lpips is not None:
        frozen_built["LPIPS (VGG16)"] = _numel(perceptual.lpips)
    assert counts.frozen_networks == frozen_built
    if kind == "decoder_finetune":  # encoder, quantizer and latent tokens frozen inside the engine
        model = stage.engines["model"].module
        assert counts.engines[0].params - counts.engines[0].trainable == (
            _numel(model.encoder) + _numel(model.quantize) + model.latent_tokens.numel())


# ---------------------------------------------------------------------------------------------
# Plans against real engines on 2 Ray Train workers


def _measure(cfgs: list, tmp_path: Path, steps: int = 3) -> list[list[dict]]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray_session import train_controller_released
    from trainer.memory_probe import measure_worker

    out = tmp_path / "measured"
    out.mkdir()
    # Otherwise fit()'s SIGINT handler keeps the run's controller (and its helpers) alive for the rest of
    # the session, and the session's end waits for them (cluster/ray_session.py).
    with train_controller_released():
        TorchTrainer(measure_worker, train_loop_config={"cfgs": cfgs, "steps": steps, "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(name="plan-check", storage_path=str(tmp_path / "ray"))).fit()
    return [[json.loads((out / f"cfg{i}-rank{r}.json").read_text()) for r in (0, 1)] for i in range(len(cfgs))]


def _assert_holdings_match(plan, ranks: list[dict]) -> None:
    for m in ranks:
        for name, memory in plan.memory.items():
            held = m["held"][name]
            assert held["params"] == pytest.approx(memory.params, rel=0.01, abs=64 * 1024), name
            assert held["master"] + held["state"] == pytest.approx(memory.master + memory.moments, rel=0.01,
                                                                    abs=64 * 1024), name
        assert m["ema"] == pytest.approx(plan.memory["model"].ema, rel=0.01, abs=64 * 1024)
        assert m["export_bytes"] == plan.export_bytes
    written = sum(m["checkpoint_bytes"] for m in ranks)
    assert written == pytest.approx(sum(plan.checkpoint_bytes.values()), rel=0.03, abs=2 * MiB)
    assert ranks[0]["export_file_bytes"] == pytest.approx(plan.export_bytes, rel=0.01, abs=256 * 1024)


def _assert_peak_within(plan, ranks: list[dict], ratio: float = 1.3) -> None:
    """Peak RSS of fresh workers (runtime included) against the plan: within ``ratio`` both ways."""
    for m in ranks:
        train = m["train_peak"] / plan.train_peak
        assert 1 / ratio <= train <= ratio, (m["rank"], m["train_peak"] / MiB, plan.train_peak / MiB)
    overall = ranks[0]["peak"] / plan.peak  # rank 0 also serialises the export
    assert 1 / ratio <= overall <= ratio, (ranks[0]["peak"] / MiB, plan.peak / MiB)


@pytest.mark.slow
def test_small_tokenizer_zero3_plan_matches_two_workers(ray_local, tmp_path, teacher_file) -> None:
    cfg = tokenizer_cfg(*SMALL_TOKENIZER, f"tokenizer.teacher_weights={teacher_file}", "trainer.num_workers=2",
                        "deepspeed.zero_stage=3")
    plan = make_plan(cfg)
    assert plan.memory["model"].params < 0.6 * 4 * plan.counts.engines[0].params  # partitioned
    ranks = _measure([cfg], tmp_path)[0]
    _assert_holdings_match(plan, ranks)
    _assert_peak_within(plan, ranks)


@pytest.mark.slow
def test_small_generator_zero2_bf16_plan_matches_two_workers(ray_local, tmp_path) -> None:
    cfg = generator_cfg(*SMALL_GENERATOR, "trainer.num_workers=2", "deepspeed.zero_stage=2",
                        "deepspeed.precision=bf16", "deepspeed.autocast=false")
    plan = make_plan(cfg)
    ranks = _measure([cfg], tmp_path)[0]
    _assert_holdings_match(plan, ranks)
    _assert_peak_within(plan, ranks)


def test_tiny_plans_match_two_workers_at_zero_0_and_1(ray_local, tmp_path, teacher_file) -> None:
    cfgs = [tokenizer_cfg(*TINY_TOKENIZER, f"tokenizer.teacher_weights={teacher_file}", "trainer.num_workers=2",
                          "deepspeed.zero_stage=0"),
            generator_cfg(*TINY_GENERATOR, "trainer.num_workers=2", "deepspeed.zero_stage=1")]
    plans = [make_plan(cfg) for cfg in cfgs]
    measured = _measure(cfgs, tmp_path)
    for plan, ranks in zip(plans, measured):
        _assert_holdings_match(plan, ranks)
    _assert_peak_within(plans[0], measured[0])  # a fresh worker: the runtime dominates, measured as planned
    for m in measured[1]:  # the second config runs in the same workers: compare its growth
        growth = m["peak"] - m["rss_before"]
        assert growth <= 1.3 * (plans[1].peak - plans[1].runtime) + 64 * MiB, growth / MiB


# ---------------------------------------------------------------------------------------------
# Command line


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, str(REPO / "trainer" / "run.py"), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def test_run_py_plan_prints_the_plan() -> None:
    done = _run("stage=generator", "experiment=demo", "trainer.num_workers=2", "deepspeed.zero_stage=2", "--plan",
                "--cpu-mem", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    cfg = generator_cfg("experiment=demo")
    trainable = count(cfg).trainable
    assert f"trainable {trainable / 1e6:.1f}M ({trainable:,})" in out
    for text in ("runtime (Python/torch/DS/Ray)", "optimizer", "activations @ 64", "largest micro-batch that fits:",
                 "limit: 8.00 GiB (8 GiB per worker): fits", "checkpoint:", "reduce_bucket_size"):
        assert text in out, text


@pytest.mark.parametrize("args, message", [
    (["--plan", "--gpu-mem", "lots"], "--gpu-mem: 'lots' is not a memory size"),
    (["--gpu-mem", "80"], "only apply with --plan"),
])
def test_run_py_plan_refuses_bad_options(args, message) -> None:
    done = _run("stage=generator", "experiment=demo", *args)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr
