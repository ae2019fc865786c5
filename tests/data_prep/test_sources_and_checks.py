"""Listing the three input forms, and the per-image decision (store as is, convert, reject)."""

from __future__ import annotations

import hashlib
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from data_prep import make_demo_data as demo
from data_prep.image_check import RejectedImage, prepare_image, resized_size
from data_prep.sources import InputError, ItemReader, Reason, list_split


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
    """The shard writer skips tarfile's buffering layer; its bytes must equal tarfile's own output."""
    import tarfile

    from data_prep.shard_writer import _HashingWriter, _member, _TarWriter

    members = [("a_1.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("a_1.cls", b"17"), ("a_1.json", b"{}"),
               ("b" * 120 + ".jpg", b"x" * 512)]  # a name longer than a ustar header holds
    with open(tmp_path / "ours.tar", "wb") as f:
        out = _HashingWriter(f)
        writer = _TarWriter(out)
        offsets = [writer.add(name, data) for name, data in members]
        writer.close()
    with tarfile.open(tmp_path / "reference.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_member(name, len(data)), io.BytesIO(data))
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == (tmp_path / "reference.tar").read_bytes()
    assert out.size == len(ours) and out.sha256.hexdigest() == hashlib.sha256(ours).hexdigest()
    for (name, data), offset in zip(members, offsets):
        assert ours[offset:offset + len(data)] == data
