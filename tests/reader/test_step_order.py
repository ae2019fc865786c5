"""trainer/data.py's training order: the samples (and pixels) of every step do not depend on the number
of ranks or loader workers; epochs stay exact across resizes; resumes are exact; bad data is replaced
the same way whoever reads it. Real shards, real DataLoader workers."""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.reader.conftest import manifest_labels, rewrite_with_garbage, take, truncate_shard
from trainer import data
from trainer.batch_layout import StepLayout
from trainer.data import ReadCounters, step_batches

SEED, WINDOW = 3, 8   # windows of one 10-sample shard (shards_80), so a stream's epoch has two
G, L = 8, 4           # q = 2 samples of each stream a step: 10 steps an epoch for shards_80, 6 for shards_48


@dataclass
class Step:
    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor


def reader(shards: Path, layout: StepLayout, rank: int, workers: int, start_step: int = 0, **options):
    return step_batches(f"{shards}/train-*.tar", layout, rank, image_size=16, num_workers=workers, seed=SEED,
                        shuffle_buffer=WINDOW, start_step=start_step, uint8=True, **options)


def rank_steps(shards: Path, layout: StepLayout, rank: int, workers: int, first: int, last: int,
               counters: ReadCounters | None = None, **options) -> list[Step]:
    """Rank ``rank``'s samples of steps ``first..last-1`` in slot order, checking on the way that its
    micro-batches are those of ``layout`` (step, index, size, padding stand-ins)."""
    accumulation, micro = layout.accumulation, layout.micro_batches(rank)
    batches = reader(shards, layout, rank, workers, first, **options)
    out = []
    for step in range(first, last):
        mine = take(batches, accumulation)
        assert [(b.step, b.micro) for b in mine] == [(step, j) for j in range(accumulation)]
        assert [b.padding for b in mine] == [not r for r in micro]
        assert [len(b.keys) for b in mine] == [b.images.shape[0] for b in mine] == [len(r) or 1 for r in micro]
        real = [b for b in mine if not b.padding]
        got = Step([k for b in real for k in b.keys], torch.cat([b.images for b in real]),
                   torch.cat([b.labels for b in real]))
        assert len(got.keys) == len(layout.rank_slots(rank))
        for b in mine:
            if b.padding:  # a stand-in holds the rank's first sample of the step
                assert b.keys == got.keys[:1] and torch.equal(b.images, got.images[:1])
        out.append(got)
    if counters is not None:
        counters.add(batches.counters)
    return out


def global_steps(shards: Path, layout: StepLayout, workers: int, first: int, last: int,
                 counters: ReadCounters | None = None, **options) -> list[Step]:
    """Steps ``first..last-1`` of the whole global batch: every rank's samples, ranks in order."""
    ranks = [rank_steps(shards, layout, rank, workers, first, last, counters, **options)
             for rank in range(layout.world_size)]
    return [Step([k for r in ranks for k in r[i].keys], torch.cat([r[i].images for r in ranks]),
                 torch.cat([r[i].labels for r in ranks])) for i in range(last - first)]


def shard_positions(shards: Path) -> dict[str, tuple[int, int]]:
    """key -> (shard number, index in the shard), read with tarfile."""
    out = {}
    for shard, path in enumerate(sorted(shards.glob("train-*.tar"))):
        with tarfile.open(path) as tar:
            keys = list(dict.fromkeys(m.name.rsplit(".", 1)[0] for m in tar if m.isfile()))
        out.update({key: (shard, index) for index, key in enumerate(keys)})
    return out


# (world size, loader workers, micro-batch): 3 does not divide G = 8 (rank shares 2, 3, 3; partial
# streams read by two ranks), and (3, 2, 1) makes 3 micro-batches of 0, 1, 1 samples on rank 0.
COMBOS = [(1, 2, 3), (2, 0, 4), (2, 1, 3), (3, 2, 1), (3, 0, 2)]


@pytest.mark.parametrize("fixture", ["shards_80", "shards_48"])
def test_step_samples_do_not_depend_on_ranks_or_loader_workers(fixture, request):
    shards = request.getfixturevalue(fixture)
    labels = manifest_labels(shards)
    steps = 12  # past the first epoch
    reference = global_steps(shards, StepLayout(G, L, 1, G), 0, 0, steps)   # one rank, no loader worker
    for step in reference:
        assert step.labels.tolist() == [labels[k] for k in step.keys]
    for world, workers, micro in COMBOS:
        layout = StepLayout(G, L, world, micro)
        for rank in range(world):
            slots = layout.rank_slots(rank)
            for expected, got in zip(reference, rank_steps(shards, layout, rank, workers, 0, steps)):
                assert got.keys == expected.keys[slots.start:slots.stop], (world, workers, rank)
                assert torch.equal(got.images, expected.images[slots.start:slots.stop])
                assert torch.equal(got.labels, expected.labels[slots.start:slots.stop])


@pytest.mark.parametrize("fixture, epoch_steps", [("shards_80", 10), ("shards_48", 6)])
def test_every_sample_once_an_epoch_across_resizes(fixture, epoch_steps, request):
    """Steps 0..a on 2 ranks, resumed on 1 rank to b, then on 3 ranks past the end of the epoch: the
    epoch is every sample exactly once, and each stream reads whole shards (80 samples in 8 shards:
    2 shards a stream) or every L-th sample (48 in 2 shards: fewer shards than streams)."""
    shards = request.getfixturevalue(fixture)
    a, b = epoch_steps // 3, 2 * epoch_steps // 3
    legs = [(StepLayout(G, L, 2, 4), 1, 0, a), (StepLayout(G, L, 1, 8), 2, a, b), (StepLayout(G, L, 3, 2), 1, b, epoch_steps + 1)]
    steps = [step for layout, workers, first, last in legs for step in global_steps(shards, layout, workers, first, last)]
    epoch = [k for step in steps[:epoch_steps] for k in step.keys]
    assert sorted(epoch) == sorted(manifest_labels(shards))
    assert steps[epoch_steps].keys != steps[0].keys  # the next epoch is reshuffled

    where, q = shard_positions(shards), G // L
    for stream in range(L):
        read = [where[k] for step in steps[:epoch_steps] for k in step.keys[stream * q:(stream + 1) * q]]
        shards_read = {shard for shard, _ in read}
        if fixture == "shards_80":  # whole shards
            assert len(read) == 20 and sorted(read) == sorted((s, i) for s in shards_read for i in range(10))
        else:  # every L-th sample of each shard (24 a shard: the same residue in both)
            assert len(read) == 12 and shards_read == {0, 1}
            assert len({index % L for _, index in read}) == 1 and all(sum(s == t for s, _ in read) == 6 for t in (0, 1))

    uninterrupted = global_steps(shards, StepLayout(G, L, 1, G), 0, 0, epoch_steps + 1)
    assert [s.keys for s in steps] == [s.keys for s in uninterrupted]
    assert all(torch.equal(s.images, u.images) for s, u in zip(steps, uninterrupted))


def test_resume_gives_the_uninterrupted_micro_batches_with_any_loader_workers(shards_80, caplog):
    layout = StepLayout(G, L, 2, 3)   # rank 1: streams 2 and 3, micro-batches of 2 and 2
    accumulation = layout.accumulation
    full = take(reader(shards_80, layout, 1, workers=2), 13 * accumulation)   # crosses the epoch at step 10
    for start, workers in [(3, 2), (11, 1), (11, 0)]:   # 3: mid-window; 11: the second epoch
        resumed = take(reader(shards_80, layout, 1, workers, start), (13 - start) * accumulation)
        assert len(resumed) == len(full[start * accumulation:])
        for a, b in zip(full[start * accumulation:], resumed):
            assert (a.step, a.micro, a.keys) == (b.step, b.micro, b.keys)
            assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    other_seed = step_batches(f"{shards_80}/train-*.tar", layout, 1, image_size=16, num_workers=0, seed=SEED + 1,
                              shuffle_buffer=WINDOW)
    assert next(other_seed).keys != full[0].keys

    with caplog.at_level(logging.WARNING, logger="trainer.data"):  # 2 streams: 3 loader workers would idle
        idle = reader(shards_80, layout, 1, workers=5, start_step=3)
    assert idle.reader.loader_workers == 2 and "would idle" in caplog.text
    assert next(idle).keys == full[3 * accumulation].keys


def test_resume_decodes_only_the_images_it_yields(shards_80, monkeypatch):
    calls = []
    real = data.decode_resized
    monkeypatch.setattr(data, "decode_resized", lambda *a, **k: calls.append(1) or real(*a, **k))
    take(reader(shards_80, StepLayout(G, L, 1, G), 0, workers=0, start_step=25), 2)  # 2.5 epochs skipped
    assert len(calls) == 2 * G


def test_decoded_cache_gives_the_same_batches_and_decodes_each_image_once_while_it_fits(shards_80, monkeypatch):
    """25 steps read the 80 images 2.5 times. With a cache that holds them all each is decoded once; with
    one that holds some, those are decoded once and the rest every time; the pixels never change (the
    crop and flip still come from each sample's own generator), with or without loader workers."""
    calls = []
    real = data.decode_resized
    monkeypatch.setattr(data, "decode_resized", lambda *a, **k: calls.append(1) or real(*a, **k))
    layout, steps = StepLayout(G, L, 1, G), 25
    uncached = global_steps(shards_80, layout, 0, 0, steps)
    assert len(calls) == steps * G == 200

    one_image = 16 * 16 * 3   # the smallest a resized image can be (shorter side 16)
    for budget_mb, decoded in [(64, lambda n: n == 80), (20 * one_image / 2**20, lambda n: 80 < n < 200)]:
        calls.clear()
        cached = global_steps(shards_80, layout, 0, 0, steps, decoded_cache_mb=budget_mb)
        assert decoded(len(calls)), (budget_mb, len(calls))
        assert [s.keys for s in cached] == [s.keys for s in uncached]
        assert all(torch.equal(c.images, u.images) and torch.equal(c.labels, u.labels)
                   for c, u in zip(cached, uncached))

    with_workers = global_steps(shards_80, StepLayout(G, L, 2, 2), 2, 0, steps, decoded_cache_mb=64)
    assert all(torch.equal(w.images, u.images) for w, u in zip(with_workers, uncached))


def test_decoded_cache_is_keyed_by_content_keeps_to_its_budget_and_never_keeps_a_bad_image(shards_80):
    images = []
    for path in sorted(shards_80.glob("train-*.tar"))[:3]:
        with tarfile.open(path) as tar:
            images += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    cache = data.DecodedCache(16, budget_mb=0.01)   # 10 KiB: a few of the 30 images at 16 px
    first = cache.decode(images[0])
    copy = images[0][:1] + images[0][1:]   # equal bytes, another object
    assert cache.decode(copy) is first and (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(np.asarray(first), np.asarray(data.decode_resized(images[0], 16)))
    for image in images[1:]:
        cache.decode(image)
    assert 0 < cache.bytes <= 10 * 2**10 and 1 < len(cache) < len(images)
    assert (cache.hits, cache.misses) == (1, len(images))
    for image in images:   # a second pass: what was kept is a hit, the rest is decoded again
        cache.decode(image)
    assert (cache.hits, cache.misses) == (1 + len(cache), 2 * len(images) - len(cache))
    held = len(cache)
    with pytest.raises(Exception):
        cache.decode(b"\xff\xd8\xff\xe0 not a jpeg")
    assert len(cache) == held
    # An image already at the target size is not resized: PIL leaves it lazy, holding its bytes; the
    # cache keeps it decoded (its bytes released), with the same pixels.
    shorter = min(Image.open(io.BytesIO(images[0])).size)
    exact = data.DecodedCache(shorter, budget_mb=1)
    kept = exact.decode(images[0])
    assert exact.decode(images[0]) is kept and getattr(kept, "fp", None) is None
    assert np.array_equal(np.asarray(kept), np.asarray(data.decode_resized(images[0], shorter)))
    off = data.DecodedCache(16)   # budget 0: a plain decode, nothing kept
    off.decode(images[0]), off.decode(images[0])
    assert len(off) == 0 and off.hits == 0
    with pytest.raises(ValueError, match="budget"):
        data.DecodedCache(16, budget_mb=-1)


def test_bad_samples_take_their_streams_next_good_sample_whoever_reads_them(shards_80, tmp_path):
    """Two undecodable images and a shard truncated after 4 of its 10 samples: each bad slot holds the
    next good sample of its stream (with that sample's own pixels), on 1 rank and on 3 ranks with
    loader workers alike, with the decoded cache too; every bad slot is counted once."""
    shards = tmp_path / "shards"
    shutil.copytree(shards_80, shards)
    where = shard_positions(shards_80)
    corrupt = set(rewrite_with_garbage(shards / "train-000000.tar", [3, 4]))
    kept = truncate_shard(shards / "train-000001.tar", keep=4)
    lost = {k for k, (shard, _) in where.items() if shard == 1} - set(kept)
    steps, q = 12, G // L
    clean = global_steps(shards_80, StepLayout(G, L, 1, G), 0, 0, steps + 6)

    expected_keys = [[""] * G for _ in range(steps)]
    expected_images = [torch.empty_like(step.images) for step in clean[:steps]]
    for stream in range(L):
        sequence = [(s, stream * q + i) for s in range(steps + 6) for i in range(q)]   # (step, slot) in order
        for n, (step, slot) in enumerate(sequence[:steps * q]):
            s2, slot2 = next((s2, slot2) for s2, slot2 in sequence[n:] if clean[s2].keys[slot2] not in corrupt | lost)
            expected_keys[step][slot] = clean[s2].keys[slot2]
            expected_images[step][slot] = clean[s2].images[slot2]
    bad_slots = [k for step in clean[:steps] for k in step.keys if k in corrupt | lost]
    assert len(bad_slots) >= len(corrupt | lost) == 8   # all of them fall in the first epoch

    for world, workers, micro, cache_mb in [(1, 0, 8, 0), (3, 2, 2, 0), (1, 0, 8, 64), (3, 2, 2, 64)]:
        counters = ReadCounters()
        got = global_steps(shards, StepLayout(G, L, world, micro), workers, 0, steps, counters,
                           decoded_cache_mb=cache_mb)
        assert [s.keys for s in got] == expected_keys, world
        assert all(torch.equal(s.images, e) for s, e in zip(got, expected_images))
        assert counters.corrupt_samples == sum(k in corrupt for k in bad_slots)
        assert counters.missing_samples == sum(k in lost for k in bad_slots)
        assert counters.truncated_shards >= 1 and counters.unreadable_shards == 0


def test_a_stream_without_any_decodable_image_is_an_error(shards_48, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shards_48, shards)
    for path in sorted(shards.glob("train-*.tar")):
        rewrite_with_garbage(path, list(range(24)))
    with pytest.raises(RuntimeError, match="no decodable image"):
        next(reader(shards, StepLayout(G, L, 1, G), 0, workers=0))
