"""Engine checkpoints written by N workers load on M workers, under ZeRO 0, 1, 2 and 3.

Real DeepSpeed engines over gloo, in real processes (tests/trainer/dist_harness.py). Each case trains
a small model a few steps on N ranks, gathers the full fp32 weights and AdamW moments with
DeepSpeed's own gatherers (``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``; the
parameters and ``optimizer.state`` themselves without ZeRO), saves with ``trainer.engine_state``,
then loads into a fresh engine on M ranks and gathers again: the values must be equal exactly, and
the next optimizer step on M ranks must match the one taken on N ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.trainer.dist_harness import run_ranks
from trainer.tensor_files import read_metadata

GLOBAL_BATCH = 12
FEATURES = 7


class Small(torch.nn.Module):
    """Sizes that no world size divides, a frozen parameter and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(FEATURES, 11)
        self.norm = torch.nn.LayerNorm(11)
        self.head = torch.nn.Linear(11, 5)
        self.frozen = torch.nn.Parameter(torch.randn(13), requires_grad=False)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.embed(x)))) * self.scale + self.frozen[:5]


def _cfg(zero: int, precision: str):
    from trainer.config import build_config
    from trainer.schema import GeneratorTrainConfig

    return build_config("generator", GeneratorTrainConfig, [
        f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}", "deepspeed.autocast=false",
        "trainer.max_steps=50", "trainer.batch_size_per_worker=3", "optim.lr=3e-2", "optim.end_lr=1e-3",
        "optim.warmup_steps=2", "optim.weight_decay=0.05", "trainer.grad_clip=1.0"])


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, FEATURES, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def _build(zero: int, precision: str, world: int, init_seed: int):
    import deepspeed

    from trainer.batch_layout import StepLayout
    from trainer.distributed import build_engine
    from trainer.ema import ParamEMA

    cfg = _cfg(zero, precision)
    layout = StepLayout(GLOBAL_BATCH, 2, world, cfg.trainer.batch_size_per_worker)
    torch.manual_seed(init_seed)
    if zero == 3:
        with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}):
            model = Small()
    else:
        model = Small()
    engine = build_engine(model, cfg, accumulation=layout.accumulation)
    return engine, layout, ParamEMA(engine.module, 0.9)


def _train_step(engine, layout, rank: int, step: int, ema) -> None:
    inputs, targets = _global_batch(step)
    dtype = next(p for p in engine.module.parameters()).dtype
    for micro in layout.micro_batches(rank):
        idx = list(micro) or [layout.rank_slots(rank).start]
        weight = layout.loss_weight(len(micro))
        out = engine(inputs[idx].to(dtype))
        loss = (out.float() - targets[idx]).pow(2).mean()
        engine.backward(loss * weight)
        engine.step()
    ema.update(engine.module)


def _full_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights and moments of every parameter, gathered by DeepSpeed (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from trainer.engine_state import base_optimizer

    out = {}
    optimizer = base_optimizer(engine)
    if getattr(engine.optimizer, "_hp_optimizer_states_linked", False):
        # DeepSpeed 0.19 links every param group's moment views after the *first group's* first step,
        # before the other groups have state (stage_1_and_2._optimizer_step): with two param groups,
        # safe_get_full_optimizer_state then fails for the second. Relink now that all state exists.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    zero_managed = engine.zero_optimization_stage() > 0 or hasattr(engine.optimizer, "fp32_groups_flat_partition")
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            if hasattr(param, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([param]):
                    out[f"{name}/param"] = param.data.float().clone()
            else:
                out[f"{name}/param"] = param.data.float().clone()
            continue
        if zero_managed:
            out[f"{name}/param"] = safe_get_full_fp32_param(param).float().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key).float().clone()
        else:
            out[f"{name}/param"] = param.data.float().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}/{key}"] = optimizer.state[param][key].float().clone()
    return out


def _scalars(engine) -> dict:
    from trainer.engine_state import base_optimizer, engine_scalars

    scalars = engine_scalars(engine)
    scalars["lr"] = [g["lr"] for g in engine.optimizer.param_groups]
    scalars["adam_step"] = scalars.pop("optimizer_step")
    scalars["state_steps"] = sorted({float(s["step"]) for s in base_optimizer(engine).state.values() if "step" in s})
    for key in ("zero_stage", "world_size"):
        scalars.pop(key)
    return scalars


def _save_phase(rank: int, world: int, zero: int, precision: str, directory: str, steps: int = 3) -> dict:
    from trainer.engine_state import save_engine

    engine, layout, ema = _build(zero, precision, world, init_seed=0)
    for step in range(steps):
        _train_step(engine, layout, rank, step, ema)
    save_engine(engine, Path(directory), rank, ema.views(engine.module, rank))
    full = _full_state(engine)
    ema_full = ema.full_state_dict(engine.module)
    scalars = _scalars(engine)
    _train_step(engine, layout, rank, steps, ema)  # the step the resumed engine must reproduce
    after = _full_state(engine)
    if rank == 0:
        torch.save({"full": full, "ema": ema_full, "after": after}, Path(directory) / "reference.pt")
    return scalars


def _load_phase(rank: int, world: int, zero: int, precision: str, directory: str, steps: int = 3) -> dict:
    from trainer.engine_state import load_engine

    engine, layout, ema = _build(zero, precision, world, init_seed=123)  # other weights: the load must overwrite
    load_engine(engine, Path(directory), rank, ema.views(engine.module, rank))
    full = _full_state(engine)
    ema_full = ema.full_state_dict(engine.module)
    scalars = _scalars(engine)
    _train_step(engine, layout, rank, steps, ema)
    after = _full_state(engine)
    reference = torch.load(Path(directory) / "reference.pt", weights_only=True)
    mismatched = [k for k, v in reference["full"].items() if not torch.equal(full[k], v)]
    ema_mismatched = [k for k, v in reference["ema"].items() if not torch.equal(ema_full[k], v)]
    worst = max(float(((after[k] - v).abs() / (v.abs() + 1e-3)).max()) for k, v in reference["after"].items()
                if k.endswith("/param"))
    return {"scalars": scalars, "mismatched": mismatched, "ema_mismatched": ema_mismatched, "keys": sorted(full),
            "reference_keys": sorted(reference["full"]), "next_step_rel_diff": worst}


CASES = [  # (zero stage, precision, saving world, loading world): every stage, both precisions, both ways
    (0, "fp32", 2, 1), (3, "fp32", 2, 1), (2, "bf16", 3, 2), (1, "bf16", 1, 2), (3, "bf16", 2, 3),
]


@pytest.mark.parametrize("zero,precision,saved_on,loaded_on", CASES,
                         ids=[f"zero{z}-{p}-{n}to{m}" for z, p, n, m in CASES])
def test_resized_load_restores_weights_moments_and_schedule_exactly(zero, precision, saved_on, loaded_on,
                                                                    tmp_path) -> None:
    saved = run_ranks(saved_on, _save_phase, zero, precision, str(tmp_path))
    files = sorted(p.name for p in tmp_path.glob("rank*.safetensors"))
    assert files == [f"rank{r}.safetensors" for r in range(saved_on)]
    loaded = run_ranks(loaded_on, _load_phase, zero, precision, str(tmp_path))
    for rank, result in enumerate(loaded):
        assert result["keys"] == result["reference_keys"]
        assert result["mismatched"] == [], f"rank {rank}: fp32 state differs after the resized load"
        assert result["ema_mismatched"] == [], f"rank {rank}: EMA differs after the resized load"
        assert result["scalars"] == saved[0], f"rank {rank}"
        # The next step (same global batch, now split over another number of ranks) agrees up to the
        # order of floating-point sums (bf16 working weights round differently per partition).
        assert result["next_step_rel_diff"] < (2e-2 if precision == "bf16" else 1e-4), result["next_step_rel_diff"]
    assert saved[0]["global_steps"] == 3 and saved[0]["scheduler"]["last_epoch"] == 3


def test_an_engine_that_has_not_stepped_checkpoints_and_resumes(tmp_path) -> None:
    """Stage 2's discriminator takes no step before ``discriminator_start`` (20k): its optimizer has no
    Adam state yet, and its first checkpoint at ZeRO-3 failed (KeyError 'exp_avg', found by
    bench/rehearse.py). It holds the zeros torch creates at the first step, so the resumed engine's
    first step equals the straight one's. (ZeRO-1/2 take the same path, but DeepSpeed's own gatherer,
    the reference here, cannot read an optimizer that has not stepped.)"""
    saved = run_ranks(1, _save_phase, 3, "fp32", str(tmp_path), 0)
    loaded = run_ranks(2, _load_phase, 3, "fp32", str(tmp_path), 0)
    for result in loaded:
        assert result["keys"] == result["reference_keys"] and result["mismatched"] == []
        assert result["scalars"] == saved[0] and result["next_step_rel_diff"] < 1e-4
    assert saved[0]["global_steps"] == 0


def test_loading_a_checkpoint_of_another_model_fails_clearly(tmp_path) -> None:
    from trainer.engine_state import (CheckpointError, FragmentReader, StateView, consolidated_state_dict,
                                      write_fragments)

    values = torch.arange(10, dtype=torch.float32)
    write_fragments(tmp_path / "rank0.safetensors", [StateView("w", "param", 0, values[:6], True, (2, 5))])
    write_fragments(tmp_path / "rank1.safetensors", [StateView("w", "param", 6, values[6:], True, (2, 5))])
    reader = FragmentReader(tmp_path)
    assert torch.equal(reader.read("w", "param", 3, 6), values[3:9])  # spans both files
    assert torch.equal(consolidated_state_dict(tmp_path)["w"], values.view(2, 5))
    with pytest.raises(CheckpointError, match="has 10 elements"):
        reader.read("w", "param", 0, 12)
    with pytest.raises(CheckpointError, match="no 'exp_avg'"):
        reader.read("w", "exp_avg", 0, 2)
    (tmp_path / "rank1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="covers 4 of the 6"):
        FragmentReader(tmp_path).read("w", "param", 2, 6)
    meta = json.loads(read_metadata(tmp_path / "rank0.safetensors")["titok_fragments"])
    assert meta == {"w::param::0": ["w", "param", 0, [2, 5]]}


def _export_phase(rank: int, world: int, directory: str) -> bool:
    from safetensors.torch import load_file

    from trainer.checkpoint import write_export_stream
    from trainer.ema import export_specs, iter_full_tensors

    engine, layout, ema = _build(3, "fp32", world, init_seed=0)
    for step in range(2):
        _train_step(engine, layout, rank, step, ema)
    expected = ema.full_state_dict(engine.module)  # all-gathered on every rank: the reference
    tensors = iter_full_tensors(engine.module, ema.shadow)
    if rank == 0:
        url = write_export_stream(directory, 2, export_specs(engine.module), tensors, {"model": "small"}, {})
        written = load_file(str(Path(url) / "model.safetensors"))
        return set(written) == set(expected) and all(torch.equal(written[k], v) for k, v in expected.items())
    assert all(t is None for t in tensors)  # the other ranks only send their slices
    return True


def test_streamed_export_under_zero3_equals_the_gathered_weights(tmp_path) -> None:
    assert run_ranks(2, _export_phase, str(tmp_path)) == [True, True]
    assert (tmp_path / "exports" / "step_000000002" / "COMPLETE").exists()
