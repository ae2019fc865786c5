"""A small ImageNet-shaped dataset drawn on the spot, for the demo and the tests.

    python data_prep/make_demo_data.py output=/tmp/demo-imagenet [classes=6 train_per_class=40 ...]

Each class is a real ImageNet wnid with a procedurally drawn look (colour and geometry differ per
class, position, scale, rotation and colours vary per image), so a tiny model can learn them and a
person can tell them apart. Files are real JPEGs of varied sizes in ImageNet's folder layout, with
ImageNet's quirks when ``quirks=true``: a CMYK JPEG, a grayscale JPEG, a PNG named ``.JPEG``, a
truncated JPEG and a zero-byte file. The same seed gives the same bytes.

The functions are reused by tests to build the three input forms ``data_prep/shard.py`` reads:
extracted folders (:func:`make_demo_tree`), a flat validation folder with a labels file
(:func:`to_flat_val`) and the original archives (:func:`to_archives`).
"""

from __future__ import annotations

import io
import math
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # `python data_prep/make_demo_data.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
from PIL import Image, ImageDraw

from data_prep.wnids import devkit_synsets

Painter = Callable[[np.random.Generator, int, int], Image.Image]


# ----------------------------------------------------------------------------------------------
# Drawing helpers


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: int = 25) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _gradient(rng: np.random.Generator, w: int, h: int, top: Sequence[int], bottom: Sequence[int],
              noise: float = 6.0) -> Image.Image:
    """Vertical gradient between two jittered colours plus a little pixel noise (texture for JPEG)."""
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    a = np.array(_jitter(rng, top), np.float32)
    b = np.array(_jitter(rng, bottom), np.float32)
    pixels = (1 - t) * a + t * b + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _star(cx: float, cy: float, r_out: float, r_in: float, angle: float, points: int = 5) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * points):
        r = r_out if k % 2 == 0 else r_in
        a = angle + k * math.pi / points
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


# ----------------------------------------------------------------------------------------------
# One painter per class


def _square(w: int, h: int) -> tuple[float, float, float]:
    """Centre and side of the central square: what a center crop keeps, so the demo's objects are
    placed relative to it."""
    return w / 2, h / 2, min(w, h)


def _paint_orange(rng, w, h):
    img = _gradient(rng, w, h, (150, 200, 245), (210, 235, 255))
    draw = ImageDraw.Draw(img)
    x0, y0, side = _square(w, h)
    r = side * rng.uniform(0.28, 0.36)
    cx, cy = x0 + side * rng.uniform(-0.08, 0.08), y0 + side * rng.uniform(-0.04, 0.1)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(rng, (245, 140, 20), 15),
                 outline=_jitter(rng, (200, 95, 10), 10), width=max(1, int(r / 8)))
    draw.ellipse((cx - r * 0.2, cy - r * 1.25, cx + r * 0.4, cy - r * 0.85), fill=(40, 140, 40))
    return img


def _paint_starfish(rng, w, h):
    img = _gradient(rng, w, h, (225, 200, 150), (200, 170, 120), noise=12)
    draw = ImageDraw.Draw(img)
    x0, y0, side = _square(w, h)
    r = side * rng.uniform(0.36, 0.46)
    cx, cy = x0 + side * rng.uniform(-0.06, 0.06), y0 + side * rng.uniform(-0.06, 0.06)
    draw.polygon(_star(cx, cy, r, r * rng.uniform(0.4, 0.5), rng.uniform(0, 2 * math.pi)),
                 fill=_jitter(rng, (230, 70, 40)), outline=(120, 30, 20))
    return img


def _paint_volcano(rng, w, h):
    img = _gradient(rng, w, h, (250, 170, 110), (120, 160, 220))
    draw = ImageDraw.Draw(img)
    x0, y0, side = _square(w, h)
    peak_x, peak_y = x0 + side * rng.uniform(-0.1, 0.1), y0 - side * rng.uniform(0.1, 0.2)
    half, top = side * rng.uniform(0.5, 0.65), side * 0.08
    draw.polygon([(peak_x - half, h), (peak_x - top, peak_y), (peak_x + top, peak_y), (peak_x + half, h)],
                 fill=_jitter(rng, (90, 55, 35), 15))
    draw.polygon([(peak_x - top, peak_y), (peak_x + top, peak_y), (peak_x, peak_y + side * 0.2)],
                 fill=_jitter(rng, (240, 60, 20), 15))
    r = side * rng.uniform(0.09, 0.12)
    draw.ellipse((peak_x - r, peak_y - 2.2 * r, peak_x + r, peak_y - 0.2 * r), fill=_jitter(rng, (130, 130, 130), 20))
    return img


def _paint_chainlink(rng, w, h):
    img = _gradient(rng, w, h, (30, 80, 40), (20, 60, 30), noise=10)
    draw = ImageDraw.Draw(img)
    x0, y0, side = _square(w, h)
    # A coarse diamond lattice whose lines cross at the centre: about two and a half meshes across
    # the crop, lines ~2.5 px wide at the demo's 32 px (thinner ones alias away at that size).
    step = side * rng.uniform(0.38, 0.44)
    width = max(2, int(side * 0.08))
    colour = _jitter(rng, (185, 185, 190), 15)
    reach = int((w + h) / step) + 1
    for k in range(-reach, reach + 1):  # lines of slope +1 and -1 through (x0 + k * step, y0)
        x = x0 + k * step
        draw.line((x - y0, 0, x + h - y0, h), fill=colour, width=width)
        draw.line((x + y0, 0, x - (h - y0), h), fill=colour, width=width)
    return img


def _paint_seashore(rng, w, h):
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    x0, y0, side = _square(w, h)
    horizon = y0 - side * rng.uniform(0.1, 0.2)
    shore = y0 + side * rng.uniform(0.15, 0.25)
    img.paste(_gradient(rng, w, h, (120, 180, 240), (190, 225, 250)).crop((0, 0, w, int(horizon) + 1)), (0, 0))
    draw.rectangle((0, horizon, w, shore), fill=_jitter(rng, (20, 70, 150), 15))
    y = (horizon + shore) / 2 + side * rng.uniform(-0.05, 0.05)
    draw.line([(x, y + side * 0.03 * math.sin(x / side * 8)) for x in range(0, w, 2)], fill=(235, 240, 250),
              width=max(2, int(side * 0.07)))
    draw.rectangle((0, shore, w, h), fill=_jitter(rng, (230, 205, 150), 15))
    return img


def _paint_jellyfish(rng, w, h):
    img = _gradient(rng, w, h, (10, 20, 60), (5, 10, 35), noise=5)
    draw = ImageDraw.Draw(img)
    x0, y0, side = _square(w, h)
    cx, top = x0 + side * rng.uniform(-0.08, 0.08), y0 - side * rng.uniform(0.3, 0.4)
    rx, ry = side * rng.uniform(0.28, 0.34), side * rng.uniform(0.18, 0.24)
    colour = _jitter(rng, (200, 90, 220), 25)
    # Three tentacles ~2.5 px wide at the demo's 32 px (four thinner ones blurred into a smear there).
    for k in range(3):
        tx = cx - rx * 0.55 + k * (1.1 * rx / 2)
        pts = [(tx + side * 0.03 * math.sin(t / side * 10 + k), top + ry + t) for t in range(0, int(side * 0.55), 2)]
        draw.line(pts, fill=colour, width=max(2, int(side * 0.08)))
    draw.pieslice((cx - rx, top, cx + rx, top + 2 * ry), 180, 360, fill=colour)
    return img


def _paint_soccer_ball(rng, w, h):
    img = _gradient(rng, w, h, (60, 150, 60), (40, 120, 40), noise=8)
    draw = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.25, 0.4)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(245, 245, 245), outline=(30, 30, 30))
    angle = rng.uniform(0, 2 * math.pi)
    for k in range(5):
        a = angle + k * 2 * math.pi / 5
        px, py = cx + 0.6 * r * math.cos(a), cy + 0.6 * r * math.sin(a)
        draw.regular_polygon((px, py, r * 0.18), 5, rotation=math.degrees(a), fill=(20, 20, 20))
    draw.regular_polygon((cx, cy, r * 0.2), 5, rotation=math.degrees(angle), fill=(20, 20, 20))
    return img


def _paint_picket_fence(rng, w, h):
    img = _gradient(rng, w, h, (130, 190, 245), (90, 170, 80), noise=8)
    draw = ImageDraw.Draw(img)
    step = int(rng.integers(10, 18))
    board = max(3, int(step * 0.6))
    top = h * rng.uniform(0.2, 0.4)
    colour = _jitter(rng, (245, 245, 240), 8)
    for x in range(int(rng.integers(0, step)), w, step):
        draw.rectangle((x, top, x + board, h), fill=colour)
        draw.polygon([(x, top), (x + board / 2, top - board * 0.8), (x + board, top)], fill=colour)
    draw.rectangle((0, top + (h - top) * 0.25, w, top + (h - top) * 0.25 + 3), fill=colour)
    return img


@dataclass(frozen=True)
class DemoClass:
    wnid: str
    name: str
    paint: Painter


DEMO_CLASSES: tuple[DemoClass, ...] = (
    DemoClass("n07747607", "orange", _paint_orange),
    DemoClass("n02317335", "starfish", _paint_starfish),
    DemoClass("n09472597", "volcano", _paint_volcano),
    DemoClass("n03000134", "chainlink fence", _paint_chainlink),
    DemoClass("n09428293", "seashore", _paint_seashore),
    DemoClass("n01910747", "jellyfish", _paint_jellyfish),
    DemoClass("n04254680", "soccer ball", _paint_soccer_ball),
    DemoClass("n03930313", "picket fence", _paint_picket_fence),
)

_SPLIT_IDS = {"train": 0, "val": 1}


def draw_image(class_index: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One RGB image of demo class ``class_index``."""
    return DEMO_CLASSES[class_index].paint(rng, width, height)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# The tree


@dataclass(frozen=True)
class DemoFile:
    """One written file. ``kind``: jpeg, cmyk, gray, png (usable) or truncated, empty (rejected)."""

    path: str        # relative to the tree root, e.g. train/n07747607/n07747607_3.JPEG
    split: str
    wnid: str
    kind: str

    @property
    def usable(self) -> bool:
        return self.kind in ("jpeg", "cmyk", "gray", "png")


@dataclass
class DemoTree:
    root: Path
    files: list[DemoFile] = field(default_factory=list)

    def of_split(self, split: str) -> list[DemoFile]:
        return [f for f in self.files if f.split == split]


QUIRK_KINDS = ("cmyk", "gray", "png", "truncated", "empty")


def _quirk_bytes(kind: str, image: Image.Image) -> bytes:
    out = io.BytesIO()
    if kind == "cmyk":
        image.convert("CMYK").save(out, format="JPEG", quality=90)
    elif kind == "gray":
        image.convert("L").save(out, format="JPEG", quality=90)
    elif kind == "png":
        image.save(out, format="PNG")
    elif kind == "truncated":
        data = encode_jpeg(image)
        out.write(data[: len(data) // 2])
    elif kind != "empty":
        raise ValueError(kind)
    return out.getvalue()


def _image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """(w, h): the shorter side from [min_size, max_size], the longer one up to 4:3 (most ImageNet
    photos), both within the range. Wider ratios would let the training crops (shorter side to the
    model's size, a random square of it) cut off the centred objects that evaluation's center crop keeps."""
    short = int(rng.integers(min_size, max_size + 1))
    long = min(max_size, int(round(short * rng.uniform(1.0, 4.0 / 3.0))))
    return (long, short) if rng.random() < 0.5 else (short, long)


def make_demo_tree(output: str | Path, classes: int = 6, train_per_class: int = 40, val_per_class: int = 8,
                   min_size: int = 64, max_size: int = 160, seed: int = 0, quirks: bool = True) -> DemoTree:
    """Write ``train/<wnid>/<wnid>_<i>.JPEG`` and ``val/<wnid>/...`` under ``output``.

    With ``quirks`` the train split gets five extra files, one per kind in :data:`QUIRK_KINDS`, spread
    over the classes (CMYK, grayscale and PNG are usable images of their class; the truncated and
    the zero-byte file must be rejected).
    """
    root = Path(output)
    tree = DemoTree(root)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            cls = DEMO_CLASSES[c]
            folder = root / split / cls.wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], c, i])
                w, h = _image_size(rng, min_size, max_size)
                image = draw_image(c, rng, w, h)
                rel = f"{split}/{cls.wnid}/{cls.wnid}_{i}.JPEG"
                (root / rel).write_bytes(encode_jpeg(image, quality=int(rng.integers(80, 96))))
                tree.files.append(DemoFile(rel, split, cls.wnid, "jpeg"))
    if quirks:
        for k, kind in enumerate(QUIRK_KINDS):
            c = k % classes
            cls = DEMO_CLASSES[c]
            rng = np.random.default_rng([seed, 7, c, k])
            w, h = _image_size(rng, min_size, max_size)
            rel = f"train/{cls.wnid}/{cls.wnid}_{train_per_class + k}.JPEG"
            (root / rel).write_bytes(_quirk_bytes(kind, draw_image(c, rng, w, h)))
            tree.files.append(DemoFile(rel, "train", cls.wnid, kind))
    return tree


# ----------------------------------------------------------------------------------------------
# The other input forms


def flat_val_order(tree: DemoTree, seed: int = 0) -> list[DemoFile]:
    """Validation files in the order of their flat names ILSVRC2012_val_00000001.JPEG, ...
    (classes interleaved, as in ImageNet)."""
    files = tree.of_split("val")
    order = np.random.default_rng([seed, 99]).permutation(len(files))
    return [files[i] for i in order]


def flat_val_name(index: int) -> str:
    return f"ILSVRC2012_val_{index + 1:08d}.JPEG"


def devkit_ground_truth(files: Sequence[DemoFile]) -> str:
    """``ILSVRC2012_validation_ground_truth.txt`` content: the devkit ID of each file, in order."""
    ids = {wnid: i + 1 for i, wnid in enumerate(devkit_synsets())}
    return "".join(f"{ids[f.wnid]}\n" for f in files)


def kaggle_solution(files: Sequence[DemoFile]) -> str:
    """``LOC_val_solution.csv`` content (box coordinates are placeholders)."""
    lines = ["ImageId,PredictionString"]
    for i, f in enumerate(files):
        lines.append(f"{flat_val_name(i)[:-5]},{f.wnid} 0 0 10 10 {f.wnid} 1 1 5 5")
    return "\n".join(lines) + "\n"


def to_flat_val(tree: DemoTree, output: str | Path, labels: str = "kaggle", seed: int = 0) -> list[tuple[str, DemoFile]]:
    """Write ``<output>/val/ILSVRC2012_val_*.JPEG`` and the labels file (``kaggle``:
    ``<output>/LOC_val_solution.csv``; ``devkit``: ``<output>/ILSVRC2012_validation_ground_truth.txt``).
    Returns (flat name, source file) pairs."""
    out = Path(output)
    (out / "val").mkdir(parents=True, exist_ok=True)
    files = flat_val_order(tree, seed)
    pairs = []
    for i, f in enumerate(files):
        name = flat_val_name(i)
        (out / "val" / name).write_bytes((tree.root / f.path).read_bytes())
        pairs.append((name, f))
    if labels == "kaggle":
        (out / "LOC_val_solution.csv").write_text(kaggle_solution(files))
    elif labels == "devkit":
        (out / "ILSVRC2012_validation_ground_truth.txt").write_text(devkit_ground_truth(files))
    else:
        raise ValueError(f"labels must be kaggle or devkit, got {labels!r}")
    return pairs


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_325_376_000, 0o644  # 2012-01-01, like the originals
    tar.addfile(info, io.BytesIO(data))


def to_archives(tree: DemoTree, output: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ImageNet's original archives: ``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class
    holding ``<wnid>_<i>.JPEG``), ``ILSVRC2012_img_val.tar`` (flat ``ILSVRC2012_val_*.JPEG``) and the
    devkit ground truth for the latter."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    train_tar = out / "ILSVRC2012_img_train.tar"
    by_class: dict[str, list[DemoFile]] = {}
    for f in tree.of_split("train"):
        by_class.setdefault(f.wnid, []).append(f)
    with tarfile.open(train_tar, "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid in sorted(by_class):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w", format=tarfile.GNU_FORMAT) as inner:
                for f in by_class[wnid]:
                    _add_bytes(inner, Path(f.path).name, (tree.root / f.path).read_bytes())
            _add_bytes(outer, f"{wnid}.tar", inner_bytes.getvalue())
    val_tar = out / "ILSVRC2012_img_val.tar"
    files = flat_val_order(tree, seed)
    with tarfile.open(val_tar, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, f in enumerate(files):
            _add_bytes(tar, flat_val_name(i), (tree.root / f.path).read_bytes())
    truth = out / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text(devkit_ground_truth(files))
    return {"train": train_tar, "val": val_tar, "ground_truth": truth}


# ----------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """Write the demo dataset in the chosen layout and print a one-line summary."""
    import shutil
    import tempfile

    from data_prep.schema import DemoDataConfig, DemoLayout
    from trainer.config import load_config

    cfg = load_config("demo_data", DemoDataConfig, argv, description=__doc__.split("\n\n")[0])
    output = Path(cfg.output)
    kwargs = dict(classes=cfg.classes, train_per_class=cfg.train_per_class, val_per_class=cfg.val_per_class,
                  min_size=cfg.min_size, max_size=cfg.max_size, seed=cfg.seed, quirks=cfg.quirks)
    if cfg.layout == DemoLayout.folders:
        tree = make_demo_tree(output, **kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="demo-tree-") as tmp:
            tree = make_demo_tree(tmp, **kwargs)
            if cfg.layout == DemoLayout.archives:
                to_archives(tree, output, seed=cfg.seed)
            else:
                shutil.copytree(Path(tmp) / "train", output / "train", dirs_exist_ok=True)
                to_flat_val(tree, output, labels="kaggle", seed=cfg.seed)
    usable = sum(f.usable for f in tree.files)
    print(f"demo data: {len(tree.files)} files ({usable} usable, {len(tree.files) - usable} to be rejected), "
          f"{cfg.classes} classes ({', '.join(c.name for c in DEMO_CLASSES[:cfg.classes])}), "
          f"layout={cfg.layout.value} -> {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
