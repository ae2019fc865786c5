"""DeepSpeed wiring on one process (gloo): LR schedule, param groups, EMA, export/checkpoint layout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.config import build_config
from trainer.distributed import build_engine, deepspeed_config, param_groups
from trainer.ema import ParamEMA, gather_full_state_dict
from trainer.schema import GeneratorTrainConfig




def _cfg(*overrides: str) -> GeneratorTrainConfig:
    return build_config("generator", GeneratorTrainConfig, [
        "trainer.max_steps=20", "trainer.batch_size_per_worker=4", "trainer.num_workers=1",
        "deepspeed.precision=fp32", "optim.lr=1e-2", "optim.end_lr=1e-3", "optim.warmup_steps=5", *overrides])


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.embed(ids)))


def test_lr_schedule_is_linear_warmup_then_cosine_to_end_lr(single_process_group) -> None:
    cfg = _cfg()
    torch.manual_seed(0)
    engine = build_engine(Tiny(), cfg)
    lr, end, warmup, total = 1e-2, 1e-3, 5, 20
    used = []
    for _ in range(total):
        used.append(engine.optimizer.param_groups[0]["lr"])  # the LR this step will apply
        loss = engine(torch.randint(0, 10, (4, 3))).pow(2).mean()
        engine.backward(loss)
        engine.step()
    for step, value in enumerate(used, start=1):
        # Independent formula for the LR of optimizer step `step` (1-based).
        if step <= warmup:
            expected = lr * step / warmup
        else:
            progress = (step - warmup) / (total - warmup)
            expected = end + (lr - end) * 0.5 * (1 + math.cos(math.pi * progress))
        assert value == pytest.approx(expected, rel=1e-9), step
    assert used[0] == pytest.approx(lr / warmup) and used[-1] == pytest.approx(end)


def test_cpu_workers_do_not_build_deepspeeds_shared_memory_op(single_process_group) -> None:
    """setup_worker marks DeepSpeed's CPU shared-memory all-reduce op (used only by its inference
    all-reduce) unavailable, so no process group start JIT-compiles it; collectives still work."""
    import deepspeed.comm as ds_comm
    from deepspeed.comm import comm

    assert comm.cdb is not None and comm.cdb.shm_comm_op is None
    summed = torch.arange(3.0)
    ds_comm.all_reduce(summed)
    assert summed.tolist() == [0.0, 1.0, 2.0]  # world size 1


def test_no_weight_decay_on_norms_biases_embeddings() -> None:
    model = Tiny()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"proj.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"embed.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_zero_and_precision_map_to_deepspeed_config() -> None:
    ds = deepspeed_config(_cfg("deepspeed.zero_stage=3", "deepspeed.precision=bf16",
                               "deepspeed.offload_optimizer=true"), accumulation=4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    native = deepspeed_config(_cfg("deepspeed.precision=bf16", "deepspeed.autocast=false", "deepspeed.zero_stage=1"))
    assert native["bf16"] == {"enabled": True, "check_grad_overflow": True} and "torch_autocast" not in native
    assert deepspeed_config(_cfg("deepspeed.zero_stage=2"))["optimizer"]["params"]["betas"] == [0.9, 0.96]
    # Without ZeRO, build_engine passes its own optimizer (SkipNonFiniteAdamW) instead of naming one.
    assert "optimizer" not in deepspeed_config(_cfg())


def test_a_step_with_non_finite_gradients_is_skipped_without_zero(single_process_group) -> None:
    cfg = _cfg("optim.warmup_steps=0")
    torch.manual_seed(2)
    engine = build_engine(Tiny(), cfg)
    ids = torch.randint(0, 10, (4, 3))
    engine.backward(engine(ids).pow(2).mean())
    engine.step()
    assert engine.was_step_applied()
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    lr_before = engine.get_lr()[0]
    engine.backward(engine(ids).pow(2).mean() * float("nan"))
    engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == 1 and engine.global_steps == 2
    for name, param in engine.module.named_parameters():
        assert torch.equal(param, before[name]), name  # untouched, and still finite
    assert engine.get_lr()[0] == lr_before  # the LR schedule did not advance on the skipped step


def test_ema_follows_its_formula(single_process_group) -> None:
    torch.manual_seed(1)
    engine = build_engine(Tiny(), _cfg("optim.warmup_steps=0"))
    ema = ParamEMA(engine.module, decay=0.9, warmup=False)
    expected = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for _ in range(3):
        loss = engine(torch.randint(0, 10, (4, 3))).pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
        for name, param in engine.module.named_parameters():
            expected[name] = 0.9 * expected[name] + 0.1 * param.detach()
    full = ema.full_state_dict(engine.module)
    for name, value in expected.items():
        torch.testing.assert_close(full[name], value, rtol=1e-6, atol=1e-7)
    assert set(full) == set(engine.module.state_dict()), "buffers included, layout of state_dict"
    # Warm-up: the first updates may not exceed (1 + n) / (10 + n).
    warm = ParamEMA(engine.module, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)
    torch.testing.assert_close(gather_full_state_dict(engine.module)["proj.weight"], engine.module.proj.weight)


def test_exports_are_listed_only_when_complete(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    state = {"w": torch.arange(6.0).view(2, 3)}
    url = ckpt.write_export(run_dir, 7, state, {"model": {"x": 1}}, {"stage": "tokenizer"})
    assert Path(url).name == "step_000000007"
    incomplete = tmp_path / "run" / "exports" / "step_000000009"
    incomplete.mkdir(parents=True)
    (incomplete / "model.safetensors").write_bytes(b"partial")
    exports = ckpt.list_exports(run_dir)
    assert [e.step for e in exports] == [7]
    assert exports[0].meta == {"step": 7, "stage": "tokenizer"}
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(str(Path(url) / "model.safetensors"))["w"], state["w"])


def test_rng_state_round_trip(tmp_path: Path) -> None:
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    ckpt.save_rng(tmp_path, rank=0)
    first = (torch.rand(3), np.random.rand(3), random.random())
    assert ckpt.load_rng(tmp_path, rank=0)
    second = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(first[0], second[0])
    assert np.array_equal(first[1], second[1]) and first[2] == second[2]
    assert not ckpt.load_rng(tmp_path, rank=1)
