"""Fixtures of the evals tests: a random-weights Inception file and small image folders.

The real Inception weights cannot be downloaded here; the same architecture with random weights
(data-dependent init, see evals.inception.random_inception_state_dict) goes through the same loading
path (a .pth read with weights_only=True). Images are tiny (the network resizes to 299 anyway):
Inception on these 2 cores runs at ~10 images/s, so every image costs ~0.1 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGES_PER_SET = 20


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    from evals.inception import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "weights-random.pth", seed=0)


def write_images(folder: Path, count: int, seed: int, shift: float, size: int = 32) -> list[np.ndarray]:
    """Smooth random colour fields plus noise; ``shift`` moves the colour distribution."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        base = rng.uniform(0, 255, (4, 4, 3))
        field = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((size, size), Image.BILINEAR), dtype=np.float64)
        pixels = np.clip(field + rng.normal(0, 25, (size, size, 3)) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
        images.append(pixels)
    return images


def write_shard(url: str, first: int, count: int, rng: np.random.Generator, min_size: int = 40,
                max_size: int = 70) -> None:
    """A WebDataset shard as data_prep/shard.py writes it: ``{key}.jpg`` + ``{key}.cls`` per sample."""
    import io
    import tarfile

    from cluster import storage

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(first, first + count):
            w, h = (int(v) for v in rng.integers(min_size, max_size, 2))
            low = rng.uniform(0, 255, (3, 3, 3)).astype(np.uint8)
            field = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR), dtype=np.float64)
            pixels = np.clip(field + rng.normal(0, 20, field.shape), 0, 255).astype(np.uint8)
            jpeg = io.BytesIO()
            Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
            for ext, data in (("jpg", jpeg.getvalue()), ("cls", str(i % 5).encode())):
                info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    storage.write_bytes(url, buffer.getvalue())


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two folders of PNGs from different distributions (input1, input2)."""
    root = tmp_path_factory.mktemp("folders")
    write_images(root / "a", IMAGES_PER_SET, seed=1, shift=0)
    write_images(root / "b", IMAGES_PER_SET, seed=2, shift=40)
    return str(root / "a"), str(root / "b")


@pytest.fixture(scope="session")
def fidelity_reference(image_folders: tuple[str, str], inception_weights: str) -> dict[str, float]:
    """torch-fidelity's own FID and IS on the folders (its CLI-equivalent API, single process).

    One thread, like each pool worker (eval.cpus_per_worker=1): oneDNN's float32 convolutions round
    differently with another thread count (~1e-6 relative on features), which the IS std amplifies."""
    import torch
    import torch_fidelity

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch_fidelity.calculate_metrics(
            input1=image_folders[0], input2=image_folders[1], fid=True, isc=True, cuda=False, batch_size=8,
            feature_extractor_weights_path=inception_weights, cache=False, save_cpu_ram=True, verbose=False)
    finally:
        torch.set_num_threads(threads)


def eval_config(*overrides: str):
    """An EvalConfig built by the same merge as the command line."""
    from evals.schema import EvalConfig
    from trainer.config import build_config

    return build_config("eval", EvalConfig, list(overrides))
