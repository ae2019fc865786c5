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
from tests.reader.conftest import manifest_labels, rewrite_with_garbage, take, truncate_shard
from trainer import data
from trainer.batch_layout import StepLayout
from trainer.data import ImageShardStream, expand_shard_urls, step_batches, to_float_images
from trainer.image_streams import StreamPlan


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


def train_reader(shards, layout=None, rank=0, **kwargs):
    """A training reader over ``shards``; by default one rank reading a step of 8 in 4 streams."""
    options = dict(image_size=16, num_workers=0, seed=0, shuffle_buffer=10) | kwargs
    return step_batches(f"{shards}/train-*.tar", layout or StepLayout(8, 4, 1, 8), rank, **options)


def test_batches_follow_the_contract(shards_80):
    labels = manifest_labels(shards_80)
    layout = StepLayout(global_batch=12, streams=4, world_size=2, micro_batch=4)  # 6 a rank: 3 + 3
    batches = take(train_reader(shards_80, layout, rank=1, image_size=32, num_workers=2), 6)
    assert [(b.step, b.micro, b.padding) for b in batches] == [(s, m, False) for s in range(3) for m in range(2)]
    for batch in batches:
        assert batch.images.shape == (3, 3, 32, 32) and batch.images.dtype == torch.float32
        assert batch.images.is_contiguous() and 0.0 <= batch.images.min() and batch.images.max() <= 1.0
        assert batch.labels.dtype == torch.int64
        assert batch.labels.tolist() == [labels[k] for k in batch.keys]


def test_eval_images_equal_torchvision_resize_and_center_crop(shards_80):
    reference = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(36),
                           T.ToTensor()])
    files = shard_files(shards_80, "val")
    stream = ImageShardStream(f"{shards_80}/val-*.tar", image_size=36, batch_size=5, draft=False)
    seen = 0
    for batch in stream:
        for key, image in zip(batch.keys, batch.images):
            expected = reference(Image.open(io.BytesIO(files[key])).convert("RGB"))
            assert torch.equal(image, expected), key
            seen += 1
    assert seen == len(files) == 16
    # The draft() fast path decodes big JPEGs at a reduced DCT scale first: close, not identical.
    drafted = ImageShardStream(f"{shards_80}/val-*.tar", image_size=36, batch_size=16, draft=True)
    batch = next(iter(drafted))
    expected = torch.stack([reference(Image.open(io.BytesIO(files[k])).convert("RGB")) for k in batch.keys])
    assert (batch.images - expected).abs().mean() < 0.03


def test_train_images_are_random_crops_and_flips_of_the_resized_image(shards_80):
    files = shard_files(shards_80)
    batches = take(train_reader(shards_80, image_size=32, seed=4, draft=False), 3)
    flips, offsets = [], set()
    for batch in batches:
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
                                  num_workers=2)
        for batch in stream:
            assert batch.labels.tolist() == [labels[k] for k in batch.keys]
            keys.extend(batch.keys)
    assert sorted(keys) == sorted(labels)


def test_eval_skips_and_counts_corrupt_samples_and_truncated_shards(shards_80, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shards_80, shards)
    bad_key = rewrite_with_garbage(shards / "train-000000.tar", [3])[0]
    readable = len(truncate_shard(shards / "train-000001.tar", keep=4))

    evaluation = ImageShardStream(f"{shards}/train-*.tar", image_size=16, batch_size=8, num_workers=2)
    keys = [k for b in evaluation for k in b.keys]
    assert len(keys) == len(set(keys)) == 80 - 1 - (10 - readable) and bad_key not in keys
    assert evaluation.counters.corrupt_samples == 1 and evaluation.counters.truncated_shards == 1


def test_reads_the_same_data_from_s3(shards_80, s3_bucket):
    remote = f"{s3_bucket}/imagenet"
    storage.upload_dir(shards_80, remote)
    local_eval = [b.keys for b in ImageShardStream(f"{shards_80}/val-*.tar", image_size=16, batch_size=4)]
    remote_eval = [b.keys for b in ImageShardStream(f"{remote}/val-{{000000..000001}}.tar", image_size=16,
                                                    batch_size=4, num_workers=2)]
    assert sorted(k for ks in remote_eval for k in ks) == sorted(k for ks in local_eval for k in ks)
    layout = StepLayout(8, 4, 2, 4)
    local = take(train_reader(shards_80, layout, rank=1, start_step=4), 2)
    remote_train = train_reader(remote, layout, rank=1, start_step=4)
    assert remote_train.counts == [10] * 8  # from the manifest on S3
    for a, b in zip(local, take(remote_train, 2)):
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
    """Every micro-batch is copied out of the ring: 45 kept (15 steps, 3 times the slots per worker)
    equal the same micro-batches taken one at a time and dropped, in both output forms. With 3
    micro-batches of a step of 8 over 4 streams, micro-batch 1 gathers chunks of both workers."""
    layout = StepLayout(8, 4, 1, 3)

    def batches(uint8: bool, keep: bool):
        out = []
        for batch in take(train_reader(shards_80, layout, num_workers=2, seed=2, uint8=uint8), 45):
            out.append(batch if keep else batch._replace(images=batch.images.clone()))
        return out

    kept = {}
    for uint8 in (True, False):
        kept[uint8], cloned = batches(uint8, keep=True), batches(uint8, keep=False)
        assert all(torch.equal(a.images, b.images) and a.keys == b.keys for a, b in zip(kept[uint8], cloned))
        assert kept[uint8][0].images.dtype == (torch.uint8 if uint8 else torch.float32)
    assert all(torch.equal(to_float_images(a.images), b.images) for a, b in zip(kept[True], kept[False]))


@pytest.mark.parametrize("streams", [3, 10])
def test_stream_plan_partitions_every_epoch(streams):
    counts = np.random.default_rng(streams).integers(0, 13, size=7).tolist()
    plan = StreamPlan(counts, streams, seed=2, window=5)
    for epoch in range(3):
        taken = [(seg.shard, i) for j in range(streams) for w in plan.windows(epoch, j) for seg in w
                 for i in (seg.keep if seg.keep is not None else range(seg.count))]
        assert sorted(taken) == sorted((s, i) for s, c in enumerate(counts) for i in range(c))
    for j in range(streams):  # locate() agrees with walking the windows in order
        walked = [(e, w, p) for e, w, segs in itertools.islice(plan.window_sequence(j, 0, 0), 12)
                  for p in range(sum(s.count for s in segs))]
        for position in range(0, len(walked), 3):
            assert plan.locate(j, position) == walked[position]
