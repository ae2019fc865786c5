"""trainer/data.py: the streaming shard reader (real shards, real DataLoader workers, local and S3)."""

from __future__ import annotations

import io
import itertools
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from cluster import storage
from tests.reader.conftest import manifest_labels
from trainer import data
from trainer.data import ImageShardStream, _StreamPlan, expand_shard_urls


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def shard_files(shards: Path, split: str = "train") -> dict[str, bytes]:
    """key -> stored image bytes."""
    out = {}
    for path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    out[member.name[:-4]] = tar.extractfile(member).read()
    return out


def resize_reference(image_bytes: bytes, size: int) -> Image.Image:
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    return T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(image)


def test_batches_follow_the_contract(shards_80):
    stream = ImageShardStream(f"{shards_80}/train-*.tar", image_size=32, batch_size=8, num_workers=2, seed=0)
    labels = manifest_labels(shards_80)
    for batch in take(stream.iter_batches(), 6):
        assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.float32
        assert batch.images.is_contiguous() and 0.0 <= batch.images.min() and batch.images.max() <= 1.0
        assert batch.labels.dtype == torch.int64
        assert batch.labels.tolist() == [labels[k] for k in batch.keys]
    assert not stream.counters.any()


def test_eval_images_equal_torchvision_resize_and_center_crop(shards_80):
    reference = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(36),
                           T.ToTensor()])
    files = shard_files(shards_80, "val")
    stream = ImageShardStream(f"{shards_80}/val-*.tar", image_size=36, batch_size=5, train=False, draft=False)
    seen = 0
    for batch in stream:
        for key, image in zip(batch.keys, batch.images):
            expected = reference(Image.open(io.BytesIO(files[key])).convert("RGB"))
            assert torch.equal(image, expected), key
            seen += 1
    assert seen == len(files) == 16
    # The draft() fast path decodes big JPEGs at a reduced DCT scale first: close, not identical.
    drafted = ImageShardStream(f"{shards_80}/val-*.tar", image_size=36, batch_size=16, train=False, draft=True)
    batch = next(iter(drafted))
    expected = torch.stack([reference(Image.open(io.BytesIO(files[k])).convert("RGB")) for k in batch.keys])
    assert (batch.images - expected).abs().mean() < 0.03


def test_train_images_are_random_crops_and_flips_of_the_resized_image(shards_80):
    files = shard_files(shards_80)
    stream = ImageShardStream(f"{shards_80}/train-*.tar", image_size=32, batch_size=8, seed=4, draft=False)
    flips, offsets = [], set()
    for batch in take(stream.iter_batches(), 3):
        for key, image in zip(batch.keys, batch.images):
            pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            resized = np.asarray(resize_reference(files[key], 32))
            h, w = resized.shape[:2]
            matches = [(top, left, flip) for top in range(h - 31) for left in range(w - 31) for flip in (False, True)
                       if np.array_equal((resized[top:top + 32, left:left + 32])[:, ::-1] if flip
                                         else resized[top:top + 32, left:left + 32], pixels)]
            assert matches, f"{key} is not a 32x32 crop of its resized image"
            flips.append(matches[0][2])
            offsets.add(matches[0][:2])
    assert 0 < sum(flips) < len(flips) and len(offsets) > 3


@pytest.mark.parametrize("fixture", ["shards_80", "shards_48"])
def test_eval_reads_every_sample_exactly_once_across_2_ranks_x_2_workers(fixture, request):
    shards = request.getfixturevalue(fixture)
    labels = manifest_labels(shards)
    keys = []
    for rank in range(2):
        stream = ImageShardStream(f"{shards}/train-*.tar", image_size=16, batch_size=7, rank=rank, world_size=2,
                                  num_workers=2, train=False)
        for batch in stream:
            assert batch.labels.tolist() == [labels[k] for k in batch.keys]
            keys.extend(batch.keys)
    assert sorted(keys) == sorted(labels)


@pytest.mark.parametrize("fixture, per_stream", [("shards_80", 20), ("shards_48", 12)])
def test_train_epochs_are_disjoint_and_complete_across_2_ranks_x_2_workers(fixture, per_stream, request):
    """80 samples in 8 shards: 2 shards per stream; 48 in 2 shards (fewer than 4 streams): every 4th sample."""
    shards = request.getfixturevalue(fixture)
    batch_size, workers = 4, 2
    per_rank_epoch = workers * per_stream // batch_size
    epochs: list[list[str]] = [[], []]
    for rank in range(2):
        stream = ImageShardStream(f"{shards}/train-*.tar", image_size=16, batch_size=batch_size, rank=rank, world_size=2,
                                  num_workers=workers, seed=3, shuffle_buffer=8)
        batches = take(stream.iter_batches(), 2 * per_rank_epoch)
        for e in range(2):
            epochs[e].extend(k for b in batches[e * per_rank_epoch:(e + 1) * per_rank_epoch] for k in b.keys)
    everything = sorted(manifest_labels(shards))
    assert sorted(epochs[0]) == everything and sorted(epochs[1]) == everything
    assert epochs[0] != epochs[1]  # the second epoch is reshuffled


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_at_any_batch_reproduces_the_uninterrupted_batches(shards_80, workers):
    def stream():
        return ImageShardStream(f"{shards_80}/train-*.tar", image_size=24, batch_size=8, num_workers=workers, seed=9,
                                shuffle_buffer=15)

    full = take(stream().iter_batches(0), 13)  # crosses epoch boundaries (40 or 80 samples per stream)
    for start in (3, 10):
        resumed = take(stream().iter_batches(start), 13 - start)
        for a, b in zip(full[start:], resumed):
            assert a.keys == b.keys and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    other_seed = ImageShardStream(f"{shards_80}/train-*.tar", image_size=24, batch_size=8, seed=10, shuffle_buffer=15)
    assert take(other_seed.iter_batches(), 1)[0].keys != full[0].keys


def test_resume_decodes_only_the_images_it_yields(shards_80, monkeypatch):
    calls = []
    real = data.decode_resized
    monkeypatch.setattr(data, "decode_resized", lambda *a, **k: calls.append(1) or real(*a, **k))
    stream = ImageShardStream(f"{shards_80}/train-*.tar", image_size=24, batch_size=8, seed=9, shuffle_buffer=15)
    take(stream.iter_batches(25), 2)  # 25 batches = 200 samples in: two and a half epochs skipped
    assert len(calls) == 16


def _rewrite_with_garbage(path: Path, victim_index: int) -> str:
    """Replace one sample's image by bytes that look like a JPEG but do not decode."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    victim = jpgs[victim_index]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for member, payload in members:
            if member.name == victim:
                payload = b"\xff\xd8\xff\xe0garbage" + bytes(200) + b"\xff\xd9"
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return victim[:-4]


def test_corrupt_samples_and_truncated_shards_are_counted_and_skipped(shards_80, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shards_80, shards)
    bad_key = _rewrite_with_garbage(shards / "train-000000.tar", 3)
    truncated = shards / "train-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    stream = ImageShardStream(f"{shards}/train-*.tar", image_size=16, batch_size=8, seed=1, shuffle_buffer=10)
    batches = take(stream.iter_batches(), 10)  # one epoch: 80 sample slots
    assert all(b.images.shape[0] == 8 for b in batches)
    assert bad_key not in {k for b in batches for k in b.keys}
    counters = stream.counters
    assert counters.corrupt_samples == 1 and counters.truncated_shards == 1 and 0 < counters.missing_samples < 10

    evaluation = ImageShardStream(f"{shards}/train-*.tar", image_size=16, batch_size=8, train=False, num_workers=2)
    keys = [k for b in evaluation for k in b.keys]
    assert len(keys) == len(set(keys)) == 80 - 1 - counters.missing_samples and bad_key not in keys
    assert evaluation.counters.corrupt_samples == 1 and evaluation.counters.truncated_shards == 1


def test_reads_the_same_data_from_s3(shards_80, s3_bucket):
    remote = f"{s3_bucket}/imagenet"
    storage.upload_dir(shards_80, remote)
    local_eval = [b.keys for b in ImageShardStream(f"{shards_80}/val-*.tar", image_size=16, batch_size=4, train=False)]
    remote_eval = [b.keys for b in ImageShardStream(f"{remote}/val-{{000000..000001}}.tar", image_size=16,
                                                    batch_size=4, train=False, num_workers=2)]
    assert sorted(k for ks in remote_eval for k in ks) == sorted(k for ks in local_eval for k in ks)
    local = take(ImageShardStream(f"{shards_80}/train-*.tar", image_size=16, batch_size=8).iter_batches(4), 2)
    remote_train = ImageShardStream(f"{remote}/train-*.tar", image_size=16, batch_size=8)
    assert remote_train.counts == [10] * 8  # from the manifest on S3
    for a, b in zip(local, take(remote_train.iter_batches(4), 2)):
        assert a.keys == b.keys and torch.equal(a.images, b.images)


def test_shard_url_forms(shards_80):
    eight = [str(shards_80 / f"train-{i:06d}.tar") for i in range(8)]
    assert expand_shard_urls(f"{shards_80}/train-{{000000..000007}}.tar") == eight
    assert expand_shard_urls(f"{shards_80}/train-*.tar") == eight
    assert expand_shard_urls([eight[1], eight[0], eight[1]]) == eight[:2]
    with pytest.raises(ValueError, match="several splits"):
        expand_shard_urls(str(shards_80))
    with pytest.raises(FileNotFoundError):
        expand_shard_urls(f"{shards_80}/nothing-*.tar")


def test_batch_ring_worker_waits_until_the_main_process_took_the_slot():
    ring = data._BatchRing(workers=1, slots=2, batch_size=1, size=2)
    first, pixels = ring.acquire(0, 0)
    pixels[:] = 7
    ring.acquire(0, 1)
    third: list = []
    waiting = threading.Thread(target=lambda: third.append(ring.acquire(0, 2)))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive(), "slot 0 still holds batch 0: batch 2 must wait"
    taken = ring.take(first, lambda view: view.clone())
    waiting.join(5)
    assert not waiting.is_alive() and third[0][0].slot == 0
    assert torch.equal(taken, torch.full((1, 2, 2, 3), 7, dtype=torch.uint8))


def test_held_batches_stay_intact_while_workers_reuse_their_slots(shards_80):
    """Every batch is copied out of its ring slot: 30 batches kept (6 times the slots per worker) equal
    the same batches taken one at a time and dropped, in both output forms."""
    def batches(uint8: bool, keep: bool):
        stream = ImageShardStream(f"{shards_80}/train-*.tar", image_size=16, batch_size=4, num_workers=2, seed=2,
                                  shuffle_buffer=10, uint8=uint8)
        out = []
        for batch in take(stream.iter_batches(), 30):
            out.append(batch if keep else batch._replace(images=batch.images.clone()))
        return out

    for uint8 in (True, False):
        kept, cloned = batches(uint8, keep=True), batches(uint8, keep=False)
        assert all(torch.equal(a.images, b.images) and a.keys == b.keys for a, b in zip(kept, cloned))
        assert kept[0].images.dtype == (torch.uint8 if uint8 else torch.float32)


@pytest.mark.parametrize("streams", [3, 10])
def test_stream_plan_partitions_every_epoch(streams):
    counts = np.random.default_rng(streams).integers(0, 13, size=7).tolist()
    plan = _StreamPlan(counts, streams, seed=2, window=5)
    for epoch in range(3):
        taken = [(seg.shard, i) for j in range(streams) for w in plan.windows(epoch, j) for seg in w
                 for i in (seg.keep if seg.keep is not None else range(seg.count))]
        assert sorted(taken) == sorted((s, i) for s, c in enumerate(counts) for i in range(c))
    for j in range(streams):  # locate() agrees with walking the windows in order
        walked = [(e, w, p) for e, w, segs in itertools.islice(plan.window_sequence(j, 0, 0), 12)
                  for p in range(sum(s.count for s in segs))]
        for position in range(0, len(walked), 3):
            assert plan.locate(j, position) == walked[position]
