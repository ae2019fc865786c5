"""Listing the three input forms, and the per-image decision (store as is, convert, reject)."""

from __future__ import annotations

import hashlib
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from data_prep import make_demo_data as demo
from cluster import storage
from data_prep.image_check import RejectedImage, jpeg_frame, prepare_image, resized_size
from data_prep.sources import InputError, ItemReader, Reason, SourceItem, list_split
from tests.data_prep.conftest import reference_shard_digest


# ----------------------------------------------------------------------------------------------
# prepare_image


def _image(w=80, h=60, seed=0) -> Image.Image:
    return demo.draw_image(0, np.random.default_rng(seed), w, h)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def test_rgb_and_grayscale_jpegs_are_stored_byte_for_byte():
    for image in (_image(), _image().convert("L")):
        data = _encode(image, "JPEG", quality=90)
        stored = prepare_image(data)
        assert stored.data is data and not stored.converted and (stored.width, stored.height) == (80, 60)
        assert prepare_image(data, full_decode=True).data is data


def test_cmyk_and_png_become_rgb_jpegs_of_the_same_picture():
    original = _image()
    for data, reference in ((_encode(original.convert("CMYK"), "JPEG", quality=95),
                             Image.open(io.BytesIO(_encode(original.convert("CMYK"), "JPEG", quality=95))).convert("RGB")),
                            (_encode(original, "PNG"), original)):
        stored = prepare_image(data, jpeg_quality=95)
        decoded = Image.open(io.BytesIO(stored.data))
        assert stored.converted and decoded.format == "JPEG" and decoded.mode == "RGB"
        error = np.abs(np.asarray(decoded, np.float32) - np.asarray(reference, np.float32)).mean()
        assert error < 4.0, error  # only JPEG re-encoding loss


def test_png_with_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    stored = prepare_image(_encode(rgba, "PNG"))
    assert np.asarray(Image.open(io.BytesIO(stored.data))).mean() > 245


@pytest.mark.parametrize("data, reason", [
    (b"", Reason.ZERO_BYTES),
    (b"this is not an image at all" * 10, Reason.NOT_AN_IMAGE),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, Reason.UNREADABLE),
])
def test_unusable_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(RejectedImage) as err:
        prepare_image(data)
    assert err.value.reason == reason


def test_truncated_jpeg_is_rejected_structurally_and_by_full_decode():
    data = _encode(_image(200, 150), "JPEG", quality=90)
    with pytest.raises(RejectedImage) as err:
        prepare_image(data[: len(data) * 2 // 3])
    assert err.value.reason == Reason.TRUNCATED
    png = _encode(_image(200, 150), "PNG")
    with pytest.raises(RejectedImage) as err:
        prepare_image(png[: len(png) // 2])
    assert err.value.reason in (Reason.TRUNCATED, Reason.UNREADABLE)


def _jpeg_variants() -> list[tuple[str, bytes]]:
    """JPEGs as cameras and encoders write them: modes, progressive, EXIF, ICC, subsampling, MPO."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(24):
        w, h = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        image = _image(max(w, 8), max(h, 8), seed=i).resize((w, h))
        mode = ("RGB", "L", "CMYK")[i % 3]
        kwargs = {"quality": int(rng.integers(30, 100)), "progressive": bool(i % 2), "optimize": bool(i % 4 == 1)}
        if i % 5 == 0:
            kwargs["exif"] = Image.Exif()
            kwargs["exif"][0x010F] = "camera" * 20
        if i % 7 == 0:
            kwargs["icc_profile"] = bytes(rng.integers(0, 256, 70_000, dtype=np.uint8))  # split over APP2 segments
        if mode == "RGB" and i % 3 == 0:
            kwargs["subsampling"] = 0
        out.append((f"{mode}-{i}", _encode(image.convert(mode), "JPEG", **kwargs)))
    out.append(("MPO", _encode(_image(), "MPO", save_all=True, append_images=[_image(seed=1)])))
    return out


def test_jpeg_fast_path_reads_the_frame_pil_reads_and_only_accepts_what_pil_accepts():
    variants = _jpeg_variants()
    for name, data in variants:
        with Image.open(io.BytesIO(data)) as image:
            expected = (image.width, image.height, image.mode)
            # EXIF is parsed by PIL (and may fail there): such files go through PIL, like CMYK and MPO.
            plain = image.format == "JPEG" and image.mode in ("L", "RGB") and "exif" not in image.info
        assert jpeg_frame(data) == (expected if plain else None), name
    # Damaged headers: whenever the fast path still takes one, PIL opens it with the same frame.
    rng = np.random.default_rng(0)
    taken = 0
    for trial in range(3000):
        name, data = variants[trial % len(variants)]
        damaged = bytearray(data[:int(rng.integers(2, len(data)))] if trial % 3 == 0 else data)
        for _ in range(int(rng.integers(1, 4))):
            damaged[int(rng.integers(0, min(len(damaged), 700)))] = int(rng.integers(0, 256))
        frame = jpeg_frame(bytes(damaged))
        if frame is not None:
            taken += 1
            with Image.open(io.BytesIO(bytes(damaged))) as image:
                assert (image.format, image.width, image.height, image.mode) == ("JPEG", *frame), (name, trial)
    assert taken > 300  # most single-byte damage lands in data the header walk does not interpret
    # A frame over PIL's decompression-bomb limit is PIL's to refuse.
    data = _encode(_image(), "JPEG")
    sof = data.index(b"\xff\xc0")
    bomb = data[:sof + 5] + (60000).to_bytes(2, "big") * 2 + data[sof + 9:]
    assert jpeg_frame(data) == (80, 60, "RGB") and jpeg_frame(bomb) is None


def test_stored_bytes_are_the_same_on_the_fast_path_and_through_pil():
    for name, data in _jpeg_variants():
        if jpeg_frame(data) is None:
            continue
        fast, decoded = prepare_image(data), prepare_image(data, full_decode=True)
        assert fast == decoded and fast.data is data, name


def test_read_all_keeps_order_and_reports_unreadable_items_in_place(s3_bucket):
    blobs = {f"{s3_bucket}/img/{i:03d}.JPEG": bytes([i]) * (100 + i) for i in range(40)}
    for url, data in blobs.items():
        storage.write_bytes(url, data)
    items = [SourceItem(url.rsplit("/", 1)[-1], "n01440764", len(data), url) for url, data in blobs.items()]
    items.insert(17, SourceItem("gone.JPEG", "n01440764", 5, f"{s3_bucket}/img/gone.JPEG"))
    with ItemReader() as reader:
        results = list(reader.read_all(items))
    assert [item for item, _ in results] == items
    for item, data in results:
        if item.name == "gone.JPEG":
            assert isinstance(data, storage.StorageError)
        else:
            assert data == blobs[item.url]


def test_resize_keeps_aspect_with_torchvision_rounding():
    import torchvision.transforms.functional as TF

    image = _image(300, 170)
    stored = prepare_image(_encode(image, "JPEG", quality=95), resize=64)
    assert stored.resized and not stored.converted
    expected_h, expected_w = TF._compute_resized_output_size((170, 300), [64])
    assert (stored.width, stored.height) == (expected_w, expected_h) == resized_size(300, 170, 64)
    small = _encode(_image(50, 40), "JPEG")
    assert prepare_image(small, resize=64).data is small  # never upscaled


# ----------------------------------------------------------------------------------------------
# Listing


def test_folders_listing_rejects_empty_files_and_unknown_classes(demo_copy):
    root = demo_copy.root
    (root / "train" / "n99999999").mkdir()
    shutil.copy(next((root / "train").rglob("*.JPEG")), root / "train" / "n99999999" / "x_1.JPEG")
    (root / "train" / "not_a_class").mkdir()
    (root / "train" / "not_a_class" / "y_1.JPEG").write_bytes(b"abc")
    (root / "train" / "n07747607" / ".DS_Store").write_bytes(b"finder")
    listing = list_split(str(root), "train")
    assert listing.form == "folders"
    expected = sorted(f.path for f in demo_copy.of_split("train") if f.kind != "empty")
    assert [i.name for i in listing.items] == expected
    assert all(i.wnid == i.name.split("/")[1] for i in listing.items)
    reasons = {r.source: r.reason for r in listing.rejected}
    empty = next(f.path for f in demo_copy.files if f.kind == "empty")
    assert reasons == {empty: Reason.ZERO_BYTES, "train/n99999999/x_1.JPEG": Reason.UNKNOWN_CLASS,
                       "train/not_a_class/y_1.JPEG": Reason.UNKNOWN_CLASS}


@pytest.mark.parametrize("labels", ["kaggle", "devkit", "devkit_tarball"])
def test_flat_val_listing_uses_the_labels_file(demo_tree, tmp_path, labels):
    pairs = demo.to_flat_val(demo_tree, tmp_path, labels="kaggle" if labels == "kaggle" else "devkit")
    if labels == "devkit_tarball":  # the devkit as downloaded, found beside the images
        import tarfile

        truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
        with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            tar.add(truth, arcname="ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
        truth.unlink()
    (tmp_path / "val" / "ILSVRC2012_val_00009999.JPEG").write_bytes(b"\xff\xd8 unlabelled")
    listing = list_split(str(tmp_path), "val")
    assert listing.form == "flat"
    assert {i.name: i.wnid for i in listing.items} == {f"val/{name}": f.wnid for name, f in pairs}
    assert [(r.source, r.reason) for r in listing.rejected] == [("val/ILSVRC2012_val_00009999.JPEG", Reason.UNKNOWN_CLASS)]


def test_flat_val_without_labels_and_missing_input_are_input_errors(demo_tree, tmp_path):
    demo.to_flat_val(demo_tree, tmp_path, labels="kaggle")
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(InputError, match="labels"):
        list_split(str(tmp_path), "val")
    with pytest.raises(InputError, match="no images"):
        list_split(str(tmp_path / "nowhere"), "train")


def test_archives_are_indexed_in_place_and_read_back_exactly(demo_tree, tmp_path):
    paths = demo.to_archives(demo_tree, tmp_path)
    expected = {f"{f.wnid}_{f.path.rsplit('_', 1)[1]}": f for f in demo_tree.of_split("train")}
    listing = list_split(str(tmp_path), "train")
    assert listing.form == "train_archive"
    usable = {k: f for k, f in expected.items() if f.kind != "empty"}
    assert sorted(i.name.rsplit("/", 1)[1] for i in listing.items) == sorted(usable)
    with ItemReader() as reader:
        for item in listing.items:
            source = usable[item.name.rsplit("/", 1)[1]]
            assert item.wnid == source.wnid
            assert reader.read(item) == (demo_tree.root / source.path).read_bytes()
    val = list_split(str(paths["val"]), "val")  # the tar itself; ground truth found beside it
    assert val.form == "val_archive"
    assert sorted(i.wnid for i in val.items) == sorted(f.wnid for f in demo_tree.of_split("val"))


def test_a_truncated_archive_becomes_rejections_not_a_crash(demo_tree, tmp_path):
    paths = demo.to_archives(demo_tree, tmp_path)
    data = paths["train"].read_bytes()
    paths["train"].write_bytes(data[: int(len(data) * 0.6)])
    listing = list_split(str(tmp_path), "train")
    assert 0 < len(listing.items) < len(demo_tree.of_split("train"))
    assert any(r.reason == Reason.TRUNCATED for r in listing.rejected)
    with ItemReader() as reader:  # everything listed is readable in full
        for item in listing.items:
            assert len(reader.read(item)) == item.size


def test_sha_of_listed_bytes_matches_sources(demo_tree):
    listing = list_split(str(demo_tree.root), "val")
    with ItemReader() as reader:
        for item in listing.items:
            assert hashlib.sha256(reader.read(item)).digest() == hashlib.sha256(
                (demo_tree.root / item.name).read_bytes()).digest()


def test_shard_tar_bytes_are_what_tarfile_writes(tmp_path):
    """The shard writer fills its headers in itself and skips tarfile's buffering layer; its bytes must
    equal tarfile's own output, for names and sizes around every field limit."""
    import tarfile

    from data_prep.shard_writer import _DigestWriter, _member, _TarWriter, member_header, scan_shard, verify_shard

    rng = np.random.default_rng(0)
    members = [("a_1.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("a_1.cls", b"17"), ("a_1.json", b"{}"),
               ("empty.cls", b""), ("b" * 120 + ".jpg", b"x" * 512),  # longer than a ustar name field
               ("c" * 95 + ".jpg", b"y" * 511), ("d" * 96 + ".jpg", b"z" * 513), ("e" * 100, b"1"),
               ("val/ünï.jpg", b"u" * 3)]  # non-ASCII: tarfile's encoding
    members += [(f"train-{i:06d}-{int(rng.integers(1e9)):09d}.jpg", rng.bytes(int(rng.integers(0, 3000))))
                for i in range(40)]
    with open(tmp_path / "ours.tar", "wb") as f:
        out = _DigestWriter(f)
        writer = _TarWriter(out)
        offsets = [writer.add(name, data) for name, data in members]
        writer.close()
    with tarfile.open(tmp_path / "reference.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_member(name, len(data)), io.BytesIO(data))
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == (tmp_path / "reference.tar").read_bytes()
    scan = scan_shard(str(tmp_path / "ours.tar"), keep_members=True)
    assert out.size == scan.size == len(ours)
    assert out.digest.hexdigest() == scan.digest == reference_shard_digest(ours)
    assert scan.members == {name.partition(".")[0]: {name.partition(".")[2]: data} for name, data in members
                            if name.partition(".")[0] != "a_1"} | {"a_1": {"jpg": members[0][1], "cls": b"17",
                                                                           "json": b"{}"}}
    for (name, data), offset in zip(members, offsets):
        assert ours[offset:offset + len(data)] == data
    truncated, damaged = tmp_path / "truncated.tar", tmp_path / "damaged.tar"
    truncated.write_bytes(ours[:offsets[0] + 10])
    damaged.write_bytes(ours[:100] + bytes([ours[100] ^ 0x7]) + ours[101:])  # a header byte: its checksum fails
    with pytest.raises(EOFError):
        scan_shard(str(truncated))
    with pytest.raises(tarfile.TarError):
        scan_shard(str(damaged))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    digest = out.digest.hexdigest()
    assert verify_shard(str(empty), len(ours), digest, []) == [
        f"empty.tar: 0 bytes, manifest says {len(ours)}", "empty.tar: digest differs from the manifest"]
    assert [p.split(" (")[0] for p in verify_shard(str(truncated), len(ours), digest, [])] == ["truncated.tar: unreadable tar"]
    for size in (0, 1, 8 ** 11 - 1, 8 ** 11, 10 ** 12):  # 8**11 bytes and up need tarfile's base-256 field
        assert member_header("k.jpg", size) == _member("k.jpg", size).tobuf(tarfile.GNU_FORMAT, "utf-8",
                                                                              "surrogateescape")
