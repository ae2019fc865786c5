"""GAN-test accuracy: does a classifier trained on real images name the class a sample was drawn for?

Shmelkov, Schmid and Alahari, "How good is my GAN?", ECCV 2018: train a classifier on the real
training images of a labelled dataset, then classify a conditional generator's samples; the
**GAN-test accuracy** is the fraction whose predicted class is the class they were generated for.
It rewards samples that look like their class (quality and conditioning), not their diversity
(a generator that draws one good image per class scores perfectly). The same classifier's accuracy
on the real validation images is the ceiling a perfect generator would reach; chance is 1 / classes,
and a generator that ignores its labels gets chance in expectation, whatever the classifier (with
every class sampled equally often, its predictions do not depend on the label). The figure depends
on the classifier, so it is comparable only between evaluations with the same classifier (its
``id`` is in every result): one dataset, one set of classifier settings.

The classifier is a small CNN (:class:`SmallClassifier`) trained once per shard set written by
``data_prep/shard.py`` (``<data>/train-*.tar``, ``<data>/val-*.tar``, ``<data>/manifest/``), on one
actor of the evaluation pool (so on a GPU node when the pool has GPUs). Its classes are the labels
of the training manifest, in ascending order. It is cached under ``<cache>/<id>/``
(``classifier.safetensors``, then ``classifier.json`` as the completion marker), where ``id`` hashes
the shard digests of both manifests (any change of the images gives a new classifier) and the
training settings. Training is seeded and reads the images in manifest order, so the same id means
the same classifier. All training images are decoded once into memory at ``image_size`` (ImageNet
at 32 px: ~4 GB and one JPEG decode per image).

Pixels: shards are read as evaluation reads them (``trainer.data``: shorter side resized to
``image_size``, bicubic and antialiased, center crop); samples of another size are resized to
``image_size`` the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cluster import storage
from evals.sources import BadInputError

log = logging.getLogger(__name__)

REFERENCE = 'Shmelkov, Schmid, Alahari: "How good is my GAN?", ECCV 2018'
# Part of the cache key: bump when the network, its training or its preprocessing change.
CLASSIFIER_VERSION = 1
WEIGHTS_FILE, META_FILE = "classifier.safetensors", "classifier.json"


# ----------------------------------------------------------------------------------------------
# What to train: the shard set, its digest and the settings


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything that determines the classifier (picklable; sent to the actor that trains it)."""

    data: str                     # shard folder (train-*.tar, val-*.tar, manifest/)
    classes: tuple[int, ...]      # dataset labels, ascending: the classifier's outputs in this order
    wnids: tuple[str, ...]        # the wnid of each class (names for per-class metrics)
    digest: str                   # sha256 over both splits' shard digests
    image_size: int
    width: int
    epochs: int
    batch_size: int
    lr: float
    seed: int
    cache: str                    # folder holding <id>/

    @property
    def id(self) -> str:
        settings = {"version": CLASSIFIER_VERSION, "digest": self.digest, "classes": list(self.classes),
                    "image_size": self.image_size, "width": self.width, "epochs": self.epochs,
                    "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def url(self) -> str:
        return storage.join(self.cache, self.id)

    def split(self, name: str) -> str:
        return storage.join(self.data, f"{name}-*.tar")


def classifier_spec(settings: Any) -> ClassifierSpec:
    """The spec of ``eval.gan_test`` (:class:`evals.schema.GanTestSettings`), from the shard manifests."""
    from data_prep import manifest

    data = str(settings.data).rstrip("/")
    digests = []
    for split in ("train", "val"):
        url = manifest.shards_url(data, split)
        if not storage.exists(url):
            raise BadInputError(f"eval.gan_test.data={data}: no {split} shard manifest ({url}); GAN-test needs "
                                "train and val shards written by data_prep/shard.py")
        table = manifest.read_table(url)
        if table.num_rows == 0 or sum(table.column("samples").to_pylist()) == 0:
            raise BadInputError(f"eval.gan_test.data={data}: the {split} split has no images")
        digests += [f"{split}:{s}:{d}" for s, d in sorted(zip(table.column("shard").to_pylist(),
                                                                table.column("digest").to_pylist()))]
    samples = manifest.read_table(manifest.samples_url(data, "train")).select(["label", "wnid"]).to_pylist()
    wnid_of = {int(row["label"]): str(row["wnid"]) for row in samples}
    classes = tuple(sorted(wnid_of))
    if len(classes) < 2:
        raise BadInputError(f"eval.gan_test.data={data}: GAN-test needs at least 2 classes, found {len(classes)}")
    digest = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return ClassifierSpec(data=data, classes=classes, wnids=tuple(wnid_of[c] for c in classes), digest=digest,
                          image_size=settings.image_size, width=settings.width, epochs=settings.epochs,
                          batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                          cache=str(settings.cache or storage.join(data, "gan_test")).rstrip("/"))


# ----------------------------------------------------------------------------------------------
# The network


class SmallClassifier(nn.Module):
    """Three conv-BN-ReLU stages (width, 2 width, 4 width; max-pooled between), global average pooling,
    a linear layer. Input: float NCHW in [0, 1] of the spec's image size."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*stage(3, width), nn.MaxPool2d(2), *stage(width, 2 * width), nn.MaxPool2d(2),
                                      *stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((images - 0.5) / 0.25))


def to_classifier_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 NCHW -> float NCHW in [0, 1] at ``image_size`` (bicubic, antialiased, clamped)."""
    x = images.float().div_(255.0)
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True,
                          align_corners=False).clamp_(0.0, 1.0)
    return x


# ----------------------------------------------------------------------------------------------
# Training (on a pool actor) and the cache


@dataclass
class ClassifierInfo:
    """The classifier's record (``classifier.json``): its spec and how well it does on real images."""

    id: str
    spec: dict[str, Any]
    classes: list[int]
    wnids: list[str]
    train_images: int
    val_images: int
    real_accuracy: float                       # on the validation images: the GAN-test ceiling
    real_per_class: dict[str, float]           # wnid -> accuracy on that class's validation images
    train_seconds: float = 0.0
    network: str = "SmallClassifier"
    reference: str = REFERENCE

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)


def read_split(url: str, spec: ClassifierSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as uint8 NCHW and class indices (manifest order; undecodable images skipped)."""
    from trainer.data import eval_batches

    index_of = {label: i for i, label in enumerate(spec.classes)}
    images, targets = [], []
    try:
        for batch in eval_batches(url, batch_size=256, image_size=spec.image_size, draft=False, uint8=True):
            unknown = sorted({int(v) for v in batch.labels.tolist()} - set(index_of))
            if unknown:
                raise BadInputError(f"{url}: labels {unknown[:5]} do not occur in the training split")
            images.append(batch.images.permute(0, 3, 1, 2).contiguous())
            targets.append(torch.tensor([index_of[int(v)] for v in batch.labels.tolist()]))
    except FileNotFoundError as err:
        raise BadInputError(str(err)) from None
    if not images:
        raise BadInputError(f"{url}: no readable images")
    return torch.cat(images), torch.cat(targets)


def _augment(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 1/8 of the side (edge pixels repeated)."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=rng) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=rng) for _ in range(2))
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None].expand(n, 3, h, w + 2 * pad)
    shifted = padded.gather(2, rows)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :].expand(n, 3, h, w)
    return shifted.gather(3, cols)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Row-wise accuracy of a confusion matrix [true, predicted] (NaN for a class with no rows)."""
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


def confusion_matrix(targets: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes] counts of (target, predicted) pairs."""
    flat = targets.long().cpu() * num_classes + predicted.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes).numpy()


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, image_size: int, batch_size: int = 256) -> torch.Tensor:
    """Predicted class indices of uint8 NCHW images (any device; the model's device is used)."""
    device = next(model.parameters()).device
    out = [torch.empty(0, dtype=torch.long)]
    for start in range(0, images.shape[0], batch_size):
        x = to_classifier_input(images[start:start + batch_size].to(device), image_size)
        out.append(model(x).argmax(dim=1).cpu())
    return torch.cat(out)


def train_classifier(spec: ClassifierSpec, device: torch.device | str = "cpu") -> tuple[SmallClassifier, ClassifierInfo]:
    """Train on ``<data>/train-*.tar`` and measure on ``<data>/val-*.tar`` (AdamW, cosine schedule,
    flips and shifts); seeded, so the same spec gives the same classifier on the same device and build."""
    started = time.perf_counter()
    device = torch.device(device)
    train_x, train_y = read_split(spec.split("train"), spec)
    val_x, val_y = read_split(spec.split("val"), spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = SmallClassifier(len(spec.classes), spec.width).to(device)
    rng = torch.Generator().manual_seed(spec.seed)
    steps_per_epoch = math.ceil(train_x.shape[0] / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    for _ in range(spec.epochs):
        order = torch.randperm(train_x.shape[0], generator=rng)
        for start in range(0, train_x.shape[0], spec.batch_size):
            rows = order[start:start + spec.batch_size]
            x = to_classifier_input(_augment(train_x[rows], rng).to(device), spec.image_size)
            loss = F.cross_entropy(model(x), train_y[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    confusion = confusion_matrix(val_y, predict(model, val_x, spec.image_size), len(spec.classes))
    per_class = per_class_accuracy(confusion)
    info = ClassifierInfo(
        id=spec.id, spec=json.loads(json.dumps(asdict(spec))), classes=list(spec.classes), wnids=list(spec.wnids),
        train_images=int(train_x.shape[0]), val_images=int(val_x.shape[0]),
        real_accuracy=float(np.trace(confusion) / confusion.sum()),
        real_per_class={w: float(a) for w, a in zip(spec.wnids, per_class) if np.isfinite(a)},
        train_seconds=round(time.perf_counter() - started, 2))
    log.info("GAN-test classifier %s: %d training images, %.4f accuracy on %d validation images (%.1fs)",
             info.id, info.train_images, info.real_accuracy, info.val_images, info.train_seconds)
    return model, info


def save_classifier(model: SmallClassifier, info: ClassifierInfo, url: str) -> None:
    """Weights first, then the record: a folder without ``classifier.json`` is not a finished classifier."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(url, WEIGHTS_FILE), save(state, metadata={"format": "pt"}))
    storage.write_text(storage.join(url, META_FILE), json.dumps(asdict(info), indent=2))


def cached_info(url: str) -> ClassifierInfo | None:
    """The record of a finished classifier at ``url``, or None."""
    meta = storage.join(url, META_FILE)
    if not storage.exists(meta):
        return None
    return ClassifierInfo(**json.loads(storage.read_text(meta)))


def load_classifier(url: str, device: torch.device | str = "cpu") -> tuple[SmallClassifier, ClassifierInfo]:
    from safetensors.torch import load

    info = cached_info(url)
    if info is None:
        raise FileNotFoundError(f"no finished GAN-test classifier at {url} ({META_FILE} missing)")
    model = SmallClassifier(len(info.classes), int(info.spec["width"]))
    model.load_state_dict(load(storage.read_bytes(storage.join(url, WEIGHTS_FILE))))
    return model.to(device).eval(), info


def ensure_classifier(spec: ClassifierSpec, device: torch.device | str = "cpu") -> ClassifierInfo:
    """The cached classifier of ``spec``, trained and cached first if there is none (two evaluations
    racing here both train the same classifier and write the same bytes)."""
    info = cached_info(spec.url)
    if info is not None:
        return info
    model, info = train_classifier(spec, device)
    save_classifier(model, info, spec.url)
    return info


# ----------------------------------------------------------------------------------------------
# Scoring samples (worker side) and the result (driver side)


class SampleScorer:
    """Loaded once per worker: classifies samples and counts (conditioning class, predicted class)."""

    def __init__(self, url: str, device: torch.device | str = "cpu") -> None:
        self.model, self.info = load_classifier(url, device)
        self._index_of = {label: i for i, label in enumerate(self.info.classes)}

    @property
    def num_classes(self) -> int:
        return len(self.info.classes)

    def confusion(self, images: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> np.ndarray:
        """[C, C] counts for uint8 NCHW ``images`` generated for dataset ``labels``."""
        labels = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
        missing = sorted(set(labels) - set(self._index_of))
        if missing:
            raise BadInputError(f"samples of classes {missing[:5]} cannot be GAN-tested: the classifier knows "
                                f"only the {self.num_classes} classes of its dataset")
        targets = torch.tensor([self._index_of[v] for v in labels])
        return confusion_matrix(targets, predict(self.model, images, self.info.spec["image_size"]), self.num_classes)


def gan_test_result(confusion: np.ndarray, info: ClassifierInfo) -> dict[str, Any]:
    """The ``gan_test`` entry of a generation result: overall and per-class accuracy, with the
    classifier's real-image accuracy (the ceiling) and chance, and what makes it comparable."""
    per_class = per_class_accuracy(confusion)
    total = int(confusion.sum())
    return {
        "metric": "GAN-test accuracy",
        "accuracy": float(np.trace(confusion) / total) if total else None,
        "per_class": {w: float(a) for w, a in zip(info.wnids, per_class) if np.isfinite(a)},
        "samples": total,
        "samples_per_class": {w: int(n) for w, n in zip(info.wnids, confusion.sum(axis=1)) if n},
        "real_accuracy": info.real_accuracy,
        "real_per_class": info.real_per_class,
        "chance": info.chance,
        "confusion": confusion.tolist(),
        "classes": info.classes,
        "wnids": info.wnids,
        "classifier": {"id": info.id, "network": info.network, "data": info.spec["data"],
                       "image_size": info.spec["image_size"], "train_images": info.train_images,
                       "val_images": info.val_images},
        "reference": REFERENCE,
        "comparable": "only with results of the same classifier id (one dataset, one classifier)",
    }

