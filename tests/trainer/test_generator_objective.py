"""MaskGIT objective pieces and the token stream, checked against direct computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.batch_layout import StepLayout
from trainer.stages.generator import cosine_mask_ratio, masked_token_loss, random_masking, sample_generators
from trainer.token_data import load_token_dataset, token_step_batches


def test_cosine_schedule() -> None:
    t = torch.tensor([0.0, 0.5, 1.0, 0.25])
    expected = [1.0, math.acos(0.5) / (math.pi / 2), 1e-6, math.acos(0.25) / (math.pi / 2)]
    assert cosine_mask_ratio(t).tolist() == pytest.approx(expected)


def test_random_masking_counts_and_determinism() -> None:
    tokens = torch.randint(0, 100, (64, 32))
    positions = torch.arange(500, 564)
    masked, mask = random_masking(tokens, mask_id=100, generators=sample_generators(0, positions))
    # Recompute the counts from the same draws, independently of the implementation: row i's first
    # draw from its own generator is its mask ratio.
    ratio = torch.stack([torch.rand(1, generator=g) for g in sample_generators(0, positions)]).view(-1)
    ratio = (torch.arccos(ratio) / (math.pi / 2)).clamp(1e-6, 1)
    expected_counts = torch.clamp(torch.round(32 * ratio), min=1)
    assert torch.equal(mask.sum(1), expected_counts.long())
    assert torch.equal(masked[mask], torch.full((int(mask.sum()),), 100))
    assert torch.equal(masked[~mask], tokens[~mask])
    again, again_mask = random_masking(tokens, 100, sample_generators(0, positions))
    assert torch.equal(again, masked) and torch.equal(again_mask, mask)
    other, _ = random_masking(tokens, 100, sample_generators(0, positions + 64))
    assert not torch.equal(other, masked)
    # A row's mask depends on its position only, not on the rows batched with it.
    alone, alone_mask = random_masking(tokens[10:11], 100, sample_generators(0, positions[10:11]))
    assert torch.equal(alone_mask[0], mask[10]) and torch.equal(alone[0], masked[10])
    # On average the schedule masks E[arccos(t)] / (pi/2) = 1 / (pi/2) = 2/pi of the tokens.
    many = random_masking(torch.zeros(4000, 32, dtype=torch.long), 1, sample_generators(1, torch.arange(4000)))[1]
    assert many.float().mean().item() == pytest.approx(2 / math.pi, abs=0.02)


def test_masked_token_loss_matches_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    targets = torch.randint(0, 7, (3, 5))
    mask = torch.rand(3, 5) < 0.5
    mask[:, 0] = True
    eps, w_visible = 0.1, 0.1
    loss, accuracy = masked_token_loss(logits, targets, mask, eps, w_visible)
    logp = logits.log_softmax(-1)
    per = -(1 - eps) * logp.gather(-1, targets[..., None]).squeeze(-1) - eps * logp.mean(-1)
    weights = torch.where(mask, 1.0, w_visible)
    assert loss.item() == pytest.approx(((per * weights).sum() / weights.sum()).item(), rel=1e-6)
    hits = (logits.argmax(-1) == targets) & mask
    assert accuracy.item() == pytest.approx((hits.sum(1) / mask.sum(1)).float().mean().item())


def _write_tokens(root: Path, rows: int, width: int = 4) -> None:
    root.mkdir(parents=True)
    tokens = np.arange(rows * width, dtype=np.uint16).reshape(rows, width)
    half = rows // 2
    for shard, sl in enumerate([slice(0, half), slice(half, rows)]):
        table = pa.table({
            "key": [f"img{i:04d}" for i in range(rows)][sl],
            "label": pa.array(np.arange(rows, dtype=np.int32)[sl] % 3),
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens[sl].reshape(-1)), width),
            "flip": pa.array(np.zeros(rows, dtype=bool)[sl]),
        })
        pq.write_table(table, root / f"tokens-{shard:06d}.parquet")


def test_token_dataset_and_stream(tmp_path: Path) -> None:
    _write_tokens(tmp_path / "tok", rows=10)
    data = load_token_dataset(str(tmp_path / "tok"))
    assert data.tokens.shape == (10, 4) and data.keys[3] == "img0003" and data.labels.tolist()[:4] == [0, 1, 2, 0]
    assert data.tokens[7].tolist() == [28, 29, 30, 31]
    # The loaded rows feed the step order (its properties: tests/trainer/test_token_order.py).
    batches = token_step_batches(data, StepLayout(global_batch=4, streams=1, world_size=2, micro_batch=2), 1, seed=3)
    seen = [next(batches) for _ in range(3)]   # steps 0-2 of rank 1: positions 2-3, 6-7, 10-11
    assert [b.positions.tolist() for b in seen] == [[2, 3], [6, 7], [10, 11]]
    for batch in seen:
        assert torch.equal(batch.tokens, data.tokens[batch.rows].long()) and torch.equal(batch.labels, data.labels[batch.rows])
    with pytest.raises(FileNotFoundError, match="pretokenize"):
        load_token_dataset(str(tmp_path / "missing"))
