"""Image inputs: folders, .npz (ranged reads, local and S3) and shards split into slices."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster import storage
from evals import npz
from evals.reference import cache_url
from evals.sources import BadInputError, FolderSlice, SliceReport, resolve_input
from tests.evals.conftest import write_images, write_shard


def _npz_bytes(compressed: bool, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_rows_by_range(store_root: str, compressed: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, (37, 6, 5, 3), dtype=np.uint8)
    url = storage.join(store_root, "samples.npz")
    storage.write_bytes(url, _npz_bytes(compressed, arr_0=images, arr_1=np.arange(37)))
    info = npz.array_info(url, "arr_0")
    assert info.shape == images.shape and (info.data_offset is None) == compressed
    np.testing.assert_array_equal(npz.read_rows(url, "arr_0", 9, 30, info), images[9:30])
    np.testing.assert_array_equal(npz.read_member(url, "arr_1"), np.arange(37))
    with pytest.raises(IndexError):
        npz.read_rows(url, "arr_0", 30, 38, info)
    # As an input: slices cover every row once, in order, as uint8 NCHW.
    image_set = resolve_input(url, chunk_size=10, image_size=256)
    assert image_set.kind == "npz_images" and [s.size for s in image_set.slices] == [10, 10, 10, 7]
    got = torch.cat([b.images for s in image_set.slices for b in s.batches(4, SliceReport())])
    assert torch.equal(got, torch.from_numpy(images).permute(0, 3, 1, 2))


def test_truncated_npz_is_a_clear_error(tmp_path: Path) -> None:
    data = _npz_bytes(False, arr_0=np.zeros((20, 8, 8, 3), np.uint8))
    path = tmp_path / "cut.npz"
    # Keep the zip directory readable but drop rows: rewrite the member's bytes shorter is not a valid
    # zip, so instead read rows past a shortened copy of the data region.
    path.write_bytes(data)
    info = npz.array_info(str(path), "arr_0")
    path.write_bytes(data[: info.data_offset + 5 * 8 * 8 * 3])  # type: ignore[operator]
    with pytest.raises(ValueError, match="truncated"):
        npz.read_rows(str(path), "arr_0", 0, 20, info)


def test_folder_input_matches_torch_fidelity_listing(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    images = write_images(folder, 5, seed=0, shift=0)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    write_images(folder / "sub", 2, seed=1, shift=0)  # torch-fidelity does not recurse
    Image.fromarray(images[0]).save(folder / "00099.JPG", quality=95)
    image_set = resolve_input(str(folder), chunk_size=4, image_size=256)
    files = [f for s in image_set.slices for f in s.files]
    assert [Path(f).name for f in files] == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png", "00099.JPG"]
    got = next(image_set.slices[0].batches(8, SliceReport())).images
    assert torch.equal(got, torch.from_numpy(np.stack(images[:4])).permute(0, 3, 1, 2))


def test_folder_batches_split_where_the_size_changes(tmp_path: Path) -> None:
    write_images(tmp_path / "a", 3, seed=0, shift=0, size=16)
    for i, size in enumerate((16, 20, 20)):
        Image.new("RGB", (size, size), (i, 0, 0)).save(tmp_path / "a" / f"1{i}.png")
    batches = list(FolderSlice(tuple(sorted(str(p) for p in (tmp_path / "a").iterdir()))).batches(8, SliceReport()))
    assert [tuple(b.images.shape) for b in batches] == [(4, 3, 16, 16), (2, 3, 20, 20)]


def test_bad_inputs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such folder"):
        resolve_input(str(tmp_path / "missing"), chunk_size=4, image_size=256)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images"):
        resolve_input(str(tmp_path / "empty"), chunk_size=4, image_size=256)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    image_set = resolve_input(str(tmp_path / "bad"), chunk_size=4, image_size=256)
    with pytest.raises(BadInputError, match="broken.png: cannot decode"):
        list(image_set.slices[0].batches(4, SliceReport()))
    other = tmp_path / "other.npz"
    other.write_bytes(_npz_bytes(False, features=np.zeros(3)))
    with pytest.raises(BadInputError, match="expected 'arr_0'"):
        resolve_input(str(other), chunk_size=4, image_size=256)


def test_shard_slices_cover_every_sample_once(store_root: str) -> None:
    rng = np.random.default_rng(5)
    folder = storage.join(store_root, "val")
    for shard, count in enumerate((7, 3, 12)):
        write_shard(storage.join(folder, f"val-{shard:06d}.tar"), shard * 100, count, rng)
    image_set = resolve_input(folder, chunk_size=5, image_size=32)
    assert image_set.kind == "shards" and image_set.expected == 22
    # Shards larger than a chunk are read as several streams; small ones are grouped.
    assert [(len(s.urls), s.stream, s.num_streams) for s in image_set.slices] == [
        (1, 0, 2), (1, 1, 2), (1, 0, 1), (1, 0, 3), (1, 1, 3), (1, 2, 3)]
    labels = []
    for part in image_set.slices:
        batches = list(part.batches(4, SliceReport()))
        assert sum(len(b.images) for b in batches) == part.size
        assert all(b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, 32, 32) for b in batches)
        labels += [int(x) for b in batches for x in b.labels]
    assert len(labels) == 22 and sorted(labels) == sorted([i % 5 for s, c in enumerate((7, 3, 12))
                                                             for i in range(s * 100, s * 100 + c)])
    # Their reference statistics are cached next to them by default, under a content key.
    url = cache_url(image_set, "f" * 64, None)
    assert url.startswith(storage.join(folder, "fid_stats") + "/") and url != cache_url(image_set, "e" * 64, None)
