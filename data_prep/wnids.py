"""ImageNet-1k class lists shipped with the package.

* ``imagenet_wnids.txt``: the 1000 ILSVRC-2012 synsets sorted; line ``i`` is label ``i``. This is the
  class index of torchvision's ``ImageFolder``/``ImageNet`` and of the TiTok checkpoints.
* ``imagenet_devkit_synsets.txt``: the same synsets in the devkit's order (``meta.mat``); line ``i`` is
  ``ILSVRC2012_ID`` ``i + 1``, the numbers used by ``ILSVRC2012_validation_ground_truth.txt``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

_HERE = Path(__file__).resolve().parent
WNID_PATTERN = re.compile(r"^n\d{8}$")
NUM_CLASSES = 1000


def _read_list(path: Path) -> tuple[str, ...]:
    return tuple(line.split()[0] for line in path.read_text().splitlines() if line.strip())


@functools.lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 wnids in label order (sorted)."""
    return _read_list(_HERE / "imagenet_wnids.txt")


@functools.lru_cache(maxsize=None)
def wnid_to_label() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}


@functools.lru_cache(maxsize=None)
def devkit_synsets() -> tuple[str, ...]:
    """The 1000 wnids in devkit order: ``devkit_synsets()[ilsvrc2012_id - 1]``."""
    return _read_list(_HERE / "imagenet_devkit_synsets.txt")


def read_synset_order(path: str | Path) -> tuple[str, ...]:
    """A synset order from a text file: one wnid per line, optionally followed by the ID and a name
    (the devkit's ``map_clsloc.txt`` format ``n02119789 1 kit_fox`` works as is)."""
    order = _read_list(Path(path))
    bad = [w for w in order if not WNID_PATTERN.match(w)]
    if bad:
        raise ValueError(f"{path}: not a synset list (first bad entry {bad[0]!r})")
    return order


def is_wnid(name: str) -> bool:
    return bool(WNID_PATTERN.match(name))
