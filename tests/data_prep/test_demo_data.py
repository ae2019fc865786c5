"""The shipped class lists and the demo data generator."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import make_demo_data as demo
from data_prep.image_check import has_end_marker
from data_prep.wnids import devkit_synsets, imagenet_wnids, is_wnid, wnid_to_label

REPO = Path(__file__).resolve().parents[2]


def test_wnid_lists_are_the_imagenet_1k_classes():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids) and all(is_wnid(w) for w in wnids)
    # Well-known anchors of the standard index: 0 tench, 999 toilet tissue.
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    devkit = devkit_synsets()
    assert len(devkit) == 1000 and set(devkit) == set(wnids) and list(devkit) != list(wnids)
    # Devkit ID 1 is kit fox; the first validation image (devkit ID 490) is a sea snake, label 65.
    assert devkit[0] == "n02119789"
    assert devkit[489] == "n01751748" and wnid_to_label()["n01751748"] == 65


def test_demo_classes_are_real_distinct_wnids():
    wnids = [c.wnid for c in demo.DEMO_CLASSES]
    assert len(set(wnids)) == len(wnids) == 8
    assert all(w in wnid_to_label() for w in wnids)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_tree_is_deterministic_and_has_the_quirks(tmp_path):
    kwargs = dict(classes=5, train_per_class=3, val_per_class=2, min_size=40, max_size=90)
    a = demo.make_demo_tree(tmp_path / "a", seed=1, **kwargs)
    demo.make_demo_tree(tmp_path / "b", seed=1, **kwargs)
    demo.make_demo_tree(tmp_path / "c", seed=2, **kwargs)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    assert _tree_bytes(tmp_path / "a") != _tree_bytes(tmp_path / "c")

    assert len(a.of_split("train")) == 5 * 3 + len(demo.QUIRK_KINDS) and len(a.of_split("val")) == 5 * 2
    by_kind = {f.kind: (tmp_path / "a" / f.path).read_bytes() for f in a.files if f.kind != "jpeg"}
    assert Image.open(io.BytesIO(by_kind["cmyk"])).mode == "CMYK"
    assert Image.open(io.BytesIO(by_kind["gray"])).mode == "L"
    assert Image.open(io.BytesIO(by_kind["png"])).format == "PNG"
    assert by_kind["truncated"][:2] == b"\xff\xd8" and not has_end_marker(by_kind["truncated"])
    assert by_kind["empty"] == b""
    sizes = {Image.open(tmp_path / "a" / f.path).size for f in a.files if f.kind == "jpeg"}
    assert len(sizes) > 10 and all(40 <= min(s) and max(s) <= 90 for s in sizes)
    assert all(f.path.endswith(".JPEG") for f in a.files)


def test_demo_classes_are_learnable_by_a_trivial_model(tmp_path):
    """Nearest class mean of 8x8 thumbnails separates the classes: a tiny model can learn them."""
    tree = demo.make_demo_tree(tmp_path, classes=8, train_per_class=12, val_per_class=6, quirks=False)

    def features(f):
        return np.asarray(Image.open(tree.root / f.path).convert("RGB").resize((8, 8)), np.float32).ravel() / 255

    wnids = [c.wnid for c in demo.DEMO_CLASSES]
    means = np.stack([np.mean([features(f) for f in tree.of_split("train") if f.wnid == w], axis=0) for w in wnids])
    val = tree.of_split("val")
    predicted = [wnids[int(np.argmin(((means - features(f)) ** 2).sum(1)))] for f in val]
    accuracy = np.mean([p == f.wnid for p, f in zip(predicted, val)])
    assert accuracy >= 0.9, accuracy


def test_flat_val_labels_and_archives_describe_the_same_images(tmp_path):
    tree = demo.make_demo_tree(tmp_path / "tree", classes=3, train_per_class=2, val_per_class=3, quirks=False)
    pairs = demo.to_flat_val(tree, tmp_path / "flat", labels="devkit")
    truth = (tmp_path / "flat" / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    devkit = devkit_synsets()
    for (name, source), class_id in zip(pairs, truth):
        assert devkit[int(class_id) - 1] == source.wnid
        assert (tmp_path / "flat" / "val" / name).read_bytes() == (tree.root / source.path).read_bytes()
    paths = demo.to_archives(tree, tmp_path / "tars")
    import tarfile

    with tarfile.open(paths["train"]) as outer:
        assert sorted(m.name for m in outer) == sorted(f"{c.wnid}.tar" for c in demo.DEMO_CLASSES[:3])


def test_cli_writes_each_layout_and_rejects_bad_keys(tmp_path):
    script = str(REPO / "data_prep" / "make_demo_data.py")
    for layout, expected in (("folders", "train/n07747607"), ("flat_val", "LOC_val_solution.csv"),
                             ("archives", "ILSVRC2012_img_train.tar")):
        out = tmp_path / layout
        done = subprocess.run([sys.executable, script, f"output={out}", "classes=2", "train_per_class=2",
                               "val_per_class=1", f"layout={layout}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert (out / expected).exists() and "demo data:" in done.stdout
    bad = subprocess.run([sys.executable, script, f"output={tmp_path}/x", "layuot=folders"], capture_output=True, text=True)
    assert bad.returncode == 2 and "layuot" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
