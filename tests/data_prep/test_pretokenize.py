"""data_prep/pretokenize.py on a real local Ray: token shards equal encoding each image alone, as the
evaluation reader sees it; flip and ten-crop views; the generator's reader; resume; errors; verify.

The inputs are made by the code users run: demo images sharded with data_prep's shard functions, and a
tiny random tokenizer exported as the trainer exports one."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cluster import storage
from data_prep import manifest
from data_prep.make_demo_data import make_demo_tree
from data_prep.pretokenize import main, verify, write
from data_prep.schema import PretokenizeConfig
from data_prep.shard_plan import fingerprint, plan_shards
from data_prep.shard_writer import ShardOptions, ensure_shard
from data_prep.sources import list_split
from trainer.config import build_config
from trainer.data import eval_batches, expand_shard_urls
from trainer.token_data import load_token_dataset

IMAGE_SIZE = 32
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def tokenizer_export(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random TiTok exported like the trainer does (weights, config.json, meta.json, marker)."""
    from trainer.checkpoint import write_export
    from trainer.models import PixelDecoderConfig, TiTokConfig, build_tokenizer, tokenizer_config_to_json

    torch.manual_seed(0)
    cfg = TiTokConfig(image_size=IMAGE_SIZE, patch_size=8, num_latent_tokens=NUM_TOKENS, codebook_size=64, token_size=4,
                      vit_enc_model_size=None, vit_dec_model_size=None, vit_enc_width=32, vit_enc_num_layers=2,
                      vit_enc_num_heads=2, vit_dec_width=32, vit_dec_num_layers=1, vit_dec_num_heads=2,
                      pixel_decoder=PixelDecoderConfig(hidden_channels=32, channel_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                       z_channels=8, codebook_size=32))
    model = build_tokenizer(cfg)
    return write_export(str(tmp_path_factory.mktemp("tokenizer")), 5, model.state_dict(), tokenizer_config_to_json(cfg),
                        {"stage": "tokenizer"})


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards x 6 demo images (3 classes), with shard.py's manifests."""
    root = tmp_path_factory.mktemp("pretokenize-data")
    tree = make_demo_tree(root / "tree", classes=3, train_per_class=6, val_per_class=0, min_size=40, max_size=90,
                          quirks=False, seed=4)
    listing = list_split(str(tree.root), "train")
    specs = plan_shards(listing.items, "train", 0, 6)
    options = ShardOptions(output=str(root / "shards"), split="train", fingerprint=fingerprint(listing.items, {"t": 1}))
    for spec in specs:
        ensure_shard(spec, options)
    manifest.write_manifests(str(root / "shards"), "train", len(specs), [])
    return root / "shards"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_export: str):
    from trainer.models import load_tokenizer

    return load_tokenizer(tokenizer_export)


def config(**values) -> PretokenizeConfig:
    overrides = {"progress": False, **values}
    return build_config("pretokenize", PretokenizeConfig, [f"{k}={v}" for k, v in overrides.items()])


def eval_images(shards: str, side: int) -> list[tuple[str, int, torch.Tensor]]:
    """(key, label, [3, side, side] image) of every sample, in shard order, as evaluation reads them."""
    out = []
    for url in expand_shard_urls(shards):
        for batch in eval_batches(url, batch_size=4, image_size=side, draft=False):
            out.extend(zip(batch.keys, batch.labels.tolist(), batch.images))
    return out


def encode_alone(model, images: list[torch.Tensor], batch_size: int = 1) -> list[list[int]]:
    """Each image encoded by itself (or consecutive groups of ``batch_size``) on one thread, as the actors
    do: the reference the token shards must equal bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [row for i in range(0, len(images), batch_size)
                for row in model.encode(torch.stack(images[i:i + batch_size])).tolist()]
    finally:
        torch.set_num_threads(threads)


def files_of(root: str) -> dict[str, bytes]:
    prefix = root.rstrip("/") + "/"
    return {f.url[len(prefix):]: storage.read_bytes(f.url) for f in storage.list_files(root)
            if not f.url.endswith(".json")}


# ----------------------------------------------------------------------------------------------


def test_flip_tokens_resume_and_redo(store_root: str, ray_local, tokenizer_export: str, image_shards: Path,
                                     tokenizer) -> None:
    """2 actors; every row equals encoding its image (or its mirror) alone; the generator's reader takes the
    output; a re-run keeps everything; a damaged and a missing token shard are redone to the same bytes."""
    source, export = str(image_shards), tokenizer_export
    if storage.is_remote(store_root):  # everything on S3: tokenizer, image shards, token shards
        storage.upload_dir(image_shards, source := f"{store_root}/images")
        storage.upload_dir(tokenizer_export, export := f"{store_root}/tokenizer")
    output = f"{store_root}/tokens"
    cfg = config(tokenizer=export, shards=source, output=output, augment="flip", workers=2)
    report = write(cfg)
    assert (report.shards, report.shards_written, report.shards_skipped, report.failed) == (3, 3, 0, [])
    assert (report.images, report.rows, report.workers) == (18, 36, 2) and report.tokens_per_s > 0
    assert "18 images -> 36 rows of 8 tokens in 3 token shards (3 written, 0 already complete)" in report.line()

    data = load_token_dataset(output)
    images = eval_images(source, IMAGE_SIZE)
    assert data.keys == [key for key, _, _ in images for _ in range(2)]
    assert data.labels.tolist() == [label for _, label, _ in images for _ in range(2)]
    assert data.flips.tolist() == [False, True] * len(images)
    assert data.crops.tolist() == [0] * 36
    views = [view for _, _, image in images for view in (image, image.flip(-1))]
    assert data.tokens.tolist() == encode_alone(tokenizer, views)
    meta = data.metadata
    assert (meta["num_tokens"], meta["codebook_size"], meta["image_size"]) == (NUM_TOKENS, 64, IMAGE_SIZE)
    assert (meta["images"], meta["rows"], meta["rows_per_image"], meta["crops"]) == (18, 36, 2, ["center"])
    assert meta["augment"] == "flip" and meta["crop"] == "shorter side to 32 (bicubic, antialias), center crop 32"
    assert meta["tokenizer"] == export.rstrip("/") and meta["encoding"] == "per-sample"
    assert [u.rsplit("/", 1)[1] for u in meta["source_shards"]] == [f"train-00000{i}.tar" for i in range(3)]
    listed = pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/manifest.parquet"))).to_pylist()
    before = files_of(output)
    for row in listed:
        assert hashlib.sha256(before[row["shard"]]).hexdigest() == row["sha256"] and row["rows"] == 12

    # A re-run finds every shard complete: no actor starts, nothing is rewritten.
    mtimes = {n: Path(output, n).stat().st_mtime_ns for n in before} if not storage.is_remote(output) else {}
    again = write(cfg)
    assert (again.shards_written, again.shards_skipped, again.workers, again.rows) == (0, 3, 0, 36)
    assert files_of(output) == before
    assert all(Path(output, n).stat().st_mtime_ns == t for n, t in mtimes.items())

    # Damaged and missing token shards are redone; the result is the uninterrupted run's, byte for byte.
    storage.write_bytes(f"{output}/tokens-000001.parquet", before["tokens-000001.parquet"][:-40])
    storage.delete(f"{output}/tokens-000002.parquet")
    redo = write(cfg)
    assert (redo.shards_written, redo.shards_skipped, redo.failed) == (2, 1, [])
    assert files_of(output) == before
    assert verify(config(output=output, mode="verify")).problems == []


def test_ten_crop_batched(tmp_path: Path, ray_local, tokenizer_export: str, image_shards: Path, tokenizer) -> None:
    """ten_crop: 10 rows per image, torchvision's five crops of the 1.1x center square and their mirrors;
    batch_size=4 encodes fixed groups of 4 rows counted from the start of the shard."""
    from torchvision.transforms.functional import five_crop

    shard = f"{image_shards}/train-{{000000..000000}}.tar"
    report = write(config(tokenizer=tokenizer_export, shards=shard, output=tmp_path, augment="ten_crop", workers=1,
                          batch_size=4))
    assert (report.shards, report.images, report.rows) == (1, 6, 60)
    data = load_token_dataset(str(tmp_path))
    assert data.metadata["crops"] == ["center", "top_left", "top_right", "bottom_left", "bottom_right"]
    assert data.metadata["encoding"] == "batches of 4" and data.metadata["rows_per_image"] == 10
    assert data.crops.tolist()[:10] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and data.flips.tolist()[:4] == [False, True] * 2
    views = []
    for _, _, square in eval_images(shard, int(IMAGE_SIZE * 1.1)):
        top_left, top_right, bottom_left, bottom_right, center = five_crop(square, [IMAGE_SIZE, IMAGE_SIZE])
        for crop in (center, top_left, top_right, bottom_left, bottom_right):
            views += [crop, crop.flip(-1)]
    assert data.tokens.tolist() == encode_alone(tokenizer, views, batch_size=4)


def _with_undecodable_sample(good: Path, out: Path) -> None:
    """A copy of shard ``good`` with a sample whose image is not an image, in the middle."""
    with tarfile.open(good) as src, tarfile.open(out, "w") as dst:
        members = src.getmembers()
        for n, info in enumerate(members):
            if n == 6:
                for name, data in (("broken.jpg", b"not a jpeg at all"), ("broken.cls", b"1")):
                    item = tarfile.TarInfo(name)
                    item.size = len(data)
                    dst.addfile(item, io.BytesIO(data))
            dst.addfile(info, src.extractfile(info))


def test_damaged_input_and_clear_errors(tmp_path: Path, ray_local, tokenizer_export: str, image_shards: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """A truncated image shard fails its token shard with a message naming it (no manifest, exit 1); an
    undecodable image is skipped and counted; unusable settings stop before any work (exit 2)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(image_shards / "train-000000.tar", shards / "train-000000.tar")
    data = (image_shards / "train-000001.tar").read_bytes()
    (shards / "train-000001.tar").write_bytes(data[: len(data) // 2 + 100])
    _with_undecodable_sample(image_shards / "train-000002.tar", shards / "train-000002.tar")
    output = tmp_path / "tokens"
    args = [f"tokenizer={tokenizer_export}", f"shards={shards}", f"output={output}", "workers=2", "progress=false"]
    assert main(args) == 1
    out = capsys.readouterr()
    assert "tokens-000001.parquet" in out.err and f"image shard {shards}/train-000001.tar is unreadable" in out.err
    assert "12 images -> 12 rows of 8 tokens in 3 token shards (2 written, 0 already complete), 1 undecodable" in out.out
    assert "FAILED shards: tokens-000001.parquet" in out.out and not (output / "manifest.parquet").exists()

    (shards / "train-000001.tar").write_bytes(data)  # repaired: the re-run does only that shard
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "18 images -> 18 rows" in out and "(1 written, 2 already complete), 1 undecodable images skipped" in out
    dataset = load_token_dataset(str(output))
    assert "broken" not in dataset.keys and dataset.metadata["undecodable"] == 1

    assert main([f"output={output}", "mode=verify"]) == 0
    storage.write_bytes(str(output / "tokens-000000.parquet"), b"garbage")
    assert main([f"output={output}", "mode=verify"]) == 1
    assert "tokens-000000.parquet: sha256 differs from the manifest" in capsys.readouterr().out

    def error(*overrides: str) -> str:
        assert main([*args, *overrides]) == 2
        return capsys.readouterr().err

    assert "no such directory" in error(f"tokenizer={tmp_path}/missing", f"output={tmp_path}/o1")
    assert "no shards match" in error(f"shards={tmp_path}/empty-*.tar", f"output={tmp_path}/o2")
    assert "takes 32x32 images" in error("image_size=64", f"output={tmp_path}/o3")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "augment=mirror"])
    assert exit_info.value.code == 2 and "augment" in capsys.readouterr().err
    assert "settings augment: 'none' -> 'flip' changed" in error("augment=flip")
    resized = tmp_path / "resized"
    shutil.copytree(image_shards, resized)
    plan = manifest.read_plan(str(resized), "train") or {}
    manifest.write_plan(str(resized), "train", {**plan, "settings": {**plan.get("settings", {}), "resize": 24}})
    assert "pre-resized to a shorter side of 24 px" in error(f"shards={resized}", f"output={tmp_path}/o4")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "cpus_per_worker" in capsys.readouterr().out
    assert not any(Path(tmp_path, f"o{i}").exists() for i in range(1, 5))
    assert np.all(dataset.tokens.numpy() < 64)
