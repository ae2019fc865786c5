"""trainer/token_data.py's training order: the rows of every step do not depend on the number of ranks
or the micro-batch size, epochs stay exact across resizes, and resuming at any step is exact."""

from __future__ import annotations

import itertools

import pytest
import torch

from trainer.batch_layout import StepLayout
from trainer.token_data import TokenDataset, token_step_batches

N, G, SEED = 30, 8, 5   # 30 rows, steps of 8: steps straddle epochs (3.75 steps an epoch)


def dataset() -> TokenDataset:
    """Row r holds tokens [r, r + 1000] and label r % 7: a batch's content names its rows."""
    rows = torch.arange(N, dtype=torch.int32)
    return TokenDataset(tokens=torch.stack([rows, rows + 1000], dim=1), labels=(rows % 7).long(),
                        keys=[f"row{r}" for r in range(N)], flips=torch.zeros(N, dtype=torch.bool), metadata={})


def global_positions_and_rows(layout: StepLayout, first: int, last: int, data: TokenDataset
                              ) -> list[tuple[list[int], list[int]]]:
    """(positions, rows) of steps ``first..last-1`` over all ranks in slot order, checking every rank's
    micro-batches against the layout (step, index, size, padding stand-ins, tokens and labels)."""
    steps: list[tuple[list[int], list[int]]] = [([], []) for _ in range(first, last)]
    for rank in range(layout.world_size):
        micro = layout.micro_batches(rank)
        batches = token_step_batches(data, layout, rank, SEED, start_step=first)
        for i, step in enumerate(range(first, last)):
            mine = list(itertools.islice(batches, layout.accumulation))
            assert [(b.step, b.micro, b.padding) for b in mine] == [(step, j, not r) for j, r in enumerate(micro)]
            assert [len(b.rows) for b in mine] == [len(r) or 1 for r in micro]
            for b in mine:
                assert torch.equal(b.tokens, data.tokens[b.rows].long()) and b.tokens.dtype == torch.int64
                assert torch.equal(b.labels, data.labels[b.rows])
            real = [b for b in mine if not b.padding]
            positions = [p for b in real for p in b.positions.tolist()]
            slots = layout.rank_slots(rank)
            assert positions == [step * G + s for s in slots]   # slot i of step s is position s * G + i
            for b in mine:
                if b.padding:  # a stand-in holds the rank's first sample of the step
                    assert b.positions.tolist() == positions[:1]
            steps[i][0].extend(positions)
            steps[i][1].extend(r for b in real for r in b.rows.tolist())
    return steps


def check_epochs(positions: list[int], rows: list[int]) -> None:
    """Positions are consecutive from 0; each epoch (N consecutive positions) is every row once."""
    assert positions == list(range(len(positions)))
    for epoch in range(len(rows) // N):
        assert sorted(rows[epoch * N:(epoch + 1) * N]) == list(range(N))
    assert rows[:N] != rows[N:2 * N]   # each epoch has its own permutation


@pytest.mark.parametrize("world, micro", [(2, 4), (2, 3), (3, 2), (3, 1), (4, 8), (5, 1)])
def test_step_rows_do_not_depend_on_ranks_or_micro_batches(world, micro):
    data = dataset()
    reference = global_positions_and_rows(StepLayout(G, 1, 1, G), 0, 9, data)
    check_epochs([p for ps, _ in reference for p in ps], [r for _, rs in reference for r in rs])
    # (3, 1): rank 0's 2 slots in 3 micro-batches, one of them a padding stand-in
    assert global_positions_and_rows(StepLayout(G, 1, world, micro), 0, 9, data) == reference


def test_every_row_once_an_epoch_across_resizes():
    data = dataset()
    legs = [(StepLayout(G, 1, 2, 4), 0, 2), (StepLayout(G, 1, 1, 8), 2, 5), (StepLayout(G, 1, 3, 2), 5, 8)]
    steps = [s for layout, first, last in legs for s in global_positions_and_rows(layout, first, last, data)]
    positions, rows = [p for ps, _ in steps for p in ps], [r for _, rs in steps for r in rs]
    check_epochs(positions, rows)
    assert steps == global_positions_and_rows(StepLayout(G, 1, 1, G), 0, 8, data)


def test_resume_gives_the_uninterrupted_micro_batches():
    data, layout = dataset(), StepLayout(G, 1, 3, 2)   # rank 1: 3 slots in micro-batches of 1 and 2
    full = list(itertools.islice(token_step_batches(data, layout, 1, SEED), 10 * layout.accumulation))
    for start in (1, 4, 7):
        resumed = token_step_batches(data, layout, 1, SEED, start_step=start)
        for expected in full[start * layout.accumulation:]:
            got = next(resumed)
            assert (got.step, got.micro, got.padding) == (expected.step, expected.micro, expected.padding)
            assert all(torch.equal(a, b) for a, b in zip(got[:4], expected[:4]))
    other_seed = next(token_step_batches(data, layout, 1, SEED + 1))
    assert not torch.equal(other_seed.rows, full[0].rows)
    with pytest.raises(ValueError, match="one stream"):
        next(token_step_batches(data, StepLayout(G, 2, 1, G), 0, SEED))


def test_a_changed_global_batch_continues_from_the_layouts_origin():
    """After a deliberate change of G at step 3 (24 positions consumed), step s of the new layout
    starts at position 24 + (s - 3) * G': the order goes on without a gap or a repeat."""
    data = dataset()
    old = global_positions_and_rows(StepLayout(G, 1, 1, G), 0, 3, data)
    new_layout = StepLayout(6, 1, 2, 3, origin_step=3, origin_position=3 * G)
    ranks = [list(itertools.islice(token_step_batches(data, new_layout, rank, SEED, start_step=3),
                                   7 * new_layout.accumulation)) for rank in range(2)]
    positions, rows = [p for ps, _ in old for p in ps], [r for _, rs in old for r in rs]
    for i in range(7):   # steps 3..9, ranks in order
        for batches in ranks:
            for b in batches[i * new_layout.accumulation:(i + 1) * new_layout.accumulation]:
                assert b.step == 3 + i
                positions.extend(b.positions.tolist())
                rows.extend(b.rows.tolist())
    check_epochs(positions, rows)
